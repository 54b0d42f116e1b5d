r"""Learnable bases: the modules of ``pyro_flowpack.bases`` and distributions built from
``nn.Parameter``\ s, kept by :class:`~pyro_flowpack.flow.Flow` as trainable parameters.

Every base below, at D = 1 and D = 3, has the analytic density (scipy's), trains with
the flow, moves with it, survives copies and reloads, passes reparameterised gradients
to its parameters, works inside Pyro, and a base the flow cannot keep is refused."""

from __future__ import annotations

import copy
import io
import pickle
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyro
import pyro.distributions as pdist
import pytest
import scipy.special
import scipy.stats
import torch
import torch.nn as nn
from pyro.distributions.torch_distribution import MaskedDistribution, TorchDistributionMixin
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.mcmc.util import initialize_model
from pyro.infer.reparam import NeuTraReparam
from torch import Tensor
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal
from torch.distributions.transforms import AffineTransform

import pyro_flowpack as pf
from pyro_flowpack.bases import DiagonalGaussian, DiagonalNormalMixture, GaussianMixture, StudentT, temper
from pyro_flowpack.transforms import MaskedAffineAutoregressive

FEATURES = [1, 3]


@dataclass
class Made:
    """A base as passed to ``Flow``, its scipy log-density (read from the current
    parameter values), its parameters with their ``state_dict`` names, and those of
    them that must stay positive."""

    base: object
    reference: Callable[[Tensor], np.ndarray]
    parameters: dict[str, nn.Parameter]
    positive: tuple[str, ...] = ()
    #: Builds a distribution base again from its parameters (a distribution holds
    #: tensors derived from them, such as normalised logits, fixed when it was built).
    rebuild: Callable[[], object] | None = None


def _np(t: Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _mixture_log_density(x: Tensor, log_weights: Tensor, loc: Tensor, scale: Tensor) -> np.ndarray:
    per_component = scipy.stats.norm.logpdf(_np(x)[:, None, :], _np(loc), _np(scale)).sum(-1)
    return scipy.special.logsumexp(_np(log_weights) + per_component, axis=-1)


def _module(base: nn.Module, reference: Callable[[Tensor], np.ndarray]) -> Made:
    return Made(base, reference, {f"base_module.{n}": p for n, p in base.named_parameters()})


def diagonal_gaussian(D: int) -> Made:
    b = DiagonalGaussian(D)
    return _module(b, lambda x: scipy.stats.norm.logpdf(_np(x), _np(b.loc), _np(b.log_scale.exp())).sum(-1))


def student_t(D: int, learn_df: bool = False) -> Made:
    b = StudentT(D, df=4.0, learn_df=learn_df)
    return _module(b, lambda x: scipy.stats.t.logpdf(_np(x), _np(b.df), _np(b.loc), _np(b.log_scale.exp())).sum(-1))


def gaussian_mixture(D: int) -> Made:
    b = GaussianMixture(D, components=3)
    return _module(b, lambda x: _mixture_log_density(x, b.logits.log_softmax(-1), b.loc, b.log_scale.exp()))


def normal_of_parameters(D: int) -> Made:
    loc, scale = nn.Parameter(torch.zeros(D)), nn.Parameter(torch.ones(D))
    reference = lambda x: scipy.stats.norm.logpdf(_np(x), _np(loc), _np(scale)).sum(-1)  # noqa: E731
    return Made(Independent(Normal(loc, scale), 1), reference, {"base_loc": loc, "base_scale": scale}, ("base_scale",))


def mixture_of_parameters(D: int) -> Made:
    logits = nn.Parameter(torch.zeros(3))
    loc = nn.Parameter(torch.linspace(-1.0, 1.0, 3).unsqueeze(-1).repeat(1, D))
    scale = nn.Parameter(torch.ones(3, D))
    def build():
        return MixtureSameFamily(Categorical(logits=logits), Independent(Normal(loc, scale), 1))

    reference = lambda x: _mixture_log_density(x, logits.log_softmax(-1), loc, scale)  # noqa: E731
    parameters = {"base_mixture_logits": logits, "base_component_loc": loc, "base_component_scale": scale}
    return Made(build(), reference, parameters, ("base_component_scale",), build)


CASES = {
    "DiagonalGaussian": diagonal_gaussian,
    "StudentT": student_t,
    "StudentT-learn_df": lambda D: student_t(D, learn_df=True),
    "GaussianMixture": gaussian_mixture,
    "Normal-of-parameters": normal_of_parameters,
    "MixtureSameFamily-of-parameters": mixture_of_parameters,
}


@pytest.fixture(params=list(CASES))
def make(request) -> Callable[[int], Made]:
    """The base of each case, made for a given number of features (the name ``case``
    is the battery's)."""
    return CASES[request.param]


def perturb(made: Made, seed: int = 1) -> Made:
    """Moves every base parameter away from its initial value (positive ones by a
    factor), so that no check passes only at the standard-normal start."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in made.parameters.items():
            noise = 0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
            p.mul_(noise.exp()) if name in made.positive else p.add_(noise)
    if made.rebuild is not None:
        made.base = made.rebuild()
    return made


def flow_with(made: Made, layers: list | None = None) -> pf.Flow:
    return pf.Flow(layers or [], base=made.base)


def fit_nll(flow: pf.Flow, x: torch.Tensor, steps: int, lr: float) -> None:
    """Maximum likelihood: ``steps`` full-batch Adam steps on ``x``."""
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    for _ in range(steps):
        loss = -flow().log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# Densities ------------------------------------------------------------------------------
@pytest.mark.parametrize("D", FEATURES)
def test_log_prob_is_the_analytic_density_through_an_affine_layer_per_point_float64_within_1e10(make, D):
    """With the layer x = 0.5 + 2 z: log p(x) = log p_Z((x - 0.5) / 2) - D log 2, p_Z
    scipy's density at the base's current parameters, point by point."""
    made = perturb(make(D))
    flow = pf.Flow([AffineTransform(0.5, 2.0)], base=made.base).to(torch.float64)
    x = 3.0 * torch.randn(16, D, dtype=torch.float64)
    expected = made.reference((x - 0.5) / 2.0) - D * np.log(2.0)
    np.testing.assert_allclose(_np(flow().log_prob(x)), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("D", FEATURES)
def test_log_prob_equals_rsample_and_log_prob_for_its_own_samples_float64_within_1e8(make, D):
    made = perturb(make(D))
    flow = pf.Flow([MaskedAffineAutoregressive(D, hidden=(8,))], base=made.base).to(torch.float64)
    with torch.no_grad():
        for p in flow.transform.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = flow()
    x, log_q = d.rsample_and_log_prob((32,))
    assert x.shape == (32, D) and log_q.shape == (32,)
    assert torch.allclose(d.log_prob(x.clone()), log_q, rtol=0, atol=1e-8)


def test_a_user_mixture_same_family_is_kept_with_its_density_and_gains_rsample():
    """torch's MixtureSameFamily of Normals has no rsample; the flow rebuilds it as a
    DiagonalNormalMixture with the same log-density (float32, 1e-6, per point)."""
    made = perturb(mixture_of_parameters(2))
    flow = flow_with(made)
    assert isinstance(flow.base(), DiagonalNormalMixture) and flow().has_rsample
    x = 2.0 * torch.randn(10, 2)
    assert torch.allclose(flow().log_prob(x), made.base.log_prob(x), rtol=0, atol=1e-6)
    assert flow().rsample((5,)).shape == (5, 2)


# Parameters: registered, trained, moved, copied, reloaded -----------------------------
def test_base_parameters_are_the_flows_parameters_and_in_its_state_dict(make):
    made = make(3)
    flow = flow_with(made, [MaskedAffineAutoregressive(3, hidden=(4,))])
    named = dict(flow.named_parameters())
    for name, p in made.parameters.items():
        assert named[name] is p  # that very parameter, not a frozen copy
        assert name in flow.state_dict()
    assert not any(name in dict(flow.named_buffers()) for name in made.parameters)


def test_a_distribution_base_keeps_plain_tensors_as_buffers_and_parameters_as_parameters():
    loc = nn.Parameter(torch.tensor([1.0, -1.0]))
    flow = pf.Flow([], base=Normal(loc, torch.tensor([2.0, 0.5])))
    assert dict(flow.named_parameters()) == {"base_loc": loc}
    assert set(dict(flow.named_buffers())) == {"base_scale"}


@pytest.mark.parametrize("D", FEATURES)
def test_maximum_likelihood_changes_every_base_parameter_and_lowers_the_nll(make, D):
    """150 Adam steps (lr 0.02) of exact NLL on data from N(1.5, 0.5^2) per feature move
    every entry of every base parameter and lower the NLL by more than 0.5 nats per
    feature (the standard normal's NLL is 2.17 nats per feature, the optimum 0.73)."""
    made = make(D)
    flow = flow_with(made)
    x = 1.5 + 0.5 * torch.randn(1024, D)
    start = {name: p.detach().clone() for name, p in made.parameters.items()}
    with torch.no_grad():
        before = -flow().log_prob(x).mean()
    fit_nll(flow, x, steps=150, lr=0.02)
    with torch.no_grad():
        after = -flow().log_prob(x).mean()
    for name, p in made.parameters.items():
        assert (p.detach() - start[name]).abs().min() > 1e-4, name
    assert after < before - 0.5 * D, (before.item(), after.item())


def test_a_mixture_base_fits_a_two_mode_sample_within_0_02_nats_of_the_true_nll():
    """A 1-D sample (4000 points) of 0.3 N(-2, 0.4^2) + 0.7 N(1.5, 0.6^2): after 500 Adam
    steps a two-component GaussianMixture base reaches the true density's NLL on that
    sample within 0.02 nats, with weights within 0.05 and means within 0.1 of the truth,
    while the best single Gaussian stays more than 0.3 nats worse."""
    weights, means, scales = torch.tensor([0.3, 0.7]), torch.tensor([-2.0, 1.5]), torch.tensor([0.4, 0.6])
    truth = MixtureSameFamily(Categorical(weights), Normal(means, scales))
    x = truth.sample((4000,)).unsqueeze(-1)
    true_nll = -truth.log_prob(x.squeeze(-1)).mean()
    base = GaussianMixture(1, components=2)
    flow = pf.Flow([], base=base)
    fit_nll(flow, x, steps=500, lr=0.05)
    with torch.no_grad():
        nll = -flow().log_prob(x).mean()
        order = base.loc.squeeze(-1).argsort()
        fitted_weights, fitted_means = base.logits.softmax(-1)[order], base.loc.squeeze(-1)[order]
    assert abs(nll - true_nll) < 0.02, (nll.item(), true_nll.item())
    assert torch.allclose(fitted_weights, weights, atol=0.05) and torch.allclose(fitted_means, means, atol=0.1)
    best_gaussian_nll = 0.5 * torch.log(2 * torch.pi * torch.e * x.var())
    assert best_gaussian_nll > true_nll + 0.3


def test_a_student_t_base_learns_heavy_tails_within_0_4_of_the_true_df_and_0_02_nats():
    """A 1-D sample (4000 points) of a Student-t with 1.5 degrees of freedom: after 400
    Adam steps from df = 5 the learnt df is within 0.4 of 1.5 and the NLL within 0.02
    nats of the true density's."""
    truth = torch.distributions.StudentT(torch.tensor(1.5), torch.tensor(0.5), torch.tensor(2.0))
    x = truth.sample((4000, 1))
    true_nll = -truth.log_prob(x).mean()
    base = StudentT(1, df=5.0, learn_df=True)
    flow = pf.Flow([], base=base)
    fit_nll(flow, x, steps=400, lr=0.05)
    with torch.no_grad():
        nll = -flow().log_prob(x).mean()
    assert abs(base.df.item() - 1.5) < 0.4, base.df
    assert abs(nll - true_nll) < 0.02, (nll.item(), true_nll.item())


def test_to_float64_moves_the_base_and_keeps_its_log_prob_within_1e5(make):
    made = perturb(make(3))
    flow = flow_with(made)
    x = torch.randn(8, 3)
    expected = flow().log_prob(x).detach()
    flow = flow.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in made.parameters.values())
    assert all(t.dtype == torch.float64 for t in flow.state_dict().values() if t.is_floating_point())
    assert flow().base_dist.mean.dtype == torch.float64
    assert torch.allclose(flow().log_prob(x.double()), expected.double(), rtol=0, atol=1e-5)


def test_state_dict_round_trip_into_a_fresh_flow_reproduces_log_prob_exactly(make):
    flow = flow_with(perturb(make(3)), [MaskedAffineAutoregressive(3, hidden=(4,))])
    fresh = flow_with(make(3), [MaskedAffineAutoregressive(3, hidden=(4,))])
    x = torch.randn(8, 3)
    assert not torch.equal(fresh().log_prob(x), flow().log_prob(x))
    fresh.load_state_dict(flow.state_dict())
    assert torch.equal(fresh().log_prob(x), flow().log_prob(x))


def test_deepcopy_and_pickle_after_backward_reproduce_log_prob_and_own_their_parameters(make):
    made = perturb(make(3))
    flow = flow_with(made)
    x = torch.randn(8, 3)
    flow().log_prob(x).sum().backward()
    buffer = io.BytesIO()
    torch.save(flow, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(flow), pickle.loads(pickle.dumps(flow)), torch.load(buffer, weights_only=False)):
        assert torch.equal(other().log_prob(x), flow().log_prob(x))
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.1)
        assert not torch.equal(other().log_prob(x), flow().log_prob(x))  # the copy's own parameters


# Reparameterised samples ---------------------------------------------------------------
@pytest.mark.parametrize("D", FEATURES)
def test_rsample_gradients_reach_every_base_parameter(make, D):
    made = perturb(make(D))
    flow = flow_with(made, [MaskedAffineAutoregressive(D, hidden=(4,))])
    (flow().rsample((64,)) ** 2).sum().backward()
    for name, p in made.parameters.items():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and p.grad.abs().max() > 0, name


def _conditional_cdf(z: Tensor, logits: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    r""":math:`F_d(z_d \mid z_{<d})` of a mixture of diagonal Normals, from its definition."""
    log_n = Normal(loc, scale).log_prob(z.unsqueeze(-2))
    before = torch.cat([torch.zeros_like(log_n[..., :1]), log_n[..., :-1]], -1).cumsum(-1)
    w = (logits.log_softmax(-1).unsqueeze(-1) + before).softmax(-2)
    return (w * torch.special.ndtr((z.unsqueeze(-2) - loc) / scale)).sum(-2)


def _inverse_cdf(u: Tensor, logits: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """The sample with conditional CDFs ``u``, feature by feature, by 200 bisections."""
    z = torch.zeros_like(u)
    for d in range(u.shape[-1]):
        low, high = torch.full(u.shape[:-1], -50.0, dtype=u.dtype), torch.full(u.shape[:-1], 50.0, dtype=u.dtype)
        for _ in range(200):
            middle = (low + high) / 2
            z[..., d] = middle
            below = _conditional_cdf(z, logits, loc, scale)[..., d] < u[..., d]
            low, high = torch.where(below, middle, low), torch.where(below, high, middle)
        z[..., d] = (low + high) / 2
    return z


@pytest.mark.parametrize("D", FEATURES)
def test_mixture_rsample_gradient_is_the_derivative_of_the_inverse_cdf_at_fixed_u_float64_within_1e7(D):
    """The implicit reparameterisation: for each of 4 samples, each feature and each
    entry of the logits, means and scales, d z / d theta from autograd equals the
    central difference (h = 1e-5) of the sample with the same conditional CDFs u."""
    logits = torch.tensor([0.3, -0.5, 0.1], dtype=torch.float64)
    loc = 2.0 * torch.randn(3, D, dtype=torch.float64)
    scale = 0.3 + torch.rand(3, D, dtype=torch.float64)

    def draw(logits, loc, scale):
        torch.manual_seed(1)
        mixture = DiagonalNormalMixture(Categorical(logits=logits), Independent(Normal(loc, scale), 1))
        return mixture.rsample((4,))

    z = draw(logits, loc, scale)
    u = _conditional_cdf(z, logits, loc, scale)
    assert torch.allclose(_inverse_cdf(u, logits, loc, scale), z, rtol=0, atol=1e-12)
    jacobians = torch.autograd.functional.jacobian(draw, (logits, loc, scale))
    h = 1e-5
    for i, jacobian in enumerate(jacobians):
        jacobian = jacobian.reshape(4, D, -1)
        for entry in range(jacobian.shape[-1]):
            up, down = [logits.clone(), loc.clone(), scale.clone()], [logits.clone(), loc.clone(), scale.clone()]
            up[i].view(-1)[entry] += h
            down[i].view(-1)[entry] -= h
            difference = (_inverse_cdf(u, *up) - _inverse_cdf(u, *down)) / (2 * h)
            assert torch.allclose(jacobian[..., entry], difference, rtol=0, atol=1e-7), (i, entry)


def test_mixture_rsample_over_a_batch_shape_moves_one_for_one_with_a_common_shift_of_the_means_within_1e12():
    """An expanded mixture (batch shape (5,)) draws samples of shape (7, 5, 2) whose
    gradients say that shifting every mean by c along a feature shifts every sample by c
    there: the means' gradients of the sum of the 35 samples sum to 35 per feature."""
    base = GaussianMixture(2, components=3).double()
    d = base().expand((5,))
    assert d.batch_shape == (5,) and d.event_shape == (2,)
    z = d.rsample((7,))
    assert z.shape == (7, 5, 2)
    z.sum().backward()
    # every sample moves one for one with a common shift of all the means
    assert torch.allclose(base.loc.grad.sum(0), torch.full((2,), 7.0 * 5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_a_mixture_of_non_normal_components_samples_but_refuses_rsample_clearly():
    components = Independent(torch.distributions.StudentT(3.0, torch.randn(2, 2), torch.ones(2, 2)), 1)
    flow = pf.Flow([], base=MixtureSameFamily(Categorical(logits=torch.zeros(2)), components))
    assert flow().sample((4,)).shape == (4, 2)
    assert flow().log_prob(torch.zeros(3, 2)).shape == (3,)
    with pytest.raises(NotImplementedError, match="MixtureSameFamily has no reparameterised sampler"):
        flow().rsample((4,))


# Temperature --------------------------------------------------------------------------
def test_tempered_base_has_each_scale_multiplied_by_t_per_point_within_1e10(make):
    """temper(p_Z, T) for T = 0.5 is the analytic density with every scale (each
    component's, for a mixture) multiplied by T and the locations kept."""
    made = perturb(make(3))
    flow = flow_with(made).to(torch.float64)
    tempered = temper(flow.base(), 0.5)
    x = torch.randn(12, 3, dtype=torch.float64)
    # the location-scale family: p_T(x) = p((x - m) / T + m) / T^D for each component
    if isinstance(flow.base(), DiagonalNormalMixture):
        normal = flow.base().component_distribution.base_dist
        expected = _mixture_log_density(x, flow.base().mixture_distribution.logits, normal.loc, 0.5 * normal.scale)
    else:
        loc = flow.base().base_dist.loc
        expected = made.reference((x - loc) / 0.5 + loc) - 3 * np.log(0.5)
    np.testing.assert_allclose(_np(tempered.log_prob(x)), expected, rtol=0, atol=1e-10)


def test_temperature_shrinks_each_mixture_component_about_its_own_mean():
    """At T = 0.1, all 2000 samples of a two-mode base lie within 0.6 of a mode
    (6 tempered standard deviations), both modes keep their weight within 0.05, and
    the flow's sample at that temperature is the layer applied to such samples."""
    base = GaussianMixture(1, components=2)
    with torch.no_grad():
        base.loc.copy_(torch.tensor([[-3.0], [3.0]]))
    flow = pf.Flow([AffineTransform(1.0, 2.0)], base=base)
    z = (flow().sample((2000,), temperature=0.1) - 1.0) / 2.0
    distance = (z - base.loc.detach().T).abs().min(-1).values
    assert distance.max() < 0.6
    assert abs((z > 0).float().mean() - 0.5) < 0.05


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_a_temperature_that_is_not_positive_is_refused(temperature):
    flow = pf.Flow([], base=GaussianMixture(2))
    with pytest.raises(ValueError, match="temperature must be positive"):
        flow().sample((2,), temperature=temperature)


def test_temper_refuses_a_base_without_location_scale_form_or_finite_mean():
    with pytest.raises(ValueError, match="Pareto has a mean that is not finite"):
        temper(pdist.Pareto(torch.ones(2), torch.full((2,), 0.5)).to_event(1), 0.5)


# Pyro ---------------------------------------------------------------------------------
def test_a_flow_with_a_learnable_base_in_pyro_sample_obs_under_a_plate(make):
    """The model's log-joint is the flow's log-density summed over the plate (1e-5),
    and its gradient reaches every base parameter through ``pyro.module``."""
    made = perturb(make(3))
    flow = flow_with(made, [MaskedAffineAutoregressive(3, hidden=(4,))])
    x = torch.randn(10, 3)

    def model():
        pyro.module("flow", flow)
        with pyro.plate("data", len(x)):
            pyro.sample("x", flow(), obs=x)

    trace = pyro.poutine.trace(model).get_trace()
    log_joint = trace.log_prob_sum()
    assert torch.allclose(log_joint, flow().log_prob(x).sum(), rtol=0, atol=1e-5)
    log_joint.backward()
    stored = set(pyro.get_param_store().keys())
    for name, p in made.parameters.items():
        assert f"flow$$${name}" in stored and p.grad is not None and p.grad.abs().max() > 0, name


class LearnableBaseGuide(AutoContinuous):
    """The smallest AutoContinuous guide over a flow with a learnable base, as
    ``NeuTraReparam`` needs it: its base, its bijection, its posterior."""

    def __init__(self, model, base: Callable[[int], object]) -> None:
        super().__init__(model)
        self._make_base = base

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        layer = MaskedAffineAutoregressive(self.latent_dim, hidden=(8,))
        self.flow = pf.Flow([pf.transforms.Inverse(layer)], base=self._make_base(self.latent_dim))

    def get_base_dist(self):
        return self.flow.base()

    def get_transform(self, *args, **kwargs):
        return self.flow.transform

    def get_posterior(self, *args, **kwargs):
        return self.flow()


def funnel():
    v = pyro.sample("v", pdist.Normal(0.0, 3.0))
    pyro.sample("x", pdist.Normal(0.0, torch.exp(v / 2)).expand([2]).to_event(1))


@pytest.mark.parametrize("name", list(CASES))
def test_neutra_reparam_takes_a_guide_with_a_learnable_base_and_keeps_its_potential(name):
    """After 3 SVI steps (which move every base parameter), the guide's base is a Pyro
    distribution that masks to nothing, NeuTraReparam names one shared latent of the
    base's shape, and at 4 points U_NeuTra(z) = U(T(z)) - log|det J_T(z)| within 1e-5."""
    made = {}

    def make_base(D):
        made["case"] = CASES[name](D)
        return made["case"].base

    guide = LearnableBaseGuide(funnel, make_base)
    guide()
    start = {key: p.detach().clone() for key, p in made["case"].parameters.items()}
    svi = SVI(funnel, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(3):
        svi.step()
    for key, p in made["case"].parameters.items():
        assert not torch.equal(p.detach(), start[key]), key
    guide.requires_grad_(False)
    base = guide.get_base_dist()
    assert isinstance(base, TorchDistributionMixin) and base.batch_shape == () and base.event_shape == (3,)
    masked = base.mask(False)
    assert isinstance(masked, MaskedDistribution)
    assert pyro.poutine.trace(lambda: pyro.sample("z", masked)).get_trace().log_prob_sum().item() == 0.0
    neutra = NeuTraReparam(guide)
    _, potential, to_unconstrained, _ = initialize_model(funnel)
    _, neutra_potential, _, _ = initialize_model(neutra.reparam(funnel))
    transform = guide.get_transform()
    for z in base.sample((4,)):
        u = transform(z)
        ladj = transform.log_abs_det_jacobian(z, u)
        sites = neutra.transform_sample(z)
        expected = potential({site: to_unconstrained[site](value) for site, value in sites.items()}) - ladj
        assert torch.allclose(neutra_potential({"v_shared_latent": z}), expected, rtol=0, atol=1e-5)


def test_a_conditional_flow_expands_a_learnable_base_over_the_context_batch_per_point_within_1e6():
    flow = pf.Flow([MaskedAffineAutoregressive(2, context=2, hidden=(8,))], base=GaussianMixture(2, components=3))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    c, x = torch.randn(5, 2), torch.randn(5, 2)
    d = flow(c)
    assert d.batch_shape == (5,) and d.rsample((3,)).shape == (3, 5, 2)
    each = torch.stack([flow(c[i]).log_prob(x[i]) for i in range(5)])
    assert torch.allclose(d.log_prob(x), each, rtol=0, atol=1e-6)


# Errors -------------------------------------------------------------------------------
class _FloatScale(torch.distributions.Distribution):
    arg_constraints = {"scale": torch.distributions.constraints.positive}

    def __init__(self, scale: float) -> None:
        self.scale = scale
        super().__init__(event_shape=(2,), validate_args=False)


class _NotADistribution(nn.Module):
    def forward(self) -> Tensor:
        return torch.zeros(2)


class _RenamedNormal(Normal):
    def __init__(self, mean: Tensor, sd: Tensor) -> None:
        super().__init__(mean, sd)


_P, _Q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.ones(2))


@pytest.mark.parametrize("base, message", [
    (lambda: Normal(_P.exp(), 1.0), r"rebuilding it as Normal\(loc, scale\) from its tensors does not reproduce its loc"),
    (lambda: Normal(torch.zeros(2, requires_grad=True), 1.0), "Normal.loc requires grad but is not an nn.Parameter"),
    (lambda: Normal(_P + _Q, 1.0), "Normal.loc is computed from 2 trainable tensors"),
    (lambda: torch.distributions.TransformedDistribution(Normal(torch.zeros(2), 1.0), []),
     "cannot store the base distribution TransformedDistribution: it has no tensor parameters"),
    (lambda: _FloatScale(2.0), "its parameter scale is a float, not a tensor"),
    (lambda: _RenamedNormal(torch.zeros(2), torch.ones(2)), r"rebuilding it as _RenamedNormal\(loc, scale\) .* fails"),
    (lambda: nn.Linear(2, 2), "a base module must be callable with no arguments"),
    (lambda: _NotADistribution(), r"a base module must return a torch Distribution, _NotADistribution\(\) returned Tensor"),
])
def test_a_base_the_flow_cannot_keep_is_refused_with_what_was_expected(base, message):
    with pytest.raises(TypeError, match=message):
        pf.Flow([pf.transforms.Reverse(2)], base=base())


@pytest.mark.parametrize("build, message", [
    (lambda: DiagonalGaussian(0), "DiagonalGaussian: features must be an int >= 1, got 0"),
    (lambda: StudentT(2, df=0.0), "StudentT: df must be a finite number > 0, got 0.0"),
    (lambda: GaussianMixture(2, components=0), "GaussianMixture: components must be an int >= 1, got 0"),
    (lambda: GaussianMixture(2, spread=-1.0), "GaussianMixture: spread must be a finite number >= 0, got -1.0"),
    (lambda: DiagonalNormalMixture(Categorical(logits=torch.zeros(2)), pdist.Laplace(torch.zeros(2), 1.0)),
     "DiagonalNormalMixture expects components that are a Normal or an Independent Normal"),
])
def test_invalid_base_options_are_refused(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_student_t_learn_df_must_be_a_bool():
    with pytest.raises(TypeError, match="learn_df must be True or False, got 1"):
        StudentT(2, learn_df=1)
