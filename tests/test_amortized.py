"""Amortized flow posteriors q(z | x): shapes, one-pass sampling and scoring in a Pyro guide,
the exact posterior of a linear-Gaussian model recovered by SVI, clear errors, and the
``examples/vae_flow.py`` script."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

import pyro_flowpack as pf
from pyro_flowpack.infer import AmortizedFlow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vae_flow.py"


def encoder(inputs: int = 6, context: int = 4, hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, context))


def amortized(latent: int = 2, inputs: int = 6, context: int = 4, transforms: int = 2,
              affine: bool = False) -> AmortizedFlow:
    outputs = context + 2 * latent if affine else context
    return AmortizedFlow(encoder(inputs, outputs), pf.flows.IAF(latent, context, transforms, hidden=(16, 16)), affine)


def perturb(module: nn.Module, scale: float = 0.2) -> None:
    """Moves the parameters away from the initial identity flow, which ignores the context."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


# Shapes and densities -----------------------------------------------------------------------
AFFINE = pytest.mark.parametrize("affine", [False, True], ids=["flow", "affine"])


@AFFINE
@pytest.mark.parametrize("batch", [(10,), (3, 5)], ids=["vector", "matrix"])
def test_batch_shape_is_the_encoder_output_batch_shape(batch, affine):
    q = amortized(latent=3, affine=affine)(torch.randn(*batch, 6))
    assert isinstance(q, pf.FlowDistribution) != affine
    assert q.batch_shape == batch and q.event_shape == (3,)
    z = q.rsample((7,))
    assert z.shape == (7, *batch, 3) and q.log_prob(z).shape == (7, *batch)
    assert q.sample().shape == (*batch, 3)


def test_one_pass_log_density_equals_the_inverse_pass_log_prob_within_1e10():
    q = amortized(latent=3, transforms=3).double()
    perturb(q)
    x = torch.randn(8, 6, dtype=torch.float64)
    z, log_q = q(x).rsample_and_log_prob((5,))
    assert torch.allclose(q(x).log_prob(z.clone()), log_q, rtol=0, atol=1e-10)  # a clone: a real inverse


def test_affine_q_is_the_flow_moved_and_scaled_by_the_encoder_within_1e10():
    """log q(z | x) = log q_flow((z - mu) / sigma | h) - sum log sigma, sigma = softplus + 1e-4."""
    q = amortized(latent=3, transforms=3, affine=True).double()
    perturb(q)
    x = torch.randn(8, 6, dtype=torch.float64)
    loc, raw, context = q.encoder(x).split([3, 3, 4], dim=-1)
    scale = torch.nn.functional.softplus(raw) + 1e-4
    z = torch.randn(5, 8, 3, dtype=torch.float64)
    expected = q.flow(context).log_prob((z - loc) / scale) - scale.log().sum(-1)
    assert torch.allclose(q(x).log_prob(z), expected, rtol=0, atol=1e-10)


def test_affine_q_starts_as_the_encoders_diagonal_gaussian_within_1e6():
    q = amortized(latent=3, affine=True)
    x, z = torch.randn(8, 6), torch.randn(8, 3)
    loc, raw, _ = q.encoder(x).split([3, 3, 4], dim=-1)
    gaussian = dist.Normal(loc, torch.nn.functional.softplus(raw) + 1e-4).to_event(1)
    assert torch.allclose(q(x).log_prob(z), gaussian.log_prob(z), rtol=0, atol=1e-6)


def test_rows_of_q_depend_only_on_their_own_observation():
    q = amortized()
    perturb(q)
    x = torch.randn(4, 6)
    z = torch.randn(4, 2)
    changed = x.clone()
    changed[2] += 1.0
    before, after = q(x).log_prob(z), q(changed).log_prob(z)
    assert torch.equal(before[[0, 1, 3]], after[[0, 1, 3]]) and before[2] != after[2]


def test_state_dict_round_trip_gives_the_same_q():
    q, twin = amortized(), amortized()
    twin.load_state_dict(q.state_dict())
    x, z = torch.randn(5, 6), torch.randn(5, 2)
    assert torch.equal(q(x).log_prob(z), twin(x).log_prob(z))


@AFFINE
def test_guide_samples_and_scores_in_one_network_pass_per_layer(affine):
    """SVI draws z from the guide and scores it: with the IAF form, each layer's MADE runs
    once for both (not once per latent dimension, as an inverse would)."""
    latent, transforms = 5, 3
    q = amortized(latent=latent, transforms=transforms, affine=affine)
    calls = []
    for module in q.modules():
        if isinstance(module, pf.nn.MADE):
            module.register_forward_hook(lambda *_: calls.append(1))

    def guide(x):
        pyro.module("q", q)
        with pyro.plate("data", len(x)):
            pyro.sample("z", q(x))

    trace = poutine.trace(guide).get_trace(torch.randn(16, 6))
    trace.compute_log_prob()
    assert trace.nodes["z"]["log_prob"].shape == (16,)
    assert len(calls) == transforms


# SVI recovers an exact posterior ----------------------------------------------------------------
def test_svi_amortized_flow_recovers_the_exact_posterior_of_a_linear_gaussian_model():
    """z ~ N(0, I_2), x | z ~ N(A z, s^2 I_3): the posterior is N(S A^T x / s^2, S) with
    S = (I + A^T A / s^2)^-1 and log p(x) = log N(x; 0, A A^T + s^2 I). After 300 SVI
    steps on 1024 observations, on 64 new ones (2000 draws of z each): the mean gap
    log p(x) - ELBO is below 0.03 nats, the root-mean-square error of q's means is below
    0.06 and q's covariance (pooled over the observations) is within 0.02 of S (measured:
    0.010, 0.028 and 0.005)."""
    torch.manual_seed(0)
    s = 0.5
    A = torch.tensor([[1.0, 0.5], [-0.7, 1.2], [0.3, -0.4]])
    marginal = dist.MultivariateNormal(torch.zeros(3), A @ A.T + s**2 * torch.eye(3))
    train_x, test_x = marginal.sample((1024,)), marginal.sample((64,))
    q = AmortizedFlow(encoder(3, 8, hidden=32), pf.flows.IAF(2, context=8, transforms=2, hidden=(16, 16)))

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ A.T, s).to_event(1), obs=x)

    def guide(x):
        pyro.module("q", q)
        with pyro.plate("data", len(x)):
            pyro.sample("z", q(x))

    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1 / 300)}), Trace_ELBO())
    losses = [svi.step(train_x) / len(train_x) for _ in range(300)]
    assert losses[-1] < losses[0] - 1.0

    with torch.no_grad():
        z, log_q = q(test_x).rsample_and_log_prob((2000,))
        log_joint = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + dist.Normal(z @ A.T, s).log_prob(test_x).sum(-1)
        gap = marginal.log_prob(test_x) - (log_joint - log_q).mean(0)
        covariance = torch.linalg.inv(torch.eye(2) + A.T @ A / s**2)
        mean = test_x @ A @ covariance / s**2
        centred = z - z.mean(0)
        q_covariance = (centred[..., :, None] * centred[..., None, :]).mean((0, 1))
    mean_rmse = (z.mean(0) - mean).pow(2).mean().sqrt()
    assert gap.mean() < 0.03, gap.mean()
    assert mean_rmse < 0.06, mean_rmse
    assert (q_covariance - covariance).abs().max() < 0.02, (q_covariance, covariance)


# Errors ---------------------------------------------------------------------------------------
def test_unconditional_flow_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match=r"flow must be conditional .*got an unconditional flow"):
        AmortizedFlow(encoder(), pf.flows.IAF(2))


def test_encoder_output_of_the_wrong_size_is_refused_with_a_clear_error():
    q = AmortizedFlow(encoder(6, 5), pf.flows.IAF(2, context=4))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\).*got shape \(10, 5\)"):
        q(torch.randn(10, 6))


def test_affine_encoder_output_of_the_wrong_size_is_refused_with_a_clear_error():
    q = AmortizedFlow(encoder(6, 4), pf.flows.IAF(2, context=4), affine=True)
    with pytest.raises(ValueError, match=r"location, scale and context tensor of shape \(\.\.\., 8\).*got shape \(10, 4\)"):
        q(torch.randn(10, 6))


@pytest.mark.parametrize("bad", ["encoder", "flow"])
def test_wrong_argument_types_are_refused_with_a_clear_error(bad):
    args = {"encoder": encoder(), "flow": pf.flows.IAF(2, context=4)}
    args[bad] = lambda x: x
    with pytest.raises(TypeError, match=f"{bad} must be a .*got function"):
        AmortizedFlow(**args)


# The example script -----------------------------------------------------------------------------
def test_vae_example_runs_with_a_tiny_budget(tmp_path):
    spec = importlib.util.spec_from_file_location("vae_flow", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--epochs", "1", "--batch", "256", "--iw-samples", "8", "--seed", "1", "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["epochs"], metrics["seed"], metrics["test_images"]) == (1, 1, 359)
    assert set(metrics["results"]) == set(example.VARIANTS)
    for result in metrics["results"].values():
        elbo, iw = result["test_elbo"], result["test_iw_log_likelihood"]
        assert math.isfinite(elbo) and math.isfinite(iw)
        # log-mean-exp of the same log-weights is at least their mean (Jensen)
        assert iw >= elbo - 1e-4, (iw, elbo)
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"
