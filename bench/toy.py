r"""Density estimation on the 2-D toy sets: pyro-flowpack's default NSF against zuko's NSF
under one identical training budget.

Models (all with 4 layers, conditioners of two hidden layers of 128 units, 8 spline bins
and the spline interval :math:`[-5, 5]` with identity tails, on a standard normal base):

- ``ours``: ``pf.flows.NSF(features=2, transforms=4, hidden=(128, 128), bins=8)``, the
  coupling form with alternating halves (the default flow of ``flowpack train`` for vector
  data);
- ``zuko``: ``zuko.flows.NSF(features=2, transforms=4, hidden_features=(128, 128), bins=8)``,
  masked autoregressive with alternating orders; with two features each layer is one
  spline of each coordinate, one of them conditioned on the other, as in coupling form,
  except that the first coordinate's spline is a learned constant rather than the identity;
- ``ours-ar`` (optional): ``pf.flows.NSF(..., autoregressive=True)``, our MAF form, the
  same architecture as zuko's.

Protocol. For each data set and each seed :math:`s`, :func:`pyro_flowpack.data.toy_dataset`
draws ``--train-size + --test-size`` points (default 20000 + 5000) with seed :math:`s`; the
first ones are the training set, the rest the held-out test set. Every model is built
after ``torch.manual_seed(s)``, then the models are trained interleaved in one process:
at each step one mini-batch of ``--batch`` (default 512) points is drawn (indices
sampled without replacement, from a generator seeded with :math:`s` and the step), and
every model in turn takes one step on that same batch: the loss
:math:`-\frac{1}{B}\sum_i \log p(x_i)`, backward, the gradient norm clipped to 1, an Adam
step (learning rate ``--lr``, default 1e-3) and a cosine decay of the learning rate to 0
over ``--steps`` steps (default 1000). A step whose loss is not finite is skipped and
counted. The time of each model's step is read on the clock of the calling thread
(``time.thread_time``; with one thread, other processes on a shared machine disturb it
less than wall time) and the median is reported. After training, in eval mode and under
``torch.no_grad()``, the test NLL is the mean of :math:`-\log p(x)` over the test set, in
nats. Over seeds the table gives mean ± standard deviation, and the paired difference
``ours - zuko`` (negative: ours is better).

Torch's distribution argument validation is switched off for all models (importing zuko
switches it off anyway). For the first seed the script saves one PNG per data set under
``--out``: a histogram of the training data, then for each model a histogram of 20000 of
its samples and its density :math:`p(x)` on a grid over :math:`[-3, 3]^2`.

Run::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/toy.py --out toy_out \
        --json toy_out/toy.json --rst toy_out/toy.rst
    .venv/bin/python bench/toy.py --steps 3 --datasets two_moons --seeds 0 --out /tmp/toy
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

# The networks are small, so OpenMP threads that spin while waiting only steal the cores
# of a shared machine; an explicit setting still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import zuko
from torch import Tensor
from torch.distributions import Distribution

import pyro_flowpack as pf

import sys
from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parent))  # bench/ scripts share tables.py
from tables import markdown, rst  # noqa: E402
from pyro_flowpack.data import TOY_DATASETS, toy_dataset
from pyro_flowpack.train import write_atomically

__all__ = ["MODELS", "batches", "run_dataset", "summarise", "main"]

TRANSFORMS, HIDDEN, BINS = 4, (128, 128), 8
LIMIT = 3.0  # the pictures show [-LIMIT, LIMIT]^2
GRID = 200  # density pixels per side
PICTURE_SAMPLES = 20000


@dataclass(frozen=True)
class Model:
    build: Callable[[], nn.Module]  # model() is a distribution with log_prob and sample
    description: str


MODELS: dict[str, Model] = {
    "ours": Model(
        lambda: pf.flows.NSF(features=2, transforms=TRANSFORMS, hidden=HIDDEN, bins=BINS),
        f"pf.flows.NSF(features=2, transforms={TRANSFORMS}, hidden={HIDDEN}, bins={BINS})",
    ),
    "zuko": Model(
        lambda: zuko.flows.NSF(features=2, transforms=TRANSFORMS, hidden_features=HIDDEN, bins=BINS),
        f"zuko.flows.NSF(features=2, transforms={TRANSFORMS}, hidden_features={HIDDEN}, bins={BINS})",
    ),
    "ours-ar": Model(
        lambda: pf.flows.NSF(features=2, transforms=TRANSFORMS, hidden=HIDDEN, bins=BINS, autoregressive=True),
        f"pf.flows.NSF(features=2, transforms={TRANSFORMS}, hidden={HIDDEN}, bins={BINS}, autoregressive=True)",
    ),
}


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def batches(n: int, batch: int, steps: int, seed: int) -> Iterator[Tensor]:
    r"""Yields the indices of ``steps`` mini-batches of ``batch`` distinct points out of
    ``n``; the indices of step :math:`t` depend on ``(seed, t)`` only."""
    if batch > n:
        raise ValueError(f"the batch ({batch}) must not exceed the training set ({n} points)")
    generator = torch.Generator()
    for step in range(steps):
        generator.manual_seed(seed * 1_000_003 + step)
        yield torch.randperm(n, generator=generator)[:batch]


@dataclass
class Run:
    """One model trained on one data set with one seed."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step_seconds: list[float]
    skipped: int = 0


def train_step(run: Run, x: Tensor) -> None:
    start = time.thread_time()
    loss = -run.model().log_prob(x).mean()
    run.optimizer.zero_grad()
    if torch.isfinite(loss):
        loss.backward()
        nn.utils.clip_grad_norm_(run.model.parameters(), max_norm=1.0)
        run.optimizer.step()
    else:
        run.skipped += 1
    run.scheduler.step()
    run.step_seconds.append(time.thread_time() - start)


@torch.no_grad()
def mean_nll(model: nn.Module, x: Tensor, chunk: int = 5000) -> float:
    """The mean of :math:`-\\log p(x)` over the rows of ``x``, in nats."""
    model.eval()
    d = model()
    return -torch.cat([d.log_prob(part) for part in x.split(chunk)]).mean().item()


@torch.no_grad()
def picture(path: Path, title: str, data: Tensor, models: dict[str, nn.Module], seed: int) -> None:
    """Saves the data histogram and, for each model, a histogram of its samples and its
    density on a grid over :math:`[-3, 3]^2`."""
    edges = torch.linspace(-LIMIT, LIMIT, GRID + 1)
    centres = (edges[1:] + edges[:-1]) / 2
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    grid = torch.stack((x, y), dim=-1).reshape(-1, 2)
    panels: list[tuple[str, Tensor, str]] = [("data", data, "hist")]
    for name, model in models.items():
        model.eval()
        torch.manual_seed(seed)
        panels.append((f"{name}: samples", model().sample((PICTURE_SAMPLES,)), "hist"))
        panels.append((f"{name}: density", model().log_prob(grid).exp().reshape(GRID, GRID), "density"))
    figure, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
    extent = (-LIMIT, LIMIT, -LIMIT, LIMIT)
    for ax, (label, values, kind) in zip(axes, panels):
        if kind == "hist":
            inside = values[(values.abs() < LIMIT).all(-1)]
            values = torch.histogramdd(inside, bins=[edges, edges]).hist.T  # rows: y
        ax.imshow(values.numpy(), origin="lower", extent=extent, cmap="viridis", interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    write_atomically(path, lambda p: figure.savefig(p, format="png", dpi=80))
    plt.close(figure)


def run_dataset(name: str, seed: int, models: Sequence[str], args: argparse.Namespace) -> dict:
    """Trains ``models`` interleaved on data set ``name`` with ``seed``; returns the
    results, and saves the picture if ``args.out`` is set and ``seed`` is the first."""
    points = toy_dataset(name, args.train_size + args.test_size, seed=seed)
    train, test = points[: args.train_size], points[args.train_size :]
    runs: dict[str, Run] = {}
    for model_name in models:
        torch.manual_seed(seed)
        model = MODELS[model_name].build()
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.steps, 1))
        runs[model_name] = Run(model, optimizer, scheduler, [])
    start = time.perf_counter()
    for index in batches(len(train), args.batch, args.steps, seed):
        x = train[index]
        for run in runs.values():
            run.model.train()
            train_step(run, x)
    elapsed = time.perf_counter() - start
    results = {}
    for model_name, run in runs.items():
        results[model_name] = {
            "test_nll": mean_nll(run.model, test),
            "train_nll": mean_nll(run.model, train),
            "ms_per_step": 1000 * statistics.median(run.step_seconds) if run.step_seconds else float("nan"),
            "skipped_steps": run.skipped,
        }
    line = ", ".join(f"{m} {r['test_nll']:.4f} ({r['ms_per_step']:.1f} ms/step)" for m, r in results.items())
    print(f"{name} seed {seed}: test NLL {line}; {elapsed:.0f} s", flush=True)
    if args.out is not None and seed == args.seeds[0]:
        title = f"{name}: {args.steps} steps, batch {args.batch}, seed {seed}"
        picture(args.out / f"{name}.png", title, train, {m: r.model for m, r in runs.items()}, seed)
    return results


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(per_seed: Sequence[dict], models: Sequence[str]) -> dict:
    r"""Mean and standard deviation over seeds of each model's test NLL and ms/step, and
    of the paired difference ``ours - zuko`` where both ran."""
    summary: dict[str, dict[str, float]] = {}
    for m in models:
        nll, nll_sd = mean_sd([r[m]["test_nll"] for r in per_seed])
        ms, _ = mean_sd([r[m]["ms_per_step"] for r in per_seed])
        summary[m] = {"test_nll": nll, "test_nll_sd": nll_sd, "ms_per_step": ms}
    if "ours" in models and "zuko" in models:
        difference, difference_sd = mean_sd([r["ours"]["test_nll"] - r["zuko"]["test_nll"] for r in per_seed])
        summary["ours - zuko"] = {"test_nll": difference, "test_nll_sd": difference_sd}
    return summary


def table(summaries: dict[str, dict], models: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    pm = lambda s: f"{s['test_nll']:.3f} ± {s['test_nll_sd']:.3f}"
    columns = [*models, *(["ours - zuko"] if "ours" in models and "zuko" in models else [])]
    header = ["data set", *(f"{c} NLL" for c in columns), *(f"{m} [ms/step]" for m in models)]
    body = [
        [name, *(pm(s[c]) for c in columns), *(f"{s[m]['ms_per_step']:.1f}" for m in models)]
        for name, s in summaries.items()
    ]
    return header, body




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(TOY_DATASETS), choices=list(TOY_DATASETS))
    parser.add_argument("--models", nargs="+", default=["ours", "zuko"], choices=list(MODELS),
                        help="models to train side by side (default: ours zuko)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's initial learning rate (cosine decay to 0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--test-size", type=int, default=5000)
    parser.add_argument("--out", type=Path, help="folder for one PNG per data set")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write settings and results as JSON")
    parser.add_argument("--rst", type=Path, metavar="PATH", help="also write the table as an RST list-table")
    args = parser.parse_args(argv)
    if args.steps < 0 or args.batch < 1 or args.train_size < 1 or args.test_size < 1 or not args.lr > 0:
        parser.error("--steps must be non-negative and --batch, --train-size, --test-size, --lr positive")
    if args.batch > args.train_size:
        parser.error(f"--batch ({args.batch}) must not exceed --train-size ({args.train_size})")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    Distribution.set_default_validate_args(False)
    torch.set_num_threads(1)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    settings = (
        f"{args.steps} steps, batch {args.batch}, Adam lr {args.lr:g} with cosine decay, clip 1.0, "
        f"{args.train_size}/{args.test_size} train/test points, seeds {' '.join(map(str, args.seeds))}, "
        "1 thread, thread CPU clock"
    )
    print(f"torch {torch.__version__}, zuko {zuko.__version__}, pyro-flowpack {pf.__version__}")
    print(settings, flush=True)
    parameters = {}
    for m in args.models:
        parameters[m] = parameter_count(MODELS[m].build())
        print(f"{m}: {parameters[m]} parameters; {MODELS[m].description}", flush=True)

    per_dataset = {name: [run_dataset(name, seed, args.models, args) for seed in args.seeds] for name in args.datasets}
    summaries = {name: summarise(runs, args.models) for name, runs in per_dataset.items()}
    header, body = table(summaries, args.models)
    print()
    print(markdown(header, body))
    if args.rst:
        caption = f"Test NLL [nats] on the 2-D toy sets, mean ± sd over seeds ({settings})"
        write_atomically(args.rst, lambda p: p.write_text(rst(header, body, caption)))
    payload = {
        "settings": {
            "steps": args.steps, "batch": args.batch, "lr": args.lr, "seeds": args.seeds,
            "train_size": args.train_size, "test_size": args.test_size, "clip": 1.0, "schedule": "cosine",
            "models": {m: {"description": MODELS[m].description, "params": parameters[m]} for m in args.models},
            "versions": {"torch": torch.__version__, "zuko": zuko.__version__, "pyro_flowpack": pf.__version__},
        },
        "summary": summaries,
        "runs": per_dataset,
    }
    if args.json:
        write_atomically(args.json, lambda p: p.write_text(json.dumps(payload, indent=2) + "\n"))
    return payload


if __name__ == "__main__":
    main()
