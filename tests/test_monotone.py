"""The elementwise monotone maps (``pyro_flowpack.transforms.monotone``): every map goes
through the same properties, checked element by element, at D = 1 and D = 3, with raw
parameters moved away from zero first; then the parameter shapes, the generic root
finder, the spline's float32 conditioning and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_flowpack.transforms.monotone import (
    Additive,
    Affine,
    Bernstein,
    Inverted,
    MonotoneMap,
    RationalQuadraticSpline,
    SoftBoundedAffine,
    SumOfSquares,
)

MAPS = {
    "Additive": Additive,
    "Affine": lambda: Affine(bound=3.0),
    "SoftBoundedAffine": lambda: SoftBoundedAffine(-2.0, 4.0),
    "RationalQuadraticSpline": lambda: RationalQuadraticSpline(bins=8, bound=5.0),
    "Bernstein": lambda: Bernstein(degree=10, bound=5.0),
    "SumOfSquares": lambda: SumOfSquares(polynomials=3, degree=4, bound=5.0),
    "Inverted(RationalQuadraticSpline)": lambda: Inverted(RationalQuadraticSpline(bins=6, bound=4.0)),
    "Inverted(Bernstein)": lambda: Inverted(Bernstein(degree=6, bound=4.0)),
    "Inverted(SumOfSquares)": lambda: Inverted(SumOfSquares(polynomials=2, degree=3, bound=4.0)),
}
SOLVED = {  # the maps whose inverse is the generic root finder
    "Bernstein": lambda: Bernstein(degree=6, bound=3.0),
    "SumOfSquares": lambda: SumOfSquares(polynomials=2, degree=3, bound=3.0),
}
FEATURES = [1, 3]
BOUND = 8.0  # inputs cover [-8, 8]: the interval [-5, 5] of the maps and both tails

maps = pytest.mark.parametrize("name", list(MAPS))
features = pytest.mark.parametrize("D", FEATURES)


def _theta(m: MonotoneMap, *shape: int, scale: float = 1.0, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Raw parameters N(0, scale^2) of shape (*shape, params), away from zero."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, m.params, generator=g, dtype=torch.float64)).to(dtype)


def _inputs(n: int, D: int, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    """``n`` points per feature, uniform on [-BOUND, BOUND], each column shuffled."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n, D, generator=g, dtype=torch.float64) * 2 - 1) * BOUND).to(dtype)


# Identity at zero parameters ------------------------------------------------------------
@maps
@features
def test_zero_parameters_give_the_identity_within_1e12(name, D):
    m = MAPS[name]()
    x = _inputs(200, D)
    theta = torch.zeros(200, D, m.params, dtype=torch.float64)
    for direction in (m.forward, m.inverse):
        y, log_d = direction(x, theta)
        assert y.shape == log_d.shape == x.shape
        assert torch.allclose(y, x, rtol=0, atol=1e-12)
        assert torch.allclose(log_d, torch.zeros_like(x), rtol=0, atol=1e-12)


# Monotonicity -----------------------------------------------------------------------------
@maps
@features
def test_strictly_increasing_per_element_on_a_grid_with_tails(name, D):
    m = MAPS[name]()
    grid = torch.linspace(-12.0, 12.0, 2401, dtype=torch.float64)
    for seed in range(3):
        theta = _theta(m, D, scale=2.0, seed=seed)  # one parameter vector per feature
        y, log_d = m.forward(grid[:, None].expand(-1, D), theta)
        assert bool((y.diff(dim=0) > 0).all()), f"not increasing for seed {seed}"
        assert bool(torch.isfinite(log_d).all())


# Log-derivatives against autograd -------------------------------------------------------
@maps
@features
def test_log_derivative_equals_autograd_per_element_float64_within_1e8(name, D):
    m = MAPS[name]()
    theta = _theta(m, 64, D)
    x = _inputs(64, D).requires_grad_()
    y, log_d = m.forward(x, theta)
    (grad,) = torch.autograd.grad(y.sum(), x)  # elementwise map: the gradient is the diagonal
    assert torch.allclose(log_d, grad.log(), rtol=0, atol=1e-8)
    y = _inputs(64, D, seed=2).requires_grad_()
    x, log_d = m.inverse(y, theta)
    (grad,) = torch.autograd.grad(x.sum(), y)  # d tau^{-1}/dy = 1 / tau'(x)
    assert torch.allclose(log_d, -grad.log(), rtol=0, atol=1e-8)


# Round trips --------------------------------------------------------------------------------
def _round_trips(m: MonotoneMap, D: int, dtype: torch.dtype, atol: float, scale: float = 1.0) -> None:
    theta = _theta(m, 512, D, scale=scale, dtype=dtype)
    x = _inputs(512, D, dtype=dtype)
    y, log_d = m.forward(x, theta)
    x2, log_d2 = m.inverse(y, theta)
    assert torch.allclose(x2, x, rtol=0, atol=atol), f"x -> y -> x off by {(x2 - x).abs().max():.2e}"
    assert torch.allclose(log_d2, log_d, rtol=0, atol=atol)
    x3, log_d3 = m.inverse(x, theta)  # the same points as y now
    y3, log_d4 = m.forward(x3, theta)
    assert torch.allclose(y3, x, rtol=0, atol=atol), f"y -> x -> y off by {(y3 - x).abs().max():.2e}"
    assert torch.allclose(log_d4, log_d3, rtol=0, atol=atol)


@maps
@features
def test_round_trip_both_ways_float64_within_1e8(name, D):
    _round_trips(MAPS[name](), D, torch.float64, 1e-8)


@maps
@features
def test_round_trip_both_ways_float32_within_1e4(name, D):
    """Raw parameters N(0, 0.5^2): float32 loses about 2^-24 |y| / tau'(x) to the rounding
    of y alone, and at unit scale the sum-of-squares map gets as flat as tau' = 2e-3
    (round trip 9e-5, log-derivative 7e-4); the spline at unit scale is checked below."""
    _round_trips(MAPS[name](), D, torch.float32, 1e-4, scale=0.5)


# Broadcasting -------------------------------------------------------------------------------
@maps
@features
def test_parameters_broadcast_over_batch_shapes_like_per_element_calls(name, D):
    m = MAPS[name]()
    theta = _theta(m, 4, 1, D)  # batch (4, 1), against inputs of batch (5,)
    x = _inputs(5, D)
    expected = torch.stack([torch.stack([m.forward(x[j], theta[i, 0])[0] for j in range(5)]) for i in range(4)])
    for direction in (m.forward, m.inverse):
        value, log_d = direction(x, theta)
        assert value.shape == log_d.shape == (4, 5, D)
    y, log_d = m.forward(x, theta)
    assert torch.allclose(y, expected, rtol=0, atol=1e-12)
    x2, _ = m.inverse(y, theta)
    assert torch.allclose(x2, x.expand(4, 5, D), rtol=0, atol=1e-8)
    # one parameter vector per feature for a whole batch of inputs
    y, log_d = m.forward(_inputs(7, D), theta[0, 0])
    assert y.shape == log_d.shape == (7, D)


# Parameter shapes ---------------------------------------------------------------------------
@maps
def test_params_is_the_total_size_of_shapes_and_split_gives_the_named_parts(name):
    m = MAPS[name]()
    assert isinstance(m.params, int)
    assert m.params == sum(math.prod(shape) for shape in m.shapes.values())
    theta = _theta(m, 2, 5, 3)
    parts = m.split(theta)
    assert list(parts) == list(m.shapes)
    for key, shape in m.shapes.items():
        assert parts[key].shape == (2, 5, 3, *shape)
    flat = torch.cat([part.reshape(2, 5, 3, -1) for part in parts.values()], dim=-1)
    assert torch.equal(flat, theta)
    with pytest.raises(ValueError, match=rf"parameters of shape \(\.\.\., D, {m.params}\), got .*\(5, 3, {m.params + 1}\)"):
        m.split(torch.zeros(5, 3, m.params + 1))


def test_shapes_of_each_map_name_its_parameters():
    assert Additive().shapes == {"shift": ()}
    assert Affine().shapes == SoftBoundedAffine(-1.0, 1.0).shapes == {"shift": (), "log_scale": ()}
    assert RationalQuadraticSpline(bins=5).shapes == {"widths": (5,), "heights": (5,), "derivatives": (4,)}
    assert RationalQuadraticSpline(bins=5).params == 14  # 3K - 1, as the layers size their conditioner
    assert Bernstein(degree=7).shapes == {"shift": (), "slopes": (7,)}
    assert SumOfSquares(polynomials=2, degree=3).shapes == {"shift": (), "coefficients": (2, 4)}
    assert Inverted(Bernstein(degree=7)).shapes == Bernstein(degree=7).shapes


def test_closed_inverse_is_true_for_formulas_and_false_for_the_root_finder():
    for m in (Additive(), Affine(), SoftBoundedAffine(-1.0, 1.0), RationalQuadraticSpline()):
        assert m.closed_inverse and type(m).inverse is not MonotoneMap.inverse
    for m in (Bernstein(), SumOfSquares()):
        assert not m.closed_inverse and type(m).inverse is MonotoneMap.inverse
    assert Inverted(Bernstein()).closed_inverse  # its inverse is Bernstein's forward


# Inverted -----------------------------------------------------------------------------------
@pytest.mark.parametrize("inner", ["RationalQuadraticSpline", "Bernstein", "Affine"])
def test_inverted_swaps_the_directions_and_negates_the_log_derivative_exactly(inner):
    m = MAPS[inner]()
    inverted = Inverted(m)
    theta = _theta(m, 64, 3)
    x = _inputs(64, 3)
    for mine, theirs in ((inverted.forward, m.inverse), (inverted.inverse, m.forward)):
        value, log_d = mine(x, theta)
        expected, expected_log_d = theirs(x, theta)
        assert torch.equal(value, expected) and torch.equal(log_d, -expected_log_d)
    twice = Inverted(inverted)
    assert torch.equal(twice.forward(x, theta)[0], m.forward(x, theta)[0])
    assert repr(twice) == f"Inverted(Inverted({m!r}))"


# The generic root finder --------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SOLVED))
@pytest.mark.parametrize("D", FEATURES)
def test_root_finder_gradients_pass_gradcheck_float64(name, D):
    m = SOLVED[name]()
    theta = _theta(m, 3, D, scale=0.7).requires_grad_()
    y = _inputs(3, D).mul(0.6).requires_grad_()  # within and outside [-3, 3]
    assert torch.autograd.gradcheck(lambda y, theta: m.inverse(y, theta), (y, theta))


def test_root_finder_gradients_equal_those_of_the_closed_form_spline_inverse_within_1e8():
    spline = RationalQuadraticSpline(bins=6, bound=4.0)
    theta = _theta(spline, 32, 3).requires_grad_()
    y = _inputs(32, 3).requires_grad_()
    grads = []
    for inverse in (spline.inverse, lambda y, theta: MonotoneMap.inverse(spline, y, theta)):
        x, log_d = inverse(y, theta)
        grads.append(torch.autograd.grad((x * x.detach().cos()).sum() + log_d.sin().sum(), (y, theta)))
    for closed, solved in zip(*grads):
        assert torch.allclose(solved, closed, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_root_finder_matches_the_spline_formula_and_solves_to_a_few_ulps(dtype):
    spline = RationalQuadraticSpline(bins=8, bound=5.0)
    theta = _theta(spline, 4096, 2, dtype=dtype)
    y = _inputs(4096, 2, dtype=dtype)
    x, log_d = MonotoneMap.inverse(spline, y, theta)
    fx, _ = spline.forward(x, theta)
    # residual within 8 ulps of y plus the change of tau over 8 ulps of x
    eps = torch.finfo(dtype).eps
    assert bool(((fx - y).abs() <= 8 * eps * (1 + y.abs() + log_d.exp() * (1 + x.abs()))).all())
    x_closed, log_d_closed = spline.inverse(y, theta)
    atol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(x, x_closed, rtol=0, atol=atol)
    assert torch.allclose(log_d, log_d_closed, rtol=0, atol=atol)


def test_root_finder_grows_the_bracket_to_far_roots_within_1e8():
    m = Bernstein(degree=4, bound=1.0)
    theta = torch.zeros(3, m.params, dtype=torch.float64)
    theta[:, 0] = torch.tensor([1e6, -3e4, 0.0])  # the shift: roots far from y
    y = torch.tensor([0.5, 2.0, 1e7], dtype=torch.float64)
    x, _ = m.inverse(y, theta)
    assert torch.allclose(x, y - theta[:, 0], rtol=0, atol=1e-8)


class _Bounded(MonotoneMap):
    """tanh: increasing but not onto R, so some y have no root."""

    shapes = {"unused": ()}

    def forward(self, x, theta):
        return torch.tanh(x), torch.log1p(-torch.tanh(x) ** 2)


def test_root_finder_raises_a_clear_error_when_the_root_cannot_be_bracketed():
    with pytest.raises(RuntimeError, match=r"could not bracket .* for 1 value\(s\) within 64 doublings"):
        _Bounded().inverse(torch.tensor([0.5, 2.0]), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"inverse expects finite values, got 2 non-finite"):
        Bernstein(degree=3).inverse(torch.tensor([math.inf, 0.0, math.nan]), torch.zeros(3, 4))


# Spline conditioning ------------------------------------------------------------------------
def test_spline_float32_round_trip_within_1e4_over_1e5_inputs_and_unit_scale_parameters():
    """1e5 inputs uniform on [-6, 6] (both tails of [-5, 5]), each with its own raw
    parameters N(0, 1); before the soft clamp of widths and heights this reached 1.9e-1."""
    spline = RationalQuadraticSpline(bins=8, bound=5.0)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(100_000, 1, generator=g) * 2 - 1) * 6.0
    theta = torch.randn(100_000, 1, spline.params, generator=g)
    y, _ = spline.forward(x, theta)
    x2, _ = spline.inverse(y, theta)
    assert (x2 - x).abs().max().item() <= 1e-4


def test_spline_bins_differ_at_most_by_max_bin_ratio_and_knot_derivatives_stay_in_bounds():
    spline = RationalQuadraticSpline(bins=8, bound=5.0, min_derivative=1e-3, max_bin_ratio=100.0)
    theta = _theta(spline, 256, 2, scale=1e3)  # raw parameters far beyond any clamp
    xk, yk, dk = spline._knots(theta)
    for knots in (xk, yk):
        sizes = knots.diff(dim=-1)
        assert bool((sizes.max(-1).values <= 100 * (1 + 1e-9) * sizes.min(-1).values).all())
    assert bool(((dk > 1e-3) & (dk < 1e3)).all())
    grid = torch.linspace(-6.0, 6.0, 1201, dtype=torch.float64)[:, None, None].expand(-1, 256, 2)
    _, log_d = spline.forward(grid, theta)
    assert bool(torch.isfinite(log_d).all())


# Family-specific properties -----------------------------------------------------------------
def test_soft_bounded_affine_keeps_the_log_scale_within_low_high_and_is_an_affine():
    m = SoftBoundedAffine(-1.5, 0.5)
    assert isinstance(m, Affine) and repr(m) == "SoftBoundedAffine(low=-1.5, high=0.5)"
    theta = torch.stack((torch.zeros(5), torch.tensor([-1e4, -3.0, 0.0, 3.0, 1e4])), dim=-1).double()
    _, log_d = m.forward(torch.zeros(5, dtype=torch.float64), theta)
    assert bool(((log_d >= -1.5) & (log_d <= 0.5)).all())
    assert log_d[2].item() == pytest.approx(0.0, abs=1e-12)  # zero raw output: the identity
    assert log_d[0].item() == pytest.approx(-1.5) and log_d[4].item() == pytest.approx(0.5)


@pytest.mark.parametrize("make", [lambda: Bernstein(degree=5, bound=2.0), lambda: SumOfSquares(2, 3, bound=2.0)])
def test_polynomial_maps_are_c1_and_linear_outside_the_interval_within_1e10(make):
    m = make()
    theta = _theta(m, 2, scale=1.5)
    for side in (1.0, -1.0):
        at = side * 2.0 * torch.ones(2, dtype=torch.float64)
        _, inner = m.forward(at - side * 1e-9, theta)
        _, outer = m.forward(at + side * 1e-9, theta)
        assert torch.allclose(inner, outer, rtol=0, atol=1e-6)  # derivative continuous at +-B
        far = at + side * torch.tensor([1.0, 3.0], dtype=torch.float64)[:, None]
        y_at, log_d = m.forward(at, theta)
        y_far, _ = m.forward(far, theta)
        assert torch.allclose(y_far, y_at + log_d.exp() * (far - at), rtol=0, atol=1e-10)


def test_bernstein_derivative_lies_between_the_extreme_slopes():
    m = Bernstein(degree=8, bound=3.0, min_derivative=1e-2)
    theta = _theta(m, 4, scale=30.0)
    grid = torch.linspace(-5.0, 5.0, 1001, dtype=torch.float64)[:, None].expand(-1, 4)
    _, log_d = m.forward(grid, theta)
    assert bool((log_d.abs() < math.log(1e2)).all())


def test_sum_of_squares_derivative_is_at_least_the_floor():
    m = SumOfSquares(polynomials=1, degree=1, bound=1.0, min_derivative=1e-2)
    theta = torch.tensor([[0.0, -1.0, -1.0]], dtype=torch.float64)  # q(v) = -v: a double zero at 0
    _, log_d = m.forward(torch.tensor([0.0, 0.5], dtype=torch.float64), theta)
    assert log_d[0].item() == pytest.approx(math.log(1e-2))
    assert log_d[1].item() == pytest.approx(math.log(1e-2 + 0.99 * 0.25))


# Argument checks ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RationalQuadraticSpline(bins=True), "RationalQuadraticSpline: bins must be an int >= 1, got True"),
        (lambda: RationalQuadraticSpline(bins=0), "RationalQuadraticSpline: bins must be an int >= 1, got 0"),
        (lambda: RationalQuadraticSpline(bound=-1.0), "RationalQuadraticSpline: bound must be a finite number > 0"),
        (lambda: RationalQuadraticSpline(min_width=1.0), r"min_width must be in \[0, 1\), got 1.0"),
        (lambda: RationalQuadraticSpline(min_derivative=0.0), r"min_derivative must be in \(0, 1\), got 0.0"),
        (lambda: RationalQuadraticSpline(max_bin_ratio=1.0), "max_bin_ratio must be > 1, got 1.0"),
        (lambda: Affine(bound=0.0), "Affine: bound must be a finite number > 0, got 0.0"),
        (lambda: SoftBoundedAffine(0.0, 1.0), "SoftBoundedAffine: low must be < 0, got 0.0"),
        (lambda: SoftBoundedAffine(-1.0, -0.5), "SoftBoundedAffine: high must be > 0, got -0.5"),
        (lambda: SoftBoundedAffine(True, 1.0), "SoftBoundedAffine: low must be a finite number, got True"),
        (lambda: Bernstein(degree=0), "Bernstein: degree must be an int >= 1, got 0"),
        (lambda: Bernstein(degree=2.5), "Bernstein: degree must be an int >= 1, got 2.5"),
        (lambda: Bernstein(bound=math.inf), "Bernstein: bound must be a finite number > 0, got inf"),
        (lambda: SumOfSquares(degree=0), "SumOfSquares: degree must be an int >= 1, got 0"),
        (lambda: SumOfSquares(polynomials=True), "SumOfSquares: polynomials must be an int >= 1, got True"),
        (lambda: SumOfSquares(min_derivative=1.0), r"SumOfSquares: min_derivative must be in \(0, 1\), got 1.0"),
        (lambda: Inverted("spline"), "Inverted: monotone must be a MonotoneMap, got 'spline'"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_argument(build, message):
    with pytest.raises(ValueError, match=message):
        build()
