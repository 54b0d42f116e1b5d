r"""Conditional density estimation: how close each conditional flow's test NLL comes to
the true conditional NLL, pyro-flowpack's builders against zuko's MAF and NSF.

Every task is a conditional Gaussian with known mean and scale functions,

.. math::

    c \sim N(0, I_C), \qquad x = m(c) + s(c) \odot \epsilon, \qquad \epsilon \sim N(0, I_D),

so the true conditional density :math:`p(x \mid c) = N(x; m(c), \operatorname{diag} s(c)^2)`
is known, and so is the true conditional NLL (the conditional entropy)
:math:`H(x \mid c) = \tfrac D2 \log(2\pi e) + \mathbb{E}_c \sum_i \log s_i(c)`. For a
flow :math:`q`, the test NLL minus the true NLL estimates
:math:`\mathbb{E}_c \mathrm{KL}(p(\cdot \mid c) \,\|\, q(\cdot \mid c)) \ge 0`.

Tasks (:data:`TASKS`):

- ``linear-2d``: :math:`x = A c + 0.1 \epsilon` with :math:`D = C = 2` and
  :math:`A = ((0.8, -0.5), (0.6, 0.9))`, every feature (the first one too) depending on
  the context; :math:`H(x \mid c) = D \cdot \tfrac12 \log(2\pi e \sigma^2)`;
- ``linear-1d``: :math:`x = c + 0.1 \epsilon` with :math:`D = C = 1`;
- ``hetero-2d``: per feature, :math:`x_i = \sin(c_i) + (0.1 + 0.2 |c_i|) \epsilon_i`
  with :math:`D = C = 2`, non-linear and heteroscedastic;
  :math:`\mathbb{E} \log(0.1 + 0.2|c_i|)` is computed by quadrature
  (:func:`normal_expectation`).

A flow that ignores the context can do no better than the marginal entropy
:math:`H(x)`: on ``linear-2d`` that is 4.6 nats above :math:`H(x \mid c)`, on
``linear-1d`` 2.3 nats.

Flows (:data:`FLOWS`), all of the same depth ``--transforms``, hidden sizes ``--hidden``
and (splines) bins ``--bins`` with the spline interval :math:`[-5, 5]` and identity
tails, on a standard normal base: pyro-flowpack's ``MAF``, ``IAF``, ``NSF`` (coupling),
``NSF-AR`` (``NSF(autoregressive=True)``) and ``RealNVP``, and zuko's ``MAF`` and ``NSF``
through :func:`pyro_flowpack.flows.from_zuko`. Every other option is the builder's
default; the affine layers bound their log-scales differently (ours at 3 per layer,
zuko's at :math:`\log 10^3`).

Protocol. For each task and seed :math:`s`, every flow is built after
``torch.manual_seed(s)`` and trained for ``--steps`` steps, one after the other, on the
same fresh mini-batches: the batch of step :math:`t` (``--batch`` pairs
:math:`(x, c)`) is drawn from a generator seeded with :math:`(s, t)`, so every flow sees
the same data and no point twice. A step is the loss :math:`-\frac1B \sum_i \log
q(x_i \mid c_i)`, backward, the gradient norm clipped to 1, an Adam step (learning rate
``--lr``) and a cosine decay of the learning rate to 0 over the steps; a step whose loss
is not finite makes no update and is counted. The time of each step is read on the
calling thread's clock and the median reported. Then, in eval mode and under
``torch.no_grad()``, the test NLL is the mean :math:`-\log q(x \mid c)` over
``--test-size`` held-out pairs (drawn with seed :math:`s + 10^4`), summed over features,
in nats. The table shows ``test NLL - true NLL`` with the true density's NLL taken on
the same held-out pairs (paired, so the test set's own noise cancels); the JSON also has
the expected true NLL :math:`H(x \mid c)`. Over seeds: mean ± sample standard
deviation. Torch's and Pyro's argument validation is off during the runs for all flows
(importing zuko switches torch's off anyway); the caller's setting is restored.

Run (one thread; the networks are small)::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/conditional.py \
        --out conditional.json --rst conditional.rst
    .venv/bin/python bench/conditional.py --smoke --out /tmp/conditional.json   # tiny budget
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# The networks are small, so OpenMP threads that spin while waiting only steal the cores
# of a shared machine; an explicit setting still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pyro
import torch
import torch.nn as nn
from torch import Tensor
from torch.distributions import Distribution

import pyro_flowpack as pf
from pyro_flowpack.transforms.zuko import import_zuko

import sys
from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parent))  # bench/ scripts share tables.py
from tables import markdown, rst  # noqa: E402
from pyro_flowpack.train import write_atomically

__all__ = [
    "FLOWS",
    "TASKS",
    "FlowOptions",
    "Task",
    "evaluate",
    "main",
    "normal_expectation",
    "run",
    "summarise",
    "train",
]

LOG_2PI_E = math.log(2 * math.pi * math.e)


# --------------------------------------------------------------------------- tasks


def normal_expectation(f: Callable[[Tensor], Tensor], limit: float = 12.0, points: int = 240_001) -> float:
    r""":math:`\mathbb{E}\, f(c)` for :math:`c \sim N(0, 1)`, by the trapezoid rule on
    :math:`[-L, L]` in double precision (a grid point at 0, where the tasks' scales have
    their kink).

    Example:
        >>> round(normal_expectation(lambda c: c**2), 8)
        1.0
    """
    c = torch.linspace(-limit, limit, points, dtype=torch.float64)
    density = torch.exp(-0.5 * c**2) / math.sqrt(2 * math.pi)
    return float(torch.trapezoid(density * f(c), c))


@dataclass(frozen=True)
class Task:
    r"""A conditional Gaussian :math:`x = m(c) + s(c) \odot \epsilon`,
    :math:`c \sim N(0, I_C)`, with its true conditional NLL.

    Arguments:
        name: The task's name on the command line.
        features: :math:`D`.
        context: :math:`C`.
        mean: :math:`m`, from ``(..., C)`` to ``(..., D)``.
        scale: :math:`s > 0`, from ``(..., C)`` to ``(..., D)``.
        true_nll: :math:`H(x \mid c) = \tfrac D2 \log(2\pi e) + \mathbb{E} \sum_i \log s_i(c)`.
        description: One line for the JSON and the docs.
    """

    name: str
    features: int
    context: int
    mean: Callable[[Tensor], Tensor]
    scale: Callable[[Tensor], Tensor]
    true_nll: float
    description: str

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` pairs ``(x, c)`` of shapes ``(n, D)`` and ``(n, C)``."""
        c = torch.randn(n, self.context, generator=generator)
        eps = torch.randn(n, self.features, generator=generator)
        return self.mean(c) + self.scale(c) * eps, c

    def log_prob(self, x: Tensor, c: Tensor) -> Tensor:
        r"""The true :math:`\log p(x \mid c)`, summed over features."""
        return torch.distributions.Normal(self.mean(c), self.scale(c)).log_prob(x).sum(-1)


SIGMA = 0.1
LINEAR_2D = torch.tensor([[0.8, -0.5], [0.6, 0.9]])
LINEAR_1D = torch.tensor([[1.0]])


def linear_task(name: str, matrix: Tensor) -> Task:
    r""":math:`x = A c + \sigma \epsilon`, whose conditional entropy is
    :math:`D \cdot \tfrac12 \log(2\pi e \sigma^2)`."""
    features, context = matrix.shape
    return Task(
        name, features, context,
        mean=lambda c: c @ matrix.T.to(c.dtype),
        scale=lambda c: torch.full((*c.shape[:-1], features), SIGMA, dtype=c.dtype),
        true_nll=features * 0.5 * (LOG_2PI_E + 2 * math.log(SIGMA)),
        description=f"x = A c + {SIGMA} eps, A = {[[round(v, 3) for v in row] for row in matrix.tolist()]}, "
                    f"D = {features}, C = {context}",
    )


def hetero_scale(c: Tensor) -> Tensor:
    return 0.1 + 0.2 * c.abs()


def hetero_task(features: int) -> Task:
    r""":math:`x_i = \sin(c_i) + (0.1 + 0.2 |c_i|) \epsilon_i`, :math:`D = C`."""
    expected_log_scale = normal_expectation(lambda c: torch.log(hetero_scale(c)))
    return Task(
        f"hetero-{features}d", features, features,
        mean=torch.sin,
        scale=hetero_scale,
        true_nll=features * (0.5 * LOG_2PI_E + expected_log_scale),
        description=f"x_i = sin(c_i) + (0.1 + 0.2 |c_i|) eps_i, D = C = {features}",
    )


TASKS: dict[str, Task] = {t.name: t for t in [
    linear_task("linear-2d", LINEAR_2D),
    linear_task("linear-1d", LINEAR_1D),
    hetero_task(2),
]}


# --------------------------------------------------------------------------- flows


@dataclass(frozen=True)
class FlowOptions:
    """The sizes shared by every flow."""

    transforms: int = 3
    hidden: tuple[int, ...] = (64, 64)
    bins: int = 8


def zuko_flow(name: str, task: Task, o: FlowOptions) -> pf.Flow:
    """zuko's ``MAF`` or ``NSF`` of the shared sizes, through ``from_zuko``."""
    zuko = import_zuko()
    sizes = {"transforms": o.transforms, "hidden_features": o.hidden}
    if name == "NSF":
        sizes["bins"] = o.bins
    return pf.flows.from_zuko(getattr(zuko.flows, name)(task.features, task.context, **sizes), task.context)


#: ``name: (builder(task, options), description)``; zuko's flows are the peers.
FLOWS: dict[str, tuple[Callable[[Task, FlowOptions], nn.Module], str]] = {
    "MAF": (lambda t, o: pf.flows.MAF(t.features, context=t.context, transforms=o.transforms, hidden=o.hidden),
            "pf.flows.MAF"),
    "IAF": (lambda t, o: pf.flows.IAF(t.features, context=t.context, transforms=o.transforms, hidden=o.hidden),
            "pf.flows.IAF (log_prob of data: D passes per layer)"),
    "NSF": (lambda t, o: pf.flows.NSF(t.features, context=t.context, transforms=o.transforms, hidden=o.hidden,
                                      bins=o.bins),
            "pf.flows.NSF (coupling)"),
    "NSF-AR": (lambda t, o: pf.flows.NSF(t.features, context=t.context, transforms=o.transforms, hidden=o.hidden,
                                         bins=o.bins, autoregressive=True),
               "pf.flows.NSF(autoregressive=True)"),
    "RealNVP": (lambda t, o: pf.flows.RealNVP(t.features, context=t.context, transforms=o.transforms,
                                              hidden=o.hidden),
                "pf.flows.RealNVP"),
    "zuko-MAF": (lambda t, o: zuko_flow("MAF", t, o), "pf.flows.from_zuko(zuko.flows.MAF)"),
    "zuko-NSF": (lambda t, o: zuko_flow("NSF", t, o), "pf.flows.from_zuko(zuko.flows.NSF)"),
}


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- train and evaluate


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s mini-batch: the same for every flow."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def train(flow: nn.Module, task: Task, steps: int, batch: int, lr: float, seed: int) -> dict[str, Any]:
    r"""Trains ``flow`` by maximum likelihood on fresh mini-batches of ``task`` (Adam,
    cosine decay to 0, gradient norm clipped to 1).

    Returns:
        ``{"train_seconds", "ms_per_step", "skipped", "final_loss"}``.
    """
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    flow.train()
    skipped, seconds, loss = 0, [], torch.tensor(float("nan"))
    start = time.perf_counter()
    for step in range(steps):
        x, c = task.sample(batch, batch_generator(seed, step))
        tick = time.thread_time()
        loss = -flow(c).log_prob(x).mean()
        optimizer.zero_grad()
        if torch.isfinite(loss):
            loss.backward()
            nn.utils.clip_grad_norm_(flow.parameters(), max_norm=1.0)
            optimizer.step()
        else:
            skipped += 1
        scheduler.step()
        seconds.append(time.thread_time() - tick)
    return {
        "train_seconds": time.perf_counter() - start,
        "ms_per_step": 1000 * statistics.median(seconds) if seconds else float("nan"),
        "skipped": skipped,
        "final_loss": float(loss.detach()),
    }


@torch.no_grad()
def evaluate(flow: nn.Module, task: Task, x: Tensor, c: Tensor, chunk: int = 5000) -> dict[str, float]:
    r"""The flow's and the true density's mean NLL on the held-out pairs.

    Returns:
        ``{"test_nll", "true_nll_test", "excess"}``, ``excess = test_nll - true_nll_test``.
    """
    flow.eval()
    log_q = torch.cat([flow(cs).log_prob(xs) for xs, cs in zip(x.split(chunk), c.split(chunk))])
    test_nll = -float(log_q.double().mean())
    true_nll_test = -float(task.log_prob(x.double(), c.double()).mean())
    return {"test_nll": test_nll, "true_nll_test": true_nll_test, "excess": test_nll - true_nll_test}


def run(task: Task, flow_name: str, seed: int, steps: int, batch: int, lr: float, test_size: int,
        options: FlowOptions) -> dict[str, Any]:
    """Builds, trains and evaluates one flow on one task with one seed."""
    torch.manual_seed(seed)
    flow = FLOWS[flow_name][0](task, options)
    training = train(flow, task, steps, batch, lr, seed)
    x, c = task.sample(test_size, torch.Generator().manual_seed(seed + 10_000))
    return {"task": task.name, "flow": flow_name, "seed": seed, "true_nll": task.true_nll,
            "params": parameter_count(flow), **training, **evaluate(flow, task, x, c)}


# --------------------------------------------------------------------------- tables


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: Sequence[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{task: {flow: {"excess", "excess_sd", "test_nll", "test_nll_sd", "ms_per_step", "seeds"}}}``,
    mean and standard deviation over seeds, in the order the results came."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["flow"]), []).append(r)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for (task, flow), rs in groups.items():
        excess, excess_sd = mean_sd([r["excess"] for r in rs])
        nll, nll_sd = mean_sd([r["test_nll"] for r in rs])
        summary.setdefault(task, {})[flow] = {
            "excess": excess, "excess_sd": excess_sd, "test_nll": nll, "test_nll_sd": nll_sd,
            "ms_per_step": statistics.fmean(r["ms_per_step"] for r in rs), "seeds": len(rs),
        }
    return summary


def table(summary: dict, tasks: Sequence[str], flows: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """One row per flow, one column per task: test NLL - true NLL, mean ± sd."""
    header = ["flow", *(f"{t} (H = {TASKS[t].true_nll:.3f})" for t in tasks)]
    cell = lambda s: f"{s['excess']:.4f} ± {s['excess_sd']:.4f}" if s["seeds"] > 1 else f"{s['excess']:.4f}"
    body = [[f, *(cell(summary[t][f]) for t in tasks)] for f in flows]
    return header, body


# --------------------------------------------------------------------------- command line


SMOKE = {"steps": 3, "batch": 64, "test_size": 256, "seeds": [0]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--flows", nargs="+", default=list(FLOWS), choices=list(FLOWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000, help="training steps per flow")
    parser.add_argument("--batch", type=int, default=512, help="fresh pairs (x, c) per step")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's initial learning rate (cosine decay to 0)")
    parser.add_argument("--test-size", type=int, default=10000, help="held-out pairs")
    parser.add_argument("--transforms", type=int, default=FlowOptions.transforms, help="layers of every flow")
    parser.add_argument("--hidden", type=int, nargs="+", default=list(FlowOptions.hidden))
    parser.add_argument("--bins", type=int, default=FlowOptions.bins, help="spline bins (NSF flows)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--smoke", action="store_true",
                        help=f"a tiny budget to check the script runs: {SMOKE} (overrides those options)")
    parser.add_argument("--out", metavar="PATH", help="write the settings, results and summary as JSON")
    parser.add_argument("--rst", metavar="PATH", help="also write the table as an RST list-table")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    counts = (args.steps, args.batch, args.test_size, args.transforms, args.bins, args.threads, *args.hidden)
    if min(counts) < 1 or not args.lr > 0:
        parser.error("--steps, --batch, --test-size, --transforms, --hidden, --bins, --threads and --lr "
                     "must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns what it writes as JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    options = FlowOptions(args.transforms, tuple(args.hidden), args.bins)
    zuko = import_zuko()
    settings = (
        f"{args.steps} steps of {args.batch} fresh pairs, Adam lr {args.lr:g} with cosine decay, clip 1.0, "
        f"flows of {options.transforms} layers, hidden {list(options.hidden)}, {options.bins} bins, "
        f"{args.test_size} test pairs, seeds {' '.join(map(str, args.seeds))}, {torch.get_num_threads()} thread(s)"
    )
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, zuko {zuko.__version__}, "
          f"pyro-flowpack {pf.__version__}")
    print(settings, flush=True)
    results: list[dict] = []

    def payload() -> dict[str, Any]:
        return {
            "settings": {
                "steps": args.steps, "batch": args.batch, "lr": args.lr, "schedule": "cosine", "clip": 1.0,
                "test_size": args.test_size, "seeds": args.seeds, "threads": torch.get_num_threads(),
                "smoke": args.smoke,
                "flow": {"transforms": options.transforms, "hidden": list(options.hidden), "bins": options.bins},
                "tasks": {t: {"features": TASKS[t].features, "context": TASKS[t].context,
                              "true_nll": TASKS[t].true_nll, "description": TASKS[t].description}
                          for t in args.tasks},
                "flows": {f: FLOWS[f][1] for f in args.flows},
                "versions": {"torch": torch.__version__, "pyro": pyro.__version__, "zuko": zuko.__version__,
                             "pyro_flowpack": pf.__version__},
            },
            "results": results,
            "summary": summarise(results),
        }

    def write_json() -> None:
        if args.out:
            text = json.dumps(payload(), indent=2) + "\n"
            write_atomically(args.out, lambda p: p.write_text(text))

    with pyro.validation_enabled(False):
        saved = Distribution._validate_args
        Distribution.set_default_validate_args(False)
        try:
            for name in args.tasks:
                for seed in args.seeds:
                    for flow in args.flows:
                        r = run(TASKS[name], flow, seed, args.steps, args.batch, args.lr, args.test_size, options)
                        results.append(r)
                        write_json()  # after every run, so that a stopped run keeps what it did
                        skipped = f", {r['skipped']} steps skipped" if r["skipped"] else ""
                        print(f"{name:>10} {flow:>9} seed {seed}: test NLL {r['test_nll']:.4f}, "
                              f"- true {r['excess']:+.4f}, {r['ms_per_step']:.1f} ms/step, "
                              f"{r['train_seconds']:.0f} s{skipped}", flush=True)
        finally:
            Distribution.set_default_validate_args(saved)

    write_json()
    header, body = table(summarise(results), args.tasks, args.flows)
    print()
    print(markdown(header, body))
    if args.rst:
        caption = (f"Test NLL minus true conditional NLL [nats], mean ± sd over seeds; H is the true "
                   f"conditional NLL ({settings})")
        write_atomically(args.rst, lambda p: p.write_text(rst(header, body, caption)))
    return payload()


if __name__ == "__main__":
    main()
