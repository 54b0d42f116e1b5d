r"""The ``flowpack`` command: train, evaluate and sample normalizing flows.

``flowpack train --data moons --out runs/moons`` trains the default neural spline flow on
a toy set and writes a run folder; ``flowpack evaluate runs/moons`` prints its test
negative log-likelihood; ``flowpack sample runs/moons -n 1000`` writes samples and their
picture. ``python -m pyro_flowpack`` is the same command. See ``flowpack COMMAND --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser"]

PROG = "flowpack"

# Defaults of `flowpack train`; image data changes a few (see _defaults_for).
TRAIN_DEFAULTS: dict[str, Any] = {
    "flow": None,  # nsf for vectors, glow for images
    "epochs": 30,
    "batch_size": None,  # 256 for vectors, 128 for images
    "lr": 1e-3,
    "weight_decay": 0.0,
    "schedule": "cosine",
    "warmup": 0,
    "clip": 1.0,
    "patience": None,
    "max_steps": None,
    "seed": 0,
    "device": "auto",
    "threads": None,
    "transforms": 4,
    "hidden": [128, 128],
    "bins": 8,
    "levels": 2,
    "depth": 4,
    "hidden_channels": 64,
    "coupling": "spline",
    "dequantization": "variational",
    "option": None,
    "root": None,
    "download": False,
    "size": None,
    "valid_fraction": 0.1,
    "test_fraction": 0.1,
    "key": None,
    "columns": None,
    "drop": None,
    "context_columns": None,
    "num_bins": None,
    "dequantize": False,
    "support": None,
    "checkpoint_every": None,
    "progress": True,
    "k": None,  # importance samples for the final image evaluation: 64 for digits, 8 otherwise
    "temperature": 0.7,
}

# The pictures that `flowpack train` writes into the run folder.
# Where `flowpack sample` writes without -o: a folder of its own, one file per draw, so
# that it never overwrites a training picture or an earlier draw with other settings.
DEFAULT_SAMPLES = "RUN_DIR/samples/{best|last}-n{N}-seed{S}-T{T}.npy"

EXAMPLES = """\
examples:
  flowpack train --data moons --out runs/moons
  flowpack train --data checkerboard --flow nsf --transforms 6 --epochs 50 --out runs/checker
  flowpack train --data table.csv --flow maf --hidden 256 256 --out runs/table
  flowpack train --data digits --out runs/digits                  # Glow, variational dequantization
  flowpack train --data mnist --root ~/data --download --epochs 10 --out runs/mnist
  flowpack train --resume --out runs/moons --epochs 60            # continue (and extend) a run
  torchrun --nproc_per_node=4 -m pyro_flowpack train --data mnist --root ~/data --out runs/mnist
  flowpack evaluate runs/moons
  flowpack sample runs/digits -n 64 --temperature 0.7 -o runs/digits/grid.npy
"""


class CommandError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _flow_option(text: str) -> tuple[str, Any]:
    """Parses ``KEY=VALUE`` with a JSON value (a bare word is a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a name, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


class _MergeOptions(argparse.Action):
    """Collects repeated ``--option KEY=VALUE`` into one dict."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        key, value = values
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), key: value})


def _number(convert: Callable[[str], Any], accept: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)``, refused unless ``accept`` holds."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_non_negative_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
_fraction = _number(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
_seed = _number(int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")


def _device(text: str) -> str:
    import torch

    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:K or auto, got {text!r}") from None
    return text



def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``flowpack`` command."""
    from . import __version__
    from .data import DATA_NAMES
    from .flows.registry import flow_names

    parser = _Parser(
        prog=PROG,
        description="Train, evaluate and sample normalizing flows with exact likelihoods (pyro-flowpack).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = argparse.SUPPRESS  # train options keep "not given" apart from their defaults (for --resume)

    train = commands.add_parser(
        "train",
        help="train a flow by maximum likelihood and write a run folder",
        description=textwrap.dedent("""\
            Trains a flow by exact maximum likelihood (images: the dequantization bound) and writes
            the run folder OUT: config.json, checkpoints/{best,last}.pt, metrics.jsonl (one JSON record
            per line), summary.json (test metrics), loss.png and a picture of the model (density.png
            for 2-D data, samples.png for images or higher-dimensional data).
            Losses are in nats per example, or bits per dimension for images.
            Defaults are shown in brackets."""),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=s,
    )
    what = train.add_argument_group("data and model")
    what.add_argument("--data", metavar="NAME|PATH",
                      help=f"a data set ({', '.join(DATA_NAMES)}) or a .npy/.npz/.csv/.pt file of "
                           "shape (N, D) [required unless --resume]")
    what.add_argument("--flow", help=f"vectors: {', '.join(flow_names('vector'))} [nsf]; images: "
                                     f"{', '.join(flow_names('image'))} [glow]")
    what.add_argument("--out", type=Path, metavar="RUN_DIR", required=True, help="the run folder to write")
    what.add_argument("--columns", nargs="+", metavar="COLUMN",
                      help="tabular files: the columns to model, by header name or 0-based index [all others]")
    what.add_argument("--drop", nargs="+", metavar="COLUMN", help="tabular files: columns to leave out "
                                                                  "(a saved row index, say)")
    what.add_argument("--context-columns", nargs="+", metavar="COLUMN",
                      help="tabular files: columns to condition on: trains p(x | c) on the other columns")
    what.add_argument("--num-bins", type=_number(int, lambda v: v >= 2, "an integer >= 2"),
                      help="makes a .npy/.npz/.pt file of integer images (N, C, H, W) in [0, NUM_BINS) an image data set")
    what.add_argument("--dequantize", action="store_true",
                      help="tabular files: model the columns that hold only integers as discrete values (uniform "
                           "dequantization); the NLL is then a bound on their probability times the others' density")
    what.add_argument("--support", metavar="SPEC",
                      help="vector data: the support of each modelled column, comma-separated: real, positive or "
                           "LOW:HIGH (an empty side is unbounded: 0: or :5), or one entry for every column; the flow "
                           "then puts no mass outside it [real]")
    what.add_argument("--resume", action="store_true", default=False,
                      help="continue the run in --out with its saved settings; --epochs / --max-steps may extend it")
    vector = train.add_argument_group("vector flows")
    vector.add_argument("--transforms", type=_positive_int, help="number of layers [4]")
    vector.add_argument("--hidden", type=_positive_int, nargs="+", metavar="H",
                        help="hidden sizes of each layer's network [128 128]")
    vector.add_argument("--bins", type=_positive_int, help="spline bins (nsf, nsf-ar, glow with splines) [8]")
    vector.add_argument("--option", type=_flow_option, action=_MergeOptions, metavar="KEY=VALUE",
                        help="any other option of the flow's builder, VALUE in JSON (--option degree=12 for "
                             "bernstein); repeatable")
    image = train.add_argument_group("image flows")
    image.add_argument("--levels", type=_positive_int, help="multi-scale levels [2]")
    image.add_argument("--depth", type=_positive_int, help="coupling steps per level [4]")
    image.add_argument("--hidden-channels", type=_positive_int, help="channels of the coupling networks [64]")
    image.add_argument("--coupling", choices=["spline", "affine"], help="Glow's couplings [spline]")
    image.add_argument("--dequantization", choices=["variational", "uniform"], help="[variational]")
    image.add_argument("--root", type=Path, help="folder of the torchvision data sets (mnist, fashion_mnist, cifar10)")
    image.add_argument("--download", action="store_true", help="download a torchvision data set into --root")
    image.add_argument("--k", type=_positive_int,
                       help="importance samples for the final test bits/dim [64 for digits, 8 otherwise]")
    image.add_argument("--temperature", type=_positive_float, help="temperature of the sample picture [0.7]")
    opt = train.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=_positive_int, help="passes over the training split [30]")
    opt.add_argument("--max-steps", type=_positive_int, help="stop after this many optimiser steps")
    opt.add_argument("--batch-size", type=_positive_int, help="examples per step [256; images 128]")
    opt.add_argument("--lr", type=_positive_float, help="Adam's learning rate [1e-3]")
    opt.add_argument("--weight-decay", type=_non_negative_float, help="[0]")
    opt.add_argument("--schedule", choices=["cosine", "constant"], help="learning-rate schedule [cosine]")
    opt.add_argument("--warmup", type=_non_negative_int, help="steps of linear warm-up [0]")
    opt.add_argument("--clip", type=_positive_float, help="maximum gradient norm [1.0]")
    opt.add_argument("--patience", type=_positive_int, help="stop after this many epochs without a better "
                                                             "validation loss [never]")
    opt.add_argument("--seed", type=_seed, help="seed of the data split, initialisation and order [0]")
    opt.add_argument("--size", type=_positive_int, help="toy sets: training points [20000]; others: "
                                                         "at most this many training examples")
    opt.add_argument("--valid-fraction", type=_fraction, help="[0.1]")
    opt.add_argument("--test-fraction", type=_fraction, help="toy and tabular data [0.1]")
    opt.add_argument("--key", help="the array of an .npz file or the tensor of a .pt dict")
    run = train.add_argument_group("running")
    run.add_argument("--device", type=_device, help="cpu, cuda, cuda:K or auto [auto]")
    run.add_argument("--threads", type=_positive_int, help="torch threads [torch's default]")
    run.add_argument("--checkpoint-every", type=_positive_int, help="steps between checkpoints within an epoch "
                                                                     "[end of each epoch only]")
    run.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar, only one line per epoch (for logs)")

    evaluate = commands.add_parser(
        "evaluate",
        help="print the test negative log-likelihood of a run",
        description="Prints the negative log-likelihood of a run on a split of its data: nats per example "
                    "(tabular data: also in the units of the file; a bound for a run with --dequantize), or for "
                    "images the bits per dimension of "
                    "the dequantization bound and of the importance-weighted estimate.",
    )
    evaluate.add_argument("run", type=Path, metavar="RUN_DIR")
    evaluate.add_argument("--checkpoint", choices=["best", "last"], default="best", help="[best]")
    evaluate.add_argument("--split", choices=["test", "valid", "train"], default="test", help="[test]")
    evaluate.add_argument("--k", type=_positive_int, help="importance samples for images [the run's]")
    evaluate.add_argument("--root", type=Path, help="folder of the torchvision data sets, if it moved")
    evaluate.add_argument("--device", type=_device, default="cpu", help="[cpu]")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    sample = commands.add_parser(
        "sample",
        help="draw samples from a run",
        description="Draws samples from a trained run and writes them (.npy or .pt, by the suffix of -o) "
                    "with a picture beside them (same name, .png): a grid for images, a scatter plot otherwise. "
                    "Tabular samples are in the units of the data file. By default they go to "
                    f"{DEFAULT_SAMPLES}, never over the run's own files (loss.png, density.png, "
                    "samples.png, checkpoints, config, metrics, summary): an -o whose file or picture would "
                    "be one of them is refused.",
    )
    sample.add_argument("run", type=Path, metavar="RUN_DIR")
    sample.add_argument("-n", "--num-samples", type=_positive_int, default=64, help="[64]")
    sample.add_argument("--temperature", type=_positive_float, default=1.0, help="scale of the base noise [1.0]")
    sample.add_argument("-o", "--output", type=Path, help=f"file to write, .npy or .pt [{DEFAULT_SAMPLES}]")
    sample.add_argument("--checkpoint", choices=["best", "last"], default="best", help="[best]")
    sample.add_argument("--seed", type=_seed, default=0, help="[0]")
    sample.add_argument("--context", type=float, nargs="+", metavar="VALUE",
                        help="a run with context columns: their values (in the file's units), one per column; "
                             "the samples are drawn from p(x | c) at them")
    sample.add_argument("--device", type=_device, default="cpu", help="[cpu]")
    return parser


def _data_options(settings: dict[str, Any]) -> dict[str, Any]:
    keys = ("root", "download", "seed", "size", "valid_fraction", "test_fraction", "key", "columns", "drop",
            "context_columns", "num_bins")
    # bool: runs from before --dequantize have no such setting
    return {**{k: settings.get(k) for k in keys}, "dequantize": bool(settings.get("dequantize"))}


def _load_data(spec: str, options: dict[str, Any]):
    from .data import load_data

    options = dict(options)
    if options.get("root") is not None:
        options["root"] = str(options["root"])
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            data = load_data(spec, **options)
        for warning in caught:  # one line each, as every message of the command
            print(f"{PROG}: warning: {warning.message}", file=sys.stderr)
        return data
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise CommandError(str(error)) from None
    except (OSError, RuntimeError) as error:  # torchvision without a network, a full disk, ...
        what = "download or read" if options.get("download") else "read"
        raise CommandError(f"could not {what} the data set {spec!r}: {error}") from None


def _file_digest(path: str) -> str:
    """The SHA-256 of a data file, to notice a file edited after training."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve_data(spec: str) -> str:
    """A data file's absolute path (resolved once, at training time); a name as it is."""
    from .data import DATA_NAMES

    if spec in DATA_NAMES or not Path(spec).expanduser().exists():
        return spec
    return str(Path(spec).expanduser().resolve())


def _is_file_spec(spec: str) -> bool:
    from .data import DATA_NAMES

    return spec not in DATA_NAMES and Path(spec).is_file()


def _check_data_unchanged(metadata: dict[str, Any]) -> None:
    """Refuses a data file that changed since training: it would be split and scored anew."""
    data = metadata.get("data") or {}
    saved = data.get("sha256")
    if saved is None:
        return
    path = data["spec"]
    if not Path(path).is_file():
        raise CommandError(f"the run's data file {path} no longer exists")
    if _file_digest(path) != saved:
        raise CommandError(f"the run's data file {path} changed since training (its SHA-256 differs); its rows "
                           "would be split and scored anew: restore the file or train a new run")


def _support(text: str, data: Any) -> list:
    """The per-column supports of ``--support``, checked against the data: every row of
    every split must lie strictly inside them (it would have zero density)."""
    from .transforms.support import Support, parse_support

    if data.kind == "image":
        raise CommandError("--support is for vector data; image flows model pixels in [0, num_bins) already")
    if data.dequantized:
        raise CommandError("--support cannot be combined with --dequantize (the dequantized columns' support is "
                           "their integer grid); leave one of them out")
    names = data.columns or [str(i) for i in range(data.event_shape[0])]
    try:
        specs = parse_support(text, features=len(names))
    except ValueError as error:
        raise CommandError(f"--support: {error}") from None
    layer = Support(specs)
    for split in ("train", "valid", "test"):
        rows = getattr(data, split)
        if data.standardizer is not None:
            rows = data.standardizer.inverse(rows.double())
        outside = ~((rows > layer.low.double()) & (rows < layer.high.double()))
        if bool(outside.any()):
            j = int(outside.any(0).nonzero()[0])
            values = rows[outside[:, j], j]
            raise CommandError(
                f"--support: column {names[j]!r} is {specs[j]!r}, but {int(outside[:, j].sum())} {split} row(s) lie "
                f"outside it (from {float(values.min()):.6g} to {float(values.max()):.6g}); they would have zero "
                "density: widen the support or drop those rows")
    return specs


# the command-line options that reach a flow's builder, by kind of data
_FLOW_ARGUMENTS = {"vector": ("transforms", "hidden", "bins"),
                   "image": ("levels", "depth", "hidden_channels", "coupling", "dequantization", "bins")}


def _flow_options(settings: dict[str, Any], kind: str, given: Sequence[str]) -> dict[str, Any]:
    """The options of the run's flow: the command line's flow options that its builder
    takes (one given explicitly that it does not take is an error), then ``--option``s."""
    from .flows.registry import flow_entry
    from .train.run import _COMMAND_NAMES

    try:
        entry = flow_entry(settings["flow"], kind)
    except ValueError as error:
        raise CommandError(str(error)) from None
    accepted = entry.options()
    options = {}
    for key in _FLOW_ARGUMENTS[kind]:
        if (_COMMAND_NAMES.get(key, key) if kind == "image" else key) in accepted:
            options[key] = settings[key]
        elif key in given:
            raise CommandError(f"--{key.replace('_', '-')} does not apply to flow {entry.name!r}; its options are "
                               f"{', '.join(sorted(accepted))} (others through --option KEY=VALUE)")
    options.update(settings.get("option") or {})
    return options


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}


def _train(args: argparse.Namespace) -> int:
    import torch

    from .train import TrainConfig
    from .train.distributed import setup
    from .train.folder import RunFolder, RunLockedError, changed_settings
    from .train.run import build_flow, with_column_dequantization, with_support

    given = {k: v for k, v in vars(args).items() if k not in ("command", "resume", "out")}
    if "data" in given:
        given["data"] = _resolve_data(str(given["data"]))
    folder = RunFolder(args.out)
    out = folder.path
    if args.resume:
        if not folder.holds_run():
            raise CommandError(f"nothing to resume in {out}: {folder.file('last')} does not exist")
        try:
            checkpoint = folder.load("last")
        except ValueError as error:
            raise CommandError(f"cannot resume {out}: {error}") from None
        saved = (checkpoint.get("metadata") or {}).get("settings")
        if not isinstance(saved, dict):
            raise CommandError(f"cannot resume {out}: it was not written by {PROG} train (no settings); "
                               "resume it with pyro_flowpack.train.fit")
        changed = changed_settings(saved, _jsonable(given))
        if changed:
            raise CommandError(
                "a resumed run keeps its settings; cannot change "
                + ", ".join(f"--{k.replace('_', '-')} (run: {saved.get(k)!r}, given: {given[k]!r})" for k in changed)
            )
        _check_data_unchanged(checkpoint["metadata"])
        settings = {**saved, **given}
    else:
        if "data" not in given:
            raise CommandError("--data is required (a data set name or a file); see flowpack train --help")
        if folder.holds_run():
            raise CommandError(f"{out} already holds a run: add --resume to continue it, or choose another --out")
        settings = {**TRAIN_DEFAULTS, **given}
    settings = _jsonable(settings)

    data = _load_data(settings["data"], _data_options(settings))
    image = data.kind == "image"
    if settings["flow"] is None:
        settings["flow"] = "glow" if image else "nsf"
    if settings["batch_size"] is None:
        settings["batch_size"] = 128 if image else 256
    if settings["k"] is None:
        settings["k"] = 64 if data.name == "digits" else 8
    if len(data.train) == 0:
        raise CommandError(f"the training split of {data.name} is empty")
    if len(data.test) == 0:
        raise CommandError(f"the test split of {data.name} is empty (--test-fraction 0?): the final evaluation "
                           "needs test examples")
    flow_options = _flow_options(settings, "image" if image else "vector", given)
    support = _support(settings["support"], data) if settings["support"] else None
    torch.manual_seed(settings["seed"])
    try:
        flow = build_flow(settings["flow"], data.event_shape, num_bins=data.num_bins,
                          context=len(data.context_columns or []), **flow_options)
        if data.dequantized:
            flow = with_column_dequantization(flow, [c in data.dequantized for c in data.columns], data.standardizer)
        if support:
            flow = with_support(flow, support, data.standardizer)
        config = TrainConfig(
            epochs=settings["epochs"], batch_size=settings["batch_size"], lr=settings["lr"],
            weight_decay=settings["weight_decay"], schedule=settings["schedule"], warmup=settings["warmup"],
            clip=settings["clip"], patience=settings["patience"], max_steps=settings["max_steps"],
            seed=settings["seed"], device=settings["device"], threads=settings["threads"],
            checkpoint_every=settings["checkpoint_every"], progress=settings["progress"],
            epoch_lines=not settings["progress"],
            unit="bits/dim" if image else "nats",
        )
        distributed = setup(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from None
    metadata = {
        "settings": settings,
        "flow": {"name": settings["flow"], "options": flow_options},
        "event_shape": list(data.event_shape),
        "num_bins": data.num_bins,
        "kind": data.kind,
        "data": {"spec": settings["data"], **_data_options(settings),
                 "sha256": _file_digest(settings["data"]) if _is_file_spec(settings["data"]) else None},
        "standardizer": data.standardizer.state_dict() if data.standardizer is not None else None,
        "columns": data.columns,
        "dequantized": data.dequantized,
        "support": support,
        "context_columns": data.context_columns,
        "context_standardizer": (data.context_standardizer.state_dict()
                                 if data.context_standardizer is not None else None),
    }
    if distributed.main:
        try:
            folder.lock()
        except (RunLockedError, OSError) as error:
            raise CommandError(str(error)) from None
    try:
        return _train_in(folder, flow, data, config, settings, metadata, args.resume, distributed)
    finally:
        folder.unlock()


def _train_in(folder, flow, data, config, settings, metadata, resume, distributed) -> int:
    """Trains in the locked run folder, evaluates the best model and writes the summary."""
    import torch

    from .train import NoFiniteValidationError, NonFiniteLossError, fit

    out = folder.path
    if distributed.main and not resume and folder.holds_run():  # another run got here first
        raise CommandError(f"{out} already holds a run: add --resume to continue it, or choose another --out")
    if distributed.main:
        folder.write_json("config", {"settings": settings, "train_config": config.to_dict()})
        parameters = sum(p.numel() for p in flow.parameters())
        print(f"{PROG}: training {settings['flow']} ({parameters} parameters) on {data.name} "
              f"({len(data.train)} train / {len(data.valid)} valid / {len(data.test)} test, event shape "
              f"{tuple(data.event_shape)}) on {distributed.device} x{distributed.world_size}, "
              f"{torch.get_num_threads()} threads; run folder {out}", flush=True)
    valid = data.valid if len(data.valid) else None
    try:
        context = data.context or {}
        result = fit(flow, data.train, valid, config, out=folder, resume=resume, metadata=metadata,
                     context=context.get("train"), valid_context=context.get("valid") if valid is not None else None)
    except (NonFiniteLossError, NoFiniteValidationError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if distributed.main:
            print(f"\n{PROG}: interrupted; continue with: {PROG} train --resume --out {out}", file=sys.stderr)
        return 130

    # The final model is the best on validation data (the last one without).
    best = folder.file("best" if valid is not None else "last")
    if distributed.main:
        try:
            flow.load_state_dict(folder.load("best" if valid is not None else "last",
                                             map_location=distributed.device)["model"])
        except (ValueError, FileNotFoundError) as error:
            print(f"{PROG}: training finished, but its best model cannot be read: {error}", file=sys.stderr)
            return 1
    if distributed.enabled:  # every process evaluates its share with rank 0's parameters
        for tensor in flow.state_dict().values():
            torch.distributed.broadcast(tensor, 0)
    from .train.report import evaluate_split, picture_title, run_pictures, summary_text

    summary = evaluate_split(flow, data, "test", settings["k"], distributed, iw=distributed.main)
    if distributed.main:
        summary.update({"steps": result.steps, "epochs": result.epochs, "stopped": result.stopped,
                        "best_epoch": result.best_epoch, "best_valid": result.best_valid,
                        "nonfinite_steps": result.nonfinite_steps, "nonfinite_valid": result.nonfinite_valid,
                        # seconds of training over all resumed parts of the run
                        "train_time_s": round(result.history[-1]["time"], 2) if result.history else 0.0,
                        "checkpoint": str(best)})
        pictures = run_pictures(flow, data, out, settings["temperature"], summary["unit"],
                                picture_title(data.name, settings["flow"], summary))
        summary["pictures"] = [str(p) for p in pictures]
        if not all(math.isfinite(summary[k]) for k in ("nll", "nll_data_units", "bpd_bound", "bpd_iw") if k in summary):
            print(f"{PROG}: the final evaluation is not finite: {summary_text(summary)}", file=sys.stderr)
            return 1
        path = folder.write_json("summary", summary)
        if result.nonfinite_valid or result.nonfinite_steps:
            print(f"{PROG}: warning: {result.nonfinite_valid} epoch(s) had a non-finite validation loss (never taken "
                  f"as the best) and {result.nonfinite_steps} step(s) a non-finite loss or gradient (skipped); see "
                  f"{folder.file('metrics')}", file=sys.stderr)
        print(f"{PROG}: {summary_text(summary)}", flush=True)
        print(f"{PROG}: wrote " + ", ".join(summary["pictures"] + [str(path)]), flush=True)
    if distributed.enabled:
        torch.distributed.destroy_process_group()
    return 0


def _load(run_dir: Path, which: str, device: str):
    import torch

    from .train.run import load_run

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"device {device} was asked for, but CUDA is not available here")
    try:
        return load_run(run_dir, which, map_location=device)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from None


def _standardizer(run):
    from .data import Standardizer

    state = run.metadata.get("standardizer")
    return Standardizer.from_state_dict(state) if state is not None else None


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    run = _load(args.run, args.checkpoint, args.device)
    settings = run.metadata.get("settings")
    if not isinstance(settings, dict):
        raise CommandError(f"{args.run} was not written by {PROG} train (its checkpoint has no settings), so the "
                           "data it was trained on is unknown; evaluate it from Python with pyro_flowpack.train")
    _check_data_unchanged(run.metadata)
    options = _data_options(settings)
    if args.root is not None:
        options["root"] = str(args.root)
    data = _load_data(settings["data"], options)
    data.standardizer = _standardizer(run) or data.standardizer
    torch.manual_seed(0)
    from .train.report import evaluate_split, summary_text

    try:
        summary = evaluate_split(run.model, data, args.split, args.k or settings["k"])
    except ValueError as error:
        raise CommandError(str(error)) from None
    summary["checkpoint"] = str(run.path)
    print(json.dumps(summary) if args.json else f"{PROG}: {summary_text(summary)}")
    return 0


def _refuse_run_files(run_dir: Path, *paths: Path) -> None:
    """Refuses a path that is one of the run's own files (pictures, checkpoints, logs)."""
    from .train.folder import FILES
    from .train.report import RUN_PICTURES

    run_dir = run_dir.resolve()
    own = {run_dir / name for name in (*FILES.values(), *RUN_PICTURES)}
    for path in paths:
        target = path.resolve()
        if target in own or run_dir / "checkpoints" in target.parents:
            raise CommandError(f"-o {paths[0]} would write {target.relative_to(run_dir)} over the run's own files "
                               f"(pictures, checkpoints, config, metrics, summary); choose another file (the "
                               f"default is {DEFAULT_SAMPLES})")


def _summary_of(run_dir: Path, run) -> dict[str, Any] | None:
    """The run's summary.json if it evaluated the model of ``run``'s checkpoint, else
    ``None``: another checkpoint, or a summary left behind by a resumed run that was
    stopped after a better model was saved, would report another model's NLL."""
    from .train.folder import RunFolder

    state = run.checkpoint.get("state") or {}
    try:
        summary = json.loads(RunFolder(run_dir).file("summary").read_text())
        same = Path(summary["checkpoint"]).resolve() == Path(run.path).resolve() and (
            (state.get("best_epoch"), state.get("best_valid")) == (summary["best_epoch"], summary["best_valid"])
            if summary["best_epoch"] is not None else state.get("step") == summary["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return summary if same else None


def _sample(args: argparse.Namespace) -> int:
    import torch

    from . import plots
    from .data import DATA_ALIASES
    from .train import write_atomically
    from .train.report import header_names, picture_title, sampled_title

    run = _load(args.run, args.checkpoint, args.device)
    output = args.output or args.run / "samples" / (
        f"{args.checkpoint}-n{args.num_samples}-seed{args.seed}-T{args.temperature:g}.npy")
    if output.suffix not in (".npy", ".pt"):
        raise CommandError(f"-o/--output must end in .npy or .pt, got {output}")
    picture = output.with_suffix(".png")
    _refuse_run_files(args.run, output, picture)
    context_columns = run.metadata.get("context_columns") or []
    if bool(context_columns) != (args.context is not None) or (args.context and len(args.context) != len(context_columns)):
        wanted = (f"--context with {len(context_columns)} value(s), for {', '.join(context_columns)}" if context_columns
                  else "no --context (the run is unconditional)")
        raise CommandError(f"{args.run} needs {wanted}, got {args.context!r}")
    context = None
    if args.context is not None:
        if not all(math.isfinite(v) for v in args.context):
            raise CommandError(f"--context values must be finite, got {args.context!r}")
        context = torch.tensor(args.context, dtype=torch.float64)
    torch.manual_seed(args.seed)
    with torch.no_grad():  # run.flow is in the units of the data file, and so is its context
        samples = run.flow(context).sample((args.num_samples,), temperature=args.temperature).cpu()
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".pt":
        write_atomically(output, lambda p: torch.save(samples, p))
    else:
        import numpy

        def save(path: Path) -> None:
            with open(path, "wb") as file:  # numpy.save(path) would add a second .npy suffix
                numpy.save(file, samples.numpy())

        write_atomically(output, save)
    data = run.metadata.get("data") or {}
    spec = data.get("spec")
    title = sampled_title(picture_title(DATA_ALIASES.get(spec, spec), (run.metadata.get("flow") or {}).get("name"),
                                    _summary_of(args.run, run)), args.temperature)
    if samples.dim() == 4:
        plots.image_grid(samples, picture, num_bins=run.metadata["num_bins"], title=title)
    else:
        names = (header_names(spec, run.metadata.get("columns"), samples.shape[1])
                 if run.metadata.get("kind") == "tabular" else None)
        plots.scatter(samples, picture, names=names, title=title)
    print(f"{PROG}: wrote {args.num_samples} samples of shape {tuple(samples.shape[1:])} to {output} and {picture}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    r"""Runs the ``flowpack`` command with ``argv`` (``sys.argv[1:]`` if ``None``); returns
    the exit status: 0 on success, 2 for bad arguments or data (with a one-line message),
    1 when training stops on non-finite losses, 130 when interrupted.

    Example:
        >>> main(["evaluate", "/no/such/run"])
        2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"train": _train, "evaluate": _evaluate, "sample": _sample}
    try:
        return commands[args.command](args)
    except CommandError as error:  # bad arguments or data, found before any training
        message = " ".join(str(error).split())  # one line, even for a library's multi-line message
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
