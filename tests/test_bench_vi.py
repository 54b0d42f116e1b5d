r"""bench/vi.py: every target's joint integrates to its stated log Z, and the benchmark
runs end to end with a tiny budget and writes what it promises."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import Distribution

VI_PATH = Path(__file__).resolve().parents[1] / "bench" / "vi.py"


def load_vi():
    spec = importlib.util.spec_from_file_location("bench_vi", VI_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


vi = load_vi()

# A trapezoid rule on these grids is accurate to well below this (in log Z).
GRID_TOLERANCE = 1e-3


def log_trapezoid_2d(log_f: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """log of the trapezoid-rule integral of exp(log_f) over the grid a x b (log_f[i, j] at a[i], b[j])."""
    shift = log_f.max()
    f = torch.exp(log_f.double() - shift)
    inner = torch.trapezoid(f, b.double(), dim=1)
    return float(torch.log(torch.trapezoid(inner, a.double())) + shift)


def grid_log_z(target_name: str, names: tuple[str, str], a: torch.Tensor, b: torch.Tensor, stack: bool) -> float:
    A, B = torch.meshgrid(a, b, indexing="ij")
    target = vi.TARGETS[target_name]
    if stack:  # one vector site holding both coordinates
        latents = {names[0]: torch.stack([A.reshape(-1), B.reshape(-1)], -1)}
    else:
        latents = {names[0]: A.reshape(-1), names[1]: B.reshape(-1)}
    with torch.no_grad():
        log_f = vi.log_joint(target, latents).reshape(A.shape)
    return log_trapezoid_2d(log_f, a, b)


@pytest.mark.parametrize(
    ("name", "a", "b"),
    [
        # x1 ~ N(0, 2^2) to 5 sd; x2 | x1 centred at (x1^2 - 4)/4 <= 24 with sd 0.5
        ("banana", torch.linspace(-10, 10, 501), torch.linspace(-5, 27, 1201)),
        # three sd-0.5 bumps on a circle of radius 3
        ("mixture", torch.linspace(-7, 7, 501), torch.linspace(-7, 7, 501)),
    ],
)
def test_two_dimensional_target_integrates_to_z_on_a_grid(name, a, b):
    assert grid_log_z(name, ("z", None), a, b, stack=True) == pytest.approx(vi.TARGETS[name].log_z, abs=GRID_TOLERANCE)


def test_normal_gamma_joint_integrates_to_the_closed_form_evidence():
    # posterior: tau about 0.7 +- 0.3, mu about 1.2 +- 0.4
    tau = torch.linspace(1e-4, 6, 601, dtype=torch.float64)
    mu = torch.linspace(-4, 6, 601, dtype=torch.float64)
    target = vi.TARGETS["normal_gamma"]
    assert grid_log_z("normal_gamma", ("tau", "mu"), tau, mu, stack=False) == pytest.approx(target.log_z,
                                                                                            abs=GRID_TOLERANCE)


def test_beta_binomial_joint_integrates_to_the_closed_form_evidence():
    p = torch.linspace(0, 1, 401, dtype=torch.float64)[1:-1]  # the ends carry no mass here (k not 0 or n)
    assert grid_log_z("beta_binomial", ("p", None), p, p, stack=True) == pytest.approx(
        vi.TARGETS["beta_binomial"].log_z, abs=GRID_TOLERANCE
    )


def test_normal_gamma_evidence_is_the_product_of_predictive_densities():
    # chain rule: p(y1, y2) = p(y1) p(y2 | y1), the second with the updated Normal-Gamma prior
    y = torch.tensor([0.7, -1.3], dtype=torch.float64)
    m0, kappa0, a0, b0 = 0.5, 2.0, 3.0, 1.5
    kappa1, a1 = kappa0 + 1, a0 + 0.5
    m1, b1 = (kappa0 * m0 + y[0].item()) / kappa1, b0 + kappa0 * (y[0].item() - m0) ** 2 / (2 * kappa1)
    chained = (vi.normal_gamma_log_evidence(y[:1], m0, kappa0, a0, b0)
               + vi.normal_gamma_log_evidence(y[1:], m1, kappa1, a1, b1))
    assert vi.normal_gamma_log_evidence(y, m0, kappa0, a0, b0) == pytest.approx(chained, abs=1e-10)


def test_funnel_joint_is_z_times_the_normalised_funnel_density():
    # log p~(z) - log p(z) must be log Z at every point, p the generative funnel
    torch.manual_seed(0)
    v_dist = torch.distributions.Normal(0.0, vi.FUNNEL_SCALE)
    v = v_dist.sample((1000,)).double()
    x_dist = torch.distributions.Normal(0.0, torch.exp(v / 2).unsqueeze(-1))
    x = x_dist.sample((vi.FUNNEL_DIM - 1,)).squeeze(-1).T
    z = torch.cat([v.unsqueeze(-1), x], -1)
    log_p = v_dist.log_prob(v) + x_dist.log_prob(x).sum(-1)
    with torch.no_grad():
        difference = vi.log_joint(vi.TARGETS["funnel"], {"z": z}) - log_p
    assert z.shape == (1000, vi.FUNNEL_DIM)
    assert torch.allclose(difference, torch.full_like(difference, vi.TARGETS["funnel"].log_z), atol=1e-6)


def test_main_runs_every_guide_end_to_end_and_writes_json_and_rst(tmp_path):
    saved = Distribution._validate_args
    out_json, out_rst = tmp_path / "vi.json", tmp_path / "vi.rst"
    tiny = ["--steps", "3", "--particles", "2", "--eval-particles", "64", "--targets", "beta_binomial"]
    results = vi.main([*tiny, "--guides", *vi.GUIDES, "--json", str(out_json), "--rst", str(out_rst)])
    assert Distribution._validate_args == saved  # the caller's validation setting is back

    payload = json.loads(out_json.read_text())
    assert [r["guide"] for r in payload["results"]] == list(vi.GUIDES) == [r["guide"] for r in results]
    assert payload["settings"]["steps"] == 3
    for r in payload["results"]:
        assert math.isfinite(r["gap"]) and math.isfinite(r["is_error"]) and r["elbo_se"] > 0
        # the ELBO is a lower bound on log Z: the estimate may not exceed it beyond its noise
        assert r["gap"] > -4 * r["elbo_se"]
    assert payload["settings"]["targets"]["beta_binomial"]["log_z"] == vi.TARGETS["beta_binomial"].log_z
    text = out_rst.read_text()
    assert text.startswith(".. list-table::") and all(f"- {g}" in text for g in vi.GUIDES)


def test_include_merges_earlier_results_without_rerunning_them(tmp_path):
    tiny = ["--steps", "2", "--particles", "2", "--eval-particles", "32", "--targets", "banana"]
    first = tmp_path / "first.json"
    vi.main([*tiny, "--guides", "AutoNormal", "--json", str(first)])
    earlier = json.loads(first.read_text())["results"][0]

    merged = vi.main([*tiny, "--guides", "AutoNormal", "AutoMultivariateNormal", "--include", str(first), str(first)])
    assert [r["guide"] for r in merged] == ["AutoNormal", "AutoMultivariateNormal"]  # the duplicate kept once
    assert merged[0] == earlier  # carried over, not run again

    with pytest.raises(ValueError, match="same settings|expected results made with"):
        vi.main(["--steps", "5", "--particles", "2", "--eval-particles", "32", "--targets", "banana",
                 "--guides", "AutoNormal", "--include", str(first)])


def test_goals_compare_with_the_best_peer_and_never_with_an_ablation_of_ours():
    def result(guide: str, gap: float, target: str = "banana") -> dict:
        return {"target": target, "guide": guide, "seed": 0, "gap": gap}

    results = [result("AutoFlowGuide", 0.010), result("AutoFlowGuideNoSTL", 0.005), result("ZukoNSF", 0.030),
               result("AutoNormal", 0.5), result("AutoFlowGuide", 0.02, "beta_binomial")]
    lines = vi.goals(results)
    assert lines[0] == "banana: AutoFlowGuide gap 0.0100, best peer ZukoNSF 0.0300, ratio 0.33 (goal <= 0.5): met"
    assert lines[1] == "beta_binomial: AutoFlowGuide gap 0.0200 (goal <= 0.01 nats): MISSED"


def test_stl_cost_script_times_both_guides_and_writes_the_table(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_stl_cost", VI_PATH.parent / "stl_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "cost.rst"
    rows = module.main(["--dims", "3", "--rounds", "1", "--steps", "2", "--warmup", "0", "--rst", str(out)])
    assert len(rows) == 1 and rows[0][0] == "3"
    stl, plain, ratio = (float(x) for x in rows[0][1:])
    assert stl > 0 and plain > 0 and abs(ratio - stl / plain) < 0.01 + 0.01 * ratio
    assert out.read_text().startswith(".. list-table::")
    with pytest.raises(SystemExit):
        module.main(["--dims", "0"])
