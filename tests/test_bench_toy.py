r"""bench/toy.py runs end to end with a tiny budget and writes what it promises."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.distributions import Distribution

from scripts import loaded_script

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "toy.py"


@pytest.fixture(scope="module")
def toy():
    """The benchmark script as a module; importing it imports zuko, so the global state
    of torch's distribution validation is restored afterwards."""
    with loaded_script(SCRIPT, "bench_toy") as module:
        yield module


@pytest.fixture(scope="module")
def smoke(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    saved = Distribution._validate_args
    payload = toy.main([
        "--steps", "3", "--datasets", "two_moons", "--seeds", "0", "1", "--train-size", "2000",
        "--test-size", "500", "--batch", "64", "--out", str(out), "--json", str(out / "toy.json"),
        "--rst", str(out / "toy.rst"),
    ])
    Distribution.set_default_validate_args(saved)
    return out, payload


def test_batches_are_reproducible_distinct_in_range_and_vary_with_step_and_seed(toy):
    first = list(toy.batches(100, 10, 3, seed=2))
    assert all(torch.equal(a, b) for a, b in zip(first, toy.batches(100, 10, 3, seed=2)))
    for index in first:
        assert len(index.unique()) == 10 and 0 <= index.min() and index.max() < 100
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], next(toy.batches(100, 10, 1, seed=3)))
    with pytest.raises(ValueError, match="batch"):
        next(toy.batches(5, 10, 1, seed=0))


def test_summary_is_mean_and_sample_sd_with_paired_difference(toy):
    runs = [{"ours": {"test_nll": 1.0, "ms_per_step": 2.0}, "zuko": {"test_nll": 1.5, "ms_per_step": 4.0}},
            {"ours": {"test_nll": 2.0, "ms_per_step": 4.0}, "zuko": {"test_nll": 2.0, "ms_per_step": 6.0}}]
    summary = toy.summarise(runs, ["ours", "zuko"])
    assert summary["ours"]["test_nll"] == pytest.approx(1.5)
    assert summary["ours"]["test_nll_sd"] == pytest.approx(math.sqrt(0.5))
    assert summary["zuko"]["ms_per_step"] == pytest.approx(5.0)
    # differences -0.5 and 0.0
    assert summary["ours - zuko"]["test_nll"] == pytest.approx(-0.25)
    assert summary["ours - zuko"]["test_nll_sd"] == pytest.approx(math.sqrt(0.125))


def test_smoke_run_writes_json_with_finite_nll_and_both_parameter_counts(toy, smoke):
    out, payload = smoke
    written = json.loads((out / "toy.json").read_text())
    assert written["settings"]["steps"] == 3 and written["settings"]["seeds"] == [0, 1]
    params = written["settings"]["models"]
    assert params["ours"]["params"] == sum(p.numel() for p in toy.MODELS["ours"].build().parameters())
    assert params["zuko"]["params"] == sum(p.numel() for p in toy.MODELS["zuko"].build().parameters())
    runs = written["runs"]["two_moons"]
    assert len(runs) == 2
    for run in runs:
        for model in ("ours", "zuko"):
            assert math.isfinite(run[model]["test_nll"]) and run[model]["skipped_steps"] == 0
            assert run[model]["ms_per_step"] > 0
    summary = written["summary"]["two_moons"]
    difference = [r["ours"]["test_nll"] - r["zuko"]["test_nll"] for r in runs]
    assert summary["ours - zuko"]["test_nll"] == pytest.approx(sum(difference) / 2, abs=1e-12)


def test_smoke_run_writes_rst_table_and_one_png_per_data_set(smoke):
    out, _ = smoke
    text = (out / "toy.rst").read_text()
    assert text.startswith(".. list-table:: Test NLL")
    assert "   * - two_moons" in text and "ours - zuko NLL" in text
    with Image.open(out / "two_moons.png") as png:
        assert png.format == "PNG" and png.width > 3 * png.height  # five panels side by side
    assert sorted(p.name for p in out.iterdir()) == ["toy.json", "toy.rst", "two_moons.png"]


def test_an_untrained_identity_initialised_nsf_scores_the_standard_normal_nll(toy):
    # Zero steps: ours starts at the identity map (identity-initialised splines), so its
    # test NLL is that of the standard normal base, 0.5 * (2 log 2 pi + mean |x|^2).
    args = toy.parse_args(["--steps", "0", "--train-size", "600", "--test-size", "400", "--batch", "8"])
    result = toy.run_dataset("circles", 0, ["ours"], args)["ours"]
    test = toy.toy_dataset("circles", 1000, seed=0)[600:]
    expected = 0.5 * (2 * math.log(2 * math.pi) + test.pow(2).sum(-1).mean().item())
    assert result["test_nll"] == pytest.approx(expected, abs=1e-4)
