"""Dequantized integer columns of a table (``ColumnDequantization``, ``load_data(...,
dequantize=True)``, ``flowpack train --dequantize``): the one-sample value is exactly the
bound in data units, it lies below the exact discrete log-likelihood, a trained run comes
within a few hundredths of a nat of the true NLL, and its samples are integers.

The layer is not in the shared battery (``cases.py``): like the image dequantization
layers, its sampling direction is a floor (zero Jacobian, no round trip from the base side)
and its density direction draws fresh noise, so its properties are checked here.
"""

from __future__ import annotations

import copy
import json
import math
import pickle

import numpy as np
import pytest
import torch
from scipy.stats import norm, poisson

from cli_support import flowpack
from pyro_flowpack import Flow
from pyro_flowpack.data import Standardizer, load_data
from pyro_flowpack.train import load_run
from pyro_flowpack.train.run import build_flow, with_column_dequantization
from pyro_flowpack.transforms import ColumnDequantization, ElementwiseAffine

RATE = 3.0  # the Poisson column
MEAN, STD = 2.0, 0.5  # the Gaussian column
SMALL = ["--transforms", "2", "--hidden", "32", "32", "--no-progress", "--threads", "1"]


def _table(path, n: int, seed: int = 0):
    """A CSV of a Poisson(3) count and a N(2, 0.5^2) column, with a header."""
    generator = np.random.default_rng(seed)
    rows = np.column_stack([generator.poisson(RATE, n), MEAN + STD * generator.standard_normal(n)])
    np.savetxt(path, rows, delimiter=",", header="count,x", comments="", fmt="%.10g")
    return rows


def _perturbed(flow, scale: float = 0.3, seed: int = 0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow.double().eval()


# The layer ---------------------------------------------------------------------------------
def test_density_direction_adds_uniform_noise_of_width_one_over_sigma_to_the_integer_columns_only():
    loc, scale = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), torch.tensor([1.7, 0.5, 4.0], dtype=torch.float64)
    layer = ColumnDequantization([True, False, True], loc, scale)
    k = torch.tensor([[0.0, 1.3, -2.0], [7.0, -0.4, 5.0]], dtype=torch.float64).repeat(500, 1)
    x = (k - loc) / scale
    y, ladj = layer.inverse_and_ladj(x)
    u = (y - x) * scale  # the noise in data units
    assert torch.equal(y[:, 1], x[:, 1])
    assert bool(((u[:, [0, 2]] >= 0) & (u[:, [0, 2]] < 1)).all())
    assert abs(float(u[:, [0, 2]].mean()) - 0.5) < 0.02 and abs(float(u[:, [0, 2]].var()) - 1 / 12) < 0.005
    # log q(y | x) = log 1.7 + log 4, for every row (float64, 1e-12)
    assert ladj.shape == (1000,) and torch.allclose(ladj, torch.tensor(math.log(1.7 * 4.0), dtype=torch.float64),
                                                    rtol=0, atol=1e-12)
    assert not torch.equal(layer.inverse_and_ladj(x)[0], y)  # fresh noise at every call


def test_sampling_direction_maps_the_cell_back_to_its_grid_point_and_keeps_the_other_columns():
    loc, scale = torch.tensor([3.0, 2.0], dtype=torch.float64), torch.tensor([1.7, 0.5], dtype=torch.float64)
    layer = ColumnDequantization([True, False], loc, scale)
    k = torch.arange(-5.0, 15.0, dtype=torch.float64)
    x = torch.stack([(k - 3.0) / 1.7, torch.linspace(-1, 1, len(k), dtype=torch.float64)], -1)
    y, _ = layer.inverse_and_ladj(x)
    back, ladj = layer.call_and_ladj(y)
    assert torch.allclose(back, x, rtol=0, atol=1e-12)  # the round trip on the grid
    assert torch.allclose(ladj, torch.tensor(math.log(1.7), dtype=torch.float64), rtol=0, atol=1e-12)
    anywhere = torch.randn(3, 4, 2, dtype=torch.float64) * 3
    grid = layer.call_and_ladj(anywhere)[0]
    assert grid.shape == (3, 4, 2) and torch.equal(grid[..., 1], anywhere[..., 1])
    k_back = grid[..., 0] * 1.7 + 3.0
    assert torch.allclose(k_back, k_back.round(), rtol=0, atol=1e-12)


def test_off_grid_values_and_bad_arguments_are_clear_errors():
    layer = ColumnDequantization([True, False])
    with pytest.raises(ValueError, match=r"expects integers .* in columns 0 \(counted from 0\)"):
        layer.inverse_and_ladj(torch.tensor([[0.5, 0.5]]))
    with pytest.raises(ValueError, match="at least one true"):
        ColumnDequantization([False, False])
    with pytest.raises(ValueError, match="at least one true"):
        ColumnDequantization([1, 0])
    with pytest.raises(ValueError, match=r"loc and scale of shape \(2,\)"):
        ColumnDequantization([True, False], torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="finite, positive scale"):
        ColumnDequantization([True, False], torch.zeros(2), torch.tensor([1.0, 0.0]))


def test_state_dict_deepcopy_pickle_and_dtype_keep_the_grid():
    s = Standardizer(torch.tensor([3.0, 2.0], dtype=torch.float64), torch.tensor([1.7, 0.5], dtype=torch.float64))
    flow = with_column_dequantization(build_flow("maf", (2,), transforms=1, hidden=(8,)), [True, False], s)
    other = with_column_dequantization(build_flow("maf", (2,), transforms=1, hidden=(8,)), [False, True],
                                       Standardizer(torch.zeros(2, dtype=torch.float64),
                                                    torch.ones(2, dtype=torch.float64)))
    other.load_state_dict(flow.state_dict())
    x = s.transform(torch.tensor([[4.0, 2.3], [0.0, 1.1]], dtype=torch.float64)).float()
    for clone in (other, copy.deepcopy(flow), pickle.loads(pickle.dumps(flow))):
        torch.manual_seed(0)
        expected = flow().log_prob(x)
        torch.manual_seed(0)
        assert torch.equal(clone().log_prob(x), expected)
    assert flow().log_prob(x).dtype == torch.float32
    assert flow.double()().log_prob(x.double()).dtype == torch.float64
    assert flow.transform.parts[1].columns.dtype == torch.bool


# The bound ---------------------------------------------------------------------------------
def test_the_reported_value_is_exactly_log_p_data_units_at_x_plus_u():
    """With the noise u of one call: the standardised log_prob minus log sigma of the real
    column is log p_X(x + u) in data units, computed by hand from the flow's density; and
    the flow in data units (ElementwiseAffine then the layer on the integers) gives the
    same number (float64, 1e-10)."""
    mu, sigma = torch.tensor([3.0, 2.0], dtype=torch.float64), torch.tensor([1.7, 0.5], dtype=torch.float64)
    s = Standardizer(mu, sigma)
    inner = _perturbed(build_flow("nsf", (2,), transforms=2, hidden=(8,), bins=4))
    model = with_column_dequantization(inner, [True, False], s).double()
    raw = torch.tensor([[0.0, 1.5], [3.0, 2.0], [7.0, 2.9]], dtype=torch.float64)
    x = s.transform(raw)
    torch.manual_seed(1)
    y, _ = model.transform.parts[1].inverse_and_ladj(x)
    torch.manual_seed(1)
    reported = model().log_prob(x) - math.log(0.5)  # what flowpack reports: - (nll + log sigma_x)
    u = (y - x) * sigma
    assert bool(((u[:, 0] >= 0) & (u[:, 0] < 1)).all()) and torch.equal(u[:, 1], torch.zeros(3, dtype=torch.float64))
    by_hand = inner().log_prob((raw + u - mu) / sigma) - sigma.log().sum()  # p_X(t) = p_Z((t - mu)/sigma) / prod sigma
    assert torch.allclose(reported, by_hand, rtol=0, atol=1e-10)
    data_units = Flow([inner.transform, ElementwiseAffine(mu, sigma), ColumnDequantization([True, False])],
                      inner.base()).double()
    torch.manual_seed(1)
    assert torch.allclose(data_units().log_prob(raw), by_hand, rtol=0, atol=1e-10)


def test_bound_is_below_the_exact_discrete_log_likelihood_and_averages_to_it_in_probability():
    """A Poisson column alone, standardised (mu = 3, sigma = sqrt 3), under a fixed
    non-linear flow: the exact log P(k) is the log of the flow's data-unit density
    integrated over [k, k + 1) (midpoint rule, 4000 nodes). Per row, over 4000 noise
    draws: the mean bound is below log P(k) (Jensen) up to 3 standard errors, and the mean
    of exp(bound) is P(k) (E_u[p / q] = P), within 4 standard errors."""
    mu, sigma = RATE, math.sqrt(RATE)
    s = Standardizer(torch.tensor([mu], dtype=torch.float64), torch.tensor([sigma], dtype=torch.float64))
    inner = _perturbed(build_flow("nsf", (1,), transforms=2, hidden=(8,), bins=4), scale=0.5)
    model = with_column_dequantization(inner, [True], s).double()
    k = torch.arange(0.0, 9.0, dtype=torch.float64)
    nodes = (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000
    with torch.no_grad():
        t = (k[:, None] + nodes[None, :] - mu) / sigma
        exact = (inner().log_prob(t[..., None]).exp().mean(1) / sigma).log()
        draws = model().log_prob(s.transform(k[:, None]).expand(4000, len(k), 1))  # fresh noise per entry
    n = len(draws)
    bound, bound_se = draws.mean(0), draws.std(0) / math.sqrt(n)
    assert bool((bound < exact + 3 * bound_se).all()), (bound, exact)
    weights = draws.exp()
    probability, probability_se = weights.mean(0), weights.std(0) / math.sqrt(n)
    assert bool(((probability - exact.exp()).abs() < 4 * probability_se + 1e-12).all()), (probability, exact.exp())
    assert bool((exact - bound > 3 * bound_se).any())  # a real gap where the density is not flat


# Data and the command ----------------------------------------------------------------------
def test_load_data_dequantizes_integer_columns_instead_of_warning(tmp_path, recwarn):
    _table(tmp_path / "t.csv", 300)
    data = load_data(tmp_path / "t.csv", dequantize=True)
    assert data.dequantized == ["count"] and not [w for w in recwarn if "integers" in str(w.message)]
    plain = load_data(tmp_path / "t.csv")
    assert plain.dequantized is None
    assert [str(w.message) for w in recwarn if "hold only integers ('count')" in str(w.message)]
    with pytest.raises(ValueError, match="dequantize applies only to tabular files, not to the data set 'two_moons'"):
        load_data("moons", dequantize=True)
    np.savetxt(tmp_path / "real.csv", np.random.default_rng(0).standard_normal((50, 2)), delimiter=",")
    with pytest.warns(UserWarning, match="no column holds only integers in every split: nothing is dequantized"):
        assert load_data(tmp_path / "real.csv", dequantize=True).dequantized == []


def test_without_dequantize_one_warning_line_names_the_integer_column(tmp_path, capsys, keep_threads):
    _table(tmp_path / "t.csv", 300)
    status, _, err = flowpack(["train", "--data", tmp_path / "t.csv", "--out", tmp_path / "r", "--epochs", 1,
                               "--max-steps", 1, *SMALL], capsys)
    assert status == 0, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "1 column(s) hold only integers ('count')" in warning[0]
    assert "--dequantize" in warning[0]
    assert "bound" not in json.loads((tmp_path / "r" / "summary.json").read_text())


def test_trained_run_is_within_a_few_hundredths_of_the_true_nll_and_samples_integers(tmp_path, capsys, keep_threads):
    """4000 rows, 20 epochs of a small spline flow (about 10 s): the test NLL in data units,
    an upper bound, lies in [true - 0.02, true + 0.15] where the true NLL is the mean of
    -log Poisson(k; 3) - log N(x; 2, 0.5^2) over the same test rows (measured: +0.03);
    evaluate reports the same bound (one noise draw: 0.05); load_run's flow samples
    integers on the count column, mean within 0.2 of 3, fewer than 2% of them negative, and
    scores raw rows with the same bound."""
    _table(tmp_path / "t.csv", 4000)
    run = tmp_path / "run"
    status, out, err = flowpack(["train", "--data", tmp_path / "t.csv", "--dequantize", "--out", run,
                                 "--epochs", 20, *SMALL], capsys)
    assert status == 0, err
    assert "warning" not in err and "(an upper bound: 'count' dequantized)" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["bound"] is True and summary["dequantized"] == ["count"]
    data = load_data(tmp_path / "t.csv", dequantize=True)
    test = data.standardizer.inverse(data.test.double()).numpy()
    test[:, 0] = test[:, 0].round()  # the raw counts, back from float32
    true = -float(np.mean(poisson.logpmf(test[:, 0], RATE) + norm.logpdf(test[:, 1], MEAN, STD)))
    assert true - 0.02 < summary["nll_data_units"] < true + 0.15, (summary["nll_data_units"], true)

    status, out, err = flowpack(["evaluate", run, "--json"], capsys)
    assert status == 0, err
    evaluated = json.loads(out)
    assert evaluated["bound"] is True and abs(evaluated["nll_data_units"] - summary["nll_data_units"]) < 0.05

    loaded = load_run(run)
    torch.manual_seed(0)
    with torch.no_grad():
        samples = loaded.flow().sample((2000,))
        raw = torch.from_numpy(test)
        nll = -torch.stack([loaded.flow().log_prob(raw) for _ in range(20)]).mean().item()
    assert torch.equal(samples[:, 0], samples[:, 0].round())
    # the flow knows nothing of the support: a little mass spills below 0 (measured: 0.6%)
    assert float((samples[:, 0] < 0).double().mean()) < 0.02
    assert abs(float(samples[:, 0].mean()) - RATE) < 0.2
    assert abs(float(samples[:, 1].mean()) - MEAN) < 0.1
    assert abs(nll - summary["nll_data_units"]) < 0.05  # the data-unit flow: the same bound
