r"""bench/digits.py runs end to end with tiny budgets and writes what it promises."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.distributions import Distribution

from scripts import loaded_script

pytest.importorskip("normflows")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "digits.py"


@pytest.fixture(scope="module")
def bench():
    """The benchmark script as a module; importing it imports zuko, so the global state
    of torch's distribution validation is restored afterwards."""
    with loaded_script(SCRIPT, "bench_digits") as module:
        yield module


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    saved = Distribution._validate_args
    payload = bench.main(["--budgets", "0.2", "0.1", "--seeds", "0", "1", "--k", "2", "--json",
                          str(out / "digits.json"), "--rst", str(out / "digits.rst")])
    Distribution.set_default_validate_args(saved)
    return out, payload


def test_smoke_run_evaluates_every_method_at_every_budget_on_its_own_clock(bench, smoke):
    out, _ = smoke
    written = json.loads((out / "digits.json").read_text())
    assert written["settings"]["budgets_s"] == [0.1, 0.2] and written["settings"]["seeds"] == [0, 1]
    assert written["settings"]["threads"] == 1
    runs = written["runs"]
    assert len(runs) == 2
    for run in runs:
        assert list(run) == bench.DEFAULT_METHODS
        for name, result in run.items():
            assert result["params"] == bench.parameter_count(bench.METHODS[name].build())
            assert result["ms_per_step"] > 0
            first, second = result["budgets"]
            assert [first["budget_s"], second["budget_s"]] == [0.1, 0.2]
            assert 0.1 <= first["train_seconds"] <= second["train_seconds"] and second["train_seconds"] >= 0.2
            assert 1 <= first["steps"] <= second["steps"]
            for point in result["budgets"]:
                assert math.isfinite(point["test_bound_bpd"]) and math.isfinite(point["test_iw_bpd"])
                assert 0 < point["test_iw_bpd"] < 10


def test_smoke_run_writes_both_rst_tables_with_a_row_per_budget_and_method(smoke):
    out, _ = smoke
    text = (out / "digits.rst").read_text()
    assert text.count(".. list-table::") == 2
    assert text.count("   * - 0.1\n") == 2 and text.count("   * - 0.2\n") == 2
    assert "(2/2 lower)" in text or "(1/2 lower)" in text or "(0/2 lower)" in text


def test_summary_means_per_budget_and_paired_difference_to_normflows(bench):
    def run(ours, peer):
        point = lambda iw: {"test_iw_bpd": iw, "test_bound_bpd": iw + 0.1, "steps": 10}
        return {"ours-glow": {"params": 1, "ms_per_step": 2.0, "budgets": [point(v) for v in ours]},
                bench.REFERENCE: {"params": 2, "ms_per_step": 4.0, "budgets": [point(v) for v in peer]}}

    runs = [run([2.0, 1.8], [2.1, 1.7]), run([2.2, 1.9], [2.1, 2.0])]
    summary = bench.summarise(runs, ["ours-glow", bench.REFERENCE], [30.0, 60.0])
    first, second = summary["ours-glow"]["budgets"]
    assert first["iw_bpd_mean"] == pytest.approx(2.1) and first["bound_bpd_mean"] == pytest.approx(2.2)
    assert first["iw_minus_reference"] == pytest.approx(0.0) and first["seeds_lower"] == 1
    assert second["iw_minus_reference"] == pytest.approx(0.0) and second["seeds_lower"] == 1
    assert "iw_minus_reference" not in summary[bench.REFERENCE]["budgets"][0]
    assert summary["ours-glow"]["ms_per_step"] == pytest.approx(2.0)


def test_evaluation_is_the_same_for_a_seed_and_leaves_the_training_random_state_alone(bench):
    torch.manual_seed(0)
    model = bench.METHODS["ours-glow"].build()
    images = bench.digits("test").images[:40]
    state = torch.get_rng_state()
    first = bench.evaluate(model, images, k=3, chunk=16, seed=5)
    assert torch.equal(torch.get_rng_state(), state) and model.training
    assert bench.evaluate(model, images, k=3, chunk=16, seed=5) == first
    assert bench.evaluate(model, images, k=3, chunk=16, seed=6) != first


def test_ours_has_exactly_normflows_coupling_networks_and_glows_conditional_prior(bench):
    import normflows as nf

    from pyro_flowpack.nn import ConvResNet
    from pyro_flowpack.transforms import Dequantization

    ours = bench.METHODS["ours-glow"].build()
    peer = bench.METHODS[bench.REFERENCE].build()
    count = lambda modules: sum(p.numel() for m in modules for p in m.parameters())
    dequantizer = {id(m) for d in ours.modules() if isinstance(d, Dequantization) for m in d.modules()}
    networks = [m for m in ours.modules() if isinstance(m, ConvResNet) and id(m) not in dequantizer]
    theirs = [m for m in peer.modules() if isinstance(m, nf.nets.ConvNet2d)]
    assert len(networks) == len(theirs) + 1  # the prior of the factored-out half
    # the prior reads 2 channels and gives 2 x 2 parameters, as the couplings on (4, 4, 4) do
    prior = next(m for m in networks if (m.net[0].in_channels, m.net[-1].out_channels) == (2, 4))
    assert count(networks) - count([prior]) == count(theirs)
