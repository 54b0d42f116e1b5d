"""Dequantization: integer data, fresh noise, and a bound that holds against the exact
discrete likelihood."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

import pyro_flowpack as pf
from pyro_flowpack.infer import iw_log_prob
from pyro_flowpack.transforms import Logit, UniformDequantization, VariationalDequantization

K = 5
ALPHA = 0.05


def _exact_log_prob(x: torch.Tensor) -> torch.Tensor:
    """log P(x) for the flow [Logit(alpha), UniformDequantization(K)] on a standard normal
    base: the mass of [x/K, (x+1)/K) under y = (sigmoid(z) - alpha) / (1 - 2 alpha)."""
    def z(y):
        return torch.logit(ALPHA + (1 - 2 * ALPHA) * y)

    normal = Normal(torch.zeros((), dtype=torch.float64), 1.0)
    mass = normal.cdf(z((x + 1) / K)) - normal.cdf(z(x / K))
    return mass.log().sum(-1)


def _logit_flow(dequantization) -> pf.Flow:
    return pf.Flow([Logit(2, ALPHA), dequantization]).double()


def test_uniform_bound_is_below_exact_and_iw_converges_to_it():
    torch.manual_seed(0)
    flow = _logit_flow(UniformDequantization(2, K))
    x = torch.tensor([[0, 4], [2, 2], [1, 3]])
    exact = _exact_log_prob(x.double())
    bound = torch.stack([flow().log_prob(x) for _ in range(4000)]).mean(0)
    assert (bound < exact).all()  # Jensen: the expected bound is below log P(x)
    # the importance-weighted estimate tightens with k: within 0.02 nats at k = 4096
    iw = iw_log_prob(flow(), x, k=4096)
    assert (iw > bound - 1e-3).all()  # 1e-3: Monte Carlo error where the bin's gap is ~0
    assert torch.allclose(iw, exact, atol=0.02), (iw, exact)


def test_variational_bound_is_below_exact_on_average():
    torch.manual_seed(0)
    flow = _logit_flow(VariationalDequantization(2, K, steps=2, hidden=8))
    with torch.no_grad():  # a non-trivial q
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.tensor([[0, 4], [2, 2]])
    bound = torch.stack([flow().log_prob(x) for _ in range(4000)]).mean(0)
    assert (bound < _exact_log_prob(x.double())).all()


def test_variational_noise_density_integrates_to_one_and_matches_log_q():
    """q(u | x) is a normalised density on [0, 1)^2 (grid integral within 1e-2), and the
    log q returned with a draw equals log_q recomputed from the draw (float64, 1e-8)."""
    torch.manual_seed(0)
    layer = VariationalDequantization(2, K, steps=2, hidden=8).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.tensor([3.0, 1.0], dtype=torch.float64)
    n = 400
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    u = torch.cartesian_prod(grid, grid)
    mass = layer.log_q(x.expand(len(u), 2), u).exp().mean()
    assert abs(mass.item() - 1) < 1e-2
    draws, log_q = layer.noise(x.expand(16, 2))
    assert ((draws > 0) & (draws < 1)).all()
    assert torch.allclose(layer.log_q(x.expand(16, 2), draws), log_q, atol=1e-8)


@pytest.mark.parametrize("kind", ["uniform", "variational"])
def test_log_prob_draws_fresh_noise_every_call_even_for_own_samples(kind):
    torch.manual_seed(0)
    flow = pf.flows.Glow((1, 4, 4), levels=1, steps=1, hidden_channels=8, dequantization=kind, num_bins=K)
    d = flow()
    x = d.sample((3,))
    first, second = d.log_prob(x), d.log_prob(x)
    assert not torch.equal(first, second)
    y = d.rsample((3,))  # the continuous sample must not be handed back by a cache
    assert not torch.equal(d.log_prob(y), d.log_prob(y))


@pytest.mark.parametrize("builder", [pf.flows.Glow, pf.flows.MultiscaleRealNVP])
@pytest.mark.parametrize("kind", ["uniform", "variational"])
def test_sampling_returns_integers_in_range(builder, kind):
    torch.manual_seed(0)
    flow = builder((1, 8, 8), levels=2, steps=1, hidden_channels=8, dequantization=kind, num_bins=K)
    for temperature in (1.0, 0.5):
        s = flow().sample((6,), temperature=temperature)
        assert s.shape == (6, 1, 8, 8) and s.dtype == torch.long
        assert s.min() >= 0 and s.max() < K
    lp = flow().log_prob(s.to(torch.uint8))  # uint8 pixels are accepted as they are
    assert lp.shape == (6,) and torch.isfinite(lp).all()


@pytest.mark.parametrize("kind", ["uniform", "variational"])
def test_dequantized_flow_trains_and_gradients_reach_q(kind):
    torch.manual_seed(0)
    flow = pf.flows.Glow((1, 4, 4), levels=1, steps=1, hidden_channels=8, dequantization=kind, num_bins=K)
    x = torch.randint(0, K, (32, 1, 4, 4))
    loss = -flow().log_prob(x).mean()
    loss.backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None, name


def test_bits_per_dim_includes_the_bin_width():
    """A flow that is uniform on [0, 1)^D gives exactly log2(K) bits per dimension."""
    base = torch.distributions.Uniform(torch.zeros(4), torch.ones(4))
    flow = pf.Flow([UniformDequantization(4, 16)], base=base)
    x = torch.randint(0, 16, (10, 4))
    bpd = pf.infer.bits_per_dim(flow().log_prob(x), 4)
    assert torch.allclose(bpd, torch.full((10,), math.log2(16)), atol=1e-6)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.tensor([[0.5, 1.0]]), r"integer values in \[0, 5\), got non-integer values"),
        (torch.tensor([[0.0, 5.0]]), r"integer values in \[0, 5\), got values in \[0, 5\]"),
        (torch.tensor([[-1.0, 2.0]]), r"integer values in \[0, 5\), got values in \[-1, 2\]"),
        (torch.tensor([[1.0, 2.0, 3.0]]), r"trailing \(event\) shape \(2,\), got a tensor of shape \(1, 3\)"),
    ],
)
def test_bad_discrete_input_is_a_clear_error(value, message):
    torch.distributions.Distribution.set_default_validate_args(True)
    flow = pf.Flow([Logit(2), UniformDequantization(2, K)])
    with pytest.raises(ValueError, match=message):
        flow().log_prob(value)


def test_invalid_options():
    with pytest.raises(ValueError, match="num_bins must be an int >= 2, got 1"):
        UniformDequantization(3, 1)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        VariationalDequantization(3, 4, steps=0)
    with pytest.raises(ValueError, match="'uniform', 'variational' or None, got 'gaussian'"):
        pf.flows.Glow((1, 4, 4), levels=1, dequantization="gaussian")
    with pytest.raises(ValueError, match=r"divisible by 4, got \(1, 6, 6\)"):
        pf.flows.Glow((1, 6, 6), levels=2)


@pytest.mark.parametrize("builder", [pf.flows.Glow, pf.flows.MultiscaleRealNVP])
@pytest.mark.parametrize("steps", [0, 2.5])
def test_image_builders_reject_bad_steps(builder, steps):
    with pytest.raises(ValueError, match=f"steps must be a positive int .* got {steps}"):
        builder((1, 4, 4), levels=1, steps=steps)
