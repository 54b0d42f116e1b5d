r"""What the path-derivative ("sticking the landing") gradient of ``AutoFlowGuide`` costs:
the time of one ELBO step with ``stl=True`` against ``stl=False``, by latent dimension.

Protocol. For each dimension :math:`D` the model is a standard normal over
:math:`\mathbb{R}^D` (the cost does not depend on the target); two guides
``pf.infer.AutoFlowGuide(model, stl=...)`` with the default flow (4 affine IAF layers of
hidden :math:`\max(64, 4D)` twice) are built and called once. A step is
``Trace_ELBO(num_particles=8, vectorize_particles=True).differentiable_loss`` followed by
``backward`` (no optimiser, so that both guides keep the same parameters). The two guides
take turns: ``--rounds`` rounds of ``--steps`` steps each, after ``--warmup`` steps per
guide, and the table gives the median over rounds of the mean time per step (wall clock
of the calling thread) and the ratio ``stl / plain``.

Run (one thread)::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/stl_cost.py
    .venv/bin/python bench/stl_cost.py --dims 2 10 --rounds 3 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import markdown, rst  # noqa: E402

import pyro_flowpack as pf  # noqa: E402
from pyro_flowpack.train import write_atomically  # noqa: E402

HEADER = ["D", "stl=True [ms/step]", "stl=False [ms/step]", "ratio"]


def standard_normal_model(dim: int) -> Callable[[], None]:
    """A model with one latent site ``z`` ~ N(0, I_dim)."""

    def model() -> None:
        pyro.sample("z", dist.Normal(torch.zeros(dim), 1.0).to_event(1))

    return model


def step_times(dim: int, rounds: int, steps: int, warmup: int) -> dict[bool, float]:
    """The median over rounds of the mean ms per ELBO step, for ``stl=True`` and ``False``."""
    model = standard_normal_model(dim)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guides = {stl: pf.infer.AutoFlowGuide(model, stl=stl) for stl in (True, False)}
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0)

    def run(guide: pf.infer.AutoFlowGuide, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            elbo.differentiable_loss(model, guide).backward()
        return (time.perf_counter() - start) / n * 1000

    for guide in guides.values():
        guide()
        if warmup:
            run(guide, warmup)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for stl, guide in guides.items():
            times[stl].append(run(guide, steps))
    return {stl: statistics.median(values) for stl, values in times.items()}


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 10, 30, 100])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="steps per guide and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rst", metavar="PATH", help="also write the table as an RST list-table")
    args = parser.parse_args(argv)
    if any(d < 1 for d in args.dims) or min(args.rounds, args.steps) < 1 or args.warmup < 0:
        parser.error(f"--dims, --rounds and --steps must be positive and --warmup >= 0, got {vars(args)}")
    torch.set_num_threads(args.threads)
    body = []
    with pyro.validation_enabled(False):
        for dim in args.dims:
            t = step_times(dim, args.rounds, args.steps, args.warmup)
            body.append([str(dim), f"{t[True]:.1f}", f"{t[False]:.1f}", f"{t[True] / t[False]:.2f}"])
            print(" | ".join(body[-1]), flush=True)
    print()
    print(markdown(HEADER, body))
    if args.rst:
        caption = (f"ELBO step time of AutoFlowGuide with and without the path gradient ({args.threads} thread(s), "
                   "8 vectorised particles, default flow)")
        text = rst(HEADER, body, caption)
        write_atomically(args.rst, lambda p: p.write_text(text))
    return body


if __name__ == "__main__":
    main()
