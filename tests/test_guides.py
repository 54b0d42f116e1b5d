r"""AutoFlowGuide: sites and shapes, constrained supports with the right log-density,
vectorised particles, Predictive, an ELBO at the exact evidence of a conjugate model,
one-pass scoring, Pyro's AutoNormalizingFlow with our layers, and clear errors."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow

import pyro_flowpack as pf
from pyro_flowpack.infer import AutoFlowGuide
from pyro_flowpack.transforms import MaskedAutoregressive

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "svi_guide.py"


@pytest.fixture(autouse=True)
def _seeded():
    pyro.set_rng_seed(0)  # also Python's and NumPy's generators (the conftest clears the param store)


def constrained_model():
    """A positive, a unit-interval, a simplex and a plated real site (D = 1 + 1 + 2 + 3)."""
    pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    pyro.sample("p", dist.Beta(2.0, 3.0))
    pyro.sample("w", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("groups", 3):
        pyro.sample("x", dist.Normal(0.0, 1.0))


def beta_binomial(n: int = 10, k: int = 7, a: float = 2.0, b: float = 2.0):
    def model():
        p = pyro.sample("p", dist.Beta(a, b))
        pyro.sample("k", dist.Binomial(n, p), obs=torch.tensor(float(k)))

    log_z = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
             + math.lgamma(a + k) + math.lgamma(b + n - k) - math.lgamma(a + b + n)
             - math.lgamma(a) - math.lgamma(b) + math.lgamma(a + b))
    return model, log_z


def elbo_estimate(model, guide, particles: int = 2000) -> float:
    loss = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        return -loss.loss(model, guide)


def train(model, guide, steps: int, lr: float = 1e-2, particles: int = 8) -> None:
    """Adam with the learning rate decaying to lr / 10 over the steps, so that the last
    iterate is not noisy."""
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    optimizer = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps)})
    svi = SVI(model, guide, optimizer, elbo)
    for _ in range(steps):
        svi.step()


# Sites and shapes ---------------------------------------------------------------------
@pytest.mark.parametrize("flow", ["nsf", "iaf", "realnvp"])
def test_guide_draws_every_latent_site_with_its_shape_and_support(flow):
    guide = AutoFlowGuide(constrained_model, flow=flow, transforms=2)
    prior = pyro.poutine.trace(constrained_model).get_trace()
    values = guide()
    assert set(values) == {"scale", "p", "w", "x"}
    for name, value in values.items():
        assert value.shape == prior.nodes[name]["value"].shape
        assert bool(prior.nodes[name]["fn"].support.check(value).all())
    assert guide.latent_dim == 7
    assert guide.get_posterior().event_shape == (7,)
    assert abs(values["w"].sum().item() - 1) < 1e-6


def test_guide_log_density_is_the_flow_density_times_the_inverse_bijection_jacobian():
    # q(scale, p) = q_u(log scale, logit p) / (scale * p * (1 - p)), with q_u computed by a
    # real inverse of the flow (a clone defeats the cache)
    def model():
        pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        pyro.sample("p", dist.Beta(2.0, 3.0))

    guide = AutoFlowGuide(model, flow="nsf", transforms=2, init_scale=0.5)
    train(model, guide, steps=5, lr=0.05)
    trace = pyro.poutine.trace(guide).get_trace()
    trace.compute_log_prob()
    total = sum(site["log_prob_sum"] for site in trace.nodes.values() if site["type"] == "sample")
    scale, p = trace.nodes["scale"]["value"], trace.nodes["p"]["value"]
    u = torch.stack([scale.log(), torch.logit(p)])
    expected = guide.get_posterior().log_prob(u.detach().clone()) - scale.log() - p.log() - (1 - p).log()
    assert torch.allclose(total, expected, atol=1e-4)


# Particles, ELBOs and Predictive ------------------------------------------------------
def test_vectorised_particles_draw_one_latent_vector_per_particle():
    guide = AutoFlowGuide(constrained_model, flow="nsf", transforms=2)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(constrained_model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    assert math.isfinite(svi.step())
    with pyro.plate("particles", 8, dim=-2):
        trace = pyro.poutine.trace(guide).get_trace()
    latent = trace.nodes["_AutoFlowGuide_latent"]["value"]
    assert latent.shape == (8, 1, 7)
    assert not torch.allclose(latent[0], latent[1])
    assert trace.nodes["x"]["value"].shape == (8, 3)  # the "groups" plate is dim -1
    assert trace.nodes["w"]["value"].shape == (8, 1, 3)


def normal_normal(y: torch.Tensor):
    """mu ~ N(0, 1), y_i ~ N(mu, 1): every site real, so TraceMeanField_ELBO is valid."""
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    return model


def gaussian_elbo(y: torch.Tensor, m: float, s: float) -> float:
    r"""The exact ELBO of q = N(m, s^2) for :func:`normal_normal`:
    E_q[log p(mu) + sum_i log p(y_i | mu)] + H(q)."""
    n, log_2pi = len(y), math.log(2 * math.pi)
    expected_log_joint = (-0.5 * log_2pi - 0.5 * (m**2 + s**2)
                          + float((-0.5 * log_2pi - 0.5 * ((y - m) ** 2 + s**2)).sum()))
    return expected_log_joint + 0.5 * math.log(2 * math.pi * math.e * s**2)


@pytest.mark.parametrize("loss", ["Trace_ELBO", "TraceMeanField_ELBO"])
def test_vectorised_elbo_of_the_untrained_guide_matches_its_closed_form_within_noise(loss):
    # untrained, q(mu) = N(0.3, 0.5^2) exactly; the log-weights have a standard deviation
    # of about 1.5 here, so 4000 particles estimate the ELBO to ~0.025 (tolerance 4 sd)
    y = torch.tensor([0.5, -0.2, 1.1, 0.8])
    model = normal_normal(y)
    init = pyro.infer.autoguide.init_to_value(values={"mu": torch.tensor(0.3)})
    guide = AutoFlowGuide(model, flow="nsf", transforms=2, init_loc_fn=init, init_scale=0.5)
    estimator = getattr(pyro.infer, loss)(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        estimate = -estimator.loss(model, guide)
    assert abs(estimate - gaussian_elbo(y, 0.3, 0.5)) < 0.1
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), getattr(pyro.infer, loss)())
    assert math.isfinite(svi.step())


def test_predictive_draws_latent_and_observed_sites_from_the_guide():
    def model(y=None):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
        with pyro.plate("data", 4):
            return pyro.sample("y", dist.Normal(loc, scale), obs=y)

    guide = AutoFlowGuide(model, flow="nsf", transforms=2)
    guide(torch.zeros(4))
    samples = Predictive(model, guide=guide, num_samples=50)()
    # Pyro's Predictive keeps a trailing 1 for AutoContinuous guides' scalar sites
    assert samples["loc"].squeeze(-1).shape == (50,)
    assert samples["scale"].numel() == 50 and bool((samples["scale"] > 0).all())
    assert samples["y"].shape == (50, 4)
    parallel = Predictive(model, guide=guide, num_samples=50, parallel=True)()
    assert parallel["y"].shape == (50, 4)


def test_trained_elbo_is_within_0p03_of_the_exact_log_evidence_of_normal_normal():
    # log Z = log N(y; 0, I + 1 1^T); the posterior is Gaussian, so the gap can reach 0
    # (150 steps leave about 0.013, 300 about 0.005; an ELBO above log Z by more than the
    # noise would mean a wrong log-density)
    y = torch.tensor([0.5, -0.2, 1.1, 0.8])
    model = normal_normal(y)
    log_z = float(dist.MultivariateNormal(torch.zeros(4), torch.eye(4) + torch.ones(4, 4)).log_prob(y))
    guide = AutoFlowGuide(model, flow="nsf", transforms=1, hidden=(16,))
    before = elbo_estimate(model, guide, 2000)
    train(model, guide, steps=150, lr=3e-2, particles=32)
    elbo = elbo_estimate(model, guide, 2000)
    # 2000 particles carry a standard error below 0.003 at this fit
    assert log_z - before > 1.0
    assert log_z - 0.03 < elbo < log_z + 0.01


# One-pass scoring -----------------------------------------------------------------------
def count_network_and_sequential_calls(guide, monkeypatch) -> dict[str, int]:
    """Counts MADE evaluations and sequential (MAF-direction) layer passes from now on."""
    calls = {"network": 0, "sequential": 0}
    made = [m for m in guide.modules() if isinstance(m, pf.nn.MADE)]
    assert len(made) == 4  # two blocks of an affine and a spline layer
    for m in made:
        m.register_forward_hook(lambda *_: calls.__setitem__("network", calls["network"] + 1))
    sequential = MaskedAutoregressive._forward_and_ladj

    def counted(self, x, context):
        calls["sequential"] += 1
        return sequential(self, x, context)

    monkeypatch.setattr(MaskedAutoregressive, "_forward_and_ladj", counted)
    return calls


def test_an_elbo_step_without_stl_runs_each_network_once_and_never_the_sequential_direction(monkeypatch):
    guide = AutoFlowGuide(constrained_model, flow="iaf", transforms=2, splines=2, stl=False)
    guide()
    calls = count_network_and_sequential_calls(guide, monkeypatch)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    elbo.loss_and_grads(constrained_model, guide)
    assert calls == {"network": 4, "sequential": 0}


def test_stl_scores_its_own_draws_in_the_sampling_pass_with_and_without_gradients(monkeypatch):
    guide = AutoFlowGuide(constrained_model, flow="iaf", transforms=2, splines=2)
    guide()
    calls = count_network_and_sequential_calls(guide, monkeypatch)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    elbo.loss_and_grads(constrained_model, guide)
    # 4 networks once: the score reuses the sampling pass's graph for its Jacobian
    assert calls == {"network": 4, "sequential": 0}
    calls.update(network=0, sequential=0)
    with torch.no_grad():
        elbo.loss(constrained_model, guide)
    assert calls == {"network": 4, "sequential": 0}


@pytest.mark.parametrize("flow, options", [("iaf", {}), ("iaf", {"transforms": 2, "splines": 2}),
                                           ("realnvp", {"transforms": 2})])
def test_stl_score_of_a_draw_by_its_jacobian_equals_the_score_by_the_inverse(flow, options):
    # for its own draw z = g(eps) the score's gradient is J(eps)^-T grad log q; any other
    # tensor (here a view of z, with the same graph) goes through the inverse: values and
    # parameter gradients must agree
    torch.manual_seed(0)
    g = pf.infer.guide_flow(flow, 5, **options)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the identity
    q = pf.infer.StickingTheLanding(g.base().expand((7,)), g.transform, g)
    z = q.rsample()
    by_jacobian, by_inverse = q.log_prob(z), q.log_prob(z.view_as(z))
    assert torch.allclose(by_jacobian, by_inverse, atol=1e-5)
    parameters = list(g.parameters())
    grads = [torch.cat([d.flatten() for d in torch.autograd.grad(score.sum(), parameters, retain_graph=True)])
             for score in (by_jacobian, by_inverse)]
    assert float((grads[0] - grads[1]).norm()) < 1e-5 * float(grads[1].norm())


# Sticking the landing ----------------------------------------------------------------------
def standard_normal_model():
    pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))


def elbo_gradient(model, guide, particles: int, plates: int = 0) -> tuple[float, torch.Tensor]:
    loss = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=plates)
    value = loss.differentiable_loss(model, guide)
    parameters = [p for p in guide.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, parameters, allow_unused=True)
    return float(value.detach()), torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                                    for p, g in zip(parameters, grads)])


@pytest.mark.parametrize("flow, options", [("iaf", {"transforms": 2, "splines": 2}), ("iaf", {}),
                                           ("realnvp", {"transforms": 2})])
def test_stl_gradient_vanishes_when_the_guide_is_the_posterior_and_the_plain_one_does_not(flow, options):
    # the untrained guide centred at the prior mean is exactly N(0, I), the posterior: every
    # particle's path gradient is zero, while the score term is not
    norms, values = {}, {}
    for stl in (True, False):
        pyro.clear_param_store()
        guide = AutoFlowGuide(standard_normal_model, flow=flow, init_loc_fn=pyro.infer.autoguide.init_to_mean,
                              stl=stl, **options)
        guide()
        pyro.set_rng_seed(1)
        values[stl], gradient = elbo_gradient(standard_normal_model, guide, particles=8)
        norms[stl] = float(gradient.norm())
    assert abs(values[True]) < 1e-5 and abs(values[False]) < 1e-5
    assert norms[True] < 1e-5 and norms[False] > 0.1


def test_stl_gradient_is_unbiased_its_mean_matches_the_plain_estimators_within_monte_carlo_error():
    # a trained-for-a-bit guide on a non-Gaussian posterior; 8 batches of 4000 particles per
    # estimator; per coordinate |mean difference| < 5 standard errors (+1e-4), and the
    # whole gradient vectors agree in direction (cosine > 0.95)
    def model():
        p = pyro.sample("p", dist.Beta(2.0, 5.0))
        s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
        pyro.sample("y", dist.Normal(p * 3.0, s), obs=torch.tensor(1.5))

    guide = AutoFlowGuide(model, flow="iaf", transforms=2, splines=1)
    train(model, guide, steps=30, lr=0.02)
    batches: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for seed in range(8):
        for stl in (True, False):
            guide.stl = stl
            pyro.set_rng_seed(100 + seed)
            batches[stl].append(elbo_gradient(model, guide, particles=4000)[1])
    means = {k: torch.stack(v).mean(0) for k, v in batches.items()}
    errors = {k: torch.stack(v).std(0) / math.sqrt(len(v)) for k, v in batches.items()}
    bound = 5 * (errors[True] ** 2 + errors[False] ** 2).sqrt() + 1e-4
    assert bool(((means[True] - means[False]).abs() <= bound).all())
    assert float(torch.nn.functional.cosine_similarity(means[True], means[False], dim=0)) > 0.95
    # and the path estimator is the less noisy one here
    assert float(errors[True].norm()) < float(errors[False].norm())


def test_stl_site_scores_like_the_posterior_and_get_posterior_keeps_parameter_gradients():
    guide = AutoFlowGuide(constrained_model, flow="nsf", transforms=2)
    trace = pyro.poutine.trace(guide).get_trace()
    site = trace.nodes["_AutoFlowGuide_latent"]
    assert isinstance(site["fn"], pf.infer.StickingTheLanding)
    value = site["value"].detach().clone()
    posterior = guide.get_posterior()
    plain = posterior.log_prob(value)
    assert torch.allclose(site["fn"].log_prob(value), plain, atol=1e-5)
    flow_parameters = list(guide.flow.parameters())
    assert all(g is not None for g in torch.autograd.grad(plain, flow_parameters, allow_unused=True))
    assert not site["fn"].log_prob(value).requires_grad  # the parameters are held fixed
    assert not isinstance(pyro.poutine.trace(AutoFlowGuide(constrained_model, stl=False)).get_trace()
                          .nodes["_AutoFlowGuide_latent"]["fn"], pf.infer.StickingTheLanding)


# Median and quantiles -------------------------------------------------------------------
def test_quantiles_of_the_untrained_guide_match_its_lognormal_within_monte_carlo_error():
    # untrained, log(scale) ~ N(log 1.5, 0.1^2) exactly (init_to_value), so the q-quantile
    # is 1.5 exp(0.1 Phi^-1(q)); 20000 draws estimate it to ~0.3 % relative
    def model():
        pyro.sample("scale", dist.LogNormal(0.0, 1.0))

    init = pyro.infer.autoguide.init_to_value(values={"scale": torch.tensor(1.5)})
    guide = AutoFlowGuide(model, flow="nsf", transforms=2, init_loc_fn=init, init_scale=0.1,
                          quantile_samples=20000)
    levels = torch.tensor([0.1, 0.5, 0.9])
    expected = 1.5 * torch.exp(0.1 * dist.Normal(0.0, 1.0).icdf(levels))
    quantiles = guide.quantiles(levels.tolist())["scale"]
    assert quantiles.shape == (3,)
    assert torch.allclose(quantiles, expected, rtol=0.01)
    assert abs(guide.median()["scale"].item() - 1.5) < 0.015


def test_median_is_in_each_sites_support():
    guide = AutoFlowGuide(constrained_model, flow="iaf", transforms=1)
    median = guide.median()
    assert median["scale"] > 0 and 0 < median["p"] < 1
    assert median["x"].shape == (3,)
    assert abs(median["w"].sum().item() - 1) < 1e-6


# Flow specifications -------------------------------------------------------------------
def test_a_builder_class_and_a_callable_give_working_guides():
    by_builder = AutoFlowGuide(constrained_model, flow=pf.flows.NSF, transforms=2, hidden=(16,))
    assert len(by_builder.get_posterior().rsample((5,))) == 5
    assert isinstance(by_builder.flow.transform[0], pf.transforms.Compose)
    by_callable = AutoFlowGuide(constrained_model, flow=lambda d: pf.flows.IAF(d, transforms=1))
    x, log_q = by_callable.get_posterior().rsample_and_log_prob((5,))
    assert x.shape == (5, 7) and log_q.shape == (5,)
    # the path gradient through builders (coupling splines with permutations, MAF form)
    by_maf = AutoFlowGuide(constrained_model, flow=pf.flows.MAF, transforms=1, hidden=(16,))
    for guide in (by_builder, by_callable, by_maf):
        value, gradient = elbo_gradient(constrained_model, guide, particles=4, plates=1)
        assert math.isfinite(value) and bool(torch.isfinite(gradient).all()) and float(gradient.norm()) > 0


def test_our_layers_work_as_init_transform_fn_of_pyros_auto_normalizing_flow():
    model, log_z = beta_binomial()
    for init in (
        lambda d: pf.transforms.Inverse(pf.transforms.MaskedSplineAutoregressive(d, hidden=(16,))),
        functools.partial(pf.transforms.MaskedAffineAutoregressive, hidden=(16,)),
    ):
        pyro.clear_param_store()
        guide = AutoNormalizingFlow(model, init)
        before = elbo_estimate(model, guide, 2000)
        train(model, guide, steps=60, lr=5e-2)
        names = list(pyro.get_param_store().keys())
        assert any("transform" in n for n in names), names
        after = elbo_estimate(model, guide, 2000)
        assert after > before + 0.1 and after < log_z + 0.01


# Errors -----------------------------------------------------------------------------------
def test_unknown_flow_name_or_option_raises_naming_the_choices():
    with pytest.raises(ValueError, match=r"unknown flow 'glowish'; for vectors \(D,\) choose one of nsf, .*iaf"):
        AutoFlowGuide(constrained_model, flow="glowish")
    with pytest.raises(TypeError, match=r"flow 'nsf' takes no option\(s\) bin; its options are .*bins"):
        AutoFlowGuide(constrained_model, flow="nsf", bin=8)
    with pytest.raises(TypeError, match="must be a pyro_flowpack Flow builder"):
        AutoFlowGuide(constrained_model, flow=torch.nn.Linear)
    with pytest.raises(TypeError, match="flow must be a name"):
        AutoFlowGuide(constrained_model, flow=3)
    with pytest.raises(ValueError, match="init_scale must be a finite number > 0, got -1"):
        AutoFlowGuide(constrained_model, init_scale=-1)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_jit_trace_elbo_trains_with_the_plain_score_and_a_warning():
    def model():
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        pyro.sample("y", dist.Normal(0.0, scale), obs=torch.tensor(0.5))

    guide = AutoFlowGuide(model, transforms=2)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.JitTrace_ELBO(ignore_jit_warnings=True))
    with pytest.warns(RuntimeWarning, match="jit tracing.*plain"):
        losses = [svi.step() for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)


def test_stl_must_be_a_bool_or_a_weight_in_the_unit_interval():
    with pytest.raises(TypeError, match=r"stl must be True, False or a weight in \[0, 1\], got 'yes'"):
        AutoFlowGuide(constrained_model, stl="yes")
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"stl must be True, False or a weight in \[0, 1\], got"):
            AutoFlowGuide(constrained_model, stl=bad)
    with pytest.raises(ValueError, match="with components=3, stl must be True or False, got 0.5"):
        AutoFlowGuide(constrained_model, components=3, stl=0.5)
    guide = AutoFlowGuide(constrained_model)
    with pytest.raises(ValueError, match="got 2"):
        guide.stl = 2
    mixture = AutoFlowGuide(constrained_model, components=3)
    with pytest.raises(ValueError, match="with components=3, stl must be True or False, got 0.5"):
        mixture.stl = 0.5


@pytest.mark.parametrize("flow, options", [("iaf", {"transforms": 2, "splines": 1}), ("realnvp", {"transforms": 2})])
@pytest.mark.parametrize("weight", [0.3, 0.75])
def test_a_fractional_stl_weight_blends_the_two_gradients_and_keeps_the_value(flow, options, weight):
    # stl=c: the ELBO's value is unchanged and its gradient is c * (path) + (1 - c) * (total),
    # per parameter, from the same draws, on a posterior that is not the guide (moved away
    # from the identity first), at 1 and at 4 particles
    def model():
        p = pyro.sample("p", dist.Beta(2.0, 5.0))
        s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
        pyro.sample("y", dist.Normal(p * 3.0, s), obs=torch.tensor(1.5))

    guide = AutoFlowGuide(model, flow=flow, **options)
    guide()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for particles in (1, 4):
        values, grads = {}, {}
        for stl in (True, False, weight):
            guide.stl = stl
            pyro.set_rng_seed(7)
            values[stl], grads[stl] = elbo_gradient(model, guide, particles=particles)
        assert values[weight] == pytest.approx(values[True], abs=1e-5)
        assert values[weight] == pytest.approx(values[False], abs=1e-5)
        expected = weight * grads[True] + (1 - weight) * grads[False]
        assert float((grads[True] - grads[False]).norm()) > 1e-3  # the two estimates differ here
        assert torch.allclose(grads[weight], expected, atol=1e-5, rtol=1e-4)


def test_a_fractional_stl_weight_also_blends_the_score_of_a_value_it_did_not_draw():
    g = pf.infer.guide_flow("iaf", 3, transforms=2, splines=1)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.1 * torch.randn_like(p))
    value = torch.randn(5, 3)
    parameters = list(g.parameters())
    plain = g().log_prob(value)
    held = pf.infer.StickingTheLanding(g.base().expand((5,)), g.transform, g, weight=0.4).log_prob(value)
    assert torch.allclose(held, plain, atol=1e-5)
    got = torch.autograd.grad(held.sum(), parameters)
    want = torch.autograd.grad(plain.sum(), parameters)
    for a, b in zip(got, want):
        assert torch.allclose(a, 0.6 * b, atol=1e-6, rtol=1e-4)
    # a value with a graph of its own: the gradient in it is the full score's, as the
    # path estimate's (the weight-1 score through the inverse with the parameters held)
    value = value.clone().requires_grad_()
    blended = pf.infer.StickingTheLanding(g.base().expand((5,)), g.transform, g, weight=0.4).log_prob(value)
    fixed = pf.infer.StickingTheLanding(g.base().expand((5,)), g.transform, g).log_prob(value)
    assert torch.allclose(blended, fixed, atol=1e-5)
    (by_blend,) = torch.autograd.grad(blended.sum(), value)
    (by_fixed,) = torch.autograd.grad(fixed.sum(), value)
    assert torch.allclose(by_blend, by_fixed, atol=1e-5, rtol=1e-4)
    assert float(by_fixed.norm()) > 1e-2


def test_a_model_without_latent_sites_raises():
    def model():
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.3))

    with pytest.raises(RuntimeError, match="AutoFlowGuide found no latent variables"):
        AutoFlowGuide(model)()


def test_a_discrete_latent_site_raises_naming_it():
    def model():
        pyro.sample("n", dist.Poisson(3.0))

    with pytest.raises(ValueError, match="cannot handle discrete sample site 'n'"):
        AutoFlowGuide(model)()


def test_realnvp_guide_over_one_latent_fits_the_exact_gaussian_posterior():
    """One latent: each coupling layer is an affine map with learned constants. For
    a ~ N(0, 1), x ~ N(a, 1), x = 1: the posterior N(0.5, 0.5) within 0.05 in mean and sd."""
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(a, 1.0), obs=torch.tensor(1.0))

    torch.manual_seed(0)
    guide = AutoFlowGuide(model, flow="realnvp", transforms=2, hidden=(16,))
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 2e-2}),
                         pyro.infer.Trace_ELBO(num_particles=8, vectorize_particles=True))
    for _ in range(300):
        svi.step()
    with torch.no_grad():
        draws = guide.get_posterior().sample((20000,))[:, 0]
    assert abs(float(draws.mean()) - 0.5) < 0.05 and abs(float(draws.std()) - 0.5**0.5) < 0.05


def test_bad_flow_callables_raise():
    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.raises(TypeError, match="must return a pyro_flowpack Flow or a layer, got Linear"):
        AutoFlowGuide(model, flow=lambda d: torch.nn.Linear(d, d))()
    with pytest.raises(ValueError, match="vectors of the 1 latent dimensions"):
        AutoFlowGuide(model, flow=lambda d: pf.flows.IAF(d + 1))()


# The example ---------------------------------------------------------------------------------
def test_svi_guide_example_prints_an_elbo_per_guide_and_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("svi_guide", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "elbo.json"
    module.main(["--steps", "20", "--seed", "1", "--particles", "200", "--json", str(out)])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert set(results["elbo"]) == {"AutoNormal", "AutoIAFNormal", "AutoFlowGuide"}
    for name, value in results["elbo"].items():
        assert name in printed and math.isfinite(value) and value < results["log_z"] + 0.5


# The "iaf" recipes ----------------------------------------------------------------------
def test_iaf_with_splines_has_bounded_affine_blocks_and_splines_in_the_last_blocks_only():
    from pyro_flowpack.transforms import MaskedSplineAutoregressive

    def kinds(**options):
        return ["spline" if isinstance(t.layer, MaskedSplineAutoregressive) else "affine"
                for t in pf.infer.guide_flow("iaf", 3, **options).transform.modules_]

    assert kinds() == ["affine"] * 4
    assert kinds(splines=1) == ["affine"] * 4 + ["spline"]
    assert kinds(transforms=2, splines=2) == ["affine", "spline", "affine", "spline"]
    assert kinds(transforms=2, splines=2, affine=False) == ["spline", "spline"]
    with pytest.raises(ValueError, match=r"splines .*transforms=2\) must be an int >= 0 and <= 2, got 3"):
        pf.infer.guide_flow("iaf", 3, transforms=2, splines=3)


def test_affine_layers_log_scale_stays_within_its_bounds_and_starts_at_the_identity():
    # the sampling direction's log-scale of layer 1 is -log|dy/dx| of its MAF map; with
    # huge network outputs it must approach the bounds (-5, 3) but not cross them
    from pyro_flowpack.transforms.monotone import SoftBoundedAffine

    affine = SoftBoundedAffine(-3.0, 5.0)  # MAF side: the negated bounds
    raw = torch.tensor([-1e4, -10.0, 0.0, 10.0, 1e4])
    _, log_scale = affine._shift_log_scale(torch.stack([torch.zeros(5), raw], -1))
    assert log_scale[2] == 0
    assert torch.allclose(log_scale[[0, 4]], torch.tensor([-3.0, 5.0]))
    assert bool(((log_scale >= -3) & (log_scale <= 5)).all()) and bool((log_scale.diff() > 0).all())
    with pytest.raises(ValueError, match=r"low < 0 < high, got \(-5.0, -1.0\)"):
        pf.infer.guide_flow("iaf", 2, log_scale_bounds=(-5.0, -1.0))


# The low-dimensional default ---------------------------------------------------------------
def normal_model(dim: int):
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(dim), 1.0).to_event(1))
    return model


@pytest.mark.parametrize("dim", [1, 2, 3, 5])
def test_the_default_ends_every_block_with_a_spline_and_blends_the_gradient_up_to_two_dimensions(dim):
    guide = AutoFlowGuide(normal_model(dim))
    guide()
    splines = sum(isinstance(m, pf.transforms.MaskedSplineAutoregressive) for m in guide.flow.modules())
    affine = sum(type(m) is MaskedAutoregressive for m in guide.flow.modules())
    assert guide.stl is None
    if dim <= AutoFlowGuide.low_dimension:
        assert (splines, affine) == (4, 4)
        assert guide._path_weight == AutoFlowGuide.low_dimension_stl == 0.75
    else:
        assert (splines, affine) == (0, 4)
        assert guide._path_weight == 1.0


@pytest.mark.parametrize("given, splines, weight", [
    ({"stl": True}, 4, 1.0), ({"stl": False}, 4, 0.0), ({"splines": 0}, 0, 1.0), ({"splines": 1}, 1, 1.0),
    ({"transforms": 2}, 2, 0.75), ({"transforms": 2, "stl": 0.25}, 2, 0.25), ({"components": 2}, 0, 1.0),
])
def test_options_the_user_gives_override_the_low_dimensional_default(given, splines, weight):
    guide = AutoFlowGuide(normal_model(2), **given)
    guide()
    flows = guide.flows if "components" in given else [guide.flow]
    for flow in flows:
        assert sum(isinstance(m, pf.transforms.MaskedSplineAutoregressive) for m in flow.modules()) == splines
    assert guide._path_weight == weight


def test_the_one_dimensional_default_fits_a_bimodal_posterior_that_no_gaussian_can():
    # in 1-D an affine IAF is a Gaussian, whose best reverse-KL gap on this target is
    # -log(2/3) = 0.405 (the larger mode); the default's splines get below it in 200 steps
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        density = torch.logsumexp(torch.stack([math.log(1 / 3) - (z + 1.5) ** 2 / 0.5,
                                               math.log(2 / 3) - (z - 1.5) ** 2 / 0.5]), 0)
        pyro.factor("target", density - dist.Normal(0.0, 1.0).log_prob(z))

    log_z = math.log(0.5 * math.sqrt(2 * math.pi))
    gaps = {}
    for name, options in (("default", {}), ("affine", {"splines": 0})):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoFlowGuide(model, **options)
        train(model, guide, steps=200, particles=8, lr=1e-2)
        pyro.set_rng_seed(1)
        with torch.no_grad():
            log_w, _, _ = pyro.infer.importance.vectorized_importance_weights(model, guide, num_samples=4000,
                                                                                max_plate_nesting=0)
        gaps[name] = log_z - float(log_w.mean())
    assert gaps["affine"] > 0.38, gaps
    assert gaps["default"] < 0.3, gaps  # below any Gaussian's 0.405 (seeds 0-4: 0.03 to 0.20)
