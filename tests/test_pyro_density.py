"""A flow as a density inside a Pyro model: the site's log-density under plates, Predictive,
SVI with a flow as a learned likelihood, NUTS on a fixed flow density, gradients of
``log_prob`` with respect to the value, and the ``examples/pyro_density.py`` script."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO

import pyro_flowpack as pf
from pyro_flowpack.transforms import (
    ActNorm,
    AffineCoupling,
    Inverse,
    LULinear,
    MaskedAffineAutoregressive,
    MaskedSplineAutoregressive,
    SplineCoupling,
)
from cases import CASES, make_flow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pyro_density.py"


def perturbed(flow: pf.Flow, scale: float = 0.3, seed: int = 0) -> pf.Flow:
    """The flow in float64 with its parameters moved away from the identity."""
    torch.manual_seed(seed)
    flow = flow.double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow


def density_model(flow: pf.Flow, n: int, x: torch.Tensor | None = None, c: torch.Tensor | None = None,
                  subsample: int | None = None) -> torch.Tensor:
    """``x_i ~ flow(c_i)`` independently for ``i < n``, the flow registered with Pyro."""
    pyro.module("flow", flow)
    with pyro.plate("data", n, subsample_size=subsample) as i:
        return pyro.sample("x", flow(None if c is None else c[i]), obs=None if x is None else x[i])


# The site's log-density ----------------------------------------------------------------
@pytest.mark.parametrize("conditional", [False, True], ids=["density", "likelihood"])
def test_trace_site_log_prob_is_flow_log_prob_summed_under_plate_within_1e10(conditional):
    flow = perturbed(pf.flows.NSF(3, context=2 if conditional else 0, transforms=2, hidden=(16,), bins=4))
    x = torch.randn(20, 3, dtype=torch.float64)
    c = torch.randn(20, 2, dtype=torch.float64) if conditional else None
    trace = pyro.poutine.trace(density_model).get_trace(flow, 20, x, c)
    site = trace.nodes["x"]
    assert site["is_observed"] and site["fn"].batch_shape == (20,) and site["fn"].event_shape == (3,)
    expected = flow(c).log_prob(x)
    trace.compute_log_prob()
    assert torch.allclose(site["log_prob"], expected, rtol=0, atol=1e-10)
    assert torch.allclose(trace.log_prob_sum(), expected.sum(), rtol=0, atol=1e-10)
    names = set(pyro.get_param_store().keys())
    assert names == {f"flow$$${name}" for name, _ in flow.named_parameters()}


def test_subsampled_plate_scales_the_flow_log_prob_by_n_over_batch():
    flow = perturbed(pf.flows.RealNVP(2, transforms=2, hidden=(8,)))
    x = torch.randn(40, 2, dtype=torch.float64)
    trace = pyro.poutine.trace(density_model).get_trace(flow, 40, x, None, 10)
    index = trace.nodes["data"]["value"]
    assert index.shape == (10,)
    expected = 40 / 10 * flow().log_prob(x[index]).sum()
    assert torch.allclose(trace.log_prob_sum(), expected, rtol=1e-12, atol=0)


# Predictive ----------------------------------------------------------------------------
@pytest.mark.parametrize("parallel", [False, True], ids=["loop", "vectorised"])
def test_predictive_draws_flow_samples_of_shape_samples_by_plate_by_event(parallel):
    flow = perturbed(pf.flows.RealNVP(2, context=3, transforms=2, hidden=(8,)))
    c = torch.randn(5, 3, dtype=torch.float64)
    predictive = Predictive(density_model, num_samples=7, parallel=parallel)
    x = predictive(flow, 5, None, c)["x"]
    assert x.shape == (7, 5, 2) and x.dtype == torch.float64
    assert torch.isfinite(x).all()
    assert (x[1:] != x[:1]).all(), "every draw is a fresh sample"


def test_predictive_samples_follow_the_flow_mean_within_5_standard_errors():
    flow = perturbed(pf.flows.RealNVP(2, transforms=2, hidden=(8,)))
    x = Predictive(density_model, num_samples=400, parallel=True)(flow, 10)["x"].reshape(-1, 2)
    reference = flow().sample((100_000,))
    error = (x.mean(0) - reference.mean(0)).abs()
    assert (error < 5 * reference.std(0) / math.sqrt(len(x))).all(), error


# SVI with a flow as a learned likelihood ------------------------------------------------
def test_svi_with_flow_likelihood_matches_direct_nll_training_within_1e8_and_decreases():
    torch.manual_seed(0)
    x = pf.data.two_moons(256, seed=0).double()
    flow = perturbed(pf.flows.RealNVP(2, transforms=2, hidden=(16, 16)), scale=0.05)
    twin = copy.deepcopy(flow)

    svi = SVI(density_model, lambda *args: None, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    svi_losses = [svi.step(twin, len(x), x) / len(x) for _ in range(40)]

    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    direct_losses = []
    for _ in range(40):
        loss = -flow().log_prob(x).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        direct_losses.append(loss.item() / len(x))

    # The ELBO of a model without latent variables is its log-likelihood (a sum over the
    # plate), and Pyro's Adam is torch's Adam for each parameter: the two runs are the
    # same computation.
    assert torch.allclose(torch.tensor(svi_losses), torch.tensor(direct_losses), rtol=0, atol=1e-8)
    assert svi_losses[-1] < svi_losses[0] - 0.3, (svi_losses[0], svi_losses[-1])


# NUTS on a fixed flow density -----------------------------------------------------------
def test_nuts_on_a_fixed_flow_density_mixes_and_matches_its_moments():
    """200 warm-up steps and 300 samples of one chain: split R-hat below 1.05, an effective
    sample size above 60, the mean within 4 Monte Carlo standard errors (sd / sqrt(ESS)) of
    the flow's own mean (from 200000 direct samples), and the variance within 4 of its
    approximate standard errors (var * sqrt(3 / ESS))."""
    flow = perturbed(pf.Flow([AffineCoupling(2, hidden=(16,)), LULinear(2)]), scale=0.3, seed=5)
    flow.requires_grad_(False).eval()
    reference = flow().sample((200_000,))
    skewness = ((reference - reference.mean(0)) ** 3).mean(0) / reference.std(0) ** 3
    assert (skewness.abs() > 0.3).all(), f"the density is nearly Gaussian (skewness {skewness})"

    def model():
        pyro.sample("x", flow())

    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(model), num_samples=300, warmup_steps=200, disable_progbar=True)
    mcmc.run()
    x = mcmc.get_samples()["x"]
    diagnostics = mcmc.diagnostics()["x"]
    ess, r_hat = diagnostics["n_eff"], diagnostics["r_hat"]
    assert x.shape == (300, 2)
    assert (r_hat < 1.05).all(), r_hat
    assert (ess > 60).all(), ess
    mean_error = (x.mean(0) - reference.mean(0)).abs()
    assert (mean_error < 4 * reference.std(0) / ess.sqrt()).all(), (mean_error, ess)
    var_error = (x.var(0) / reference.var(0) - 1).abs()
    assert (var_error < 4 * (3 / ess).sqrt()).all(), (var_error, ess)


# Gradients of log_prob with respect to the value ------------------------------------------
GRADIENT_CASES = [
    "AffineCoupling", "SplineCoupling", "MaskedAffineAutoregressive", "MaskedSplineAutoregressive",
    "Inverse-AffineCoupling", "LULinear", "ActNorm", "BatchNorm", "RealNVP", "MAF", "IAF", "NSF", "Glow",
]


@pytest.mark.parametrize("family", [c for c in CASES if c.name in GRADIENT_CASES], ids=lambda c: c.name)
def test_log_prob_gradient_wrt_value_matches_finite_differences(family):
    """Autograd against central differences (eps 1e-6), float64, atol 1e-5 / rtol 1e-4."""
    case = family
    context = 3 if case.conditional else 0
    flow = make_flow(case, context)
    flow.requires_grad_(False)
    x = case.data_sample((3,)).requires_grad_()
    c = case.context_sample(context, (3,))
    assert torch.autograd.gradcheck(lambda v: flow(c).log_prob(v), (x,), eps=1e-6, atol=1e-5, rtol=1e-4)
    (gradient,) = torch.autograd.grad(flow(c).log_prob(x).sum(), x)
    assert torch.isfinite(gradient).all() and (gradient != 0).any()


def test_gradients_flow_through_every_layer_of_a_deep_flow():
    """In a flow of every vector family, the gradient of log_prob with respect to the value
    matches finite differences, and every parameter of every layer gets a nonzero gradient."""
    torch.manual_seed(0)
    layers = [
        ActNorm(4), AffineCoupling(4, hidden=(8,)), LULinear(4), SplineCoupling(4, hidden=(8,), bins=4),
        MaskedAffineAutoregressive(4, hidden=(8,)), Inverse(MaskedSplineAutoregressive(4, hidden=(8,), bins=4)),
    ]
    flow = perturbed(pf.Flow(layers), scale=0.1)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: flow().log_prob(v), (x,), eps=1e-6, atol=1e-5, rtol=1e-4)
    flow().log_prob(x).sum().backward()
    for layer in layers:
        for name, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).any(), (layer, name)


# The example script ----------------------------------------------------------------------
def test_pyro_density_example_runs_with_a_tiny_budget(tmp_path):
    spec = importlib.util.spec_from_file_location("pyro_density", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--steps", "20", "--warmup", "50", "--samples", "50", "--reference-draws", "5000", "--seed", "1",
                  "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(metrics["test_nll"]) and metrics["steps"] == 20 and metrics["seed"] == 1
    assert len(metrics["posterior_mean_nuts"]) == 2 and len(metrics["posterior_mean_reference"]) == 2
    assert all(math.isfinite(v) for v in metrics["r_hat"] + metrics["n_eff"])
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"
