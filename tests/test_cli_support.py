"""``flowpack train --support``: a tabular run whose flow is a proper density on each
column's support, in the file's units, kept by --resume and by load_run."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import pyro_flowpack as pf

from cli_support import flowpack, one_line


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Three columns: real, positive (log-normal around 50) and a rate in (0, 1)."""
    rng = np.random.default_rng(0)
    n = 600
    rows = np.stack([rng.standard_normal(n), 50 * np.exp(0.3 * rng.standard_normal(n)),
                     1 / (1 + np.exp(-rng.standard_normal(n) - 1))], axis=1)
    path = tmp_path_factory.mktemp("support") / "table.npy"
    np.save(path, rows)
    return path


@pytest.fixture(scope="module")
def run(table, tmp_path_factory):
    out = tmp_path_factory.mktemp("support") / "run"
    status = pf.cli.main(["train", "--data", str(table), "--support", "real,positive,0:1", "--flow", "maf",
                          "--transforms", "2", "--hidden", "16", "--epochs", "2", "--no-progress", "--out", str(out)])
    assert status == 0
    return out


@contextlib.contextmanager
def validation(on: bool):
    before = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(on)
    try:
        yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(before)


def test_the_reloaded_flow_puts_no_mass_outside_each_columns_support(run):
    flow = pf.train.load_run(run).flow
    samples = flow().sample((4000,))
    # every sample inside its column's support, per column
    assert bool((samples[:, 1] > 0).all()) and bool(((samples[:, 2] > 0) & (samples[:, 2] < 1)).all())
    inside = torch.tensor([[0.1, 40.0, 0.5]], dtype=torch.float64)
    assert torch.isfinite(flow().log_prob(inside)).all()
    # (an end point such as x2 = 1 may round to just inside after the map to standard units)
    for j, bad in ((1, -1.0), (1, -1e-9), (2, 1.5), (2, 1 + 1e-9), (2, -0.1)):
        outside = inside.clone()
        outside[0, j] = bad
        with validation(False), torch.no_grad():  # zero density: log p = -inf, per point
            assert float(flow().log_prob(outside)) == float("-inf"), (j, bad)
        with validation(True), pytest.raises(ValueError, match=f"feature {j} must lie in"):
            flow().log_prob(outside)


@pytest.mark.parametrize("spec, draw, to_grid", [
    # (0, inf) by x = e^u; (2, 5) by x = 2 + 3 sigmoid(u): the integral of p(x(u)) x'(u) du
    ("positive", lambda r: 50 * np.exp(0.3 * r), lambda u: (u.exp(), u.exp())),
    ("2:5", lambda r: 2 + 3 / (1 + np.exp(-r - 1)), lambda u: (2 + 3 * torch.sigmoid(u),
                                                              3 * torch.sigmoid(u) * torch.sigmoid(-u))),
])
def test_a_one_column_run_with_a_support_integrates_to_one_in_the_files_units(spec, draw, to_grid, tmp_path, capsys):
    rows = draw(np.random.default_rng(1).standard_normal((500, 1)))
    np.save(tmp_path / "one.npy", rows)
    status, _, err = flowpack(["train", "--data", str(tmp_path / "one.npy"), "--support", spec, "--flow", "nsf",
                               "--transforms", "2", "--hidden", "16", "--epochs", "2", "--no-progress",
                               "--out", str(tmp_path / "run")], capsys)
    assert status == 0, err
    flow = pf.train.load_run(tmp_path / "run").flow
    u = torch.linspace(-30.0, 30.0, 400001, dtype=torch.float64)
    x, dx = to_grid(u)
    total = torch.trapezoid(flow().log_prob(x[:, None]).exp() * dx, u)
    assert abs(float(total) - 1.0) < 1e-4
    below = -1.0 if spec == "positive" else 1.9
    with validation(False):
        assert float(flow().log_prob(torch.tensor([[below]], dtype=torch.float64))) == float("-inf")


def test_rows_outside_the_support_and_bad_specs_are_one_line_errors(table, tmp_path, capsys):
    status, _, err = flowpack(["train", "--data", str(table), "--support", "positive", "--out", str(tmp_path / "a")],
                              capsys)
    assert status == 2 and one_line(err)
    assert "--support: column 'column 0' is 'positive', but" in err and "train row(s) lie outside it" in err
    status, _, err = flowpack(["train", "--data", str(table), "--support", "real,positive", "--out",
                               str(tmp_path / "b")], capsys)
    assert status == 2 and "expects 1 or 3 entries (one per column), got 2" in err
    status, _, err = flowpack(["train", "--data", "digits", "--support", "positive", "--out", str(tmp_path / "c")],
                              capsys)
    assert status == 2 and "--support is for vector data" in err


def test_resume_keeps_the_support(run, capsys):
    status, _, err = flowpack(["train", "--resume", "--out", str(run), "--epochs", "3", "--no-progress"], capsys)
    assert status == 0, err
    assert pf.train.load_run(run).metadata["support"] == ["real", "positive", (0.0, 1.0)]
