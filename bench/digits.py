r"""Anchor benchmark for image flows: bits per dimension on the 8x8 digits under an equal
CPU training budget per method.

Data: :func:`pyro_flowpack.data.digits`, 8x8 grey images with :math:`K = 17` levels and
the package's fixed split (1438 train, 359 test images), :math:`D = 64`.

Protocol. Each method is built with ``torch.manual_seed(--seed)`` and trained alone, one
after the other, for the same wall-clock budget (``--budget`` seconds, default 120) with
``torch.set_num_threads(--threads)`` (default 2): Adam (learning rate ``--lr``, default
1e-3), mini-batches of ``--batch`` (default 128) images drawn without replacement, epoch
after epoch, with a seeded order. The loss is the negative one-sample bound below,
averaged over the batch; the clock is read after every step and training stops at the
first step that ends past the budget (data-dependent initialisations, e.g. ActNorm's, run
inside the first step and count against the budget). Steps whose loss is not finite are
skipped (no update) and counted. Then, in eval mode, under ``torch.no_grad()`` and in
chunks of images, the script reports on the whole train split the mean one-sample bound in
bits/dim, and on the test split the mean one-sample bound and the importance-weighted
estimate with ``--k`` draws (default 64) of :func:`pyro_flowpack.infer.iw_log_prob`.
Bits/dim are :func:`pyro_flowpack.infer.bits_per_dim`, :math:`-\log P(x) / (D \ln 2)`.

Every number is a bound on (an estimate of) the same discrete :math:`\log P(x)`:

- Ours (``pf.flows.Glow`` and ``pf.flows.MultiscaleRealNVP``): ``flow().log_prob(x)`` of the
  integer images is itself the one-sample bound :math:`\log p_Y(y) - \log q(y \mid x)`,
  :math:`y = (x + u) / K`, with :math:`q` uniform (``dequantization="uniform"``, so
  :math:`\log q(y \mid x) = D \log K`) or a learned conditional flow (``"variational"``);
  the logit pre-processing is a layer inside the flow.
- Peers, all with the same uniform dequantization :math:`u \sim U[0, 1)^D`,
  :math:`y = (x + u) / K \in [0, 1)^D`, and the one-sample bound
  :math:`\log p_Y(y) - D \log K`, where :math:`p_Y` is the peer's density of :math:`y`:

  * zuko ``NSF``, ``MAF`` and ``RealNVP`` on the flattened 64-vector
    :math:`z = \operatorname{logit}(\alpha + (1 - 2\alpha) y)`, :math:`\alpha = 0.05`, so
    :math:`\log p_Y(y) = \log p_Z(z) + \sum_i [\log(1 - 2\alpha) - \log s_i - \log(1 - s_i)]`
    with :math:`s = \alpha + (1 - 2\alpha) y` (the exact log-det of the pre-processing);
  * normflows' multi-scale Glow (``normflows.MultiscaleFlow`` of ``GlowBlock``,
    ``Squeeze``, ``Merge`` and learned ``GlowBase`` priors, laid out as in normflows' own
    Glow example, on (1, 8, 8) with 2 levels of 4 blocks), with normflows' own pre-processing layer
    ``normflows.transforms.Logit(alpha=0.05)`` as the model's ``transform``: the same
    logit with the same exact log-det, so ``model.log_prob(y)`` is :math:`\log p_Y(y)`.
    normflows has no dequantization of its own besides the data-loader transform
    ``normflows.utils.Jitter``, which adds the same uniform noise; it is drawn here.

For a peer, ``log_prob(x)`` draws fresh noise at each call, so ``iw_log_prob`` applies to
peers and ours alike. Sizes are comparable: every model has about 4 x 10^5 parameters
(the variational methods have their dequantization flow on top); the counts and the exact
configurations are printed with the results. Ours come as Glow with affine couplings (the
paper's) and with rational-quadratic spline couplings (``coupling="spline"``, fewer hidden
channels for the same size).

Torch's distribution argument validation is switched off explicitly for all methods
(``Distribution.set_default_validate_args(False)``; importing zuko switches it off anyway).

Run::

    .venv/bin/python bench/digits.py                        # 7 methods x 120 s (about 17 min)
    .venv/bin/python bench/digits.py --quick                # 10 s per method, k = 8
    .venv/bin/python bench/digits.py --methods ours-glow-uniform zuko-nsf --budget 60
    .venv/bin/python bench/digits.py --rst docs/_generated/digits.rst --json digits.json

``--methods all`` adds ``ours-glow-variational`` (affine couplings) and
``ours-realnvp-uniform`` (pf.flows.MultiscaleRealNVP) to the default seven.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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

import sys
from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parent))  # bench/ scripts share tables.py
from tables import markdown, rst  # noqa: E402
from pyro_flowpack.data import ImageDataset, digits
from pyro_flowpack.train import write_atomically

SHAPE = (1, 8, 8)
D = math.prod(SHAPE)
NUM_BINS = 17
ALPHA = 0.05  # the logit pre-processing's squeeze, for every method

# Sizes of the multi-scale image flows: ours as specified, about 4.2e5 parameters for Glow;
# normflows' Glow has the same levels and steps, its plainer conditioner (3x3, 1x1, 3x3
# convolutions) gets more hidden channels to match that count, and the zuko flows are sized
# to match it too.
LEVELS, STEPS, HIDDEN_CHANNELS = 2, 4, 64
NORMFLOWS_HIDDEN_CHANNELS = 192

HEADER = ["method", "params", "steps", "train bpd (bound)", "test bpd (bound)", "test bpd (IW k={k})"]


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


def normflows_glow() -> UniformlyDequantizedPeer:
    """normflows' multi-scale Glow on (1, 8, 8), as in normflows' Glow example: level 0 is
    the coarsest (8 channels of 2x2), each level's blocks end with a ``Squeeze`` (to the
    finer scale in the sampling direction) and the finer level's prior is ``Merge``d in."""
    channels, size = SHAPE[0], SHAPE[1]
    priors, merges, levels = [], [], []
    for i in range(LEVELS):
        width = channels * 2 ** (LEVELS + 1 - i)  # the channels of this level's squeezed image
        blocks = [
            nf.flows.GlowBlock(width, NORMFLOWS_HIDDEN_CHANNELS, split_mode="channel", scale=True)
            for _ in range(STEPS)
        ]
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


def ours(builder: str, dequantization: str, **options: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        settings = dict(shape=SHAPE, levels=LEVELS, steps=STEPS, hidden_channels=HIDDEN_CHANNELS)
        settings.update(options)
        return getattr(pf.flows, builder)(**settings, dequantization=dequantization, num_bins=NUM_BINS)

    return build


SIZES = f"shape={SHAPE}, levels={LEVELS}, steps={STEPS}, hidden_channels={HIDDEN_CHANNELS}"
# spline couplings, with fewer hidden channels for about the same number of parameters
SPLINE = dict(coupling="spline", hidden_channels=44)
SPLINE_SIZES = f"shape={SHAPE}, levels={LEVELS}, steps={STEPS}, coupling='spline', hidden_channels=44"
METHODS: dict[str, Method] = {
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
    "normflows-glow": Method(
        normflows_glow,
        f"normflows.MultiscaleFlow: {LEVELS} levels x {STEPS} GlowBlock(hidden={NORMFLOWS_HIDDEN_CHANNELS}), "
        "GlowBase priors, transform=Logit(0.05)",
    ),
    "ours-glow-uniform": Method(ours("Glow", "uniform"), f"pf.flows.Glow({SIZES}, dequantization='uniform')"),
    "ours-glow-variational": Method(
        ours("Glow", "variational"), f"pf.flows.Glow({SIZES}, dequantization='variational')"
    ),
    "ours-glow-spline-uniform": Method(
        ours("Glow", "uniform", **SPLINE), f"pf.flows.Glow({SPLINE_SIZES}, dequantization='uniform')"
    ),
    "ours-glow-spline-variational": Method(
        ours("Glow", "variational", **SPLINE), f"pf.flows.Glow({SPLINE_SIZES}, dequantization='variational')"
    ),
    "ours-realnvp-uniform": Method(
        ours("MultiscaleRealNVP", "uniform"), f"pf.flows.MultiscaleRealNVP({SIZES}, dequantization='uniform')"
    ),
}
DEFAULT_METHODS = [name for name in METHODS if name not in ("ours-glow-variational", "ours-realnvp-uniform")]


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class Training:
    steps: int
    skipped: int  # steps with a non-finite loss, not applied
    seconds: float
    last_loss_bpd: float


def train(model: nn.Module, data: ImageDataset, budget: float, batch: int, lr: float, seed: int) -> Training:
    """Trains ``model`` on ``data`` for ``budget`` seconds of wall clock."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = data.loader(batch_size=batch, shuffle=True, seed=seed)
    steps = skipped = 0
    loss = torch.tensor(float("nan"))
    start = time.perf_counter()
    while True:
        for x, _ in loader:
            loss = -model().log_prob(x).mean()
            optimizer.zero_grad()
            if torch.isfinite(loss):
                loss.backward()
                optimizer.step()
            else:
                skipped += 1
            steps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                return Training(steps, skipped, elapsed, pf.infer.bits_per_dim(-loss.detach(), D).item())


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, k: int, chunk: int) -> tuple[float, float]:
    """The mean one-sample bound and the mean importance-weighted estimate with ``k``
    draws (``k = 0``: not computed, NaN), both in bits/dim."""
    model.eval()
    d = model()
    bound, iw = [], []
    for x in images.split(chunk):
        bound.append(d.log_prob(x))
        if k:
            iw.append(pf.infer.iw_log_prob(d, x, k=k, chunk=max(1, 4096 // len(x))))
    mean_bpd = lambda lp: pf.infer.bits_per_dim(torch.cat(lp), SHAPE).mean().item() if lp else float("nan")
    return mean_bpd(bound), mean_bpd(iw)


def run_method(name: str, train_data: ImageDataset, test_data: ImageDataset, args: argparse.Namespace) -> dict:
    method = METHODS[name]
    torch.manual_seed(args.seed)
    model = method.build()
    params = parameter_count(model)
    print(f"{name}: {params} parameters; {method.description}", flush=True)
    training = train(model, train_data, args.budget, args.batch, args.lr, args.seed)
    torch.manual_seed(args.seed + 1)
    start = time.perf_counter()
    train_bpd, _ = evaluate(model, train_data.images, 0, args.eval_chunk)
    test_bpd, test_iw_bpd = evaluate(model, test_data.images, args.k, args.eval_chunk)
    result = {
        "method": name,
        "description": method.description,
        "params": params,
        "steps": training.steps,
        "skipped_steps": training.skipped,
        "train_seconds": round(training.seconds, 2),
        "last_batch_bpd": training.last_loss_bpd,
        "train_bpd": train_bpd,
        "test_bpd": test_bpd,
        "test_iw_bpd": test_iw_bpd,
        "eval_seconds": round(time.perf_counter() - start, 2),
    }
    skipped = f", {training.skipped} skipped (non-finite loss)" if training.skipped else ""
    print(
        f"  {training.steps} steps in {training.seconds:.1f} s{skipped}; train {train_bpd:.4f}, "
        f"test {test_bpd:.4f}, test IW(k={args.k}) {test_iw_bpd:.4f} bits/dim "
        f"(evaluated in {result['eval_seconds']:.1f} s)",
        flush=True,
    )
    return result


def table_body(results: Sequence[dict]) -> list[list[str]]:
    return [
        [r["method"], str(r["params"]), str(r["steps"]), f"{r['train_bpd']:.3f}", f"{r['test_bpd']:.3f}",
         f"{r['test_iw_bpd']:.3f}"]
        for r in results
    ]





def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        choices=[*METHODS, "all"],
        help=f"methods to run, in order (default: {' '.join(DEFAULT_METHODS)}; 'all' adds ours-glow-variational and ours-realnvp-uniform)",
    )
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds (wall clock) per method")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--k", type=int, default=64, help="importance samples of the IW estimate")
    parser.add_argument("--eval-chunk", type=int, default=128, help="images per evaluation call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 s budgets and k = 8")
    parser.add_argument("--rst", metavar="PATH", help="also write the table as an RST list-table")
    parser.add_argument("--json", metavar="PATH", help="also write the settings and results as JSON")
    args = parser.parse_args(argv)
    if "all" in args.methods:
        args.methods = list(METHODS)
    if args.quick:
        args.budget, args.k = 10.0, 8
    if args.budget <= 0 or args.batch < 1 or args.k < 1 or args.threads < 1 or args.eval_chunk < 1:
        parser.error("--budget, --batch, --k, --threads and --eval-chunk must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    Distribution.set_default_validate_args(False)
    # normflows' LU-parametrised 1x1 convolution calls the deprecated torch.lu
    warnings.filterwarnings("ignore", message="torch.lu is deprecated")
    torch.set_num_threads(args.threads)
    train_data, test_data = digits("train"), digits("test")
    settings = (
        f"digits {len(train_data)}/{len(test_data)}, K={NUM_BINS}, {args.budget:g} s per method, "
        f"{torch.get_num_threads()} threads, batch {args.batch}, Adam lr {args.lr:g}, seed {args.seed}, "
        f"IW k={args.k}"
    )
    print(f"torch {torch.__version__}, zuko {zuko.__version__}, normflows {nf.__version__}, "
          f"pyro-flowpack {pf.__version__}")
    print(settings)
    print("Distribution argument validation: off for all methods (set explicitly).\n", flush=True)

    results = [run_method(name, train_data, test_data, args) for name in args.methods]
    header = [h.format(k=args.k) for h in HEADER]
    body = table_body(results)
    print()
    print(markdown(header, body))
    if args.rst:
        table = rst(header, body, f"Bits/dim on digits, equal CPU budget ({settings})")
        write_atomically(args.rst, lambda p: p.write_text(table))
    if args.json:
        payload = {
            "settings": {
                "budget_s": args.budget,
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "lr": args.lr,
                "seed": args.seed,
                "k": args.k,
                "train_size": len(train_data),
                "test_size": len(test_data),
                "num_bins": NUM_BINS,
                "alpha": ALPHA,
                "versions": {"torch": torch.__version__, "zuko": zuko.__version__, "normflows": nf.__version__,
                             "pyro_flowpack": pf.__version__},
            },
            "results": results,
        }
        text = json.dumps(payload, indent=2) + "\n"
        write_atomically(args.json, lambda p: p.write_text(text))


if __name__ == "__main__":
    main()
