"""Tables as users have them: a saved row index to drop, columns chosen by name, integer
columns flagged, context columns for a conditional density p(x | c) that ``evaluate`` and
``load_run`` score in the file's units, and the continuous flow from the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from cli_support import flowpack
from pyro_flowpack.train import load_run

SMALL = ["--transforms", "2", "--hidden", "32", "32", "--no-progress", "--threads", "1"]


def _write(path, header: str, rows: np.ndarray) -> None:
    np.savetxt(path, rows, delimiter=",", header=header, comments="", fmt="%.10g")


def test_a_saved_row_index_is_dropped_and_columns_are_chosen_by_name(tmp_path, capsys, keep_threads):
    generator = np.random.default_rng(0)
    rows = np.column_stack([np.arange(400), generator.standard_normal((400, 3))])
    _write(tmp_path / "t.csv", "id,a,b,c", rows)
    status, _, err = flowpack(["train", "--data", tmp_path / "t.csv", "--drop", "id", "--out", tmp_path / "r1",
                               "--epochs", 1, *SMALL], capsys)
    assert status == 0, err
    assert load_run(tmp_path / "r1").metadata["columns"] == ["a", "b", "c"]
    status, _, err = flowpack(["train", "--data", tmp_path / "t.csv", "--columns", "c", "a", "--out", tmp_path / "r2",
                               "--epochs", 1, *SMALL], capsys)
    assert status == 0, err
    run = load_run(tmp_path / "r2")
    assert run.metadata["columns"] == ["c", "a"] and run.flow.event_shape == (2,)
    status, _, err = flowpack(["train", "--data", tmp_path / "t.csv", "--columns", "price", "--out", tmp_path / "r3",
                               *SMALL], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "no column 'price'; the header's names are 'id', 'a', 'b', 'c'" in err
    status, _, err = flowpack(["train", "--data", tmp_path / "t.csv", "--drop", "a", "--context-columns", "a",
                               "--out", tmp_path / "r4", *SMALL], capsys)
    assert status == 2 and "cannot be modelled, a context and dropped at once: a" in err


def test_integer_columns_are_flagged_in_one_line(tmp_path, capsys, keep_threads):
    generator = np.random.default_rng(0)
    rows = np.column_stack([generator.poisson(5.0, 400), generator.standard_normal(400)])
    _write(tmp_path / "counts.csv", "count,x", rows)
    status, _, err = flowpack(["train", "--data", tmp_path / "counts.csv", "--out", tmp_path / "r", "--epochs", 1,
                               *SMALL], capsys)
    assert status == 0, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "1 column(s) hold only integers ('count')" in warning[0]


def test_context_columns_train_a_conditional_density_scored_in_the_file_s_units(tmp_path, capsys, keep_threads):
    """x = 2 c + 5 eps in raw units (c ~ 50 + 10 N(0, 1)): the test NLL in data units is
    within 0.1 nats of the true conditional NLL 0.5 log(2 pi e 25) = 3.03, far below the
    marginal 4.44; evaluate repeats it; load_run's flow and `sample --context` take raw
    rows."""
    generator = np.random.default_rng(0)
    c = 50 + 10 * generator.standard_normal(3000)
    x = 2 * c + 5 * generator.standard_normal(3000)
    _write(tmp_path / "pairs.csv", "c,x", np.column_stack([c, x]))
    run = tmp_path / "run"
    status, out, err = flowpack(["train", "--data", tmp_path / "pairs.csv", "--context-columns", "c", "--flow", "maf",
                                 "--out", run, "--epochs", 40, "--lr", 3e-3, *SMALL], capsys)
    assert status == 0, err
    summary = json.loads((run / "summary.json").read_text())
    true = 0.5 * math.log(2 * math.pi * math.e * 25)
    assert abs(summary["nll_data_units"] - true) < 0.1, (summary["nll_data_units"], true)
    status, out, err = flowpack(["evaluate", run, "--json"], capsys)
    assert status == 0, err
    assert abs(json.loads(out)["nll_data_units"] - summary["nll_data_units"]) < 1e-9
    loaded = load_run(run)
    assert loaded.metadata["context_columns"] == ["c"] and loaded.metadata["columns"] == ["x"]
    raw_c = torch.tensor([[40.0], [60.0]], dtype=torch.float64)
    with torch.no_grad():
        draws = loaded.flow(raw_c).sample((2000,))  # (2000, 2, 1): raw x given raw c
        log_p = loaded.flow(raw_c).log_prob(torch.tensor([[80.0], [120.0]], dtype=torch.float64))
    assert torch.allclose(draws.mean(0).squeeze(-1), torch.tensor([80.0, 120.0], dtype=torch.float64), atol=1.5)
    assert torch.allclose(draws.std(0).squeeze(-1), torch.tensor([5.0, 5.0], dtype=torch.float64), rtol=0.15)
    assert bool((log_p > -2.7).all())  # the true log density at the conditional mean is -2.53
    status, _, err = flowpack(["sample", run, "-n", 500, "--context", 40.0, "-o", tmp_path / "s.npy"], capsys)
    assert status == 0, err
    assert abs(float(np.load(tmp_path / "s.npy").mean()) - 80.0) < 1.5  # an unconditional flow: 100
    status, _, err = flowpack(["sample", run, "-n", 5, "-o", tmp_path / "t.npy"], capsys)
    assert status == 2 and "needs --context with 1 value(s), for c" in err


def test_the_continuous_flow_trains_from_the_command_line(tmp_path, capsys, keep_threads):
    status, _, err = flowpack(["train", "--data", "moons", "--flow", "cnf", "--size", 256, "--batch-size", 128,
                               "--epochs", 1, "--hidden", 16, 16, "--no-progress", "--threads", 1,
                               "--out", tmp_path / "cnf"], capsys)
    assert status == 0, err
    summary = json.loads((tmp_path / "cnf" / "summary.json").read_text())
    assert math.isfinite(summary["nll"])
    assert load_run(tmp_path / "cnf").flow.event_shape == (2,)


def test_a_file_of_integer_images_trains_with_num_bins_and_is_refused_without(tmp_path, capsys, keep_threads):
    images = np.random.default_rng(0).integers(0, 4, (60, 1, 4, 4)).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    run = tmp_path / "run"
    status, _, err = flowpack(["train", "--data", tmp_path / "images.npy", "--num-bins", 4, "--out", run,
                               "--levels", 1, "--depth", 1, "--hidden-channels", 8, "--epochs", 1, "--batch-size", 16,
                               "--k", 2, "--no-progress", "--threads", 1], capsys)
    assert status == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["unit"] == "bits/dim" and math.isfinite(summary["bpd_bound"])
    assert load_run(run).flow().sample((2,)).dtype == torch.long
    status, _, err = flowpack(["train", "--data", tmp_path / "images.npy", "--out", tmp_path / "r2"], capsys)
    assert status == 2 and "need num_bins, flowpack's --num-bins" in err
    status, _, err = flowpack(["train", "--data", tmp_path / "images.npy", "--num-bins", 3, "--out", tmp_path / "r3"],
                              capsys)
    assert status == 2 and "pixel values must lie in [0, 3), got [0, 3]" in err
