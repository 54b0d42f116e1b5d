r"""Benchmark pyro-flowpack against zuko and Pyro's built-in transforms.

Each row builds the same flow three times, with pyro-flowpack, zuko and Pyro's own
``pyro.distributions.transforms``: the same number of layers, hidden sizes, spline bins
and spline bound, and the same autoregressive orders or coupling splits as far as each
library allows (the remaining differences are printed with the row). Three operations
are timed:

* ``train step``: ``loss = -d.log_prob(x).mean(); loss.backward(); opt.step();
  opt.zero_grad()`` with Adam, where ``d = flow()`` is built inside the step for
  pyro-flowpack and zuko, as their users do, and a Pyro ``TransformedDistribution`` is
  built once, as Pyro's users do;
* ``log_prob``: density evaluation of a batch under ``torch.no_grad()``;
* ``sample``: ``d.sample((N,))`` of as many points as a batch, under ``torch.no_grad()``.

Protocol: everything runs in one process, in float32 on the CPU, with
``torch.set_num_threads(--threads)``. Every call gets a batch tensor other than the one
before it (a pool of batches is cycled), as in training, so that no library answers from
a cache keyed on the input tensor (Pyro's transforms keep ``cache_size=1``). Each library runs ``--warmup`` untimed calls of an operation, then the
libraries are interleaved round-robin for ``--repeats`` rounds, the starting library
rotating each round, so that drifts in machine load hit all of them alike. Reported are
the median time per call (wall time, or with ``--clock cpu`` the CPU time of the calling
thread, which other processes on a shared machine disturb less) and the ratio
``peer / ours`` (above 1: pyro-flowpack is faster).

Importing zuko switches off torch's distribution argument validation globally; the
script switches it off explicitly with
``torch.distributions.Distribution.set_default_validate_args(False)`` so that all three
libraries run without it. pyro-flowpack runs with its layer cache on (the default).

Run with ``OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python bench/peers.py``; ``--quick``
for a fast run and ``--rst PATH`` to also write the table as reStructuredText.
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pyro
import pyro.distributions as pdist
import torch
import torch.nn as nn
import zuko
from pyro.distributions.transforms import (
    AffineAutoregressive,
    AffineCoupling,
    Permute,
    SplineAutoregressive,
    SplineCoupling,
)
from pyro.nn import AutoRegressiveNN, DenseNN
from zuko.transforms import MonotonicRQSTransform
from torch import Tensor
from torch.distributions import Distribution

import pyro_flowpack as pf
from pyro_flowpack.train import write_atomically

import sys
from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parent))  # bench/ scripts share tables.py
from tables import markdown, rst  # noqa: E402

OPERATIONS = ("train step", "log_prob", "sample")
HEADER = ["flow", "operation", "ours [ms]", "zuko [ms]", "zuko / ours", "Pyro [ms]", "Pyro / ours"]

#: Median seconds per call, ``{operation: {library: seconds}}``.
Medians = dict[str, dict[str, float]]

DEGREES = "MADE hidden-unit degrees: ours and Pyro's evenly spread, zuko's cycled"
SPLINE_PARAMETERS = "widths and knot slopes are squashed differently (ours and zuko soft-clamped exp slopes, Pyro softplus)"


@dataclass(frozen=True)
class Config:
    """The sizes shared by every row."""

    features: int
    transforms: int
    hidden: tuple[int, ...]
    bins: int
    bound: float
    batch: int


@dataclass
class Contender:
    """One library's version of a row's flow.

    Arguments:
        module: The module holding every parameter.
        distribution: Returns the distribution to evaluate (``flow()`` for
            pyro-flowpack and zuko, a distribution built once for Pyro).
        description: What the library's flow is made of.
    """

    module: nn.Module
    distribution: Callable[[], Distribution]
    description: str
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=1e-3)

    def train_step(self, x: Tensor) -> None:
        loss = -self.distribution().log_prob(x).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def log_prob(self, x: Tensor) -> None:
        with torch.no_grad():
            self.distribution().log_prob(x)

    def sample(self, x: Tensor) -> None:
        """Draws as many points as ``x`` holds (``x`` only sets the number)."""
        with torch.no_grad():
            self.distribution().sample((x.shape[0],))

    def operation(self, name: str) -> Callable[[Tensor], None]:
        return {"train step": self.train_step, "log_prob": self.log_prob, "sample": self.sample}[name]


@dataclass
class Row:
    """A flow family, its three contenders and the differences between them that remain.
    ``pyro_sequential_density`` marks the rows where Pyro's layers are in IAF form, so that
    its ``log_prob`` of data takes ``D`` passes a layer."""

    name: str
    contenders: dict[str, Contender]
    differences: Sequence[str]
    pyro_sequential_density: bool = False

    def check(self, x: Tensor) -> None:
        """Raises unless every contender gives a finite log-density of shape ``(batch,)``."""
        for name, c in self.contenders.items():
            with torch.no_grad():
                log_p = c.distribution().log_prob(x)
            if log_p.shape != x.shape[:1] or not bool(torch.isfinite(log_p).all()):
                raise RuntimeError(
                    f"{self.name}: {name} should give a finite log_prob of shape {tuple(x.shape[:1])}, "
                    f"got shape {tuple(log_p.shape)} with {int((~torch.isfinite(log_p)).sum())} non-finite values"
                )


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flowpack_contender(flow: pf.Flow, description: str) -> Contender:
    return Contender(flow, flow, f"{description}; layer cache on (default)")


def zuko_contender(flow: zuko.flows.Flow, description: str) -> Contender:
    return Contender(flow, flow, description)


def pyro_contender(transforms: Sequence[nn.Module | Permute], features: int, description: str) -> Contender:
    """A Pyro ``TransformedDistribution`` over a standard normal, built once."""
    base = pdist.Normal(torch.zeros(features), torch.ones(features)).to_event(1)
    d = pdist.TransformedDistribution(base, list(transforms))
    module = nn.ModuleList([t for t in transforms if isinstance(t, nn.Module)])
    return Contender(module, lambda: d, description)


def alternating_orders(cfg: Config) -> list[Tensor]:
    """Ascending, descending, ascending, ... orders, as pyro-flowpack's and zuko's MAF use."""
    ascending = torch.arange(cfg.features)
    return [ascending if i % 2 == 0 else ascending.flip(0) for i in range(cfg.transforms)]


def with_reversals(layers: list[nn.Module], features: int) -> list[nn.Module | Permute]:
    """Pyro coupling layers with a feature reversal between consecutive ones."""
    reverse = torch.arange(features).flip(0)
    out: list[nn.Module | Permute] = []
    for i, layer in enumerate(layers):
        if i > 0:
            out.append(Permute(reverse))
        out.append(layer)
    return out


def maf_row(cfg: Config) -> Row:
    D, T, H = cfg.features, cfg.transforms, cfg.hidden
    pyro_layers = [AffineAutoregressive(AutoRegressiveNN(D, list(H), permutation=o)) for o in alternating_orders(cfg)]
    return Row(
        "MAF (affine)",
        {
            "pyro-flowpack": flowpack_contender(
                pf.flows.MAF(D, transforms=T, hidden=H),
                f"flows.MAF: {T} MaskedAffineAutoregressive (MAF form), orders alternating",
            ),
            "zuko": zuko_contender(
                zuko.flows.MAF(D, transforms=T, hidden_features=H),
                f"flows.MAF: {T} MaskedAutoregressiveTransform (affine), orders alternating",
            ),
            "Pyro": pyro_contender(
                pyro_layers,
                D,
                f"{T} AffineAutoregressive (IAF form: log_prob of data takes {D} passes a layer), "
                "AutoRegressiveNN permutations alternating",
            ),
        },
        [
            "log-scale: ours b*tanh(s/b) with b=3; zuko s/(1+|s/ln 1e-3|); Pyro clamp to [-5, 3]",
            DEGREES,
            "Pyro's layer is IAF form, so its log_prob is sequential and its sampling one pass "
            "(the reverse of MAF form)",
        ],
        pyro_sequential_density=True,
    )


def nsf_coupling_row(cfg: Config) -> Row:
    D, T, H, K, B = cfg.features, cfg.transforms, cfg.hidden, cfg.bins, cfg.bound
    split = D // 2
    pyro_layers = [
        SplineCoupling(
            D,
            split,
            DenseNN(split, list(H), param_dims=[(D - split) * K, (D - split) * K, (D - split) * (K - 1)]),
            count_bins=K,
            bound=B,
            order="quadratic",
            identity=True,
        )
        for _ in range(T)
    ]
    return Row(
        "NSF (coupling)",
        {
            "pyro-flowpack": flowpack_contender(
                pf.flows.NSF(D, transforms=T, hidden=H, bins=K, bound=B, mask="alternating"),
                f"flows.NSF(mask='alternating'): {T} SplineCoupling, MLP conditioner, checkered masks alternating",
            ),
            "zuko": zuko_contender(
                # zuko's NSF(passes=2) also splines the conditioning half and reads all
                # features; this is zuko's own coupling layer with the same spline instead
                zuko.flows.NICE(
                    D,
                    transforms=T,
                    hidden_features=H,
                    univariate=partial(MonotonicRQSTransform, bound=B),
                    shapes=[(K,), (K,), (K - 1,)],
                ),
                f"{T} GeneralCouplingTransform(MonotonicRQSTransform), MLP conditioner, "
                "checkered masks alternating",
            ),
            "Pyro": pyro_contender(
                with_reversals(pyro_layers, D),
                D,
                f"{T} SplineCoupling(order='quadratic', identity=True), DenseNN conditioner, "
                "reversal Permute between layers",
            ),
        },
        [
            f"spline: rational-quadratic, {K} bins on [-{B:g}, {B:g}], identity tails in all three; "
            f"{SPLINE_PARAMETERS}",
            f"Pyro: {T - 1} extra Permute layers; split = first {split} features of the permuted vector",
        ],
    )


def nsf_autoregressive_row(cfg: Config) -> Row:
    D, T, H, K, B = cfg.features, cfg.transforms, cfg.hidden, cfg.bins, cfg.bound
    pyro_layers = [
        SplineAutoregressive(
            D,
            AutoRegressiveNN(D, list(H), param_dims=[K, K, K - 1], permutation=o),
            count_bins=K,
            bound=B,
            order="quadratic",
        )
        for o in alternating_orders(cfg)
    ]
    return Row(
        "NSF (autoregressive)",
        {
            "pyro-flowpack": flowpack_contender(
                pf.flows.NSF(D, transforms=T, hidden=H, bins=K, bound=B, autoregressive=True),
                f"flows.NSF(autoregressive=True): {T} MaskedSplineAutoregressive (MAF form), orders alternating",
            ),
            "zuko": zuko_contender(
                zuko.flows.NSF(D, transforms=T, hidden_features=H, bins=K),
                f"flows.NSF: {T} MaskedAutoregressiveTransform (RQS), orders alternating",
            ),
            "Pyro": pyro_contender(
                pyro_layers,
                D,
                f"{T} SplineAutoregressive(order='quadratic') (IAF form: log_prob of data takes "
                f"{D} passes a layer), AutoRegressiveNN permutations alternating",
            ),
        },
        [
            f"spline: rational-quadratic, {K} bins on [-{B:g}, {B:g}], identity tails in all three; "
            f"{SPLINE_PARAMETERS}",
            DEGREES,
            "Pyro's layer is IAF form, so its log_prob is sequential and its sampling one pass",
        ],
        pyro_sequential_density=True,
    )


def realnvp_row(cfg: Config) -> Row:
    D, T, H = cfg.features, cfg.transforms, cfg.hidden
    split = D // 2
    pyro_layers = [AffineCoupling(split, DenseNN(split, list(H), param_dims=[D - split, D - split])) for _ in range(T)]
    return Row(
        "RealNVP",
        {
            "pyro-flowpack": flowpack_contender(
                pf.flows.RealNVP(D, transforms=T, hidden=H, mask="alternating"),
                f"flows.RealNVP(mask='alternating'): {T} AffineCoupling, checkered masks alternating",
            ),
            "zuko": zuko_contender(
                zuko.flows.RealNVP(D, transforms=T, hidden_features=H),
                f"flows.RealNVP: {T} GeneralCouplingTransform (affine), checkered masks alternating",
            ),
            "Pyro": pyro_contender(
                with_reversals(pyro_layers, D),
                D,
                f"{T} AffineCoupling, DenseNN conditioner, reversal Permute between layers",
            ),
        },
        [
            "log-scale: ours b*tanh(s/b) with b=3; zuko s/(1+|s/ln 1e-3|); Pyro clamp to [-5, 3]",
            f"Pyro: {T - 1} extra Permute layers; split = first {split} features of the permuted "
            "vector rather than a checkered mask",
        ],
    )


def time_row(row: Row, batches: Sequence[Tensor], warmup: int, repeats: int, clock: Callable[[], float]) -> Medians:
    """Times every operation of a row: warm-up calls, then interleaved rounds."""
    pool = itertools.cycle(batches)
    medians: Medians = {}
    for op in OPERATIONS:
        calls = {name: c.operation(op) for name, c in row.contenders.items()}
        for call in calls.values():
            for _ in range(warmup):
                call(next(pool))
        times: dict[str, list[float]] = {name: [] for name in calls}
        names = list(calls)
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                x = next(pool)
                start = clock()
                calls[name](x)
                times[name].append(clock() - start)
        medians[op] = {name: statistics.median(t) for name, t in times.items()}
    return medians


def ratio(medians: Medians, op: str, peer: str) -> float:
    """``peer / ours`` for one operation (above 1: pyro-flowpack is faster)."""
    return medians[op][peer] / medians[op]["pyro-flowpack"]


def table_body(rows: Sequence[Row], results: Sequence[Medians]) -> list[list[str]]:
    """The table's cells below the header: milliseconds and ratios."""
    body = []
    for row, medians in zip(rows, results):
        for op in OPERATIONS:
            m = medians[op]
            body.append([
                row.name,
                op,
                f"{1e3 * m['pyro-flowpack']:.2f}",
                f"{1e3 * m['zuko']:.2f}",
                f"{ratio(medians, op, 'zuko'):.2f}",
                f"{1e3 * m['Pyro']:.2f}",
                f"{ratio(medians, op, 'Pyro'):.2f}",
            ])
    return body




def targets(rows: Sequence[Row], results: Sequence[Medians]) -> list[str]:
    """The project's targets: no slower than zuko to train, 3x Pyro's AR layers on log_prob."""
    lines = []
    for row, medians in zip(rows, results):
        checks = [("train step", "zuko", 1.0)]
        if row.pyro_sequential_density:
            checks.append(("log_prob", "Pyro", 3.0))
        for op, peer, target in checks:
            r = ratio(medians, op, peer)
            verdict = "met" if r >= target else "MISSED"
            lines.append(f"{row.name}: {op} {peer} / ours = {r:.2f} (target >= {target:g}): {verdict}")
    return lines


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--transforms", type=int, default=4)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--bins", type=int, default=8)
    parser.add_argument("--bound", type=float, default=5.0, help="the spline half-width B")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls per library and operation")
    parser.add_argument("--repeats", type=int, default=100, help="timed round-robin rounds")
    parser.add_argument("--quick", action="store_true", help="2 warm-up calls and 15 rounds")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="wall time, or the CPU time of this thread (needs --threads 1; robust to other "
        "processes competing for the cores)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rst", metavar="PATH", help="also write the table as an RST list-table")
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.repeats = 2, 15
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu times this thread only, so it needs --threads 1")

    torch.distributions.Distribution.set_default_validate_args(False)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = Config(args.features, args.transforms, tuple(args.hidden), args.bins, args.bound, args.batch)
    batches = list(torch.randn(8, cfg.batch, cfg.features).unbind(0))

    settings = (
        f"D={cfg.features}, transforms={cfg.transforms}, hidden={cfg.hidden}, bins={cfg.bins}, "
        f"spline bound={cfg.bound:g}, batch={cfg.batch}, float32 CPU, threads={torch.get_num_threads()}, "
        f"{args.clock} clock, warm-up={args.warmup}, rounds={args.repeats}"
    )
    print(f"torch {torch.__version__}, pyro-ppl {pyro.__version__}, zuko {zuko.__version__}, "
          f"pyro-flowpack {pf.__version__}")
    print(settings)
    print("Distribution argument validation: off for all libraries (set explicitly; importing zuko also does).")
    print("Times are medians per call; ratios are peer / ours (> 1: pyro-flowpack is faster).\n")

    rows = [maf_row(cfg), nsf_coupling_row(cfg), nsf_autoregressive_row(cfg), realnvp_row(cfg)]
    results = []
    for row in rows:
        print(row.name)
        for name, c in row.contenders.items():
            print(f"  {name:14s} {parameter_count(c.module):7d} parameters  {c.description}")
        for d in row.differences:
            print(f"  difference: {d}")
        row.check(batches[0])
        results.append(time_row(row, batches, args.warmup, args.repeats, CLOCKS[args.clock]))
    body = table_body(rows, results)
    print()
    print(markdown(HEADER, body, text_columns=2))
    print()
    print("\n".join(targets(rows, results)))
    if args.rst:
        table = rst(HEADER, body, f"pyro-flowpack vs zuko and Pyro ({settings})")
        write_atomically(args.rst, lambda p: p.write_text(table))


if __name__ == "__main__":
    main()
