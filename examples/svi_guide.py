r"""A flow guide on a hard posterior: Neal's funnel, fitted by SVI with Pyro's
``AutoNormal`` and ``AutoIAFNormal`` and pyro-flowpack's ``AutoFlowGuide``.

The model is Neal's funnel in 10 dimensions,

.. math:: v \sim \mathcal{N}(0, 3^2), \qquad x_i \mid v \sim \mathcal{N}(0, e^{v}),
    \quad i = 1, \dots, 9,

with no data, so the "posterior" is the funnel itself and its normaliser is
:math:`Z = 1`: the ELBO is :math:`-\mathrm{KL}(q \,\|\, p) \le \log Z = 0`, and how far
below 0 it ends is how far each guide is from the funnel, whose scale in :math:`x`
changes by :math:`e^{\pm 3}` along :math:`v`. Every guide gets the same budget: the same
steps of ``Trace_ELBO`` with 8 vectorised particles and Adam with a learning rate that
decays tenfold. Each guide is then diagnosed from many draws
(``pf.infer.diagnose``, ``AutoFlowGuide.diagnose`` for ours): its ELBO, the
importance-sampled :math:`\log Z` with its standard error, the Pareto :math:`\hat k`
(below 0.5: good; 0.5 to 0.7: usable with care; above 0.7: do not trust the guide) and
the effective sample size, printed with a verdict.

Run::

    OMP_NUM_THREADS=2 python examples/svi_guide.py --steps 2000 --seed 0 --json elbo.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal

import pyro_flowpack as pf
from pyro_flowpack.train import write_atomically

DIM = 10
LOG_Z = 0.0

GUIDES: dict[str, Callable] = {
    "AutoNormal": lambda model: AutoNormal(model),
    "AutoIAFNormal": lambda model: AutoIAFNormal(model, hidden_dim=[64, 64], num_transforms=4),
    "AutoFlowGuide": lambda model: pf.infer.AutoFlowGuide(model, transforms=4, hidden=(64, 64)),
}


def funnel() -> None:
    """Neal's funnel: a Pyro model with two latent sites and no data."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    scale = torch.exp(v / 2).unsqueeze(-1).expand(v.shape + (DIM - 1,))
    pyro.sample("x", dist.Normal(0.0, scale).to_event(1))


def fit(make_guide: Callable, steps: int, lr: float, seed: int, particles: int) -> tuple[pf.infer.Diagnostics, float]:
    """Trains one guide and returns its diagnostics from ``particles`` draws and the
    training seconds."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(funnel)
    optimizer = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / max(steps, 1))})
    svi = SVI(funnel, guide, optimizer, Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0))
    start = time.perf_counter()
    for _ in range(steps):
        svi.step()
    seconds = time.perf_counter() - start
    pyro.set_rng_seed(seed + 1)
    return pf.infer.diagnose(funnel, guide, num_particles=particles, max_plate_nesting=0), seconds


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="SVI steps per guide")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's initial learning rate (decays to lr/10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--particles", type=int, default=10000, help="draws of the final diagnostics (>= 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the ELBOs as JSON")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.particles < 2 or not args.lr > 0:
        parser.error("--steps must be a positive int, --particles an int >= 2 and --lr a positive number")

    print(f"Neal's funnel, D={DIM}, log Z = {LOG_Z:g}; {args.steps} steps, 8 vectorised particles")
    results: dict[str, float] = {}
    diagnostics: dict[str, dict] = {}
    for name, make_guide in GUIDES.items():
        diagnosis, seconds = fit(make_guide, args.steps, args.lr, args.seed, args.particles)
        results[name] = diagnosis.elbo
        diagnostics[name] = diagnosis.as_dict()
        print(f"{name:>14}: ELBO {diagnosis.elbo:8.4f}   log Z - ELBO {LOG_Z - diagnosis.elbo:7.4f}   "
              f"({seconds:.0f} s)", flush=True)
        print("                " + str(diagnosis).replace("\n", "\n                "), flush=True)

    summary = {"log_z": LOG_Z, "steps": args.steps, "seed": args.seed, "lr": args.lr,
               "particles": args.particles, "elbo": results, "diagnostics": diagnostics}
    if args.json:
        write_atomically(Path(args.json), lambda p: p.write_text(json.dumps(summary, indent=2)))
    return summary


if __name__ == "__main__":
    main()
