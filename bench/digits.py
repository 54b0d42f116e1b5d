r"""Anchor benchmark for image flows: test bits per dimension on the 8x8 digits against
training wall-clock, ours against normflows' Glow at the same levels, steps and hidden
channels, trained interleaved in one process.

Data: :func:`pyro_flowpack.data.digits`, 8x8 grey images with :math:`K = 17` levels and
the package's fixed split (1438 train, 359 test images), :math:`D = 64`.

Protocol. For each seed (``--seeds``, default 0 1) every method is built after
``torch.manual_seed(seed)`` and gets its own Adam optimizer at a constant learning rate
(``--lr``, default 2e-3, the same for every method) and its own loader of mini-batches drawn without replacement, epoch after epoch, in the
order of a generator seeded with ``seed`` (methods with the same batch size see the same
batches in the same order). All methods train in one process with
``torch.set_num_threads(--threads)`` (default 1), interleaved step by step: the method
whose clock is furthest behind takes the next step, so that every method trains through
the same stretches of wall-clock time and load from other processes slows them alike.
A method's clock is the sum of its own steps' times (fetching the batch, the loss,
backward, the Adam step): wall-clock time, or with ``--clock cpu`` the CPU time of the
training thread, which on a machine shared with other work does not count the waits for
a core (with one thread, the whole step runs on that thread). Data-dependent
initialisations (ActNorm's) run inside the first step and count. The loss is the negative one-sample bound below, averaged over
the batch; a step whose loss is not finite is skipped (no update) and counted.

When a method's clock first passes a budget (``--budgets``, default 30 60 120 180 300
seconds) it is evaluated, off the clock. Since the learning rate is constant, the model
at budget :math:`b` is the one a run of budget :math:`b` alone would give. The
evaluation is the same for every method: on the whole test split, in eval mode, under
``torch.no_grad()``, in chunks of ``--eval-chunk`` images, with the global generator
seeded with ``seed + 1`` (and the training stream restored afterwards), it computes the
mean one-sample bound and the mean importance-weighted estimate with ``--k`` draws
(default 64) of :func:`pyro_flowpack.infer.iw_log_prob`, both in bits/dim
(:func:`pyro_flowpack.infer.bits_per_dim`, :math:`-\log P(x) / (D \ln 2)`). The
importance-weighted estimate is the tighter of the two bounds on the same :math:`\log P(x)`
and is the figure compared; the one-sample bound is reported beside it.

The methods; every number bounds the same discrete :math:`\log P(x)`:

- ``normflows-glow``: normflows' multi-scale Glow (``normflows.MultiscaleFlow`` of
  ``GlowBlock``, ``Squeeze``, ``Merge`` and learned ``GlowBase`` priors, laid out as in
  normflows' own Glow example), 2 levels of 4 blocks, 64 hidden channels, with
  normflows' pre-processing ``normflows.transforms.Logit(alpha=0.05)`` as the model's
  ``transform``. normflows has no dequantization of its own besides the data-loader
  transform ``normflows.utils.Jitter``, which adds uniform noise; the same noise is drawn
  here: :math:`y = (x + u) / K`, :math:`u \sim U[0, 1)^D`, and the bound is
  :math:`\log p_Y(y) - D \log K` with normflows' ``model.log_prob(y)`` as
  :math:`\log p_Y(y)` (the logit's exact log-det included).
- ``ours-glow``: ``pf.flows.Glow`` with the same levels, steps and hidden channels and
  Glow's own conditioner, 3x3, 1x1 and 3x3 convolutions (``blocks=0``), the network of
  normflows' ``GlowBlock``, so the step couplings have exactly normflows' parameters;
  ours adds Glow's conditional prior for the factored-out half (an affine coupling
  reading the kept half, where normflows has a learned unconditional ``GlowBase``) and a
  small variational dequantizer (``dequantization="variational"``, two checkerboard
  couplings of 16 channels). Its ``flow().log_prob(x)`` of the integer images is the
  one-sample bound :math:`\log p_Y(y) - \log q(y \mid x)`, with the logit
  pre-processing a layer inside the flow and :math:`q` the learned noise distribution.
- ``ours-glow-resnet``: ``pf.flows.Glow`` at the same sizes with its defaults: the ResNet
  conditioner (one residual block, ``blocks=1``, about 5 times the parameters) and
  uniform dequantization; ``ours-glow-spline-variational``: the same with spline
  couplings and the default variational dequantizer (32 channels), the image defaults of
  ``flowpack train``, about 10 times normflows' parameters.
- ``zuko-nsf``, ``zuko-maf``, ``zuko-realnvp``: zuko's flows on the flattened
  :math:`z = \operatorname{logit}(\alpha + (1 - 2\alpha) y)`, :math:`\alpha = 0.05`, with
  the same uniform dequantization and the exact log-det of the pre-processing,
  :math:`\log p_Y(y) = \log p_Z(z) + \sum_i [\log(1 - 2\alpha) - \log s_i - \log(1 - s_i)]`,
  :math:`s = \alpha + (1 - 2\alpha) y`, each sized at about :math:`4 \times 10^5`
  parameters.

The parameter counts, median milliseconds per step and the configurations are printed
with the results. Torch's distribution argument validation is switched off explicitly for
all methods (``Distribution.set_default_validate_args(False)``; importing zuko switches it
off anyway).

Run::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/digits.py   # 2 seeds x 2 x 300 s, ~22 min
    .venv/bin/python bench/digits.py --clock cpu              # budgets of CPU time, on a shared machine
    .venv/bin/python bench/digits.py --quick                  # budgets 5 10 s, one seed, k = 8
    .venv/bin/python bench/digits.py --methods ours-glow ours-glow-resnet normflows-glow --budgets 30 60
    .venv/bin/python bench/digits.py --rst docs/_generated/digits.rst --json digits.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

# The networks are small, so OpenMP threads that spin while waiting only steal the cores
# of a shared machine; an explicit setting still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import normflows as nf
import torch
import torch.nn as nn
import zuko
from torch import Tensor
from torch.distributions import Distribution

import pyro_flowpack as pf
from pyro_flowpack.data import ImageDataset, digits
from pyro_flowpack.train import write_atomically

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ scripts share tables.py
from tables import markdown, rst  # noqa: E402

SHAPE = (1, 8, 8)
D = math.prod(SHAPE)
NUM_BINS = 17
ALPHA = 0.05  # the logit pre-processing's squeeze, for every method

# The multi-scale flows share these sizes; Glow's own conditioner (blocks=0) is
# normflows' GlowBlock network, so ours and normflows' have about the same size.
LEVELS, STEPS, HIDDEN_CHANNELS = 2, 4, 64
BUDGETS = (30.0, 60.0, 120.0, 180.0, 300.0)
# wall-clock time, or the CPU time of the training thread (with one thread: steadier on a
# machine shared with other work, since waiting for a core does not count)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
REFERENCE = "normflows-glow"


def logit_and_ladj(y: Tensor) -> tuple[Tensor, Tensor]:
    r"""Returns :math:`z = \operatorname{logit}(s)`, :math:`s = \alpha + (1 - 2\alpha) y`, and
    :math:`\log |\det \partial z / \partial y|`, summed over all but the first dimension."""
    s = ALPHA + (1 - 2 * ALPHA) * y
    z = s.log() - (-s).log1p()
    ladj = math.log(1 - 2 * ALPHA) * y[0].numel() - (s.log() + (-s).log1p()).flatten(1).sum(-1)
    return z, ladj


class UniformlyDequantizedPeer(nn.Module):
    r"""A peer's density :math:`p_Y` of :math:`y \in [0, 1)^D` as a model of the integer
    pixels, by uniform dequantization: ``log_prob(x)`` draws :math:`u \sim U[0, 1)^D` and
    returns :math:`\log p_Y((x + u) / K) - D \log K`, a one-sample lower bound on
    :math:`\log P(x)`, for ``x`` of shape ``(*batch, 1, 8, 8)``.

    Calling the module returns itself, so that ``model().log_prob(x)`` reads as for a flow.
    """

    def __init__(self, log_density: Callable[[Tensor], Tensor], modules: nn.Module) -> None:
        super().__init__()
        self.log_density = log_density  # (N, 1, 8, 8) in [0, 1) -> (N,)
        self.peer = modules

    def forward(self) -> "UniformlyDequantizedPeer":
        return self

    def log_prob(self, x: Tensor) -> Tensor:
        batch = x.shape[: x.dim() - len(SHAPE)]
        x = x.reshape(-1, *SHAPE).float()
        y = (x + torch.rand_like(x)) / NUM_BINS
        return (self.log_density(y) - D * math.log(NUM_BINS)).reshape(batch)


def zuko_peer(flow: zuko.flows.Flow) -> UniformlyDequantizedPeer:
    """A zuko flow on the flattened logit of ``y``."""

    def log_density(y: Tensor) -> Tensor:
        z, ladj = logit_and_ladj(y)
        return flow().log_prob(z.flatten(1)) + ladj

    return UniformlyDequantizedPeer(log_density, flow)


def normflows_glow(hidden_channels: int = HIDDEN_CHANNELS) -> UniformlyDequantizedPeer:
    """normflows' multi-scale Glow on (1, 8, 8), as in normflows' Glow example: level 0 is
    the coarsest (8 channels of 2x2), each level's blocks end with a ``Squeeze`` (to the
    finer scale in the sampling direction) and the finer level's prior is ``Merge``d in."""
    channels, size = SHAPE[0], SHAPE[1]
    priors, merges, levels = [], [], []
    for i in range(LEVELS):
        width = channels * 2 ** (LEVELS + 1 - i)  # the channels of this level's squeezed image
        blocks = [nf.flows.GlowBlock(width, hidden_channels, split_mode="channel", scale=True) for _ in range(STEPS)]
        levels.append(blocks + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (channels * 2 ** (LEVELS - i), size // 2 ** (LEVELS - i), size // 2 ** (LEVELS - i))
        else:
            latent = (channels * 2 ** (LEVELS + 1), size // 2**LEVELS, size // 2**LEVELS)
        priors.append(nf.distributions.GlowBase(latent))
    model = nf.MultiscaleFlow(priors, levels, merges, transform=nf.transforms.Logit(alpha=ALPHA), class_cond=False)
    return UniformlyDequantizedPeer(lambda y: model.log_prob(y, None), model)


@dataclass(frozen=True)
class Method:
    build: Callable[[], nn.Module]  # model() has log_prob(x_uint8) -> one-sample bound
    description: str
    lr: float | None = None  # None: --lr
    batch: int | None = None  # None: --batch


def ours(**options: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        settings = dict(shape=SHAPE, levels=LEVELS, steps=STEPS, hidden_channels=HIDDEN_CHANNELS, num_bins=NUM_BINS)
        return pf.flows.Glow(**{**settings, **options})

    return build


def glow_description(**options: Any) -> str:
    settings = dict(shape=SHAPE, levels=LEVELS, steps=STEPS, hidden_channels=HIDDEN_CHANNELS, num_bins=NUM_BINS)
    return "pf.flows.Glow(" + ", ".join(f"{k}={v!r}" for k, v in {**settings, **options}.items()) + ")"


# ours-glow: Glow's own conditioner at normflows' size, with a small variational
# dequantizer (two checkerboard couplings of 16 channels); docs/benchmarks.rst has the
# tuning runs behind the choice
OURS = dict(blocks=0, coupling="affine", dequantization="variational", dequantization_channels=16)
METHODS: dict[str, Method] = {
    "ours-glow": Method(ours(**OURS), glow_description(**OURS)),
    REFERENCE: Method(
        normflows_glow,
        f"normflows.MultiscaleFlow: {LEVELS} levels x {STEPS} GlowBlock(hidden_channels={HIDDEN_CHANNELS}, "
        "split_mode='channel', scale=True), GlowBase priors, transform=Logit(0.05)",
    ),
    "ours-glow-resnet": Method(ours(dequantization="uniform"), glow_description(dequantization="uniform")),
    "ours-glow-spline-variational": Method(ours(coupling="spline", dequantization="variational"),
                                           glow_description(coupling="spline", dequantization="variational")),
    "zuko-nsf": Method(
        lambda: zuko_peer(zuko.flows.NSF(D, transforms=4, hidden_features=(64, 64), bins=8)),
        "zuko.flows.NSF(64, transforms=4, hidden_features=(64, 64), bins=8) on logit(y)",
    ),
    "zuko-maf": Method(
        lambda: zuko_peer(zuko.flows.MAF(D, transforms=5, hidden_features=(200, 200))),
        "zuko.flows.MAF(64, transforms=5, hidden_features=(200, 200)) on logit(y)",
    ),
    "zuko-realnvp": Method(
        lambda: zuko_peer(zuko.flows.RealNVP(D, transforms=5, hidden_features=(240, 240))),
        "zuko.flows.RealNVP(64, transforms=5, hidden_features=(240, 240)) on logit(y)",
    ),
}
DEFAULT_METHODS = ["ours-glow", REFERENCE]


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def batches(data: ImageDataset, batch: int, seed: int) -> Iterator[Tensor]:
    """Mini-batches of images, epoch after epoch, in a seeded order."""
    loader = data.loader(batch_size=batch, shuffle=True, seed=seed)
    while True:
        for x, _ in loader:
            yield x


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, k: int, chunk: int, seed: int) -> tuple[float, float]:
    """The mean one-sample bound and the mean importance-weighted estimate with ``k``
    draws on ``images``, both in bits/dim, with the noise of a generator seeded with
    ``seed``; the global random state and the training mode are restored afterwards."""
    was_training = model.training
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        d = model()
        bound, iw = [], []
        for x in images.split(chunk):
            bound.append(d.log_prob(x))
            iw.append(pf.infer.iw_log_prob(d, x, k=k, chunk=max(1, 4096 // len(x))))
    model.train(was_training)
    mean_bpd = lambda lp: pf.infer.bits_per_dim(torch.cat(lp), SHAPE).mean().item()
    return mean_bpd(bound), mean_bpd(iw)


@dataclass
class Trainee:
    """One method in training: its model, optimizer, batches and clock."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: Iterator[Tensor]
    timer: Callable[[], float] = time.perf_counter
    clock: float = 0.0
    steps: int = 0
    skipped: int = 0  # steps with a non-finite loss, not applied
    step_seconds: list[float] = field(default_factory=list)

    def step(self) -> None:
        start = self.timer()
        x = next(self.data)
        loss = -self.model().log_prob(x).mean()
        self.optimizer.zero_grad()
        if torch.isfinite(loss):
            loss.backward()
            self.optimizer.step()
        else:
            self.skipped += 1
        seconds = self.timer() - start
        self.clock += seconds
        self.steps += 1
        self.step_seconds.append(seconds)


def run_seed(names: Sequence[str], train_data: ImageDataset, test_data: ImageDataset, seed: int,
             args: argparse.Namespace) -> dict[str, dict]:
    """Trains the methods interleaved for one seed, evaluating each at every budget."""
    trainees, results = [], {}
    for name in names:
        method = METHODS[name]
        torch.manual_seed(seed)
        model = method.build()
        model.train()
        lr = method.lr if method.lr is not None else args.lr
        batch = method.batch if method.batch is not None else args.batch
        trainees.append(Trainee(name, model, torch.optim.Adam(model.parameters(), lr=lr),
                                batches(train_data, batch, seed), CLOCKS[args.clock]))
        results[name] = {"params": parameter_count(model), "lr": lr, "batch": batch, "budgets": []}
    pending = {t.name: list(args.budgets) for t in trainees}
    while any(pending.values()):
        t = min((t for t in trainees if pending[t.name]), key=lambda t: t.clock)
        t.step()
        passed = [b for b in pending[t.name] if t.clock >= b]  # more than one if a step is long
        if passed:
            del pending[t.name][:len(passed)]
            start = time.perf_counter()
            bound, iw = evaluate(t.model, test_data.images, args.k, args.eval_chunk, seed + 1)
            for budget in passed:
                results[t.name]["budgets"].append({
                    "budget_s": budget, "train_seconds": round(t.clock, 2), "steps": t.steps,
                    "skipped_steps": t.skipped, "test_bound_bpd": bound, "test_iw_bpd": iw,
                })
            print(f"  seed {seed} {t.name:>16} {passed[-1]:6g} s: {t.steps:6d} steps, test {bound:.4f} (bound), "
                  f"{iw:.4f} (IW k={args.k}) bits/dim (evaluated in {time.perf_counter() - start:.1f} s)", flush=True)
    for t in trainees:
        # the first step holds the data-dependent initialisations
        results[t.name]["ms_per_step"] = 1000 * statistics.median(t.step_seconds[1:] or t.step_seconds)
    return results


def summarise(runs: Sequence[dict[str, dict]], names: Sequence[str], budgets: Sequence[float]) -> dict:
    """Per method and budget: the IW and bound bits/dim of every seed, their means, the
    mean steps and, against the reference (when run), the mean paired difference and the
    number of seeds where the method is lower."""
    summary: dict[str, Any] = {}
    for name in names:
        rows = []
        for i, budget in enumerate(budgets):
            iw = [run[name]["budgets"][i]["test_iw_bpd"] for run in runs]
            bound = [run[name]["budgets"][i]["test_bound_bpd"] for run in runs]
            row = {"budget_s": budget, "iw_bpd": iw, "iw_bpd_mean": statistics.fmean(iw),
                   "bound_bpd": bound, "bound_bpd_mean": statistics.fmean(bound),
                   "steps_mean": statistics.fmean(run[name]["budgets"][i]["steps"] for run in runs)}
            if REFERENCE in names and name != REFERENCE:
                ref = [run[REFERENCE]["budgets"][i]["test_iw_bpd"] for run in runs]
                row["iw_minus_reference"] = statistics.fmean(a - b for a, b in zip(iw, ref))
                row["seeds_lower"] = sum(a < b for a, b in zip(iw, ref))
            rows.append(row)
        summary[name] = {
            "params": runs[0][name]["params"],
            "ms_per_step": statistics.fmean(run[name]["ms_per_step"] for run in runs),
            "budgets": rows,
        }
    return summary


def tables(summary: dict, names: Sequence[str], seeds: Sequence[int], k: int) -> tuple[list, list, list, list]:
    """The bits/dim table (a row per budget and method) and the size and speed table."""
    header = ["budget (s)", "method", "steps", *(f"IW k={k} seed {s}" for s in seeds), "IW mean",
              f"IW - {REFERENCE}", "bound mean"]
    body = []
    for i in range(len(next(iter(summary.values()))["budgets"])):
        for name in names:
            row = summary[name]["budgets"][i]
            delta = (f"{row['iw_minus_reference']:+.3f} ({row['seeds_lower']}/{len(seeds)} lower)"
                     if "iw_minus_reference" in row else "")
            body.append([f"{row['budget_s']:g}", name, f"{row['steps_mean']:.0f}", *(f"{v:.3f}" for v in row["iw_bpd"]),
                         f"{row['iw_bpd_mean']:.3f}", delta, f"{row['bound_bpd_mean']:.3f}"])
    size_header = ["method", "params", "ms/step", "configuration"]
    size_body = [[name, str(summary[name]["params"]), f"{summary[name]['ms_per_step']:.1f}",
                  METHODS[name].description] for name in names]
    return header, body, size_header, size_body


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=[*METHODS, "all"],
                        help=f"methods to train together (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS),
                        help="training seconds (each method's own clock) at which to evaluate")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="what a budget counts: wall-clock or the training thread's CPU time (--threads 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--batch", type=int, default=128, help="batch size of methods without their own")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate for methods without their own")
    parser.add_argument("--k", type=int, default=64, help="importance samples of the IW estimate")
    parser.add_argument("--eval-chunk", type=int, default=128, help="images per evaluation call")
    parser.add_argument("--quick", action="store_true", help="smoke run: budgets 5 10 s, seed 0, k = 8")
    parser.add_argument("--rst", metavar="PATH", help="also write the tables as RST list-tables")
    parser.add_argument("--json", metavar="PATH", help="also write the settings and results as JSON")
    args = parser.parse_args(argv)
    if "all" in args.methods:
        args.methods = list(METHODS)
    args.methods = list(dict.fromkeys(args.methods))
    if args.quick:
        args.budgets, args.seeds, args.k = [5.0, 10.0], [0], 8
    args.budgets = sorted(set(args.budgets))
    if (min(args.budgets) <= 0 or args.batch < 1 or args.k < 1 or args.threads < 1 or args.eval_chunk < 1
            or not args.lr > 0):
        parser.error("--budgets, --batch, --lr, --k, --threads and --eval-chunk must be positive")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    Distribution.set_default_validate_args(False)
    # normflows' LU-parametrised 1x1 convolution calls the deprecated torch.lu
    warnings.filterwarnings("ignore", message="torch.lu is deprecated")
    torch.set_num_threads(args.threads)
    train_data, test_data = digits("train"), digits("test")
    settings = (
        f"digits {len(train_data)}/{len(test_data)}, K={NUM_BINS}, budgets {' '.join(f'{b:g}' for b in args.budgets)} s, "
        f"{args.clock} clock, {torch.get_num_threads()} thread(s), interleaved, batch {args.batch}, Adam lr {args.lr:g} (constant), "
        f"seeds {' '.join(map(str, args.seeds))}, IW k={args.k}"
    )
    print(f"torch {torch.__version__}, zuko {zuko.__version__}, normflows {nf.__version__}, "
          f"pyro-flowpack {pf.__version__}")
    print(settings)
    for name in args.methods:
        print(f"{name}: {METHODS[name].description}")
    print("Distribution argument validation: off for all methods (set explicitly).\n", flush=True)

    runs = [run_seed(args.methods, train_data, test_data, seed, args) for seed in args.seeds]
    summary = summarise(runs, args.methods, args.budgets)
    header, body, size_header, size_body = tables(summary, args.methods, args.seeds, args.k)
    print()
    print(markdown(header, body, text_columns=2))
    print()
    print(markdown(size_header, size_body))
    if args.rst:
        text = (rst(header, body, f"Test bits/dim on digits against training time ({settings})") + "\n"
                + rst(size_header, size_body, "Sizes and speed (ms per training step, median, mean over seeds)"))
        write_atomically(args.rst, lambda p: p.write_text(text))
    payload = {
        "settings": {
            "budgets_s": args.budgets, "clock": args.clock, "seeds": args.seeds, "threads": torch.get_num_threads(),
            "batch": args.batch, "lr": args.lr, "k": args.k, "train_size": len(train_data),
            "test_size": len(test_data), "num_bins": NUM_BINS, "alpha": ALPHA,
            "methods": {name: METHODS[name].description for name in args.methods},
            "versions": {"torch": torch.__version__, "zuko": zuko.__version__, "normflows": nf.__version__,
                         "pyro_flowpack": pf.__version__},
        },
        "runs": runs,
        "summary": summary,
    }
    if args.json:
        text = json.dumps(payload, indent=2) + "\n"
        write_atomically(args.json, lambda p: p.write_text(text))
    return payload


if __name__ == "__main__":
    main()
