r"""The training examples run end to end with tiny settings, on the library's training loop,
and write what they promise."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG = b"\x89PNG\r\n\x1a\n"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG, f"{path} is not a PNG"


def assert_no_temporary_files(folder: Path) -> None:
    assert not [p for p in folder.rglob(".*") if p.is_file()], "a temporary file was left behind"


def test_train_2d(tmp_path):
    out = tmp_path / "run"
    metrics = load_example("train_2d").main(
        ["--size", "512", "--epochs", "2", "--batch", "128", "--transforms", "2", "--seed", "1", "--out", str(out)])
    assert (metrics["dataset"], metrics["flow"], metrics["seed"], metrics["steps"]) == ("checkerboard", "nsf", 1, 8)
    assert math.isfinite(metrics["test_nll"])
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for name in ("density.png", "loss.png"):
        assert_png(out / name)
    assert (out / "checkpoints" / "best.pt").exists()
    assert_no_temporary_files(out)


def test_train_2d_resumes(tmp_path):
    """A second call with --resume continues the same run folder (here: an extension)."""
    example = load_example("train_2d")
    arguments = ["--size", "256", "--batch", "128", "--transforms", "1", "--out", str(tmp_path)]
    example.main(arguments + ["--epochs", "1"])
    metrics = example.main(arguments + ["--epochs", "2", "--resume"])
    assert metrics["steps"] == 4 and metrics["epochs"] == 2


def test_train_tabular_returns_samples_in_the_file_units(tmp_path):
    out = tmp_path / "run"
    metrics = load_example("train_tabular").main(["--epochs", "1", "--transforms", "1", "--out", str(out)])
    assert metrics["features"] == 5 and math.isfinite(metrics["test_nll_standardised"])
    rows = torch.tensor([[float(v) for v in line.split(",")]
                         for line in (out / "samples.csv").read_text().splitlines()[1:]])
    assert rows.shape == (2000, 5)
    # the example table's first column is a height in cm (mean 170, sd 10): samples are too,
    # even after one epoch, because they are mapped back through the standardisation
    assert abs(rows[:, 0].median().item() - 170) < 10
    # the file-units NLL differs from the standardised one by sum(log sd) of the columns
    table = torch.tensor([[float(v) for v in line.split(",")]
                          for line in (out / "example.csv").read_text().splitlines()[1:]])
    log_sd = table.std(0).log().sum().item()
    assert abs(metrics["test_nll_file_units"] - metrics["test_nll_standardised"] - log_sd) < 0.05
    for name in ("samples.png", "loss.png"):
        assert_png(out / name)
    assert_no_temporary_files(out)


def test_train_tabular_reads_a_user_file(tmp_path):
    data = torch.randn(400, 3, generator=torch.Generator().manual_seed(0)) * 5 + 40
    path = tmp_path / "table.npy"
    import numpy

    numpy.save(path, data.numpy())
    metrics = load_example("train_tabular").main(
        ["--data", str(path), "--epochs", "1", "--transforms", "1", "--batch", "64", "--out", str(tmp_path / "run")])
    assert metrics["features"] == 3 and metrics["steps"] == 5


@pytest.mark.parametrize("flow, dequantization", [("glow", "uniform"), ("realnvp", "variational")])
def test_train_images(tmp_path, flow, dequantization):
    out = tmp_path / "run"
    metrics = load_example("train_images").main(
        ["--flow", flow, "--dequantization", dequantization, "--max-steps", "3", "--depth", "1",
         "--hidden-channels", "8", "--k", "2", "--threads", "1", "--seed", "1", "--out", str(out)])
    assert (metrics["dataset"], metrics["flow"], metrics["dequantization"]) == ("digits", flow, dequantization)
    assert (metrics["steps"], metrics["seed"], metrics["k"]) == (3, 1, 2)
    # an almost untrained flow: loose bounds around a uniform model's log2(17) = 4.09 bits/dim
    assert 0 < metrics["test_iw_bpd"] < 10 and 0 < metrics["test_bpd"] < 10
    assert [h["step"] for h in metrics["history"]] == [3]
    for name in ("samples.png", "loss.png"):
        assert_png(out / name)
    assert_no_temporary_files(out)


@pytest.mark.parametrize("name, arguments, message", [
    ("train_2d", ["--epochs", "0"], "must be positive"),
    ("train_tabular", ["--batch", "0"], "must be positive"),
    ("train_images", ["--dataset", "mnist"], "needs --root"),
])
def test_examples_reject_bad_arguments(name, arguments, message, capsys):
    with pytest.raises(SystemExit) as exit:
        load_example(name).parse_args(arguments)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_an_example_exits_2_without_a_traceback():
    done = subprocess.run([sys.executable, str(EXAMPLES / "train_2d.py"), "--batch", "0"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr
