r"""Guide diagnostics: on a conjugate Gaussian model with its exact posterior and evidence,
the Pareto k-hat is low for the posterior itself and high for a poor guide, the
importance-sampled log Z is within its stated tolerance of the exact one, k-hat is
Pyro's psis_diagnostic on the same draws, and the verdicts and errors are clear."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.importance import psis_diagnostic

import pyro_flowpack as pf
from pyro_flowpack.infer import AutoFlowGuide, Diagnostics, diagnose
from pyro_flowpack.infer.diagnostics import pareto_khat

Y = torch.tensor([0.8, 1.9, 0.4, 1.3, 2.2])
PRIOR_SCALE, NOISE = 1.0, 1.0
POSTERIOR_VAR = 1 / (1 / PRIOR_SCALE**2 + len(Y) / NOISE**2)
POSTERIOR_MEAN = POSTERIOR_VAR * float(Y.sum()) / NOISE**2
LOG_Z = float(dist.MultivariateNormal(torch.zeros(len(Y)), NOISE**2 * torch.eye(len(Y))
                                      + PRIOR_SCALE**2 * torch.ones(len(Y), len(Y))).log_prob(Y))


@pytest.fixture(autouse=True)
def _seeded():
    pyro.set_rng_seed(0)


def model(y=Y):
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SCALE))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, NOISE), obs=y)


def gaussian_guide(scale_factor: float, shift: float = 0.0):
    """N(posterior mean + shift * sd, (scale_factor * sd)^2): the exact posterior for 1, 0."""

    def guide(y=Y):
        sd = math.sqrt(POSTERIOR_VAR)
        pyro.sample("mu", dist.Normal(POSTERIOR_MEAN + shift * sd, scale_factor * sd))

    return guide


def test_the_exact_posterior_has_a_low_khat_a_full_ess_and_the_exact_log_z():
    """Every weight equals Z up to rounding: k-hat below 0.5, ESS within 0.1% of S, log Z
    and the ELBO within 1e-4 of the exact log Z."""
    d = diagnose(model, gaussian_guide(1.0), num_particles=4000)
    assert d.khat < 0.5
    assert d.ess > 0.999 * 4000
    assert d.log_z == pytest.approx(LOG_Z, abs=1e-4) and d.elbo == pytest.approx(LOG_Z, abs=1e-4)
    assert "good" in str(d)


def test_a_too_narrow_guide_has_a_high_khat():
    """A quarter of the posterior's sd: weights exp(15 chi2_1 / 32), a Pareto tail of
    index 15/16, estimated above 0.7 from 4000 draws."""
    d = diagnose(model, gaussian_guide(0.25), num_particles=4000)
    assert d.khat > 0.7
    assert "do not trust the guide" in str(d)
    assert d.ess < 0.5 * 4000


def bimodal():
    """Two equal, well separated modes, normalised (log Z = 0)."""
    pyro.sample("x", dist.MixtureSameFamily(dist.Categorical(torch.ones(2)),
                                            dist.Normal(torch.tensor([-3.0, 3.0]), 0.5)))


def test_a_guide_that_reaches_a_neglected_mode_only_rarely_has_a_high_khat():
    """N(3, 2^2) against modes at -3 and 3 of sd 0.5: the few draws near -3 carry huge
    weights, and k-hat is above 0.7."""
    d = diagnose(bimodal, lambda: pyro.sample("x", dist.Normal(3.0, 2.0)), num_particles=4000)
    assert d.khat > 0.7 and "do not trust the guide" in str(d)


def test_khat_cannot_see_a_mode_that_no_draw_reaches():
    """The limitation: a guide equal to one of the two modes has constant weights, so
    k-hat is low, the ESS full, and log Z off by exactly log 2."""
    d = diagnose(bimodal, lambda: pyro.sample("x", dist.Normal(3.0, 0.5)), num_particles=4000)
    assert d.khat < 0.5 and d.ess > 0.999 * 4000
    assert d.log_z == pytest.approx(-math.log(2), abs=1e-4)


def test_log_z_of_a_reasonable_guide_is_within_its_tolerance_and_the_elbo_below():
    """A guide 1.3 times wider than the posterior and off by 0.3 sd (k-hat < 0.5): from
    4000 draws log Z is within 4 standard errors and 0.01 nats of the exact one, the ELBO
    below it by the KL (here 0.07 nats, within 0.02)."""
    d = diagnose(model, gaussian_guide(1.3, shift=0.3), num_particles=4000)
    assert d.khat < 0.5
    assert abs(d.log_z - LOG_Z) < min(0.01, 4 * d.log_z_se)
    kl = math.log(1 / 1.3) + (1.3**2 + 0.3**2) / 2 - 0.5
    assert d.gap == pytest.approx(kl, abs=0.02) and d.elbo < LOG_Z


def test_khat_is_pyros_psis_diagnostic_on_the_same_draws():
    guide = gaussian_guide(0.5)
    pyro.set_rng_seed(1)
    ours = diagnose(model, guide, num_particles=2000, max_plate_nesting=7).khat
    pyro.set_rng_seed(1)
    assert ours == pytest.approx(psis_diagnostic(model, guide, num_particles=2000), abs=1e-6)  # float32 vs 64


@pytest.mark.parametrize("components", [1, 3])
def test_the_guide_method_is_diagnose_of_its_model_and_works_for_a_mixture(components):
    guide = AutoFlowGuide(model, components=components, transforms=1)
    guide(Y)
    pyro.set_rng_seed(2)
    d = guide.diagnose(Y, num_particles=500)
    pyro.set_rng_seed(2)
    assert d == diagnose(model, guide, Y, num_particles=500)
    assert isinstance(d, Diagnostics) and d.num_particles == 500
    assert all(math.isfinite(v) for v in (d.elbo, d.elbo_se, d.log_z, d.log_z_se, d.ess))
    assert d.elbo <= d.log_z + 1e-9 and 1 <= d.ess <= 500
    assert set(d.as_dict()) >= {"elbo", "log_z", "khat", "ess", "gap", "verdict"}


@pytest.mark.parametrize("khat, words", [(0.3, "good"), (float("-inf"), "good"), (0.6, "usable with care"),
                                         (0.9, "do not trust the guide"), (float("inf"), "increase num_particles")])
def test_the_verdict_follows_the_khat_thresholds(khat, words):
    d = Diagnostics(elbo=-1.0, elbo_se=0.01, log_z=-0.9, log_z_se=0.01, khat=khat, ess=100.0, num_particles=1000)
    text = str(d)
    assert words in text and "ESS 100 of 1000" in text and len(text.splitlines()) == 2


def test_a_high_khat_with_a_nearly_full_ess_says_the_tail_is_light_in_mass():
    d = Diagnostics(elbo=-1.0, elbo_se=0.001, log_z=-1.0, log_z_se=0.001, khat=0.8, ess=990.0, num_particles=1000)
    assert "do not trust the guide" in str(d) and "ESS 99%" in d.verdict
    assert "barely vary" not in Diagnostics(-1.0, 0.1, -0.5, 0.1, 0.8, 300.0, 1000).verdict


def test_signature_errors_are_clear():
    guide = gaussian_guide(1.0)
    with pytest.raises(TypeError, match="guide"):
        diagnose(model)
    with pytest.raises(TypeError, match=r"diagnose\(model, guide, \*args"):
        diagnose(model, "guide")
    for bad in (1, 0, True, 2.5):
        with pytest.raises(ValueError, match="diagnose: num_particles must be an int >= 2"):
            diagnose(model, guide, num_particles=bad)
    with pytest.raises(ValueError, match="diagnose: max_plate_nesting must be an int >= 0"):
        diagnose(model, guide, max_plate_nesting=-1)
    with pytest.raises(ValueError, match="pareto_khat expects a 1-D tensor"):
        pareto_khat(torch.zeros(3, 4))


def test_equal_weights_have_no_tail():
    assert pareto_khat(torch.full((100,), -2.0)) == float("-inf")
    with pytest.warns(RuntimeWarning, match="not enough tail samples"):
        assert pareto_khat(torch.tensor([0.0, 1.0, 2.0])) == float("inf")


def test_non_finite_log_weights_are_reported():
    def guide(y=Y):
        pyro.sample("mu", dist.Normal(float("nan"), 1.0))

    with pytest.raises(ValueError, match="NaN or \\+inf"), pyro.validation_enabled(False):
        diagnose(model, guide, num_particles=10)


def test_the_example_guide_pipeline_is_exported():
    assert pf.infer.diagnose is diagnose and pf.infer.Diagnostics is Diagnostics
