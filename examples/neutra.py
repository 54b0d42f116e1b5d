r"""NeuTra HMC on Neal's funnel: NUTS on a model reparametrised by a trained flow guide,
pyro-flowpack's ``AutoFlowGuide`` against Pyro's ``AutoIAFNormal``, with plain NUTS as
the reference.

The model is Neal's funnel in ``--dim`` dimensions (10 by default, as in
``examples/svi_guide.py``),

.. math:: v \sim \mathcal{N}(0, 3^2), \qquad x_i \mid v \sim \mathcal{N}(0, e^{v}),
    \quad i = 1, \dots, D - 1,

whose scale in :math:`x` changes by :math:`e^{\pm 3}` along :math:`v`: no single step
size suits both the neck and the mouth, so plain NUTS diverges in the neck and mixes
slowly in :math:`v`. Neural transport (NeuTra, Hoffman et al. 2019) runs NUTS on
:math:`z` instead, where :math:`u = T(z)` is the guide's bijection from its base to the
unconstrained latent vector. Pyro's ``NeuTraReparam`` turns the model into one over
:math:`z` with potential energy

.. math:: U_\mathrm{NeuTra}(z) = U(T(z)) - \log |\det J_T(z)| ,

which is close to :math:`\tfrac12 \|z\|^2` when the guide is close to the posterior; the
draws are mapped back by ``neutra.transform_sample``.

Each guide gets the same budget: ``--steps`` steps of ``Trace_ELBO`` with 8 vectorised
particles and Adam with a learning rate that decays tenfold. Then every sampler runs
``--chains`` chains one after the other (``--warmup`` adaptation steps, ``--samples``
draws), and the script prints, per site, the effective sample size (``n_eff``; the
smallest over the coordinates of ``x``) and the split R-hat (the largest over ``x``),
the number of divergent transitions, the mean and standard deviation of :math:`v`
(exactly 0 and 3), and the wall time of SVI and of NUTS.

Run (a few minutes on one core)::

    OMP_NUM_THREADS=1 python examples/neutra.py --seed 0 --json neutra.json

References:
    | NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using Neural Transport
      (Hoffman et al., 2019)
    | https://arxiv.org/abs/1903.03704
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

# Small networks: OpenMP threads that spin while waiting only steal the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoContinuous, AutoIAFNormal
from pyro.infer.mcmc.util import summary
from pyro.infer.reparam import NeuTraReparam
from torch import Tensor

import pyro_flowpack as pf
from pyro_flowpack.train import write_atomically

GUIDES: dict[str, Callable[[Callable], AutoContinuous]] = {
    "AutoFlowGuide": lambda model: pf.infer.AutoFlowGuide(model, transforms=4, hidden=(64, 64)),
    "AutoIAFNormal": lambda model: AutoIAFNormal(model, hidden_dim=[64, 64], num_transforms=4),
}


def funnel(dim: int) -> None:
    """Neal's funnel: a Pyro model with two latent sites, ``v`` and ``x`` (``dim - 1``
    coordinates), and no data."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    scale = torch.exp(v / 2).unsqueeze(-1).expand(v.shape + (dim - 1,))
    pyro.sample("x", dist.Normal(0.0, scale).to_event(1))


def fit(make_guide: Callable[[Callable], AutoContinuous], model: Callable, steps: int, lr: float,
        seed: int) -> tuple[AutoContinuous, float]:
    """Trains one guide by SVI; returns it, frozen, and the training seconds."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(model)
    optimizer = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps)})
    svi = SVI(model, guide, optimizer, Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0))
    start = time.perf_counter()
    for _ in range(steps):
        svi.step()
    return guide.requires_grad_(False), time.perf_counter() - start


def run_chains(model: Callable, chains: int, warmup: int, samples: int, max_tree_depth: int, seed: int,
               to_sites: Callable[[dict[str, Tensor]], dict[str, Tensor]] = lambda s: s
               ) -> tuple[dict[str, Tensor], int, float]:
    """Runs ``chains`` NUTS chains one after the other, each from its own random start.

    Returns:
        The draws of every model site, each of shape ``(chains, samples, *site_shape)``
        (``to_sites`` maps one chain's draws to the model's sites), the number of
        divergent transitions after warm-up, and the seconds.
    """
    draws: dict[str, list[Tensor]] = {}
    divergences = 0
    start = time.perf_counter()
    for chain in range(chains):
        pyro.set_rng_seed(seed + chain)
        mcmc = MCMC(NUTS(model, max_tree_depth=max_tree_depth), num_samples=samples, warmup_steps=warmup,
                    disable_progbar=True)
        mcmc.run()
        for name, value in to_sites(mcmc.get_samples()).items():
            draws.setdefault(name, []).append(value.detach())
        divergences += sum(len(d) for d in mcmc.diagnostics()["divergences"].values())
    seconds = time.perf_counter() - start
    return {name: torch.stack(values) for name, values in draws.items()}, divergences, seconds


def diagnose(draws: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per site: the smallest effective sample size and the largest split R-hat over the
    site's coordinates."""
    table = summary(draws, group_by_chain=True)
    return {name: {"n_eff": table[name]["n_eff"].min().item(), "r_hat": table[name]["r_hat"].max().item()}
            for name in draws}


def report(draws: dict[str, Tensor], divergences: int, mcmc_s: float, svi_s: float | None = None) -> dict:
    """One row of the table (``svi_s`` is ``None`` for plain NUTS, which trains no guide)."""
    v = draws["v"].flatten()
    return {"sites": diagnose(draws), "divergences": divergences, "v_mean": v.mean().item(),
            "v_sd": v.std().item(), "svi_s": None if svi_s is None else round(svi_s, 1), "mcmc_s": round(mcmc_s, 1)}


def print_row(name: str, row: dict) -> None:
    sites = row["sites"]
    svi = "-" if row["svi_s"] is None else f"{row['svi_s']:.0f}"
    print(f"{name:>22} {sites['v']['n_eff']:8.0f} {sites['v']['r_hat']:7.3f} {sites['x']['n_eff']:8.0f} "
          f"{sites['x']['r_hat']:7.3f} {row['divergences']:5d} {row['v_mean']:6.2f} {row['v_sd']:5.2f} "
          f"{svi:>6} {row['mcmc_s']:6.0f}", flush=True)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--dim", type=int, default=10, help="dimensions of the funnel (v and dim - 1 x's)")
    parser.add_argument("--steps", type=int, default=1000, help="SVI steps per guide")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's initial learning rate (decays to lr/10)")
    parser.add_argument("--chains", type=int, default=2, help="NUTS chains per sampler, run one after the other")
    parser.add_argument("--warmup", type=int, default=200, help="NUTS warm-up steps per chain")
    parser.add_argument("--samples", type=int, default=300, help="NUTS draws per chain")
    parser.add_argument("--max-tree-depth", type=int, default=10,
                        help="NUTS's largest tree depth (at most 2^depth - 1 leapfrog steps per draw)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    args = parser.parse_args(argv)
    if args.dim < 2:
        parser.error(f"--dim must be an int >= 2, got {args.dim}")
    if min(args.steps, args.chains, args.warmup, args.samples, args.max_tree_depth) < 1 \
            or not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error("--steps, --chains, --warmup, --samples and --max-tree-depth must be positive ints "
                     "and --lr a positive number")

    model = partial(funnel, args.dim)
    mcmc = partial(run_chains, chains=args.chains, warmup=args.warmup, samples=args.samples,
                   max_tree_depth=args.max_tree_depth, seed=args.seed)
    print(f"Neal's funnel, D={args.dim}; {args.steps} SVI steps per guide; NUTS {args.chains} chains x "
          f"({args.warmup} warm-up + {args.samples} draws, "
          f"tree depth <= {args.max_tree_depth}); {torch.get_num_threads()} threads")
    print(f"{'sampler':>22} {'v n_eff':>8} {'v R-hat':>7} {'x n_eff':>8} {'x R-hat':>7} {'div':>5} "
          f"{'v mean':>6} {'v sd':>5} {'SVI s':>6} {'NUTS s':>6}")
    rows: dict[str, dict] = {}
    rows["NUTS"] = report(*mcmc(model))
    print_row("NUTS", rows["NUTS"])
    for name, make_guide in GUIDES.items():
        guide, svi_s = fit(make_guide, model, args.steps, args.lr, args.seed)
        neutra = NeuTraReparam(guide)
        # the reparametrised model's one latent site, named after the model's first one
        draws, divergences, mcmc_s = mcmc(neutra.reparam(model),
                                          to_sites=lambda s: neutra.transform_sample(s["v_shared_latent"]))
        rows[f"NeuTra+{name}"] = report(draws, divergences, mcmc_s, svi_s)
        print_row(f"NeuTra+{name}", rows[f"NeuTra+{name}"])
    print("n_eff: the smallest over the coordinates of a site; R-hat: the largest (split R-hat); "
          "div: divergent transitions after warm-up; v is N(0, 3^2)")

    result = {"dim": args.dim, "steps": args.steps, "lr": args.lr, "chains": args.chains, "warmup": args.warmup,
              "samples": args.samples, "max_tree_depth": args.max_tree_depth, "seed": args.seed,
              "threads": torch.get_num_threads(), "samplers": rows}
    if args.json:
        write_atomically(Path(args.json), lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    return result


if __name__ == "__main__":
    main()
