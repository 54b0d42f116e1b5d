r"""Trains a normalizing flow on a two-dimensional toy data set by exact maximum likelihood.

The flow minimises the exact negative log-likelihood ``-flow().log_prob(x).mean()`` with
Adam on a fixed training set, and is scored on a held-out test set. The script writes,
under ``--out``:

- ``density.png``: three panels side by side, a 2-D histogram of the test data, one of
  as many samples from the flow, and the learned density :math:`\exp \log p(x)` on a
  grid, each normalised to [0, 1] (clipped at its 99.5th percentile) and coloured with
  a viridis-like map;
- ``metrics.json``: the final test NLL (nats per point) and the run's settings and time.

Run ``python examples/train_2d.py`` (one to two minutes on two CPU cores) or, for example,
``python examples/train_2d.py --dataset two_spirals --flow realnvp --steps 5000``.
Torch uses all cores unless ``OMP_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable

# The networks are small, so OpenMP threads that spin while waiting only steal the cores
# (tens of times slower on a busy machine); an explicit setting still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import Tensor
from torchvision.utils import save_image

import pyro_flowpack as pf
from pyro_flowpack.train import write_atomically
from pyro_flowpack.data import TOY_DATASETS, toy_dataset

TRAIN_SIZE = 20_000
TEST_SIZE = 5_000
PANEL = 256  # pixels per side of each panel
BINS = 32  # histogram bins per axis; PANEL is a multiple of it
SEPARATOR = 2  # pixels of white between panels

FLOWS: dict[str, Callable[[], pf.Flow]] = {
    "nsf": lambda: pf.flows.NSF(features=2, transforms=4, hidden=(128, 128), bins=16),
    "realnvp": lambda: pf.flows.RealNVP(features=2, transforms=8, hidden=(128, 128)),
    "maf": lambda: pf.flows.MAF(features=2, transforms=8, hidden=(128, 128)),
}

# Five samples of matplotlib's viridis, interpolated linearly.
VIRIDIS = torch.tensor([
    [0.267, 0.005, 0.329],
    [0.229, 0.322, 0.546],
    [0.128, 0.567, 0.551],
    [0.369, 0.789, 0.383],
    [0.993, 0.906, 0.144],
])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=list(TOY_DATASETS), default="checkerboard")
    parser.add_argument("--flow", choices=list(FLOWS), default="nsf")
    parser.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    parser.add_argument("--batch", type=int, default=512, help="points per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="initial learning rate (cosine decay)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be positive")
    return args


@torch.no_grad()
def test_nll(flow: pf.Flow, x: Tensor) -> float:
    """The mean negative log-likelihood of ``x``, in nats per point."""
    flow.eval()
    return -flow().log_prob(x).mean().item()


def train(flow: pf.Flow, train_x: Tensor, test_x: Tensor, args: argparse.Namespace) -> None:
    optimizer = torch.optim.Adam(flow.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    every = max(args.steps // 10, 1)
    for step in range(1, args.steps + 1):
        flow.train()
        batch = train_x[torch.randint(len(train_x), (args.batch,))]
        loss = -flow().log_prob(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % every == 0 or step == args.steps:
            print(f"step {step:5d}  batch NLL {loss.item():7.4f}  test NLL {test_nll(flow, test_x):7.4f}", flush=True)


def colourise(values: Tensor) -> Tensor:
    """Maps values ``(H, W)`` in [0, 1] to an RGB image ``(3, H, W)`` through :data:`VIRIDIS`."""
    position = values.clamp(0, 1) * (len(VIRIDIS) - 1)
    low = position.floor().long().clamp(max=len(VIRIDIS) - 2)
    rgb = torch.lerp(VIRIDIS[low], VIRIDIS[low + 1], (position - low)[..., None])
    return rgb.permute(2, 0, 1)


def normalise(values: Tensor) -> Tensor:
    """Scales non-negative values to [0, 1] by their 99.5th percentile, clipping above it
    so that a few sharp peaks do not darken the rest; non-finite values count as 0."""
    values = values.nan_to_num(0.0, posinf=0.0)
    return (values / values.quantile(0.995).clamp(min=torch.finfo(values.dtype).tiny)).clamp(max=1)


def histogram(points: Tensor, limit: float) -> Tensor:
    """A ``PANEL x PANEL`` image of the counts of ``points`` in ``BINS x BINS`` bins on
    ``[-limit, limit]^2``, with ``y`` increasing upwards."""
    counts = torch.histogramdd(points, bins=[BINS, BINS], range=[-limit, limit, -limit, limit]).hist
    image = counts.T.flip(0)  # rows are y (top: largest), columns are x
    upscale = PANEL // BINS
    return image.repeat_interleave(upscale, 0).repeat_interleave(upscale, 1)


@torch.no_grad()
def density(flow: pf.Flow, limit: float) -> Tensor:
    """The flow's density on the centres of a ``PANEL x PANEL`` grid on ``[-limit, limit]^2``."""
    flow.eval()
    centres = ((torch.arange(PANEL) + 0.5) / PANEL * 2 - 1) * limit
    y, x = torch.meshgrid(centres.flip(0), centres, indexing="ij")
    return flow().log_prob(torch.stack((x, y), dim=-1)).exp()


def picture(flow: pf.Flow, test_x: Tensor) -> Tensor:
    """The three panels (test data, flow samples, flow density) with white separators."""
    limit = 1.05 * test_x.abs().max().item()
    with torch.no_grad():
        flow.eval()
        samples = flow().sample((len(test_x),))
    panels = [histogram(test_x, limit), histogram(samples, limit), density(flow, limit)]
    separator = torch.ones(3, PANEL, SEPARATOR)
    images = [colourise(normalise(panel)) for panel in panels]
    return torch.cat([images[0], separator, images[1], separator, images[2]], dim=-1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data = toy_dataset(args.dataset, TRAIN_SIZE + TEST_SIZE, seed=args.seed)
    train_x, test_x = data[:TRAIN_SIZE], data[TRAIN_SIZE:]
    flow = FLOWS[args.flow]()
    print(f"{args.flow} on {args.dataset}: {sum(p.numel() for p in flow.parameters())} parameters, "
          f"{TRAIN_SIZE} train / {TEST_SIZE} test points, {torch.get_num_threads()} threads", flush=True)

    start = time.perf_counter()
    train(flow, train_x, test_x, args)
    train_time = time.perf_counter() - start
    nll = test_nll(flow, test_x)

    args.out.mkdir(parents=True, exist_ok=True)
    image_path, metrics_path = args.out / "density.png", args.out / "metrics.json"
    image = picture(flow, test_x)
    write_atomically(image_path, lambda path: save_image(image, path, format="PNG"))
    metrics = {
        "dataset": args.dataset,
        "flow": args.flow,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "test_nll": nll,
        "train_time_s": round(train_time, 2),
        "total_time_s": round(time.perf_counter() - start, 2),
    }
    write_atomically(metrics_path, lambda path: path.write_text(json.dumps(metrics, indent=2) + "\n"))
    print(f"final test NLL {nll:.4f} nats (mean over {TEST_SIZE} test points), "
          f"trained in {train_time:.1f} s; wrote {image_path} and {metrics_path}")


if __name__ == "__main__":
    main()
