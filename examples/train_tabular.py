r"""Trains a flow on a table of numbers (a ``.csv``, ``.npy``, ``.npz`` or ``.pt`` file of
shape ``(N, D)``) by exact maximum likelihood, and draws new rows in the file's units.

:func:`pyro_flowpack.data.load_data` shuffles the rows, splits them into train,
validation and test sets, and standardises all three with the training split's mean and
standard deviation (a :class:`~pyro_flowpack.data.Standardizer`). The flow is trained on
the standardised rows with :func:`pyro_flowpack.train.fit`, the loop of ``flowpack
train``; its density in the file's units is

.. math:: \log p(x) = \log p_{\text{flow}}\big((x - \mu) / \sigma\big) - \sum_d \log \sigma_d ,

and samples are mapped back by :math:`x = \mu + \sigma z`.

Without ``--data`` the script first writes an example table, ``example.csv`` in
``--out``: 20000 rows of five columns in very different units, with curved and
heavy-tailed dependencies. It writes, under ``--out``: ``samples.png`` (a scatter matrix
of samples over the test rows), ``loss.png``, ``samples.csv`` (new rows, in the file's
units), ``metrics.json`` (test NLL standardised and in the file's units), checkpoints and
the metrics log.

Run ``python examples/train_tabular.py`` (a minute or two on two CPU cores) or
``python examples/train_tabular.py --data my_table.csv --flow maf --epochs 50``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pyro_flowpack as pf
from pyro_flowpack.data import load_data
from pyro_flowpack.train import TrainConfig, build_flow, evaluate_nll, fit, write_atomically


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a .csv/.npy/.npz/.pt file of shape (N, D) [an example table]")
    parser.add_argument("--flow", choices=list(pf.train.VECTOR_FLOWS), default="nsf")
    parser.add_argument("--transforms", type=int, default=5, help="layers")
    parser.add_argument("--epochs", type=int, default=20, help="passes over the training rows")
    parser.add_argument("--batch", type=int, default=256, help="rows per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("tabular_output"), help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    args = parser.parse_args(argv)
    if min(args.transforms, args.epochs, args.batch) < 1:
        parser.error("--transforms, --epochs and --batch must be positive")
    return args


def example_table(path: Path, rows: int = 20_000, seed: int = 0) -> Path:
    """Writes a five-column CSV whose columns have different units and dependencies."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, 5, generator=generator)
    height = 170 + 10 * normal[:, 0]  # cm
    weight = 0.9 * (height - 100) + 8 * normal[:, 1]  # kg, linear in height
    income = torch.exp(10 + 0.5 * normal[:, 2])  # heavy right tail
    angle = torch.atan2(normal[:, 3], normal[:, 4])
    ring = torch.stack([torch.cos(angle), torch.sin(angle)], -1) * (3 + 0.2 * normal[:, 3:4])  # a ring
    table = torch.stack([height, weight, income, ring[:, 0], ring[:, 1]], -1)
    lines = ["height,weight,income,u,v"] + [",".join(f"{v:.6g}" for v in row) for row in table.tolist()]
    text = "\n".join(lines) + "\n"
    write_atomically(path, lambda p: p.write_text(text))
    return path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    source = args.data or example_table(args.out / "example.csv", seed=args.seed)
    data = load_data(str(source), seed=args.seed)
    features = data.event_shape[0]
    torch.manual_seed(args.seed)
    wanted = {"transforms": args.transforms, "hidden": (128, 128)}
    accepted = pf.flows.flow_entry(args.flow).options()  # "cnf" has no transforms
    flow = build_flow(args.flow, (features,), **{k: v for k, v in wanted.items() if k in accepted})
    print(f"{args.flow} on {source}: {features} columns, {len(data.train)} train / {len(data.valid)} valid / "
          f"{len(data.test)} test rows", flush=True)

    start = time.perf_counter()
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch, lr=args.lr, seed=args.seed)
    result = fit(flow, data.train, data.valid, config, out=args.out, resume=args.resume,
                 metadata={"standardizer": data.standardizer.state_dict()})
    flow.load_state_dict(pf.train.load_checkpoint(args.out / pf.train.RUN_FILES["best"])["model"])
    nll = evaluate_nll(flow, data.test)
    nll_file_units = nll + data.standardizer.log_abs_det().item()

    with torch.no_grad():
        flow.eval()
        samples = data.standardizer.inverse(flow().sample((2000,)))
    header = ",".join(f"x{d}" for d in range(features))
    text = "\n".join([header] + [",".join(f"{v:.6g}" for v in row) for row in samples.tolist()]) + "\n"
    write_atomically(args.out / "samples.csv", lambda p: p.write_text(text))
    records = pf.train.read_metrics(args.out)
    test_rows = data.standardizer.inverse(data.test[:2000])
    pictures = [pf.plots.scatter(samples, args.out / "samples.png", data=test_rows, max_dims=min(features, 5)),
                pf.plots.loss_curve(records, args.out / "loss.png")]
    metrics = {"data": str(source), "flow": args.flow, "features": features, "epochs": result.epochs,
               "steps": result.steps, "seed": args.seed, "best_epoch": result.best_epoch,
               "test_nll_standardised": nll, "test_nll_file_units": nll_file_units,
               "train_time_s": round(result.train_time, 2), "total_time_s": round(time.perf_counter() - start, 2)}
    write_atomically(args.out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    print(f"final test NLL {nll:.4f} nats standardised, {nll_file_units:.4f} nats in the file's units; wrote "
          f"{', '.join(map(str, pictures))}, {args.out / 'samples.csv'} and {args.out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
