"""The ``flowpack`` command: help, the run folder that ``train`` writes, ``evaluate`` and
``sample``, data units for tabular files and bits/dim for images, exact resume after an
interrupt and after a SIGKILL, atomic checkpoints, and every bad input ending in exit
status 2 with a one-line message and no traceback.

Most calls go through :func:`pyro_flowpack.cli.main` in-process; the console script and
``python -m pyro_flowpack`` run as subprocesses where the exit status, the absence of a
traceback or a real kill matters. Resume equivalence is exact (``torch.equal``) on CPU
with one thread, which every run compared here uses (``--threads 1``).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_support import flowpack
import pyro_flowpack.train.loop as loop
from pyro_flowpack.cli import main
from pyro_flowpack.data import Standardizer
from pyro_flowpack.train import load_checkpoint, load_run, write_atomically

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The tiny model and data every toy run here uses: a few seconds at most.
TINY = ["--size", "500", "--transforms", "1", "--hidden", "8", "--epochs", "2", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
SUBPROCESS_TIMEOUT = 300  # seconds; generous for a slow, loaded machine


def console_script():
    """The ``flowpack`` console script of this environment."""
    script = Path(sys.executable).parent / "flowpack"
    found = str(script) if script.exists() else shutil.which("flowpack")
    assert found, "the flowpack console script is not installed (pip install -e .)"
    return found


def assert_png(path):
    assert Path(path).read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"


def same_parameters(a, b):
    """Whether two model state dicts are bitwise equal."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def epoch_records(run):
    """The per-epoch records of metrics.jsonl, without their wall-clock time."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "epoch", "train_loss", "valid_loss")} for r in records if "valid_loss" in r]


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    """A tiny trained run on the two moons, shared by the tests that only read it."""
    run = tmp_path_factory.mktemp("cli") / "moons"
    assert main(["train", "--data", "moons", "--out", str(run), *TINY]) == 0
    return run


# -- help ------------------------------------------------------------------------------


def test_help_of_the_console_script_and_of_python_m():
    done = subprocess.run([console_script(), "--help"], env=ENV, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert all(word in done.stdout for word in ("train", "evaluate", "sample", "examples:"))
    done = subprocess.run([sys.executable, "-m", "pyro_flowpack", "train", "--help"], env=ENV, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT)
    assert done.returncode == 0, done.stderr
    for option in ("--data", "--flow", "--out", "--epochs", "--batch-size", "--lr", "--seed", "--device", "--resume",
                   "--transforms", "--hidden", "--levels", "--depth", "--checkpoint-every", "metrics.jsonl"):
        assert option in done.stdout, option


@pytest.mark.parametrize("command, options", [
    ("evaluate", ("RUN_DIR", "--checkpoint", "--split", "--k", "--json")),
    ("sample", ("RUN_DIR", "--num-samples", "--temperature", "--output", ".npy", ".pt")),
])
def test_help_of_evaluate_and_sample(command, options, capsys):
    status, out, _ = flowpack([command, "--help"], capsys)
    assert status == 0
    assert all(option in out for option in options)


# -- train, evaluate, sample -----------------------------------------------------------


def test_train_writes_the_run_folder(moons_run):
    config = json.loads((moons_run / "config.json").read_text())
    assert config["settings"]["data"] == "moons" and config["settings"]["epochs"] == 2
    assert config["train_config"]["epochs"] == 2 and config["train_config"]["unit"] == "nats"
    for name in ("last", "best"):
        checkpoint = load_checkpoint(moons_run / "checkpoints" / f"{name}.pt")
        assert {"model", "optimizer", "scheduler", "state", "rng", "config", "metadata"} <= checkpoint.keys()
        assert checkpoint["metadata"]["settings"]["data"] == "moons"
        assert checkpoint["config"]["epochs"] == 2
    assert load_checkpoint(moons_run / "checkpoints" / "last.pt")["state"]["step"] == 2 * (500 // 256)
    records = [json.loads(line) for line in (moons_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "valid_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["valid_loss"]) for r in epochs)
    summary = json.loads((moons_run / "summary.json").read_text())
    assert summary["unit"] == "nats" and math.isfinite(summary["nll"]) and summary["stopped"] == "finished"
    assert summary["best_valid"] == min(r["valid_loss"] for r in epochs)
    for picture in ("loss.png", "density.png"):
        assert_png(moons_run / picture)


def test_evaluate_prints_the_summary_nll(moons_run, capsys):
    summary = json.loads((moons_run / "summary.json").read_text())
    status, out, err = flowpack(["evaluate", moons_run, "--json"], capsys)
    assert status == 0, err
    result = json.loads(out)
    assert result["split"] == "test" and result["examples"] == summary["examples"]
    assert abs(result["nll"] - summary["nll"]) <= 1e-6
    status, out, _ = flowpack(["evaluate", moons_run], capsys)
    assert status == 0 and f"NLL {summary['nll']:.4f} nats" in out


def test_sample_writes_npy_pt_and_a_picture(moons_run, tmp_path, capsys):
    status, _, err = flowpack(["sample", moons_run, "-n", 37, "-o", tmp_path / "s.npy"], capsys)
    assert status == 0, err
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (37, 2) and np.isfinite(samples).all()
    assert_png(tmp_path / "s.png")
    status, _, err = flowpack(["sample", moons_run, "-n", 5, "-o", tmp_path / "sub" / "s.pt"], capsys)
    assert status == 0, err
    assert torch.load(tmp_path / "sub" / "s.pt").shape == (5, 2)
    assert_png(tmp_path / "sub" / "s.png")
    status, _, err = flowpack(["sample", moons_run, "-n", 3], capsys)  # default: RUN_DIR/samples/...
    assert status == 0, err
    assert np.load(moons_run / "samples" / "best-n3-seed0-T1.npy").shape == (3, 2)


def test_sample_temperature_shrinks_the_spread_and_the_seed_fixes_the_draw(moons_run, tmp_path, capsys):
    def draw(name, *options):
        assert flowpack(["sample", moons_run, "-n", 2000, "-o", tmp_path / name, *options], capsys)[0] == 0
        return np.load(tmp_path / name)

    hot, cold = draw("hot.npy"), draw("cold.npy", "--temperature", "0.2")
    assert np.array_equal(hot, draw("again.npy"))
    assert not np.array_equal(hot, draw("other.npy", "--seed", "1"))
    # The base noise is scaled by 0.2; the flow's near-identity map keeps the ratio well below 1/2.
    assert cold.std(0).max() < 0.5 * hot.std(0).min()


@pytest.mark.parametrize("features", [1, 2, 3])  # 1: the default coupling NSF over one column
def test_tabular_samples_and_nll_are_in_the_units_of_the_file(features, tmp_path, capsys):
    generator = np.random.default_rng(0)
    mean, std = 100.0 + 50.0 * np.arange(features), 10.0 * (1 + np.arange(features))
    x = mean + std * generator.standard_normal((1000, features))
    path = tmp_path / "table.csv"
    header = ",".join(f"x{i}" for i in range(features))
    np.savetxt(path, x, delimiter=",", header=header, comments="")
    run = tmp_path / "run"
    status, _, err = flowpack(["train", "--data", path, "--out", run, *TINY], capsys)
    assert status == 0, err

    summary = json.loads((run / "summary.json").read_text())
    standardizer = Standardizer.from_state_dict(load_run(run).metadata["standardizer"])
    # The standardiser was fitted on the train split (800 of the 1000 rows): within 10% of the file's.
    np.testing.assert_allclose(standardizer.std.numpy(), x.std(0), rtol=0.1)
    expected = summary["nll"] + float(torch.log(standardizer.std.double()).sum())
    assert abs(summary["nll_data_units"] - expected) <= 1e-6
    # load_run's flow is a density over raw rows: the trained model moved by the standardiser
    # (float64), per row within 1e-4 of the float32 model's value; on the file's rows its mean
    # NLL is near the test NLL in data units (it was -162 nats/row off before, in standardised space)
    run_ = load_run(run)
    raw = torch.from_numpy(x)
    with torch.no_grad():
        log_p = run_.flow().log_prob(raw)
        z = standardizer.transform(raw).float()
        expected_rows = run_.model().log_prob(z).double() - standardizer.log_abs_det()
    assert torch.allclose(log_p, expected_rows, rtol=0, atol=1e-4)
    assert abs(-float(log_p.mean()) - summary["nll_data_units"]) < 0.3
    assert_png(run / ("density.png" if features == 2 else "samples.png"))

    status, _, err = flowpack(["sample", run, "-n", 2000, "-o", tmp_path / "s.npy"], capsys)
    assert status == 0, err
    samples = np.load(tmp_path / "s.npy")
    # In data units: means within a third of a standard deviation, spreads within a factor 2.
    assert (np.abs(samples.mean(0) - mean) < std / 3).all()
    assert ((samples.std(0) > std / 2) & (samples.std(0) < 2 * std)).all()


def test_images_report_bits_per_dim_and_sample_integer_grids(tmp_path, capsys):
    run = tmp_path / "digits"
    status, out, err = flowpack(["train", "--data", "digits", "--size", 64, "--batch-size", 32, "--depth", 1,
                                 "--levels", 1, "--hidden-channels", 8, "--epochs", 1, "--k", 2, "--no-progress",
                                 "--out", run], capsys)
    assert status == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["unit"] == "bits/dim" and summary["k"] == 2
    # bits/dim = NLL / (D ln 2) with D = 1 * 8 * 8 pixels
    assert abs(summary["bpd_bound"] - summary["nll_bound_nats"] / (64 * math.log(2))) <= 1e-9
    # The importance-weighted estimate tightens the bound (up to Monte Carlo noise).
    assert 0 < summary["bpd_iw"] < summary["bpd_bound"] + 0.02
    assert_png(run / "samples.png")
    assert_png(run / "loss.png")

    status, out, err = flowpack(["evaluate", run], capsys)
    assert status == 0, err
    assert "bits/dim (bound)" in out and "importance-weighted, k=2" in out

    status, _, err = flowpack(["sample", run, "-n", 8, "-o", tmp_path / "grid.npy", "--temperature", 0.7], capsys)
    assert status == 0, err
    samples = np.load(tmp_path / "grid.npy")
    assert samples.shape == (8, 1, 8, 8) and np.issubdtype(samples.dtype, np.integer)
    assert samples.min() >= 0 and samples.max() < 17
    assert_png(tmp_path / "grid.png")


# -- resume, kill, atomic writes ---------------------------------------------------------

# 500 // 64 = 7 steps per epoch, 21 in all; checkpoints every 3 steps and at epoch ends.
RESUMABLE_RUN = ["--data", "moons", "--size", 500, "--batch-size", 64, "--epochs", 3, "--transforms", 1,
                 "--hidden", 8, "--threads", 1, "--checkpoint-every", 3, "--no-progress"]


def test_resume_after_an_interrupt_ends_with_the_uninterrupted_parameters(tmp_path, capsys, monkeypatch,
                                                                          keep_threads):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert flowpack(["train", "--out", whole, *RESUMABLE_RUN], capsys)[0] == 0

    forward, calls = loop._Objective.forward, []

    def interrupted(self, x):
        calls.append(1)
        if len(calls) == 10:  # Ctrl-C during step 10 of 21, one step after the checkpoint of step 9
            raise KeyboardInterrupt
        return forward(self, x)

    monkeypatch.setattr(loop._Objective, "forward", interrupted)
    status, _, err = flowpack(["train", "--out", parts, *RESUMABLE_RUN], capsys)
    assert status == 130 and f"train --resume --out {parts}" in err
    assert load_checkpoint(parts / "checkpoints" / "last.pt")["state"]["step"] == 9
    assert not (parts / "summary.json").exists()
    monkeypatch.undo()

    status, _, err = flowpack(["train", "--resume", "--out", parts], capsys)
    assert status == 0, err
    for name in ("last", "best"):
        assert same_parameters(load_checkpoint(whole / "checkpoints" / f"{name}.pt")["model"],
                               load_checkpoint(parts / "checkpoints" / f"{name}.pt")["model"])
    assert epoch_records(parts) == epoch_records(whole)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (parts, whole)]
    assert summaries[0]["nll"] == summaries[1]["nll"]


def test_kill_and_resume_ends_with_the_uninterrupted_parameters(tmp_path, capsys, keep_threads):
    epochs = 2  # 100 steps per epoch; longer if the run finishes before the kill lands
    for attempt in range(4):
        killed = tmp_path / f"killed{attempt}"
        options = ["--data", "moons", "--size", 1000, "--batch-size", 10, "--epochs", epochs, "--transforms", 1,
                   "--hidden", 8, "--threads", 1, "--checkpoint-every", 5, "--no-progress", "--seed", 3]
        process = subprocess.Popen(
            [sys.executable, "-m", "pyro_flowpack", "train", "--out", str(killed), *map(str, options)],
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        last = killed / "checkpoints" / "last.pt"
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # land the kill at some step after the first checkpoint
        process.send_signal(signal.SIGKILL)
        _, err = process.communicate(timeout=60)
        assert process.returncode in (0, -signal.SIGKILL), err
        assert last.exists(), f"no checkpoint within {SUBPROCESS_TIMEOUT} s"
        # Killed mid-way: before the last step (not merely during the final evaluation).
        if process.returncode == -signal.SIGKILL and load_checkpoint(last)["state"]["step"] < epochs * 100:
            break
        epochs *= 4
    else:
        pytest.fail("the run always finished before it could be killed")

    # Nothing partial: both checkpoints load; a temporary file left by the kill starts with "."
    checkpoints = [p for p in (killed / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert {p.name for p in checkpoints} <= {"last.pt", "best.pt"} and last in checkpoints
    assert not (killed / "summary.json").exists()
    for path in checkpoints:
        load_checkpoint(path)
    # A torn temporary file beside the checkpoints does not disturb the resumed run.
    (killed / "checkpoints" / ".last.pt.torn.pt").write_bytes(b"\x80\x02 half a pickle")

    status, _, err = flowpack(["train", "--resume", "--out", killed], capsys)
    assert status == 0, err
    whole = tmp_path / "whole"
    assert flowpack(["train", "--out", whole, *options], capsys)[0] == 0
    assert same_parameters(load_checkpoint(whole / "checkpoints" / "last.pt")["model"],
                           load_checkpoint(last)["model"])
    assert epoch_records(killed) == epoch_records(whole)


def test_write_atomically_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "last.pt"
    torch.save({"step": 1}, target)

    def fails_half_way(path):
        path.write_bytes(b"\x80\x02 the first half of a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fails_half_way)
    assert torch.load(target) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


# -- failures ------------------------------------------------------------------------------


def test_nonfinite_losses_exit_1_and_keep_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    forward, calls = loop._Objective.forward, []

    def nan_after_one_epoch(self, x):
        calls.append(1)
        loss = forward(self, x)
        return loss * float("nan") if len(calls) > 7 else loss

    monkeypatch.setattr(loop._Objective, "forward", nan_after_one_epoch)
    run = tmp_path / "nan"
    status, _, err = flowpack(["train", "--data", "moons", "--batch-size", 64, "--out", run, *TINY], capsys)
    assert status == 1
    assert "non-finite" in err and "Traceback" not in err and str(run / "checkpoints" / "last.pt") in err
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint["state"]["step"] == 7  # the end of the first epoch; steps 8 to 12 were skipped
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    skipped = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in skipped if "skipped" in r] == [8, 9, 10, 11, 12]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "words.csv").write_text("a,b\n1.0,2.0\n3.0,three\n")
    nan = np.random.default_rng(0).standard_normal((100, 2))
    nan[5, 1] = np.nan
    np.save(folder / "nan.npy", nan)
    np.save(folder / "flat.npy", np.arange(100.0))
    (folder / "empty_run").mkdir()
    (folder / "torn" / "checkpoints").mkdir(parents=True)
    (folder / "torn" / "checkpoints" / "last.pt").write_bytes(b"\x80\x02 half a pickle")
    return folder


BAD_INPUTS = {
    "unknown data name": (["train", "--data", "no_such_set", "--out", "{new}"], "unknown data set 'no_such_set'"),
    "missing file": (["train", "--data", "{bad}/missing.csv", "--out", "{new}"], "no such file"),
    "non-numeric csv column": (["train", "--data", "{bad}/words.csv", "--out", "{new}"], "not numeric"),
    "nan in npy": (["train", "--data", "{bad}/nan.npy", "--out", "{new}"], "NaN"),
    "1-d array": (["train", "--data", "{bad}/flat.npy", "--out", "{new}"], "2-D array"),
    "unknown flow": (["train", "--data", "moons", "--flow", "nope", "--out", "{new}"], "unknown flow 'nope'; for vectors (D,) choose one of nsf, "),
    "image flow on vectors": (["train", "--data", "moons", "--flow", "glow", "--out", "{new}"],
                              "flow 'glow' is for images (C, H, W); for vectors (D,) choose one of nsf"),
    "vector flow on images": (["train", "--data", "digits", "--flow", "maf", "--out", "{new}"],
                              "flow 'maf' is for vectors (D,); for images (C, H, W) choose one of glow"),
    "zero epochs": (["train", "--data", "moons", "--epochs", "0", "--out", "{new}"], "--epochs"),
    "negative epochs": (["train", "--data", "moons", "--epochs", "-3", "--out", "{new}"], "--epochs"),
    "zero lr": (["train", "--data", "moons", "--lr", "0", "--out", "{new}"], "--lr"),
    "unknown device": (["train", "--data", "moons", "--device", "tpu", "--out", "{new}"], "--device"),
    "no data": (["train", "--out", "{new}"], "--data is required"),
    "no out": (["train", "--data", "moons"], "--out"),
    "no command": ([], "COMMAND"),
    "evaluate a missing run": (["evaluate", "{bad}/no_run"], "no run folder"),
    "evaluate a folder without checkpoints": (["evaluate", "{bad}/empty_run"], "no checkpoint"),
    "sample a missing run": (["sample", "{bad}/no_run"], "no run folder"),
    "sample to a bad suffix": (["sample", "{run}", "-o", "{bad}/samples.txt"], ".npy or .pt"),
    "resume without a run": (["train", "--resume", "--out", "{new}"], "nothing to resume"),
    "resume a torn checkpoint": (["train", "--resume", "--out", "{bad}/torn"], "not a readable checkpoint"),
    "train into a run": (["train", "--data", "moons", "--out", "{run}"], "already holds a run"),
    "resume with another lr": (["train", "--resume", "--out", "{run}", "--lr", "0.01"], "cannot change --lr"),
}


@pytest.mark.parametrize("argv, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_exits_2_with_one_line(argv, message, bad_files, moons_run, tmp_path, capsys):
    new = tmp_path / "new_run"
    before = sorted(p.name for p in moons_run.rglob("*"))
    status, out, err = flowpack([a.format(bad=bad_files, run=moons_run, new=new) for a in argv], capsys)
    assert status == 2
    assert err.startswith("flowpack") and err.endswith("\n") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert not new.exists()  # nothing written
    assert sorted(p.name for p in moons_run.rglob("*")) == before


def test_bad_input_through_the_console_script_exits_2_without_traceback(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([console_script(), "train", "--data", str(tmp_path / "missing.npy"), "--out", str(out)],
                          env=ENV, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no such file" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()
