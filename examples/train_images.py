r"""Trains a multi-scale image flow (Glow or RealNVP) on discrete images by maximising the
dequantization lower bound on :math:`\log P(x)`, and reports bits per dimension.

The flow, ``pf.flows.Glow`` (spline couplings by default, ``--coupling affine`` for the
paper's) or ``pf.flows.MultiscaleRealNVP``, with variational (default) or uniform
dequantization, takes the integer images as they are: ``flow().log_prob(x)`` is the
one-sample bound :math:`\log p_Y(y) - \log q(y \mid x)`, :math:`y = (x + u) / K`, and
training minimises its negative mean with Adam. After each epoch the script prints the
train bits/dim (the mean of that epoch's mini-batch bounds, in train mode) and the test
bits/dim (the mean one-sample bound over the test split, in eval mode); at the end, the
test bound and the tighter importance-weighted estimate with ``--k`` draws
(:func:`pyro_flowpack.infer.iw_log_prob`). It writes, under ``--out``:

- ``samples.png``: an 8x8 grid of samples at temperature ``--temperature``, scaled from
  ``[0, K)`` to [0, 1], small images enlarged to at least 32 pixels a side;
- ``loss.png``: the learning curve, bits/dim against optimiser steps: each mini-batch's
  bound in light blue, the test bound after each epoch in red, axes in black, and light
  grey horizontal lines at every whole bit/dim inside the plotted range (the range is in
  ``metrics.json`` as ``plot_bpd_range``);
- ``metrics.json``: the final test bits/dim (bound and IW), the per-epoch history, the
  settings and the times.

Files are written to a temporary name and renamed, so a reader never sees half a file.

Run ``python examples/train_images.py`` (digits, about 2 to 3 minutes on two CPU cores),
``python examples/train_images.py --flow realnvp --dequantization variational --epochs 50``
or ``python examples/train_images.py --dataset mnist --root ~/data --download --epochs 1``.
Torch uses all cores unless ``OMP_NUM_THREADS`` (or ``--threads``) says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

# The networks are small, so OpenMP threads that spin while waiting only steal the cores
# (tens of times slower on a busy machine); an explicit setting still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

import pyro_flowpack as pf
from pyro_flowpack.train import write_atomically
from pyro_flowpack.data import IMAGE_DATASETS, ImageDataset, image_dataset

FLOWS: dict[str, Callable[..., pf.Flow]] = {"glow": pf.flows.Glow, "realnvp": pf.flows.MultiscaleRealNVP}
GRID = 8  # samples per side of the grid
MIN_SIDE = 32  # smaller images are enlarged (nearest neighbour) to at least this side
PLOT_WIDTH, PLOT_HEIGHT, MARGIN = 640, 360, 24  # loss.png, in pixels
TRAIN_COLOUR = torch.tensor([0.62, 0.79, 0.95])
TEST_COLOUR = torch.tensor([0.84, 0.15, 0.16])
GRID_COLOUR = torch.tensor([0.88, 0.88, 0.88])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=list(IMAGE_DATASETS), default="digits")
    parser.add_argument("--root", type=Path, help="directory of the torchvision data sets (not for digits)")
    parser.add_argument("--download", action="store_true", help="download a torchvision data set into --root")
    parser.add_argument("--flow", choices=list(FLOWS), default="glow")
    parser.add_argument("--dequantization", choices=["uniform", "variational"], default="variational")
    parser.add_argument("--coupling", choices=["affine", "spline"], default="spline",
                        help="Glow's coupling layers (MultiscaleRealNVP is affine)")
    parser.add_argument("--levels", type=int, help="multi-scale levels (default: 2, or 3 for cifar10)")
    parser.add_argument("--depth", type=int, default=4, help="steps (couplings) per level")
    parser.add_argument("--hidden-channels", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    parser.add_argument("--steps", type=int, help="optimiser steps in all, instead of --epochs")
    parser.add_argument("--batch", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--k", type=int, help="importance samples of the final IW estimate (default: 64 for "
                        "digits, 8 otherwise)")
    parser.add_argument("--eval-chunk", type=int, default=1024,
                        help="images per evaluation call, each importance sample counting as one")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("image_output"), help="output folder")
    args = parser.parse_args(argv)
    if args.dataset != "digits" and args.root is None:
        parser.error(f"--dataset {args.dataset} needs --root (and --download the first time)")
    if args.levels is None:
        args.levels = 3 if args.dataset == "cifar10" else 2
    if args.k is None:
        args.k = 64 if args.dataset == "digits" else 8
    counts = {"--epochs": args.epochs, "--steps": args.steps or 1, "--batch": args.batch, "--k": args.k,
              "--levels": args.levels, "--depth": args.depth, "--hidden-channels": args.hidden_channels,
              "--eval-chunk": args.eval_chunk, "--threads": args.threads or 1}
    bad = [name for name, value in counts.items() if value < 1]
    if bad:
        parser.error(f"{', '.join(bad)} must be positive")
    if not args.temperature > 0:
        parser.error("--temperature must be positive")
    return args


def bpd(log_prob: Tensor, shape: torch.Size) -> float:
    """The mean bits per dimension of a batch of log-likelihoods."""
    return pf.infer.bits_per_dim(log_prob, shape).mean().item()


@torch.no_grad()
def evaluate(flow: pf.Flow, data: ImageDataset, k: int, chunk: int) -> tuple[float, float]:
    """The test bits/dim: the mean one-sample bound and, for ``k > 0``, the mean
    importance-weighted estimate with ``k`` draws (NaN for ``k = 0``). Each call of
    ``log_prob`` sees at most ``chunk`` images, counting each draw as one."""
    flow.eval()
    d = flow()
    bound, iw = [], []
    for x in data.images.split(chunk):
        bound.append(d.log_prob(x))
        if k:
            iw.append(pf.infer.iw_log_prob(d, x, k=k, chunk=max(1, chunk // len(x))))
    return bpd(torch.cat(bound), data.shape), bpd(torch.cat(iw), data.shape) if iw else math.nan


def train(flow: pf.Flow, train_data: ImageDataset, test_data: ImageDataset, args: argparse.Namespace
          ) -> tuple[list[float], list[dict]]:
    """Trains ``flow``; returns every step's mini-batch bits/dim and the per-epoch history."""
    optimizer = torch.optim.Adam(flow.parameters(), lr=args.lr)
    loader = train_data.loader(batch_size=args.batch, shuffle=True, seed=args.seed)
    total = args.steps if args.steps is not None else args.epochs * len(loader)
    losses, history = [], []
    epoch = 0
    while len(losses) < total:
        epoch += 1
        flow.train()
        start, first = time.perf_counter(), len(losses)
        for x, _ in loader:
            loss = -flow().log_prob(x).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(bpd(-loss.detach(), train_data.shape))
            if len(losses) == total:
                break
        train_bpd = sum(losses[first:]) / (len(losses) - first)
        test_bpd, _ = evaluate(flow, test_data, 0, args.eval_chunk)
        history.append({"epoch": epoch, "step": len(losses), "train_bpd": train_bpd, "test_bpd": test_bpd})
        print(f"epoch {epoch:3d}  step {len(losses):5d}  train {train_bpd:.4f}  test {test_bpd:.4f} bits/dim "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    return losses, history


@torch.no_grad()
def sample_grid(flow: pf.Flow, num_bins: int, temperature: float) -> Tensor:
    """A grid of ``GRID x GRID`` samples in [0, 1], enlarged to at least ``MIN_SIDE``."""
    flow.eval()
    samples = flow().sample((GRID * GRID,), temperature=temperature) / (num_bins - 1)
    scale = max(1, math.ceil(MIN_SIDE / max(samples.shape[-2:])))
    samples = samples.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    return make_grid(samples.clamp(0, 1), nrow=GRID, padding=2, pad_value=1.0)


def draw_polyline(canvas: Tensor, rows: Tensor, cols: Tensor, colour: Tensor) -> None:
    """Draws the segments between consecutive points ``(rows[i], cols[i])`` (float pixel
    coordinates) two pixels thick onto ``canvas`` of shape ``(3, H, W)``, in place."""
    if len(rows) == 1:  # a lone point: a 2x2 dot
        rows, cols = rows.repeat(2), cols.repeat(2)
    pixels_r, pixels_c = [], []
    for r0, c0, r1, c1 in zip(rows[:-1], cols[:-1], rows[1:], cols[1:]):
        n = int(max(abs(r1 - r0), abs(c1 - c0)).ceil()) + 1
        pixels_r.append(torch.linspace(float(r0), float(r1), n))
        pixels_c.append(torch.linspace(float(c0), float(c1), n))
    r, c = torch.cat(pixels_r).round().long(), torch.cat(pixels_c).round().long()
    height, width = canvas.shape[1:]
    for dr, dc in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        canvas[:, (r + dr).clamp(0, height - 1), (c + dc).clamp(0, width - 1)] = colour[:, None]


def loss_curve(losses: list[float], history: list[dict]) -> tuple[Tensor, tuple[float, float]]:
    """The learning curve as an RGB image, and its bits/dim range ``(bottom, top)``.

    The range spans the finite values, its top clipped at the 98th percentile of the
    mini-batch values so that the first steps do not flatten the rest of the curve."""
    steps = torch.arange(1, len(losses) + 1, dtype=torch.float)
    values = torch.tensor(losses)
    test_steps = torch.tensor([h["step"] for h in history], dtype=torch.float)
    test_values = torch.tensor([h["test_bpd"] for h in history])
    finite = torch.cat([values, test_values])
    finite = finite[finite.isfinite()]
    bottom = finite.min().item() if len(finite) else 0.0
    top = max(torch.quantile(finite, 0.98).item(), test_values.max().item()) if len(finite) else 1.0
    if not top > bottom:
        top = bottom + 1.0
    pad = 0.05 * (top - bottom)
    bottom, top = bottom - pad, top + pad
    left, right, upper, lower = MARGIN, PLOT_WIDTH - MARGIN, MARGIN, PLOT_HEIGHT - MARGIN

    def to_pixels(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        col = left + (x - 1) / max(len(losses) - 1, 1) * (right - left)
        row = lower - (y.nan_to_num(top).clamp(bottom, top) - bottom) / (top - bottom) * (lower - upper)
        return row, col

    canvas = torch.ones(3, PLOT_HEIGHT, PLOT_WIDTH)
    for whole in range(math.ceil(bottom), math.floor(top) + 1):
        row = round(lower - (whole - bottom) / (top - bottom) * (lower - upper))
        canvas[:, row, left:right + 1] = GRID_COLOUR[:, None]
    draw_polyline(canvas, *to_pixels(steps, values), TRAIN_COLOUR)
    draw_polyline(canvas, *to_pixels(test_steps, test_values), TEST_COLOUR)
    canvas[:, upper:lower + 1, left - 1] = 0.0  # y axis
    canvas[:, lower + 1, left - 1:right + 1] = 0.0  # x axis
    return canvas, (bottom, top)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_data = image_dataset(args.dataset, args.root, "train", args.download)
    test_data = image_dataset(args.dataset, args.root, "test", args.download)
    options = {"coupling": args.coupling} if args.flow == "glow" else {}
    flow = FLOWS[args.flow](
        shape=train_data.shape,
        levels=args.levels,
        steps=args.depth,
        hidden_channels=args.hidden_channels,
        dequantization=args.dequantization,
        num_bins=train_data.num_bins,
        **options,
    )
    params = sum(p.numel() for p in flow.parameters())
    print(f"{args.flow} ({args.dequantization} dequantization) on {args.dataset}: {params} parameters, "
          f"{len(train_data)} train / {len(test_data)} test images of shape {tuple(train_data.shape)}, "
          f"{torch.get_num_threads()} threads", flush=True)

    start = time.perf_counter()
    losses, history = train(flow, train_data, test_data, args)
    train_time = time.perf_counter() - start
    test_bpd, test_iw_bpd = evaluate(flow, test_data, args.k, args.eval_chunk)
    print(f"final test bits/dim: bound {test_bpd:.4f}, importance-weighted (k={args.k}) {test_iw_bpd:.4f}; "
          f"trained {len(losses)} steps in {train_time:.1f} s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    samples_path, loss_path, metrics_path = args.out / "samples.png", args.out / "loss.png", args.out / "metrics.json"
    grid = sample_grid(flow, train_data.num_bins, args.temperature)
    write_atomically(samples_path, lambda path: save_image(grid, path, format="PNG"))
    curve, plot_range = loss_curve(losses, history)
    write_atomically(loss_path, lambda path: save_image(curve, path, format="PNG"))
    metrics = {
        "dataset": args.dataset,
        "flow": args.flow,
        "dequantization": args.dequantization,
        "levels": args.levels,
        "depth": args.depth,
        "hidden_channels": args.hidden_channels,
        "parameters": params,
        "steps": len(losses),
        "epochs": len(history),
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "k": args.k,
        "temperature": args.temperature,
        "test_bpd": test_bpd,
        "test_iw_bpd": test_iw_bpd,
        "history": history,
        "plot_bpd_range": list(plot_range),
        "train_time_s": round(train_time, 2),
        "total_time_s": round(time.perf_counter() - start, 2),
    }
    write_atomically(metrics_path, lambda path: path.write_text(json.dumps(metrics, indent=2) + "\n"))
    print(f"wrote {samples_path}, {loss_path} and {metrics_path}")


if __name__ == "__main__":
    main()
