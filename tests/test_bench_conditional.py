r"""bench/conditional.py runs end to end in its smoke mode and writes what it promises;
its true conditional NLLs are right."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.distributions import Distribution

from scripts import loaded_script

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "conditional.py"


@pytest.fixture(scope="module")
def bench():
    """The benchmark script as a module (its import leaves torch's validation setting as
    it was; restored anyway)."""
    with loaded_script(SCRIPT, "bench_conditional") as module:
        yield module


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("conditional")
    saved, threads = Distribution._validate_args, torch.get_num_threads()
    payload = bench.main(["--smoke", "--out", str(out / "conditional.json"), "--rst", str(out / "conditional.rst")])
    torch.set_num_threads(threads)
    assert Distribution._validate_args == saved  # the caller's validation setting is back
    return out, payload


def test_smoke_json_has_every_flow_and_task_with_finite_numbers(bench, smoke):
    out, payload = smoke
    written = json.loads((out / "conditional.json").read_text())
    assert written["settings"]["smoke"] and written["settings"]["steps"] == bench.SMOKE["steps"]
    assert set(written["settings"]["flows"]) == set(bench.FLOWS)
    assert set(written["settings"]["tasks"]) == set(bench.TASKS)
    runs = {(r["task"], r["flow"]) for r in written["results"]}
    assert runs == {(t, f) for t in bench.TASKS for f in bench.FLOWS}
    for r in written["results"]:
        for key in ("test_nll", "true_nll_test", "excess", "true_nll", "ms_per_step", "final_loss"):
            assert math.isfinite(r[key]), (r["task"], r["flow"], key)
        assert r["excess"] == pytest.approx(r["test_nll"] - r["true_nll_test"], abs=1e-9)
        assert r["skipped"] == 0 and r["params"] > 0
    for task in bench.TASKS:
        assert set(written["summary"][task]) == set(bench.FLOWS)
        assert all(math.isfinite(s["excess"]) for s in written["summary"][task].values())
    assert written["summary"] == payload["summary"]


def test_smoke_rst_table_has_a_row_per_flow_and_a_column_per_task(bench, smoke):
    out, _ = smoke
    text = (out / "conditional.rst").read_text()
    assert text.startswith(".. list-table::")
    assert all(f"* - {f}\n" in text for f in bench.FLOWS)
    assert all(f"- {t} (H = " in text for t in bench.TASKS)


@pytest.mark.parametrize("task", ["linear-2d", "linear-1d", "hetero-2d"])
def test_true_nll_is_the_true_density_mean_nll_within_4_standard_errors(bench, task):
    t = bench.TASKS[task]
    x, c = t.sample(100_000, torch.Generator().manual_seed(0))
    nll = -t.log_prob(x.double(), c.double())
    assert abs(float(nll.mean()) - t.true_nll) < 4 * float(nll.std()) / math.sqrt(len(nll))


def test_linear_true_nll_is_the_gaussian_conditional_entropy_and_far_below_the_marginal(bench):
    t = bench.TASKS["linear-2d"]
    sigma, a = bench.SIGMA, bench.LINEAR_2D.double()
    assert t.true_nll == pytest.approx(2 * 0.5 * math.log(2 * math.pi * math.e * sigma**2), abs=1e-12)
    covariance = a @ a.T + sigma**2 * torch.eye(2, dtype=torch.float64)
    marginal = 0.5 * float(torch.logdet(2 * math.pi * math.e * covariance))
    assert marginal - t.true_nll > 4.0  # a flow blind to the context is far off


def test_normal_expectation_integrates_moments_to_1e_8(bench):
    assert bench.normal_expectation(lambda c: torch.ones_like(c)) == pytest.approx(1.0, abs=1e-8)
    assert bench.normal_expectation(lambda c: c**4) == pytest.approx(3.0, abs=1e-8)
    assert bench.normal_expectation(torch.abs) == pytest.approx(math.sqrt(2 / math.pi), abs=1e-8)


def test_every_flow_sees_the_same_batches(bench):
    t = bench.TASKS["linear-1d"]
    first = t.sample(8, bench.batch_generator(seed=1, step=3))
    again = t.sample(8, bench.batch_generator(seed=1, step=3))
    other = t.sample(8, bench.batch_generator(seed=1, step=4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_smoke_flag_overrides_the_budget_and_bad_sizes_are_refused(bench):
    args = bench.parse_args(["--smoke", "--steps", "500"])
    assert (args.steps, args.batch, args.test_size, args.seeds) == tuple(bench.SMOKE.values())
    with pytest.raises(SystemExit):
        bench.parse_args(["--hidden", "0"])
