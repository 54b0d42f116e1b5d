r"""The multimodal guide ``AutoFlowGuide(components=K)`` and the stratified losses
``SIWAE`` and ``StratifiedELBO``: every mode covered, the mixture's density, the bounds
against Pyro's ELBOs on the same draws, finite gradients, annealing, and clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal
from pyro.infer.importance import vectorized_importance_weights

from pyro_flowpack.infer import SIWAE, AutoFlowGuide, StratifiedELBO, StratifiedMixture
from scripts import loaded_script

SCALE = 0.5
MEANS = torch.tensor([[3.0 * math.cos(math.pi / 2 + 2 * math.pi * k / 3),
                       3.0 * math.sin(math.pi / 2 + 2 * math.pi * k / 3)] for k in range(3)])


@pytest.fixture(autouse=True)
def _seeded():
    pyro.set_rng_seed(0)


def three_modes():
    """Three equal 2-D Gaussians of sd 0.5 on a circle of radius 3 (bench/vi.py's
    ``mixture``): a standard normal site corrected by a factor."""
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    z = pyro.sample("z", base)
    squared = ((z.unsqueeze(-2) - MEANS) ** 2).sum(-1)
    pyro.factor("target", torch.logsumexp(-0.5 * squared / SCALE**2, -1) - base.log_prob(z))


def normal_model(y: torch.Tensor = torch.tensor([0.3, -0.4, 1.1])):
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    return model


def constrained_model():
    pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    pyro.sample("p", dist.Beta(2.0, 3.0))


def fit(model, guide, loss, steps: int, lr: float = 1e-2) -> None:
    guide()
    optimizer = torch.optim.Adam([p for p in guide.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.1 ** (1 / steps))
    for _ in range(steps):
        optimizer.zero_grad()
        loss.differentiable_loss(model, guide).backward()
        optimizer.step()
        schedule.step()


# Covering the modes --------------------------------------------------------------------


def near_each_mode(guide, draws: int = 3000) -> torch.Tensor:
    """The share of the guide's draws within 2 sd of each mode's centre (the exact
    posterior: (1 - exp(-2)) / 3 = 0.288 for each)."""
    with torch.no_grad():
        z = guide.get_posterior().sample((draws,))
    return ((z.unsqueeze(-2) - MEANS).norm(dim=-1) < 2 * SCALE).float().mean(0)


def test_components_guide_puts_at_least_a_fifth_of_its_draws_near_every_mode():
    """200 steps of SIWAE (8 particles per component): each of the three modes receives
    at least 20% of 3000 draws within 2 sd of its centre (28.8% for the exact
    posterior), and the mixture weights are each within 0.1 of 1/3."""
    guide = AutoFlowGuide(three_modes, components=3, transforms=2, hidden=(32, 32))
    with pyro.validation_enabled(False):
        fit(three_modes, guide, SIWAE(num_particles=8, max_plate_nesting=0), steps=200)
    near = near_each_mode(guide)
    assert (near >= 0.2).all(), f"share of draws within 2 sd of each mode: {near.tolist()}"
    weights = torch.softmax(guide.mixture_logits.detach(), 0)
    assert (weights - 1 / 3).abs().max() < 0.1, weights


def test_a_one_component_guide_with_the_elbo_finds_one_mode_only():
    """The contrast: AutoFlowGuide's default, trained by the ELBO, settles on a single
    mode (fewer than 5% of its draws within 2 sd of at least one of the three)."""
    guide = AutoFlowGuide(three_modes, transforms=2, hidden=(32, 32))
    with pyro.validation_enabled(False):
        fit(three_modes, guide, StratifiedELBO(num_particles=8, max_plate_nesting=0), steps=200)
    near = near_each_mode(guide)
    assert near.min() < 0.05, near.tolist()


# The mixture's density -----------------------------------------------------------------


def test_mixture_log_prob_is_the_log_of_the_weighted_sum_of_component_densities():
    guide = AutoFlowGuide(three_modes, components=3, transforms=2, hidden=(16, 16))
    guide()
    with torch.no_grad():
        guide.mixture_logits.copy_(torch.tensor([0.5, -1.0, 0.2]))
    q = guide.get_posterior()
    x = torch.randn(50, 2) * 2
    log_pi = torch.log_softmax(guide.mixture_logits, 0)
    direct = torch.logsumexp(torch.stack([log_pi[k] + guide.flows[k]().log_prob(x) for k in range(3)], -1), -1)
    torch.testing.assert_close(q.log_prob(x), direct, atol=1e-5, rtol=1e-5)


def test_mixture_density_integrates_to_one():
    """A Riemann sum over [-10, 10]^2 (a 400 x 400 grid) of the untrained mixture's
    density, whose components start one unit from the origin with scale 1: within 1e-3."""
    guide = AutoFlowGuide(three_modes, components=3, transforms=2, hidden=(16, 16))
    guide()
    with torch.no_grad():
        guide.mixture_logits.copy_(torch.tensor([1.0, 0.0, -1.0]))
        axis = torch.linspace(-10, 10, 400)
        grid = torch.cartesian_prod(axis, axis)
        mass = guide.get_posterior().log_prob(grid).exp().sum() * (axis[1] - axis[0]) ** 2
    assert abs(float(mass) - 1) < 1e-3


def test_stratified_draws_at_index_k_come_from_component_k():
    q = StratifiedMixture([dist.Normal(-5.0, 1.0), dist.Normal(0.0, 1.0), dist.Normal(5.0, 1.0)],
                          torch.tensor([0.0, 1.0, 2.0])).stratify(-1)
    z = q.rsample((4000,))
    assert z.shape == (4000, 3)
    torch.testing.assert_close(z.mean(0), torch.tensor([-5.0, 0.0, 5.0]), atol=0.1, rtol=0)
    ancestral = StratifiedMixture(q.components, q.logits).sample((8000,))
    share = torch.stack([(ancestral < -2.5).float().mean(), (ancestral > 2.5).float().mean()])
    torch.testing.assert_close(share, torch.softmax(q.logits, 0)[[0, 2]], atol=0.02, rtol=0)


def test_stratified_elbo_estimates_the_mixture_elbo_of_ancestral_draws():
    """Stratified (2000 draws per component) and plain (20000 ancestral draws, the
    mixture's log-density) estimates of E_q[log p - log q] agree within 0.05 nats."""
    guide = AutoFlowGuide(three_modes, components=3, transforms=2, hidden=(16, 16))
    guide()
    with torch.no_grad():
        guide.mixture_logits.copy_(torch.tensor([1.0, 0.0, -0.5]))
        log_w, _, _ = vectorized_importance_weights(three_modes, guide, num_samples=20000, max_plate_nesting=0)
    stratified = -StratifiedELBO(num_particles=2000, max_plate_nesting=0).loss(three_modes, guide)
    assert abs(stratified - float(log_w.mean())) < 0.05


# The losses against Pyro's on the same draws ------------------------------------------


def same_draws(loss, model, guide) -> float:
    pyro.set_rng_seed(3)
    return loss.loss(model, guide)


@pytest.mark.parametrize("make_guide", [lambda m: AutoNormal(m), lambda m: AutoFlowGuide(m, stl=False)],
                         ids=["AutoNormal", "AutoFlowGuide"])
def test_with_one_component_the_losses_are_pyros_elbo_and_iwae_on_the_same_draws(make_guide):
    """With one component, SIWAE(T) is RenyiELBO(alpha=0) (IWAE_T), StratifiedELBO(T) is
    Trace_ELBO with T vectorised particles, and SIWAE(1) is the one-sample ELBO: 1e-5."""
    model = normal_model()
    guide = make_guide(model)
    guide()
    for ours, pyros in [
        (SIWAE(num_particles=1, max_plate_nesting=1), Trace_ELBO(max_plate_nesting=1)),
        (StratifiedELBO(num_particles=1, max_plate_nesting=1), Trace_ELBO(max_plate_nesting=1)),
        (SIWAE(num_particles=16, max_plate_nesting=1),
         RenyiELBO(alpha=0, num_particles=16, vectorize_particles=True, max_plate_nesting=1)),
        (StratifiedELBO(num_particles=16, max_plate_nesting=1),
         Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1)),
    ]:
        assert same_draws(ours, model, guide) == pytest.approx(same_draws(pyros, model, guide), abs=1e-5)


def test_siwae_is_at_least_the_stratified_elbo_on_the_same_draws():
    guide = AutoFlowGuide(three_modes, components=3, transforms=2, hidden=(16, 16))
    guide()
    for particles in (1, 4):
        siwae = -same_draws(SIWAE(num_particles=particles, max_plate_nesting=0), three_modes, guide)
        elbo = -same_draws(StratifiedELBO(num_particles=particles, max_plate_nesting=0), three_modes, guide)
        assert siwae >= elbo - 1e-6


@pytest.mark.parametrize("stl", [True, False])
@pytest.mark.parametrize("loss", [SIWAE, StratifiedELBO])
def test_gradients_are_finite_and_reach_every_component_and_the_weights(loss, stl):
    guide = AutoFlowGuide(three_modes, components=3, stl=stl, transforms=2, hidden=(16, 16))
    guide()
    with torch.no_grad():
        guide.mixture_logits.copy_(torch.tensor([0.3, 0.0, -0.3]))
    loss(num_particles=4, max_plate_nesting=0).differentiable_loss(three_modes, guide).backward()
    for name, parameter in guide.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert guide.mixture_logits.grad.abs().sum() > 0
    for flow in guide.flows:
        assert sum(float(p.grad.abs().sum()) for p in flow.parameters()) > 0


@pytest.mark.parametrize("make_guide", [lambda m: AutoNormal(m), lambda m: AutoIAFNormal(m, hidden_dim=[8]),
                                        lambda m: AutoFlowGuide(m, components=2, transforms=1)],
                         ids=["AutoNormal", "AutoIAFNormal", "AutoFlowGuide-components2"])
@pytest.mark.parametrize("model", [normal_model(), constrained_model], ids=["plated", "constrained"])
@pytest.mark.filterwarnings("ignore:ConditionalAutoRegressiveNN input_dim = 1")
def test_svi_steps_with_siwae_are_finite_for_pyro_guides_and_ours(make_guide, model):
    guide = make_guide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=SIWAE(num_particles=4))
    losses = [svi.step() for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)


def test_a_mixture_guide_works_with_predictive_and_its_quantiles():
    guide = AutoFlowGuide(constrained_model, components=3, transforms=1)
    for parallel in (False, True):
        draws = Predictive(constrained_model, guide=guide, num_samples=20, parallel=parallel)()
        assert draws["scale"].shape == (20,) and bool((draws["scale"] > 0).all())
        assert bool(((draws["p"] > 0) & (draws["p"] < 1)).all())
    assert guide.quantiles([0.1, 0.9])["p"].shape == (2,)


# Annealing -----------------------------------------------------------------------------


def test_annealing_ramps_the_temperature_linearly_over_gradient_steps_only():
    model = normal_model()
    guide = AutoNormal(model, init_scale=1.0)  # q = the prior N(0, 1)
    loss = SIWAE(num_particles=4, max_plate_nesting=1, beta0=0.0, anneal_steps=4)
    assert loss.beta == 0.0
    assert loss.loss(model, guide) == pytest.approx(0.0, abs=1e-6)  # at beta = 0 the target is the prior
    assert loss.step == 0
    betas = []
    for _ in range(6):
        betas.append(loss.beta)
        loss.loss_and_grads(model, guide)
    assert betas == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    assert SIWAE().beta == 1.0


# Errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("components", [0, -1, True, 1.5, "3"])
def test_components_must_be_a_positive_int(components):
    with pytest.raises(ValueError, match="AutoFlowGuide: components must be an int >= 1"):
        AutoFlowGuide(three_modes, components=components)


def test_init_spread_must_be_a_non_negative_number():
    with pytest.raises(ValueError, match="init_spread"):
        AutoFlowGuide(three_modes, components=2, init_spread=-1.0)


def test_a_mixture_has_no_single_transform_for_neutra():
    guide = AutoFlowGuide(three_modes, components=2, transforms=1)
    guide()
    with pytest.raises(NotImplementedError, match="mixture of flows"):
        guide.get_transform()
    with pytest.raises(NotImplementedError, match="mixture of flows"):
        guide.get_base_dist()


@pytest.mark.parametrize("options, message", [
    ({"num_particles": 0}, "num_particles must be an int >= 1"),
    ({"num_particles": True}, "num_particles must be an int >= 1"),
    ({"beta0": 1.5}, r"beta0 must be in \[0, 1\]"),
    ({"anneal_steps": -1}, "anneal_steps must be an int >= 0"),
    ({"max_plate_nesting": -1}, "max_plate_nesting must be an int >= 0"),
])
def test_loss_options_are_checked(options, message):
    for loss in (SIWAE, StratifiedELBO):
        with pytest.raises(ValueError, match=f"{loss.__name__}: {message}"):
            loss(**options)


def test_a_guide_site_without_rsample_is_refused():
    def model():
        pyro.sample("c", dist.Bernoulli(0.5))

    def guide():
        pyro.sample("c", dist.Bernoulli(0.3))

    with pytest.raises(NotImplementedError, match="'c' is not reparameterised"):
        SIWAE(num_particles=2, max_plate_nesting=0).loss(model, guide)


def test_stratified_mixture_checks_its_components_and_logits():
    with pytest.raises(ValueError, match="at least one component"):
        StratifiedMixture([], torch.zeros(0))
    with pytest.raises(ValueError, match="logits must be a tensor of shape \\(2,\\)"):
        StratifiedMixture([dist.Normal(0.0, 1.0), dist.Normal(1.0, 1.0)], torch.zeros(3))
    with pytest.raises(ValueError, match="event shape"):
        StratifiedMixture([dist.Normal(0.0, 1.0), dist.Normal(torch.zeros(2), 1.0).to_event(1)], torch.zeros(2))
    with pytest.raises(ValueError, match="has no rsample"):
        StratifiedMixture([dist.Poisson(1.0)], torch.zeros(1))


# The benchmark script ------------------------------------------------------------------


def test_the_multimodal_benchmark_runs_and_states_its_goals(tmp_path, capsys):
    script = Path(__file__).resolve().parents[1] / "bench" / "vi_multimodal.py"
    with loaded_script(script, "vi_multimodal") as bench:
        out = tmp_path / "mm.json"
        summary = bench.main(["--seeds", "0", "--steps", "2", "--eval-particles", "50", "--configs",
                              "AutoFlowGuide-K3/SIWAE", "AutoNormal/StratifiedELBO", "--json", str(out),
                              "--rst", str(tmp_path / "mm.rst")])
        assert json.loads(out.read_text())["goals"] == summary["goals"]
        assert len(summary["goals"]) == 2 and all("AutoFlowGuide-K3 + SIWAE" in g for g in summary["goals"])
        assert [r["loss_particles"] for r in summary["runs"]] == [8, 24]
        assert "list-table" in (tmp_path / "mm.rst").read_text()
        assert bench.main(["--table-from", str(out)])["runs"] == summary["runs"]
        with pytest.raises(SystemExit):
            bench.main(["--configs", "AutoNormal/Trace_ELBO"])
    assert "error: --configs" in capsys.readouterr().err
