r"""Trains a multi-scale image flow (Glow or RealNVP) on discrete images by maximising the
dequantization lower bound on :math:`\log P(x)`, and reports bits per dimension.

The flow, ``pf.flows.Glow`` (spline couplings by default, ``--coupling affine`` for the
paper's) or ``pf.flows.MultiscaleRealNVP``, with variational (default) or uniform
dequantization, takes the integer images as they are: ``flow().log_prob(x)`` is the
one-sample bound :math:`\log p_Y(y) - \log q(y \mid x)`, :math:`y = (x + u) / K`, and
:func:`pyro_flowpack.train.fit` (the loop of ``flowpack train``) minimises its negative
mean, reporting bits per dimension :math:`-\log P(x) / (D \ln 2)`. At the end the script
prints the test bound and the tighter importance-weighted estimate with ``--k`` draws
(:func:`pyro_flowpack.infer.iw_log_prob`), and writes under ``--out``: ``samples.png``
(an 8x8 grid at temperature ``--temperature``), ``loss.png``, ``metrics.json``,
checkpoints and the metrics log (``--resume`` continues an interrupted run).

Run ``python examples/train_images.py`` (digits, about 3 minutes on two CPU cores) or
``python examples/train_images.py --dataset mnist --root ~/data --download --epochs 1``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pyro_flowpack as pf
from pyro_flowpack.data import IMAGE_DATASETS, load_data
from pyro_flowpack.train import TrainConfig, build_flow, evaluate_nll, fit, write_atomically


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=list(IMAGE_DATASETS), default="digits")
    parser.add_argument("--root", type=Path, help="directory of the torchvision data sets (not for digits)")
    parser.add_argument("--download", action="store_true", help="download a torchvision data set into --root")
    parser.add_argument("--flow", choices=list(pf.train.IMAGE_FLOWS), default="glow")
    parser.add_argument("--dequantization", choices=["uniform", "variational"], default="variational")
    parser.add_argument("--coupling", choices=["affine", "spline"], default="spline", help="Glow's couplings")
    parser.add_argument("--levels", type=int, default=2, help="multi-scale levels")
    parser.add_argument("--depth", type=int, default=4, help="steps (couplings) per level")
    parser.add_argument("--hidden-channels", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    parser.add_argument("--batch", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay)")
    parser.add_argument("--k", type=int, default=64, help="importance samples of the final IW estimate")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("image_output"), help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    args = parser.parse_args(argv)
    if args.dataset != "digits" and args.root is None:
        parser.error(f"--dataset {args.dataset} needs --root (and --download the first time)")
    if min(args.levels, args.depth, args.hidden_channels, args.epochs, args.batch, args.k) < 1:
        parser.error("--levels, --depth, --hidden-channels, --epochs, --batch and --k must be positive")
    if not args.temperature > 0:
        parser.error("--temperature must be positive")
    return args


def bits_per_dim(nll: float, shape: torch.Size) -> float:
    """A mean NLL in nats per image, in bits per dimension."""
    return pf.infer.bits_per_dim(torch.tensor(-nll), shape).item()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data = load_data(args.dataset, root=args.root, download=args.download, seed=args.seed)
    torch.manual_seed(args.seed)
    options = {"levels": args.levels, "steps": args.depth, "hidden_channels": args.hidden_channels,
               "dequantization": args.dequantization}
    if args.flow == "glow":  # the multi-scale RealNVP's couplings are affine
        options["coupling"] = args.coupling
    flow = build_flow(args.flow, data.event_shape, num_bins=data.num_bins, **options)
    params = sum(p.numel() for p in flow.parameters())
    print(f"{args.flow} ({args.dequantization} dequantization) on {data.name}: {params} parameters, "
          f"{len(data.train)} train / {len(data.valid)} valid / {len(data.test)} test images of shape "
          f"{tuple(data.event_shape)}", flush=True)

    start = time.perf_counter()
    config = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch, lr=args.lr,
                         seed=args.seed, threads=args.threads, unit="bits/dim")
    result = fit(flow, data.train, data.valid, config, out=args.out, resume=args.resume)
    flow.load_state_dict(pf.train.load_checkpoint(args.out / pf.train.RUN_FILES["best"])["model"])
    bound = bits_per_dim(evaluate_nll(flow, data.test), data.event_shape)
    iw = bits_per_dim(pf.train.evaluate_iw_nll(flow, data.test, args.k), data.event_shape)
    print(f"final test bits/dim: bound {bound:.4f}, importance-weighted (k={args.k}) {iw:.4f}", flush=True)

    with torch.no_grad():
        samples = flow().sample((64,), temperature=args.temperature)
    records = pf.train.read_metrics(args.out)
    pictures = [pf.plots.image_grid(samples, args.out / "samples.png", num_bins=data.num_bins, nrow=8),
                pf.plots.loss_curve(records, args.out / "loss.png", unit="bits/dim")]
    metrics = {"dataset": data.name, "flow": args.flow, "dequantization": args.dequantization,
               "coupling": args.coupling, "levels": args.levels, "depth": args.depth,
               "hidden_channels": args.hidden_channels, "parameters": params, "steps": result.steps,
               "epochs": result.epochs, "best_epoch": result.best_epoch, "batch": args.batch, "lr": args.lr,
               "seed": args.seed, "k": args.k, "temperature": args.temperature, "test_bpd": bound,
               "test_iw_bpd": iw, "history": result.history, "train_time_s": round(result.train_time, 2),
               "total_time_s": round(time.perf_counter() - start, 2)}
    write_atomically(args.out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    print(f"wrote {', '.join(map(str, pictures))} and {args.out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
