r"""A normalizing flow as a density inside Pyro models: learned by SVI, then used as a
fixed prior under NUTS.

1. **A learned density.** The model registers the flow with ``pyro.module`` and scores
   each point with ``pyro.sample("x", flow(), obs=x)`` under a subsampled plate. It has
   no latent variables, so its ELBO is the log-likelihood and ``SVI`` with an empty
   guide is exact maximum likelihood (scaled by ``N / batch`` for the subsample).
2. **A pre-trained flow as a prior under NUTS.** The trained flow, frozen, is the prior of
   a point :math:`x` observed ``--observations`` times with Gaussian noise,

   .. math:: x \sim p_\mathrm{flow}, \qquad y_j \mid x \sim \mathcal{N}(x, \sigma^2 I) ,

   and ``pyro.infer.MCMC`` with ``NUTS`` draws from :math:`p(x \mid y)`, differentiating
   ``log_prob`` with respect to :math:`x` through every layer. The NUTS posterior mean is
   compared with a self-normalised importance-sampling reference that weights
   ``--reference-draws`` draws from the flow prior by the likelihood (exact as the draws grow).

The script prints and writes to ``--out/metrics.json`` the test NLL (nats per point), the
NUTS posterior mean and the reference, their difference in Monte Carlo standard errors,
and NUTS's split R-hat and effective sample sizes.

Run ``python examples/pyro_density.py`` (a few minutes on two CPU cores).
Torch uses all cores unless ``OMP_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

# Small networks: OpenMP threads that spin while waiting only steal the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from torch import Tensor

import pyro_flowpack as pf
from pyro_flowpack.data import TOY_DATASETS, toy_dataset
from pyro_flowpack.train import write_atomically

TRAIN_SIZE = 10_000
TEST_SIZE = 2_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=list(TOY_DATASETS), default="two_moons")
    parser.add_argument("--steps", type=int, default=2000, help="SVI steps")
    parser.add_argument("--batch", type=int, default=256, help="points per step (the plate's subsample)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--observations", type=int, default=3, help="noisy observations of the point")
    parser.add_argument("--sigma", type=float, default=0.5, help="standard deviation of the observation noise")
    parser.add_argument("--warmup", type=int, default=300, help="NUTS warm-up steps")
    parser.add_argument("--samples", type=int, default=500, help="NUTS samples")
    parser.add_argument("--reference-draws", type=int, default=200_000,
                        help="prior draws of the importance-sampling reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("pyro_density_output"), help="output folder")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch, args.observations, args.warmup, args.samples, args.reference_draws) < 1:
        parser.error("--steps, --batch, --observations, --warmup, --samples and --reference-draws must be positive")
    if not args.sigma > 0:
        parser.error(f"--sigma must be positive, got {args.sigma}")
    return args


def density_model(flow: pf.Flow, x: Tensor, batch: int) -> None:
    """``x_i ~ flow()`` for every point, scored on a random subsample of ``batch`` points."""
    pyro.module("flow", flow)
    with pyro.plate("data", len(x), subsample_size=min(batch, len(x))) as i:
        pyro.sample("x", flow(), obs=x[i])


def empty_guide(flow: pf.Flow, x: Tensor, batch: int) -> None:
    """The model has no latent variables: nothing to guess."""


def denoising_model(prior: pf.Flow, sigma: float, y: Tensor) -> Tensor:
    """A point with the flow as its prior, seen ``len(y)`` times with Gaussian noise."""
    x = pyro.sample("x", prior())
    with pyro.plate("observations", len(y)):
        pyro.sample("y", dist.Normal(x, sigma).to_event(1), obs=y)
    return x


def learn_density(flow: pf.Flow, train_x: Tensor, test_x: Tensor, args: argparse.Namespace) -> float:
    """Fits the flow by SVI (exact maximum likelihood); returns the test NLL per point."""
    svi = SVI(density_model, empty_guide, pyro.optim.ClippedAdam({"lr": args.lr, "lrd": 0.1 ** (1 / args.steps)}),
              Trace_ELBO())
    every = max(args.steps // 10, 1)
    for step in range(1, args.steps + 1):
        loss = svi.step(flow, train_x, args.batch) / len(train_x)
        if step % every == 0 or step == args.steps:
            print(f"step {step:5d}  SVI loss {loss:7.4f} nats/point", flush=True)
    with torch.no_grad():
        return -flow().log_prob(test_x).mean().item()


def posterior_reference(prior: pf.Flow, sigma: float, y: Tensor, draws: int) -> tuple[Tensor, Tensor, float]:
    """Self-normalised importance sampling with the prior as proposal: the posterior mean,
    its standard deviation and the effective sample size of the weights."""
    with torch.no_grad():
        x = prior().sample((draws,))
        log_w = dist.Normal(x[:, None], sigma).log_prob(y).sum((-2, -1))
        w = torch.softmax(log_w, 0)
        mean = (w[:, None] * x).sum(0)
        sd = (w[:, None] * (x - mean) ** 2).sum(0).sqrt()
        return mean, sd, (1 / (w**2).sum()).item()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    data = toy_dataset(args.dataset, TRAIN_SIZE + TEST_SIZE, seed=args.seed)
    train_x, test_x = data[:TRAIN_SIZE], data[TRAIN_SIZE:]
    flow = pf.flows.NSF(features=2, transforms=4, hidden=(64, 64), bins=8)
    print(f"NSF on {args.dataset}: {sum(p.numel() for p in flow.parameters())} parameters, "
          f"{torch.get_num_threads()} threads", flush=True)

    start = time.perf_counter()
    nll = learn_density(flow, train_x, test_x, args)
    train_time = time.perf_counter() - start
    print(f"test NLL {nll:.4f} nats/point, trained in {train_time:.1f} s", flush=True)

    flow.requires_grad_(False).eval()  # a fixed, pre-trained density from here on
    x_true = test_x[0]
    y = x_true + args.sigma * torch.randn(args.observations, 2)
    start = time.perf_counter()
    mcmc = MCMC(NUTS(denoising_model), num_samples=args.samples, warmup_steps=args.warmup, disable_progbar=True)
    mcmc.run(flow, args.sigma, y)
    mcmc_time = time.perf_counter() - start
    samples = mcmc.get_samples()["x"]
    diagnostics = mcmc.diagnostics()["x"]
    ess, r_hat = diagnostics["n_eff"], diagnostics["r_hat"]
    mean, sd, is_ess = posterior_reference(flow, args.sigma, y, args.reference_draws)
    error = (samples.mean(0) - mean).abs() / (sd / ess.sqrt())
    print(f"NUTS: {args.samples} samples in {mcmc_time:.1f} s, R-hat {r_hat.tolist()}, ESS {ess.tolist()}")
    print(f"posterior mean: NUTS {samples.mean(0).tolist()}, importance sampling {mean.tolist()} "
          f"(weights' ESS {is_ess:.0f}); difference {error.tolist()} Monte Carlo standard errors")

    args.out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "dataset": args.dataset,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "test_nll": nll,
        "train_time_s": round(train_time, 2),
        "sigma": args.sigma,
        "x_true": x_true.tolist(),
        "observations": y.tolist(),
        "warmup": args.warmup,
        "samples": args.samples,
        "posterior_mean_nuts": samples.mean(0).tolist(),
        "posterior_sd_nuts": samples.std(0).tolist(),
        "posterior_mean_reference": mean.tolist(),
        "posterior_sd_reference": sd.tolist(),
        "reference_draws": args.reference_draws,
        "reference_ess": is_ess,
        "mean_error_in_standard_errors": error.tolist(),
        "r_hat": r_hat.tolist(),
        "n_eff": ess.tolist(),
        "mcmc_time_s": round(mcmc_time, 2),
    }
    path = args.out / "metrics.json"
    write_atomically(path, lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
