"""The Flow module: any torch transform as a layer, any base distribution kept as buffers."""

from __future__ import annotations

import pyro.distributions as pdist
import pyro.distributions.transforms as ptransforms
import torch
from torch.distributions import Independent, Normal, TransformedDistribution, Uniform
from torch.distributions.transforms import AffineTransform, SigmoidTransform

import pyro_flowpack as pf
from pyro_flowpack.transforms import AffineCoupling, MaskedAffineAutoregressive, Reverse


def test_flow_accepts_plain_torch_transforms_with_exact_log_prob():
    torch.manual_seed(0)
    coupling = AffineCoupling(3, hidden=(8,))
    with torch.no_grad():
        for p in coupling.parameters():
            p.add_(0.1 * torch.randn_like(p))
    affine = AffineTransform(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2.0, 0.5, 1.5]))
    flow = pf.Flow([coupling, affine, SigmoidTransform()])
    x = torch.rand(10, 3, dtype=torch.float32) * 0.9 + 0.05
    reference = TransformedDistribution(flow.base(), [coupling, affine, SigmoidTransform()])
    assert torch.allclose(flow().log_prob(x), reference.log_prob(x), atol=1e-5)
    s = flow().sample((4,))
    assert s.shape == (4, 3) and ((s > 0) & (s < 1)).all()


def test_flow_registers_parameters_of_pyro_transform_modules():
    spline = ptransforms.Spline(2, count_bins=4)
    flow = pf.Flow([spline, Reverse(2)], base=Independent(Normal(torch.zeros(2), torch.ones(2)), 1))
    names = {name for name, _ in flow.named_parameters()}
    assert {f"transform.modules_.0.{n}" for n, _ in spline.named_parameters()} <= names
    x = torch.randn(5, 2)
    assert flow().log_prob(x).shape == (5,)


def test_custom_base_is_kept_as_buffers_and_moves_with_the_flow():
    base = Normal(torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.5]))  # batch shape (2,): reinterpreted
    flow = pf.Flow([MaskedAffineAutoregressive(2, hidden=(4,))], base=base)
    assert set(flow.state_dict()) >= {"base_loc", "base_scale"}
    x = torch.randn(7, 2)
    expected = base.log_prob(x).sum(-1)  # the layer starts at the identity
    assert torch.allclose(flow().log_prob(x), expected, atol=1e-6)
    flow64 = flow.to(torch.float64)
    assert flow64().base_dist.mean.dtype == torch.float64
    assert torch.allclose(flow64().log_prob(x.double()), expected.double(), atol=1e-6)


def test_custom_base_survives_state_dict_into_a_fresh_flow():
    def build():
        return pf.Flow([Reverse(2)], base=pdist.Uniform(torch.zeros(2), torch.ones(2)).to_event(1))

    flow = build()
    flow.base_low.fill_(-3.0)  # a buffer like any other
    fresh = build()
    fresh.load_state_dict(flow.state_dict())
    assert torch.equal(fresh().base_dist.base_dist.low, torch.full((2,), -3.0))
    assert isinstance(fresh().base_dist.base_dist, Uniform)


def test_flow_distribution_is_a_pyro_transformed_distribution():
    d = pf.flows.NSF(2)()
    assert isinstance(d, pdist.TransformedDistribution)
    assert d.has_rsample
    expanded = d.expand((4,))
    assert expanded.batch_shape == (4,) and expanded.sample().shape == (4, 2)


def test_flow_trains_by_maximum_likelihood():
    """A few hundred Adam steps of exact NLL on a shifted, correlated Gaussian bring the
    NLL within 0.1 nats of the data's true entropy (a real optimisation check)."""
    torch.manual_seed(0)
    scale_tril = torch.tensor([[1.0, 0.0], [0.8, 0.5]])
    target = torch.distributions.MultivariateNormal(torch.tensor([2.0, -1.0]), scale_tril=scale_tril)
    x = target.sample((2048,))
    flow = pf.flows.MAF(2, transforms=2, hidden=(16, 16))
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(300):
        loss = -flow().log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        nll = -flow().log_prob(x).mean()
    assert nll < target.entropy() + 0.1, (nll, target.entropy())


def test_clear_cache_after_an_update_through_data():
    """Version counters do not see ``.data`` writes; ``flow.clear_cache()`` forgets every
    layer's evaluation so the next log_prob is fresh (float32, 1e-6)."""
    torch.manual_seed(0)
    flow = pf.flows.RealNVP(3, transforms=2, hidden=(8,))
    d = flow()
    y = d.rsample((5,))
    for p in flow.parameters():
        p.data.add_(0.1)
    flow.clear_cache()
    assert torch.allclose(d.log_prob(y), d.log_prob(y.clone()), atol=1e-6)


def test_a_parameter_replaced_by_a_new_tensor_of_the_same_version_invalidates_the_cache():
    """Assigning a new Parameter whose version counter equals the old one's must not
    serve the old evaluation: log_prob of the very sample equals a fresh evaluation (1e-6)
    and differs from the old value."""
    torch.manual_seed(0)
    flow = pf.flows.MAF(3, transforms=1, hidden=(8,))
    layer = flow.transform.parts[0]
    d = flow()
    y = d.rsample((5,))
    before = d.log_prob(y).detach()
    last = layer.conditioner.net[-1]
    new = torch.nn.Parameter(torch.randn_like(last.weight))
    with torch.no_grad():
        while new._version < last.weight._version:
            new.mul_(1.0)  # each in-place operation bumps the version by one
    assert new._version == last.weight._version
    last.weight = new
    after = d.log_prob(y)
    assert torch.allclose(after, d.log_prob(y.clone()), atol=1e-6)
    assert (after - before).abs().min() > 1e-3


def test_load_state_dict_invalidates_the_cache():
    torch.manual_seed(0)
    flow, other = pf.flows.NSF(2, transforms=2, hidden=(8,)), pf.flows.NSF(2, transforms=2, hidden=(8,))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = flow()
    y = d.rsample((5,))
    d.log_prob(y)
    flow.load_state_dict(other.state_dict())
    assert torch.allclose(d.log_prob(y), other().log_prob(y.clone()), atol=1e-6)


def test_data_edit_of_a_sample_is_not_seen_until_clear_cache():
    """The documented limit: a ``.data`` write bypasses version counters, so the cache
    still answers for the old value; ``flow.clear_cache()`` makes log_prob fresh again,
    while an ordinary in-place edit is seen at once."""
    torch.manual_seed(0)
    flow = pf.flows.MAF(3, transforms=2, hidden=(8,))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = flow()
    y = d.sample((5,))
    y.data[0] += 1.0
    flow.clear_cache()
    assert torch.allclose(d.log_prob(y), d.log_prob(y.clone()), atol=1e-6)
    z = d.sample((5,))
    z[0] += 1.0  # in place: the version counter moves
    assert torch.allclose(d.log_prob(z), d.log_prob(z.clone()), atol=1e-6)
