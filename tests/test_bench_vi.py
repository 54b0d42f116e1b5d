r"""bench/vi.py: every target's joint integrates to its stated log Z, the reference
method (NUTS, then importance sampling) recovers a known log Z and is cached, and the
benchmark runs end to end with a tiny budget, resumes, and writes what it promises."""

import json
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import Distribution

from scripts import loaded_script

VI_PATH = Path(__file__).resolve().parents[1] / "bench" / "vi.py"


@pytest.fixture(scope="module")
def vi():
    with loaded_script(VI_PATH, "bench_vi") as module:
        yield module


# A trapezoid rule on these grids is accurate to well below this (in log Z).
GRID_TOLERANCE = 1e-3


def log_trapezoid_2d(log_f: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """log of the trapezoid-rule integral of exp(log_f) over the grid a x b (log_f[i, j] at a[i], b[j])."""
    shift = log_f.max()
    f = torch.exp(log_f.double() - shift)
    inner = torch.trapezoid(f, b.double(), dim=1)
    return float(torch.log(torch.trapezoid(inner, a.double())) + shift)


def grid_log_z(vi, target_name: str, names: tuple[str, str], a: torch.Tensor, b: torch.Tensor, stack: bool) -> float:
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
        # an arc of radius 2, radial sd 0.25: nothing beyond radius 3.5
        ("crescent", torch.linspace(-3.5, 3.5, 1401), torch.linspace(-3.5, 3.5, 1401)),
    ],
)
def test_two_dimensional_target_integrates_to_z_on_a_grid(vi, name, a, b):
    log_z = grid_log_z(vi, name, ("z", None), a.double(), b.double(), stack=True)
    assert log_z == pytest.approx(vi.TARGETS[name].log_z, abs=GRID_TOLERANCE)


def test_bimodal_target_integrates_to_z_on_a_grid(vi):
    x = torch.linspace(-6, 6, 4001, dtype=torch.float64)  # modes at -1.5 and 1.5 with sd 0.5
    with torch.no_grad():
        log_f = vi.log_joint(vi.TARGETS["bimodal"], {"z": x.unsqueeze(-1)})
    log_z = float(torch.log(torch.trapezoid(torch.exp(log_f), x)))
    assert log_z == pytest.approx(vi.TARGETS["bimodal"].log_z, abs=1e-6)


def test_normal_gamma_joint_integrates_to_the_closed_form_evidence(vi):
    # posterior: tau about 0.7 +- 0.3, mu about 1.2 +- 0.4
    tau = torch.linspace(1e-4, 6, 601, dtype=torch.float64)
    mu = torch.linspace(-4, 6, 601, dtype=torch.float64)
    target = vi.TARGETS["normal_gamma"]
    assert grid_log_z(vi, "normal_gamma", ("tau", "mu"), tau, mu, stack=False) == pytest.approx(
        target.log_z, abs=GRID_TOLERANCE)


def test_beta_binomial_joint_integrates_to_the_closed_form_evidence(vi):
    p = torch.linspace(0, 1, 401, dtype=torch.float64)[1:-1]  # the ends carry no mass here (k not 0 or n)
    assert grid_log_z(vi, "beta_binomial", ("p", None), p, p, stack=True) == pytest.approx(
        vi.TARGETS["beta_binomial"].log_z, abs=GRID_TOLERANCE
    )


def test_normal_gamma_evidence_is_the_product_of_predictive_densities(vi):
    # chain rule: p(y1, y2) = p(y1) p(y2 | y1), the second with the updated Normal-Gamma prior
    y = torch.tensor([0.7, -1.3], dtype=torch.float64)
    m0, kappa0, a0, b0 = 0.5, 2.0, 3.0, 1.5
    kappa1, a1 = kappa0 + 1, a0 + 0.5
    m1, b1 = (kappa0 * m0 + y[0].item()) / kappa1, b0 + kappa0 * (y[0].item() - m0) ** 2 / (2 * kappa1)
    chained = (vi.normal_gamma_log_evidence(y[:1], m0, kappa0, a0, b0)
               + vi.normal_gamma_log_evidence(y[1:], m1, kappa1, a1, b1))
    assert vi.normal_gamma_log_evidence(y, m0, kappa0, a0, b0) == pytest.approx(chained, abs=1e-10)


def assert_joint_is_z_times(vi, name: str, z: torch.Tensor, log_p: torch.Tensor, atol: float) -> None:
    """log p~(z) - log p(z) must be log Z at every point, p the normalised density."""
    with torch.no_grad():
        difference = vi.log_joint(vi.TARGETS[name], {"z": z}) - log_p
    assert z.shape[-1] == vi.TARGETS[name].latent_dim
    assert torch.allclose(difference, torch.full_like(difference, vi.TARGETS[name].log_z), atol=atol)


def test_funnel_joint_is_z_times_the_normalised_funnel_density(vi):
    torch.manual_seed(0)
    v_dist = torch.distributions.Normal(0.0, vi.FUNNEL_SCALE)
    v = v_dist.sample((1000,)).double()
    x_dist = torch.distributions.Normal(0.0, torch.exp(v / 2).unsqueeze(-1))
    x = x_dist.sample((vi.FUNNEL_DIM - 1,)).squeeze(-1).T
    z = torch.cat([v.unsqueeze(-1), x], -1)
    assert_joint_is_z_times(vi, "funnel", z, v_dist.log_prob(v) + x_dist.log_prob(x).sum(-1), atol=1e-6)


def test_student_t_joint_is_z_times_the_multivariate_student_t_density(vi):
    torch.manual_seed(0)
    d = vi.STUDENT_DIM
    t = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64))
    chi2 = torch.distributions.Chi2(torch.tensor(vi.STUDENT_DF, dtype=torch.float64))
    z = t.sample((1000,)) / torch.sqrt(chi2.sample((1000,)) / vi.STUDENT_DF).unsqueeze(-1)  # heavy tails included
    mvt = dist.MultivariateStudentT(torch.tensor(vi.STUDENT_DF, dtype=torch.float64), torch.zeros(d, dtype=torch.float64),
                                    torch.eye(d, dtype=torch.float64))
    assert_joint_is_z_times(vi, "student_t", z, mvt.log_prob(z), atol=1e-6)


def test_gaussian_target_has_condition_number_1000_and_its_joint_is_z_times_the_normal_density(vi):
    covariance = vi.gaussian_covariance()
    eigenvalues = torch.linalg.eigvalsh(covariance)
    assert float(eigenvalues.max() / eigenvalues.min()) == pytest.approx(1000.0, rel=1e-8)
    normal = torch.distributions.MultivariateNormal(torch.zeros(vi.GAUSSIAN_DIM, dtype=torch.float64), covariance)
    torch.manual_seed(0)
    z = normal.sample((1000,))
    assert_joint_is_z_times(vi, "gaussian", z, normal.log_prob(z), atol=1e-6)


def test_eight_schools_likelihood_given_tau_is_the_integral_over_mu_of_the_school_predictives(vi):
    # given tau, y_j | mu ~ N(mu, sigma_j^2 + tau^2) independently and mu ~ N(0, 5): a 1-D grid over mu
    y, sigma = vi.EIGHT_SCHOOLS_Y.double(), vi.EIGHT_SCHOOLS_SIGMA.double()
    mu = torch.linspace(-60, 60, 24001, dtype=torch.float64)
    taus = torch.tensor([0.0, 0.5, 4.0, 30.0], dtype=torch.float64)
    closed = vi.eight_schools_log_likelihood(y, sigma, taus, mu_scale=5.0)
    for tau, expected in zip(taus.tolist(), closed.tolist()):
        per_school = torch.distributions.Normal(mu.unsqueeze(-1), torch.sqrt(sigma**2 + tau**2)).log_prob(y).sum(-1)
        log_f = per_school + torch.distributions.Normal(0.0, 5.0).log_prob(mu)
        on_grid = float(torch.log(torch.trapezoid(torch.exp(log_f - log_f.max()), mu)) + log_f.max())
        assert on_grid == pytest.approx(expected, abs=1e-6)


def test_eight_schools_quadrature_has_converged(vi):
    args = (vi.EIGHT_SCHOOLS_Y, vi.EIGHT_SCHOOLS_SIGMA, 5.0, 5.0)
    coarse, fine = vi.eight_schools_log_evidence(*args, nodes=201), vi.eight_schools_log_evidence(*args, nodes=20001)
    assert coarse == pytest.approx(fine, abs=1e-9)
    assert vi.TARGETS["eight_schools"].log_z == vi.TARGETS["eight_schools_nc"].log_z == pytest.approx(fine, abs=1e-9)


def test_eight_schools_parametrisations_have_the_same_evidence(vi):
    # non-centred joint at (mu, tau, raw) = centred joint at theta = mu + tau raw, times the Jacobian tau^8
    torch.manual_seed(0)
    mu, tau, raw = torch.randn(100) * 5, torch.rand(100) * 10 + 0.1, torch.randn(100, 8)
    theta = mu.unsqueeze(-1) + tau.unsqueeze(-1) * raw
    with torch.no_grad():
        centred = vi.log_joint(vi.TARGETS["eight_schools"], {"mu": mu, "tau": tau, "theta": theta})
        non_centred = vi.log_joint(vi.TARGETS["eight_schools_nc"], {"mu": mu, "tau": tau, "theta_raw": raw})
    assert torch.allclose(non_centred, centred + 8 * torch.log(tau), atol=1e-3)


def test_logistic_data_is_fixed_and_the_model_has_twenty_unconstrained_weights(vi):
    x, y = vi.logistic_data()
    assert x.shape == (100, 20) and y.shape == (100,) and set(y.tolist()) == {0.0, 1.0}
    assert vi._data_digest("logistic") == vi._data_digest("logistic")
    sites = vi.latent_sites(vi.logistic_model)
    assert [(name, tuple(shape)) for name, shape, _ in sites] == [("w", (20,))]


def test_unconstrained_log_joint_adds_the_log_jacobian_of_each_support(vi):
    u = torch.randn(5, 10)
    latents = {"mu": u[:, 0], "tau": u[:, 1].exp(), "theta_raw": u[:, 2:]}
    with torch.no_grad():
        expected = vi.log_joint(vi.TARGETS["eight_schools_nc"], latents) + u[:, 1]  # d tau / du = tau
        got = vi.unconstrained_log_joint(vi.TARGETS["eight_schools_nc"].model, u)
    assert torch.allclose(got, expected, atol=1e-5)


def test_importance_sampling_recovers_a_known_log_z_within_its_standard_error(vi):
    def model():  # a correlated 3-D Gaussian times exp(2): log Z = 2
        scale_tril = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.3, 0.0], [-0.2, 0.1, 2.0]])
        pyro.sample("x", dist.MultivariateNormal(torch.ones(3), scale_tril=scale_tril))
        pyro.factor("z", torch.tensor(2.0))

    torch.manual_seed(0)
    rough = torch.diag(torch.tensor([1.5, 0.5, 3.0]))  # a poor proposal scale: the estimate stays unbiased
    found = vi.importance_log_z(model, torch.zeros(3), rough, draws=40000, df=5.0, batch=8192)
    assert found["log_z_se"] < 0.02 and 0 < found["ess"] < 40000
    assert abs(found["log_z"] - 2.0) < 4 * found["log_z_se"]


def test_nuts_moments_of_a_gaussian_are_its_mean_and_covariance(vi):
    def model():
        pyro.sample("x", dist.Normal(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])).to_event(1))
        pyro.sample("s", dist.LogNormal(0.0, 0.3))  # positive: its moments are those of log s

    found = vi.nuts_moments(model, warmup=30, samples=120, seed=0)
    # 120 draws: about 0.1 sd of Monte Carlo error on each mean, 7% on each sd; allowed 4 times that
    sd = torch.tensor([0.5, 2.0, 0.3], dtype=torch.float64)
    assert torch.all((found["mean"] - torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)).abs() < 0.4 * sd)
    assert torch.allclose(found["covariance"].diagonal().sqrt(), sd, rtol=0.25)
    assert found["max_r_hat"] < 1.1 and found["min_n_eff"] > 30


def test_reference_run_matches_the_eight_schools_quadrature_and_is_read_back_from_its_cache(vi, tmp_path, monkeypatch):
    made = []

    def rough_moments(model, warmup, samples, seed):  # stands in for NUTS: about the posterior's moments
        made.append(samples)
        mean = torch.tensor([4.4, 1.0] + [0.0] * 8, dtype=torch.float64)
        return {"mean": mean, "covariance": torch.diag(torch.tensor([3.3, 1.5] + [1.0] * 8) ** 2).double(),
                "divergences": 0, "min_n_eff": float(samples), "max_r_hat": 1.0}

    monkeypatch.setattr(vi, "nuts_moments", rough_moments)
    path = tmp_path / "reference.json"
    tiny = vi.ReferenceSettings(warmup=10, samples=20, draws=16384, batch=4096)
    entry = vi.reference_run("eight_schools_nc", path, tiny)
    assert abs(entry["log_z"] - vi.TARGETS["eight_schools_nc"].log_z) < 5 * entry["log_z_se"] < 0.25
    assert len(entry["mean"]) == len(entry["sd"]) == 10 and json.loads(path.read_text())["eight_schools_nc"] == entry
    assert vi.reference_run("eight_schools_nc", path, tiny) == entry and made == [20]  # read back, not made again
    vi.reference_run("eight_schools_nc", path, vi.ReferenceSettings(warmup=10, samples=21, draws=4096))
    assert made == [20, 21]  # other settings: made again


def test_main_runs_every_guide_end_to_end_and_writes_json_and_rst(vi, tmp_path):
    saved = Distribution._validate_args
    out_json, out_rst = tmp_path / "vi.json", tmp_path / "vi.rst"
    tiny = ["--steps", "2", "--particles", "2", "--eval-particles", "64", "--targets", "beta_binomial", "bimodal"]
    results = vi.main([*tiny, "--guides", *vi.GUIDES, "--json", str(out_json), "--rst", str(out_rst)])
    assert Distribution._validate_args == saved  # the caller's validation setting is back

    payload = json.loads(out_json.read_text())
    expected = [(t, g) for t in ("beta_binomial", "bimodal") for g in vi.GUIDES]
    assert [(r["target"], r["guide"]) for r in payload["results"]] == expected
    assert [(r["target"], r["guide"]) for r in results] == expected
    assert payload["settings"]["steps"] == 2 and payload["settings"]["particles"] == [2]
    for r in payload["results"]:
        assert math.isfinite(r["gap"]) and math.isfinite(r["is_error"]) and r["elbo_se"] > 0
        # the ELBO is a lower bound on log Z: the estimate may not exceed it beyond its noise
        assert r["gap"] > -4 * r["elbo_se"]
    assert payload["settings"]["targets"]["beta_binomial"]["log_z"] == vi.TARGETS["beta_binomial"].log_z
    assert set(payload["settings"]["guides"]) == set(vi.GUIDES)
    text = out_rst.read_text()
    assert text.startswith(".. list-table::") and all(f"- {g}" in text for g in vi.GUIDES)


def test_both_budgets_run_and_a_rerun_resumes_from_the_json(vi, tmp_path, monkeypatch):
    out = tmp_path / "vi.json"
    tiny = ["--steps", "2", "--particles", "1", "3", "--eval-particles", "32", "--targets", "banana",
            "--guides", "AutoNormal", "AutoFlowGuide", "--seeds", "0", "1", "--json", str(out)]
    first = vi.main(tiny)
    assert sorted((r["guide"], r["particles"], r["seed"]) for r in first) == sorted(
        (g, p, s) for g in ("AutoNormal", "AutoFlowGuide") for p in (1, 3) for s in (0, 1))

    def no_run(*args, **kwargs):
        raise AssertionError("a run that the JSON holds was repeated")

    monkeypatch.setattr(vi, "run", no_run)
    assert vi.main(tiny) == first
    body = vi.table_body(first, [1, 3])
    assert [row[2] for row in body] == ["AutoFlowGuide", "AutoNormal"]
    assert len(body[0]) == len(vi.header([1, 3])) and body[0][5].endswith("/2")


def test_include_merges_earlier_results_without_rerunning_them(vi, tmp_path):
    tiny = ["--steps", "2", "--particles", "2", "--eval-particles", "32", "--targets", "banana"]
    first = tmp_path / "first.json"
    vi.main([*tiny, "--guides", "AutoNormal", "--json", str(first)])
    earlier = json.loads(first.read_text())["results"][0]

    shown = tmp_path / "shown.rst"
    merged = vi.main([*tiny, "--guides", "AutoNormal", "AutoMultivariateNormal", "--include", str(first), str(first),
                      "--show", "AutoMultivariateNormal", "--rst", str(shown)])
    assert [r["guide"] for r in merged] == ["AutoNormal", "AutoMultivariateNormal"]  # the duplicate kept once
    assert merged[0] == earlier  # carried over, not run again
    assert "- AutoMultivariateNormal" in shown.read_text() and "- AutoNormal\n" not in shown.read_text()

    with pytest.raises(ValueError, match="expected results made with"):
        vi.main(["--steps", "5", "--particles", "2", "--eval-particles", "32", "--targets", "banana",
                 "--guides", "AutoNormal", "--include", str(first)])


def test_goals_compare_with_the_best_peer_per_budget_and_count_diverged_seeds(vi):
    def result(guide: str, gap: float, target: str = "banana", particles: int = 1, seed: int = 0) -> dict:
        return {"target": target, "guide": guide, "particles": particles, "seed": seed, "gap": gap}

    results = [
        result("AutoFlowGuide", 0.010), result("AutoFlowGuide", 1.5, seed=1),  # one seed diverged
        result("AFG-spline1-nostl", 0.001), result("ZukoNSF", 0.030), result("ZukoNSF", 0.040, seed=1),
        result("AutoNormal", 0.5), result("AutoNormal", 0.5, seed=1),
        result("AutoFlowGuide", 0.020, particles=8), result("AutoIAFNormal", 0.015, particles=8),
        result("AutoFlowGuide", 2.0, "mixture"), result("AutoNormal", 1.1, "mixture"),  # nobody solves it
    ]
    lines = vi.goals(results, ["AutoFlowGuide"])
    assert lines[0] == ("banana [1 p.]: AutoFlowGuide gap 0.7550, best peer ZukoNSF 0.0350: MISSED; "
                        "diverged 1/2")
    assert lines[1] == ("banana [8 p.]: AutoFlowGuide gap 0.0200, best peer AutoIAFNormal 0.0150: within 0.01; "
                        "diverged 0/1")
    assert lines[2] == "mixture [1 p.]: AutoFlowGuide gap 2.0000, best peer AutoNormal 1.1000: MISSED; diverged 0/1"
    assert lines[3] == "AutoFlowGuide: met 0, within 0.01 1, missed 2 of 3; 1 diverged seed(s)"
    # an ablation of ours is never the peer to beat
    assert all("AFG-spline1-nostl" not in line.split("best peer")[1] for line in vi.goals(results) if "best peer" in line)


def test_every_recipe_is_in_the_one_mapping_and_builds_an_autoflowguide(vi):
    import pyro_flowpack as pf

    assert vi.OURS in vi.RECIPES and vi.RECOMMENDED in vi.RECIPES
    assert list(vi.GUIDES)[: len(vi.RECIPES)] == list(vi.RECIPES)
    assert not set(vi.RECIPES) & set(vi.PEERS)
    for name in vi.RECIPES:
        guide = vi.GUIDES[name][0](vi.TARGETS["banana"].model, vi.FlowOptions())
        assert isinstance(guide, pf.infer.AutoFlowGuide)


def test_stl_cost_script_times_both_guides_and_writes_the_table(tmp_path):
    with loaded_script(VI_PATH.parent / "stl_cost.py", "bench_stl_cost") as module:
        out = tmp_path / "cost.rst"
        rows = module.main(["--dims", "3", "--rounds", "1", "--steps", "2", "--warmup", "0", "--rst", str(out)])
        assert len(rows) == 1 and rows[0][0] == "3"
        stl, plain, ratio = (float(x) for x in rows[0][1:])
        assert stl > 0 and plain > 0 and abs(ratio - stl / plain) < 0.01 + 0.01 * ratio
        assert out.read_text().startswith(".. list-table::")
        with pytest.raises(SystemExit):
            module.main(["--dims", "0"])
