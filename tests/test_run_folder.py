"""The run folder never loses or misreports a run: one writer at a time, best and last
checkpoints that agree after a kill inside the writer, a metrics log cut back to the
checkpoint on every start, non-finite validation losses and loss streaks reported, data
files found from anywhere and refused once edited, and every failure a one-line message
(exit 2 for bad input, 1 for a failed run). Each case is a subprocess or an injected fault."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cli_support import flowpack, one_line
import pyro_flowpack as pf
import pyro_flowpack.train.loop as loop
from pyro_flowpack.train import (
    NoFiniteValidationError,
    NonFiniteLossError,
    RunFolder,
    TrainConfig,
    fit,
    load_checkpoint,
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
TIMEOUT = 300
TINY = ["--size", "300", "--transforms", "1", "--hidden", "8", "--epochs", "2", "--no-progress", "--threads", "1"]


def gaussian(n: int) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0))


def small_flow() -> pf.Flow:
    torch.manual_seed(1)
    return pf.flows.MAF(2, transforms=1, hidden=(8,))


def config(**changes) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "batch_size": 32, "lr": 1e-2, "progress": False, **changes})


# One writer ---------------------------------------------------------------------------------
HOLD = textwrap.dedent("""
    import sys, time
    from pyro_flowpack.train import RunFolder
    folder = RunFolder(sys.argv[1])
    folder.lock()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_second_writer_is_refused_and_a_dead_writer_s_lock_is_taken_over(tmp_path, capsys, keep_threads):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status, _, err = flowpack(["train", "--data", "moons", "--out", run, *TINY], capsys)
        assert status == 2 and one_line(err)
        assert f"being written by another process (pid {holder.pid})" in err
        assert not RunFolder(run).holds_run()
    finally:
        holder.send_signal(signal.SIGKILL)  # a writer killed: the OS drops its lock
        holder.wait(timeout=60)
    status, _, err = flowpack(["train", "--data", "moons", "--out", run, *TINY], capsys)
    assert status == 0, err


def test_two_concurrent_trainings_on_one_folder_leave_one_run(tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "pyro_flowpack", "train", "--data", "moons", "--out", str(run), *TINY]
    first = subprocess.Popen(argv + ["--seed", "1"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    second = subprocess.Popen(argv + ["--seed", "2"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    errors = [p.communicate(timeout=TIMEOUT)[1] for p in (first, second)]
    codes = sorted(p.returncode for p in (first, second))
    assert codes == [0, 2], errors  # one trains, the other is refused (locked, or finds the run)
    refused = errors[[first.returncode, second.returncode].index(2)]
    assert one_line(refused) and ("another process" in refused or "already holds a run" in refused)
    seeds = {json.loads((run / "config.json").read_text())["settings"]["seed"],
             load_checkpoint(run / "checkpoints" / "last.pt")["metadata"]["settings"]["seed"]}
    assert len(seeds) == 1  # config and checkpoints of the same run


# Best and last agree ------------------------------------------------------------------------
KILL_BETWEEN = textwrap.dedent("""
    import os, signal, sys, torch
    import pyro_flowpack as pf
    from pyro_flowpack.train import RunFolder, TrainConfig, fit
    from pyro_flowpack.train import folder as folder_module

    saved = folder_module.save_checkpoint
    def save_checkpoint(path, content):
        saved(path, content)
        if path.name == "last.pt" and content["state"]["epoch"] == int(sys.argv[2]):
            if content["state"]["best_step"] == content["state"]["step"]:
                os.kill(os.getpid(), signal.SIGKILL)  # after last.pt, before best.pt
    folder_module.save_checkpoint = save_checkpoint
    torch.set_num_threads(1)
    x = torch.randn(224, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    flow = pf.flows.MAF(2, transforms=1, hidden=(8,))
    fit(flow, x[:192], x[192:], TrainConfig(epochs=3, batch_size=32, lr=1e-2, progress=False), out=sys.argv[1])
""")


def test_a_kill_between_last_and_best_is_repaired_on_the_next_read_and_resume(tmp_path, keep_threads):
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", KILL_BETWEEN, str(run), "2"], env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == -signal.SIGKILL, done.stderr
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["state"]["best_step"] == last["state"]["step"] == 12
    assert load_checkpoint(run / "checkpoints" / "best.pt")["state"]["step"] == 6  # one epoch behind
    folder = RunFolder(run)
    assert folder.load("best")["state"]["step"] == 12  # repaired from last.pt
    torch.set_num_threads(1)
    x = gaussian(224)
    resumed = small_flow()
    fit(resumed, x[:192], x[192:], config(), out=run, resume=True)
    whole = small_flow()
    fit(whole, x[:192], x[192:], config(), out=tmp_path / "whole")
    for name in ("best", "last"):
        a = load_checkpoint(tmp_path / "whole" / "checkpoints" / f"{name}.pt")
        b = load_checkpoint(run / "checkpoints" / f"{name}.pt")
        assert a["state"]["step"] == b["state"]["step"]
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_metrics_of_a_run_killed_before_its_first_checkpoint_are_dropped_on_restart(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 2, "train_loss": 9.0}\n{"step": 4, "train_loss": 8.0}\n')
    x = gaussian(224)
    fit(small_flow(), x[:192], x[192:], config(log_every=2), out=run)
    steps = [r["step"] for r in RunFolder(run).read_metrics() if "train_loss" in r and "valid_loss" not in r]
    assert steps == sorted(set(steps)) and 9.0 not in [r.get("train_loss") for r in RunFolder(run).read_metrics()]


def test_garbage_in_metrics_is_skipped_and_a_resume_still_works(tmp_path, capsys, keep_threads):
    run = tmp_path / "run"
    assert flowpack(["train", "--data", "moons", "--out", run, *TINY], capsys)[0] == 0
    with open(run / "metrics.jsonl", "a") as file:
        file.write("not json\n[1, 2]\n42\n{\"step\": \"x\"}\n\x00\x01\n")
    status, _, err = flowpack(["train", "--resume", "--out", run, "--epochs", "3"], capsys)
    assert status == 0, err
    records = RunFolder(run).read_metrics()
    assert all(isinstance(r, dict) and isinstance(r["step"], int) for r in records)
    assert [r["epoch"] for r in records if "valid_loss" in r] == [1, 2, 3]


# Non-finite losses ------------------------------------------------------------------------------
def test_a_huge_outlier_in_the_validation_split_ends_in_a_clear_failure_keeping_last_pt(tmp_path):
    """Validation loss inf every epoch: never the best, counted, no best.pt, last.pt kept,
    and NoFiniteValidationError (the CLI: exit 1)."""
    x = gaussian(224)
    valid = x[192:].clone()
    valid[3, 0] = 3e20
    with pytest.raises(NoFiniteValidationError, match="no epoch of 3 had a finite validation loss.*last good"):
        fit(small_flow(), x[:192], valid, config(), out=tmp_path / "run")
    records = RunFolder(tmp_path / "run").read_metrics()
    epochs = [r for r in records if "valid_nonfinite" in r]
    assert len(epochs) == 3 and all(r["valid_loss"] is None for r in epochs)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()


def test_the_cli_exits_1_with_one_line_when_no_validation_loss_is_finite(tmp_path, capsys, keep_threads):
    rows = np.random.default_rng(0).standard_normal((300, 2))
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    rows[int(order[30 + 5]), 1] = 3e20  # a row of the validation split (test: the first 30 of the order)
    np.save(tmp_path / "table.npy", rows)
    run = tmp_path / "run"
    status, _, err = flowpack(["train", "--data", tmp_path / "table.npy", "--out", run, "--transforms", 1,
                               "--hidden", 8, "--epochs", 2, "--no-progress"], capsys)
    message = "".join(line for line in err.splitlines(True) if not line.startswith("epoch "))  # --no-progress
    assert status == 1 and one_line(message) and "no epoch of 2 had a finite validation loss" in message
    assert (run / "checkpoints" / "last.pt").exists() and not (run / "summary.json").exists()


def _nan_on_steps(monkeypatch, bad: set[int]):
    forward, calls = loop._Objective.forward, []

    def patched(self, value):
        calls.append(1)
        loss = forward(self, value)
        return loss * float("nan") if len(calls) in bad else loss

    monkeypatch.setattr(loop._Objective, "forward", patched)


def test_the_non_finite_streak_survives_a_checkpoint_and_a_resume(tmp_path, monkeypatch):
    """Steps 2..4 bad with max_nonfinite=3 and a checkpoint at step 3: the uninterrupted run
    stops at step 4, and so does one resumed from step 3 (the streak of 2 is in last.pt);
    without it, the resumed run would go on."""
    x = gaussian(224)
    settings = config(max_nonfinite=3, checkpoint_every=3)
    _nan_on_steps(monkeypatch, {2, 3, 4})
    with pytest.raises(NonFiniteLossError, match="stopped at step 4"):
        fit(small_flow(), x[:192], x[192:], settings, out=tmp_path / "whole")
    monkeypatch.undo()

    def stop_after(step):
        def callback(info):
            if info.step == step:
                raise KeyboardInterrupt
        return callback

    _nan_on_steps(monkeypatch, {2, 3})
    with pytest.raises(KeyboardInterrupt):
        fit(small_flow(), x[:192], x[192:], settings, out=tmp_path / "parts", callback=stop_after(4))
    checkpoint = load_checkpoint(tmp_path / "parts" / "checkpoints" / "last.pt")
    assert (checkpoint["state"]["step"], checkpoint["state"]["in_a_row"]) == (3, 2)
    monkeypatch.undo()
    _nan_on_steps(monkeypatch, {1})  # the resumed process: its first step (step 4) is bad
    with pytest.raises(NonFiniteLossError, match="stopped at step 4"):
        fit(small_flow(), x[:192], x[192:], settings, out=tmp_path / "parts", resume=True)


def test_a_run_that_ends_inside_a_shorter_streak_fails(tmp_path, monkeypatch, capsys, keep_threads):
    _nan_on_steps(monkeypatch, {17, 18})  # the last two of 3 epochs x 6 steps
    x = gaussian(224)
    with pytest.raises(NonFiniteLossError, match="ended at step 18 inside a streak of 2"):
        fit(small_flow(), x[:192], x[192:], config(), out=tmp_path / "run")


# Data files: found from anywhere, refused once edited ------------------------------------------
def test_a_relative_data_path_is_resolved_once_and_an_edited_file_is_refused(tmp_path, capsys, monkeypatch,
                                                                           keep_threads):
    rows = np.random.default_rng(0).standard_normal((300, 2))
    (tmp_path / "data").mkdir()
    np.savetxt(tmp_path / "data" / "t.csv", rows, delimiter=",")
    monkeypatch.chdir(tmp_path / "data")
    run = tmp_path / "run"
    status, _, err = flowpack(["train", "--data", "t.csv", "--out", run, "--transforms", 1, "--hidden", 8,
                               "--epochs", 1, "--no-progress"], capsys)
    assert status == 0, err
    settings = json.loads((run / "config.json").read_text())["settings"]
    assert settings["data"] == str(tmp_path / "data" / "t.csv")
    monkeypatch.chdir(tmp_path)  # elsewhere: evaluate and resume still find the file
    assert flowpack(["evaluate", run], capsys)[0] == 0
    status, _, err = flowpack(["train", "--resume", "--out", run, "--epochs", 2, "--data",
                               tmp_path / "data" / "t.csv"], capsys)  # the same file, absolute: no change
    assert status == 0, err
    rows[0, 0] += 1.0
    np.savetxt(tmp_path / "data" / "t.csv", rows, delimiter=",")
    for argv in (["evaluate", run], ["train", "--resume", "--out", run, "--epochs", 3]):
        status, _, err = flowpack(argv, capsys)
        assert status == 2 and one_line(err) and "changed since training" in err


# Every failure a one-line message ----------------------------------------------------------------
def test_a_read_only_output_folder_exits_2(tmp_path, capsys, monkeypatch):
    import tempfile

    mkstemp = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and str(tmp_path / "ro") in str(dir):
            raise PermissionError(13, "Permission denied")
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # root ignores chmod: inject the refusal
    status, _, err = flowpack(["train", "--data", "moons", "--out", tmp_path / "ro" / "run", *TINY], capsys)
    assert status == 2 and one_line(err) and "cannot write the run folder" in err and "Permission denied" in err


def test_a_seed_beyond_int64_exits_2(tmp_path, capsys):
    status, _, err = flowpack(["train", "--data", "moons", "--seed", str(2**64), "--out", tmp_path / "r"], capsys)
    assert status == 2 and one_line(err) and "--seed" in err and "[0, 2**63)" in err


def test_evaluate_a_run_written_by_fit_exits_2(tmp_path, capsys):
    x = gaussian(224)
    fit(small_flow(), x[:192], x[192:], config(epochs=1), out=tmp_path / "run",
        metadata={"flow": {"name": "maf", "options": {"transforms": 1, "hidden": [8], "bins": 8}},
                  "event_shape": [2]})
    status, _, err = flowpack(["evaluate", tmp_path / "run"], capsys)
    assert status == 2 and one_line(err) and "not written by flowpack train" in err


def test_download_without_a_network_exits_2(tmp_path, capsys, monkeypatch):
    import pyro_flowpack.data.splits as splits

    def offline(*args, **kwargs):  # torchvision's message spans lines
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example.org/mnist/, got:\n"
                           "<urlopen error [Errno -3] Temporary failure in name resolution>\n")

    monkeypatch.setattr(splits, "image_dataset", offline)
    status, _, err = flowpack(["train", "--data", "mnist", "--root", tmp_path, "--download", "--out",
                               tmp_path / "r"], capsys)
    assert status == 2 and one_line(err) and "could not download or read the data set 'mnist'" in err


def test_an_empty_test_split_is_refused_before_training(tmp_path, capsys):
    status, _, err = flowpack(["train", "--data", "moons", "--test-fraction", "0", "--out", tmp_path / "r",
                               *TINY], capsys)
    assert status == 2 and one_line(err) and "test split" in err
    assert not (tmp_path / "r").exists()


def test_a_corrupt_best_pt_is_repaired_when_last_holds_the_best_and_refused_otherwise(tmp_path, capsys,
                                                                                     keep_threads):
    run = tmp_path / "run"
    assert flowpack(["train", "--data", "moons", "--out", run, *TINY], capsys)[0] == 0
    best = run / "checkpoints" / "best.pt"
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    best.write_bytes(b"\x80\x02 garbage")
    if last["state"]["best_step"] == last["state"]["step"]:
        assert flowpack(["evaluate", run], capsys)[0] == 0  # rewritten from last.pt
        best.write_bytes(b"\x80\x02 garbage")
    last["state"]["best_step"] = 1  # now last.pt does not hold the best model
    torch.save(last, run / "checkpoints" / "last.pt")
    status, _, err = flowpack(["evaluate", run], capsys)
    assert status == 2 and one_line(err) and "not a readable checkpoint" in err


def test_a_non_finite_validation_loss_in_one_epoch_is_flagged_and_never_the_best(tmp_path, capsys, monkeypatch,
                                                                                keep_threads):
    """As when a BatchNorm's running variance overflows for an epoch: that epoch is recorded
    with a null loss, counted in the summary, never the best, and the command warns."""
    evaluate, calls = loop.evaluate_nll, []

    def second_is_inf(*args, **kwargs):
        calls.append(1)
        return math.inf if len(calls) == 2 else evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_nll", second_is_inf)
    run = tmp_path / "run"
    status, _, err = flowpack(["train", "--data", "moons", "--out", run, "--size", 300, "--transforms", 1, "--hidden", 8,
                               "--epochs", 3, "--no-progress",
                               "--threads", 1], capsys)
    assert status == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["nonfinite_valid"] == 1 and summary["best_epoch"] != 2
    assert "warning: 1 epoch(s) had a non-finite validation loss" in err
    epochs = [r for r in RunFolder(run).read_metrics() if "valid_loss" in r]
    assert [r["valid_loss"] is None for r in epochs] == [False, True, False]
