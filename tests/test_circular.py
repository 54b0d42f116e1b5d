"""Angles: wrap_angle, the circular spline, its coupling layer and CircularNSF, the
specification.

The circular spline is a diffeomorphism of the circle (identity at zero parameters,
inputs read modulo 2 pi, outputs in [-pi, pi), derivative continuous across the seam);
the coupling layer's parameters are continuous across the seam of its pass-through
angles; a CircularNSF is a density on the torus: it integrates to one over [-pi, pi)^D,
is continuous across every seam (the gap at -pi + eps and pi - eps shrinks with eps, per
feature and per point, in a trained flow), and its samples lie in [-pi, pi)^D.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Uniform

import pyro_flowpack as pf
from pyro_flowpack.nn import MLP, Constant
from pyro_flowpack.transforms import CircularRationalQuadraticSpline, CircularSplineCoupling
from pyro_flowpack.transforms.circular import wrap_angle

PI = math.pi


def _angles(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return (2 * torch.rand(*shape, dtype=dtype) - 1) * PI


def _circle_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The distance between angles along the circle."""
    return wrap_angle(a - b).abs()


def _perturbed(flow, scale: float, seed: int = 0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow.double().eval()


def _von_mises_torus(n: int) -> torch.Tensor:
    """Correlated angles on the 2-torus: a von Mises angle and a second one around a
    sine of it."""
    first = torch.distributions.VonMises(torch.tensor(2.5), torch.tensor(4.0)).sample((n,))
    second = torch.distributions.VonMises(torch.tensor(-2.8), torch.tensor(2.0)).sample((n,))
    return wrap_angle(torch.stack([first, second + 0.8 * torch.sin(first)], dim=-1)).double()


@pytest.fixture(scope="module")
def trained_torus() -> pf.Flow:
    """A CircularNSF on the 2-torus fitted for 80 steps to data with mass on both seams."""
    torch.manual_seed(0)
    flow = pf.flows.CircularNSF(2, transforms=2, hidden=(16, 16), bins=6).double()
    optimizer = torch.optim.Adam(flow.parameters(), lr=2e-2)
    for _ in range(80):
        loss = -flow().log_prob(_von_mises_torus(128)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return flow.eval()


# wrap_angle ------------------------------------------------------------------------------
def test_wrap_angle_returns_angles_in_range_exactly_and_others_modulo_2pi():
    torch.manual_seed(0)
    inside = _angles(1000)
    assert torch.equal(wrap_angle(inside), inside)
    tiny = torch.tensor([1e-30, -1e-30, 0.0], dtype=torch.float64)
    assert torch.equal(wrap_angle(tiny), tiny)
    k = torch.randint(-5, 6, (1000,), dtype=torch.float64)
    assert torch.allclose(wrap_angle(inside + 2 * PI * k), inside, rtol=0, atol=1e-13)
    assert wrap_angle(torch.tensor(PI, dtype=torch.float64)).item() == -PI


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_wrap_angle_lands_in_the_half_open_range_even_where_rounding_gives_pi(dtype):
    eps = torch.finfo(dtype).eps
    x = torch.tensor([-eps, -1e-30, PI, -PI, 3 * PI, -3 * PI, 2 * PI - eps, 1e6, -1e6], dtype=dtype)
    y = wrap_angle(x)
    assert bool(((y >= -PI) & (y < PI)).all()), y


# The circular spline ----------------------------------------------------------------------------
def test_circular_spline_declares_its_parameter_shapes():
    tau = CircularRationalQuadraticSpline(bins=5)
    assert tau.shapes == {"widths": (5,), "heights": (5,), "derivatives": (5,), "rotation": ()}
    assert tau.params == 16
    parts = tau.split(torch.zeros(3, 2, 16))
    assert parts["rotation"].shape == (3, 2) and parts["derivatives"].shape == (3, 2, 5)


@pytest.mark.parametrize("bins", [0, -1, 2.5, True, "8"], ids=repr)
def test_circular_spline_rejects_bad_bins(bins):
    with pytest.raises(ValueError, match="CircularRationalQuadraticSpline: bins must be an int >= 1"):
        CircularRationalQuadraticSpline(bins)


@pytest.mark.parametrize("features", [1, 4])
def test_circular_spline_is_the_identity_at_zero_parameters_within_1e12(features):
    tau = CircularRationalQuadraticSpline(bins=6)
    x = torch.cat([_angles(256, features), torch.full((1, features), -PI, dtype=torch.float64)])
    theta = torch.zeros(features, tau.params, dtype=torch.float64)
    for direction in (tau.forward, tau.inverse):
        y, log_d = direction(x, theta)
        assert torch.allclose(y, x, rtol=0, atol=1e-12)
        assert torch.allclose(log_d, torch.zeros_like(log_d), rtol=0, atol=1e-12)


def _theta(tau, features: int, scale: float = 1.5, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return scale * torch.randn(features, tau.params, dtype=torch.float64)


SEAM = torch.tensor([-PI, -PI + 1e-12, PI - 1e-12, -PI + 1e-3, PI - 1e-3], dtype=torch.float64)


@pytest.mark.parametrize("features", [1, 4])
def test_circular_spline_round_trip_float64_within_1e10_including_the_seam(features):
    tau = CircularRationalQuadraticSpline(bins=6)
    theta = _theta(tau, features)
    x = torch.cat([_angles(512, features), SEAM[:, None].expand(-1, features)])
    y, log_d = tau.forward(x, theta)
    assert bool(((y >= -PI) & (y < PI)).all())
    x2, log_d2 = tau.inverse(y, theta)
    assert torch.allclose(_circle_distance(x2, x), torch.zeros_like(x), rtol=0, atol=1e-10)
    assert torch.allclose(log_d2, log_d, rtol=0, atol=1e-9)
    assert bool(((x2 >= -PI) & (x2 < PI)).all())


def test_circular_spline_round_trip_float32_within_1e4_on_minus_3p1_to_3p1():
    tau = CircularRationalQuadraticSpline(bins=8)
    theta = _theta(tau, 5, scale=1.0).float()
    x = torch.linspace(-3.1, 3.1, 5 * 256).reshape(256, 5)
    y, _ = tau.forward(x, theta)
    x2, _ = tau.inverse(y, theta)
    assert torch.allclose(x2, x, rtol=0, atol=1e-4)


def test_soft_clamped_parameters_keep_float32_within_1e2_of_float64_for_raw_parameters_of_1e3():
    """Raw parameters of size 1e3 (a diverging network) still give bins within a ratio of
    100 and knot derivatives within (1e-3, 1e3): the float32 map is within 1e-3 of the
    float64 one, its log-derivative within 1e-2, and tau(tau^-1(y)) within 1e-3 of y (float32
    resolution of x times slopes up to e^6.5; the base side itself is ill-conditioned
    where the map is nearly flat)."""
    tau = CircularRationalQuadraticSpline(bins=8)
    theta = 1e3 * torch.randn(5, tau.params, generator=torch.Generator().manual_seed(0))
    x = torch.linspace(-3.1, 3.1, 5 * 256).reshape(256, 5)
    y, log_d = tau.forward(x, theta)
    y64, log_d64 = tau.forward(x.double(), theta.double())
    assert torch.isfinite(log_d).all()
    assert bool((_circle_distance(y.double(), y64) <= 1e-3).all())
    assert torch.allclose(log_d.double(), log_d64, rtol=0, atol=1e-2)
    y2, _ = tau.forward(tau.inverse(y, theta)[0], theta)
    assert bool((_circle_distance(y2, y) <= 1e-3).all())


def test_circular_spline_log_derivative_equals_autograd_per_point_within_1e10():
    tau = CircularRationalQuadraticSpline(bins=6)
    theta = _theta(tau, 3)
    x = torch.cat([_angles(64, 3), SEAM[1:, None].expand(-1, 3)]).requires_grad_(True)
    y, log_d = tau.forward(x, theta)
    (grad,) = torch.autograd.grad(y.sum(), x)  # elementwise: the sum's gradient is the diagonal
    assert torch.allclose(grad.log(), log_d, rtol=0, atol=1e-10)


def test_circular_spline_reads_inputs_modulo_2pi_within_1e10():
    tau = CircularRationalQuadraticSpline(bins=6)
    theta = _theta(tau, 3)
    x = _angles(128, 3)
    y, log_d = tau.forward(x, theta)
    for k in (-3, -1, 1, 2):
        yk, log_dk = tau.forward(x + 2 * PI * k, theta)
        assert torch.allclose(_circle_distance(yk, y), torch.zeros_like(y), rtol=0, atol=1e-10)
        assert torch.allclose(log_dk, log_d, rtol=0, atol=1e-9)
        xk, _ = tau.inverse(y + 2 * PI * k, theta)
        assert torch.allclose(_circle_distance(xk, x), torch.zeros_like(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("eps", [1e-2, 1e-4, 1e-6])
def test_circular_spline_is_continuous_with_its_derivative_across_the_seam_within_50_eps(eps):
    """Per feature: the images of -pi + eps and pi - eps are 2 eps / s' apart along the
    circle, and their log-derivatives differ by at most 50 eps (Lipschitz), for raw
    parameters of scale 1.5; and at -pi itself the log-derivative is the seam's."""
    tau = CircularRationalQuadraticSpline(bins=6)
    theta = _theta(tau, 8)
    low, high = torch.full((8,), -PI + eps, dtype=torch.float64), torch.full((8,), PI - eps, dtype=torch.float64)
    (y_low, d_low), (y_high, d_high) = tau.forward(low, theta), tau.forward(high, theta)
    assert bool(((d_low - d_high).abs() <= 50 * eps).all()), (d_low - d_high).abs()
    assert bool((_circle_distance(y_low, y_high) <= 2 * eps * d_low.exp() * (1 + 50 * eps)).all())
    _, d_seam = tau.forward(torch.full((8,), -PI, dtype=torch.float64), theta)
    assert bool(((d_seam - d_low).abs() <= 50 * eps).all())


def test_circular_spline_maps_the_circle_onto_itself_once():
    """On a sorted grid of the circle the images increase but for one jump of -2 pi (at
    most): the map preserves the circle's order and winds once."""
    tau = CircularRationalQuadraticSpline(bins=6)
    theta = _theta(tau, 6)
    grid = torch.linspace(-PI, PI, 4097, dtype=torch.float64)[:-1, None].expand(-1, 6)
    y, _ = tau.forward(grid, theta)
    steps = y.diff(dim=0)
    jumps = steps < 0
    assert bool((jumps.sum(0) <= 1).all())
    assert torch.allclose(steps[jumps], torch.full_like(steps[jumps], -2 * PI), rtol=0, atol=0.01)
    # the steps (a jump counted as +2 pi - 2 pi) and the closing step add up to one turn
    winding = torch.where(jumps, steps + 2 * PI, steps).sum(0) + wrap_angle(y[0] - y[-1])
    assert torch.allclose(winding, torch.full_like(winding, 2 * PI), rtol=0, atol=1e-9)


# The coupling layer --------------------------------------------------------------------------
def test_coupling_conditioner_reads_cos_and_sin_of_the_pass_through_angles():
    layer = CircularSplineCoupling(5, context=2, hidden=(8,), bins=4)
    assert isinstance(layer.conditioner, MLP)
    assert layer.conditioner[0].in_features == 2 * 3 + 2  # half: 3 pass through
    assert layer.conditioner[-1].out_features == 2 * (3 * 4 + 1)


def test_one_feature_coupling_transforms_it_from_constants_or_the_context():
    alone = CircularSplineCoupling(1, bins=4)
    assert alone.mask.tolist() == [False] and isinstance(alone.conditioner, Constant)
    conditional = CircularSplineCoupling(1, context=3, hidden=(8,), bins=4)
    assert isinstance(conditional.conditioner, MLP) and conditional.conditioner[0].in_features == 3


def _perturbed_layer(features: int, context: int = 0, seed: int = 0) -> CircularSplineCoupling:
    torch.manual_seed(seed)
    layer = CircularSplineCoupling(features, context=context, hidden=(16,), bins=6).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("features", [1, 5])
def test_coupling_starts_at_the_identity(features):
    layer = CircularSplineCoupling(features, hidden=(8,), bins=4).double()
    x = _angles(64, features)
    y, ladj = layer.call_and_ladj(x)
    assert torch.allclose(y, x, rtol=0, atol=1e-12) and torch.allclose(ladj, torch.zeros(64, dtype=torch.float64))


@pytest.mark.parametrize("features", [1, 5])
def test_coupling_reads_inputs_modulo_2pi_and_outputs_angles_in_range(features):
    layer = _perturbed_layer(features)
    torch.manual_seed(1)
    x = _angles(128, features)
    shift = 2 * PI * torch.randint(-3, 4, (128, features), dtype=torch.float64)
    y, ladj = layer.call_and_ladj(x)
    y_shifted, ladj_shifted = layer.call_and_ladj(x + shift)
    for out in (y, y_shifted):
        assert bool(((out >= -PI) & (out < PI)).all())
    assert torch.allclose(_circle_distance(y_shifted, y), torch.zeros_like(y), rtol=0, atol=1e-10)
    assert torch.allclose(ladj_shifted, ladj, rtol=0, atol=1e-9)
    x_back, _ = layer.inverse_and_ladj(y_shifted + shift)
    assert torch.allclose(_circle_distance(x_back, x), torch.zeros_like(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("eps", [1e-3, 1e-5])
def test_coupling_parameters_are_continuous_across_the_seam_of_a_pass_through_angle(eps):
    """Per pass-through feature and per point: moving it from pi - eps to -pi + eps (2 eps
    along the circle) changes the transformed outputs and log-determinant by O(eps)."""
    layer = _perturbed_layer(5)
    torch.manual_seed(2)
    x = _angles(64, 5)
    for i in layer.index_a.tolist():
        low, high = x.clone(), x.clone()
        low[:, i], high[:, i] = -PI + eps, PI - eps
        (y_low, l_low), (y_high, l_high) = layer.call_and_ladj(low), layer.call_and_ladj(high)
        b = layer.index_b
        assert bool((_circle_distance(y_low[:, b], y_high[:, b]) <= 100 * eps).all()), i
        assert bool(((l_low - l_high).abs() <= 100 * eps).all()), i


# CircularNSF ---------------------------------------------------------------------------------------------------
def test_circular_nsf_keeps_its_uniform_base_as_buffers_that_move_with_the_flow():
    flow = pf.flows.CircularNSF(3, transforms=2, hidden=(8,), bins=4)
    base = flow.base()
    assert isinstance(base, Independent) and isinstance(base.base_dist, Uniform)
    assert {"base_low", "base_high"} <= set(flow.state_dict())
    assert torch.allclose(base.base_dist.low, torch.full((3,), -PI)) and torch.allclose(base.base_dist.high,
                                                                                          torch.full((3,), PI))
    flow = flow.double()
    assert flow.base().base_dist.low.dtype == torch.float64
    assert flow().log_prob(torch.zeros(3, dtype=torch.float64)).item() == pytest.approx(-3 * math.log(2 * PI), abs=1e-6)


@pytest.mark.parametrize("make, message", [
    (lambda: pf.flows.CircularNSF(0), "CircularNSF: features must be an int >= 1, got 0"),
    (lambda: pf.flows.CircularNSF(2, transforms=0), "transforms .*must be an int >= 1, got 0"),
    (lambda: pf.flows.CircularNSF(2, bins=0), "bins must be an int >= 1, got 0"),
    (lambda: CircularSplineCoupling(2.0), "CircularSplineCoupling: features must be an int >= 1"),
    (lambda: CircularSplineCoupling(2, context=-1), "CircularSplineCoupling: context must be an int >= 0"),
    (lambda: CircularSplineCoupling(3, mask="checkerboard"), "mask must be 'half', 'alternating'"),
], ids=["features", "transforms", "bins", "coupling-features", "coupling-context", "coupling-mask"])
def test_bad_circular_arguments_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("features", [1, 3])
def test_circular_nsf_samples_lie_in_the_torus_and_score_finitely(features, dtype):
    flow = _perturbed(pf.flows.CircularNSF(features, transforms=3, hidden=(16,), bins=6), 0.5).to(dtype)
    torch.manual_seed(3)
    samples, log_p = flow().rsample_and_log_prob((4096,))
    assert samples.dtype == dtype
    assert bool(((samples >= -PI) & (samples < PI)).all())
    assert torch.isfinite(log_p).all() and torch.isfinite(flow().log_prob(samples.clone())).all()


def test_circular_nsf_density_is_periodic_in_each_angle_within_1e9(trained_torus):
    torch.manual_seed(4)
    x = _angles(256, 2)
    log_p = trained_torus().log_prob(x)
    for i in range(2):
        for k in (-2, 1):
            shifted = x.clone()
            shifted[:, i] += 2 * PI * k
            assert torch.allclose(trained_torus().log_prob(shifted), log_p, rtol=0, atol=1e-9)


def test_circular_nsf_density_integrates_to_one_in_1d_within_1e6():
    """A perturbed 1-angle CircularNSF on 8192 midpoints of [-pi, pi)."""
    flow = _perturbed(pf.flows.CircularNSF(1, transforms=3, hidden=(16,), bins=6), 0.5)
    n = 8192
    x = -PI + 2 * PI * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    with torch.no_grad():
        density = flow().log_prob(x.unsqueeze(-1)).exp()
    assert density.max() / density.min() > 2  # far from uniform
    assert abs(density.sum().item() * 2 * PI / n - 1) < 1e-6


def test_trained_torus_density_integrates_to_one_in_2d_within_1e4(trained_torus):
    """The trained 2-torus flow on 256 x 256 midpoints of [-pi, pi)^2 (the midpoint rule
    on a periodic, piecewise smooth density)."""
    n = 256
    t = -PI + 2 * PI * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), dim=-1).reshape(-1, 2)
    with torch.no_grad():
        density = trained_torus().log_prob(grid).exp()
    assert density.max() / density.min() > 10  # a trained, far from uniform density
    assert abs(density.sum().item() * (2 * PI / n) ** 2 - 1) < 1e-4


@pytest.mark.parametrize("eps", [1e-2, 1e-3, 1e-4, 1e-5])
def test_trained_torus_density_is_continuous_across_each_seam_within_30_eps(trained_torus, eps):
    """Per feature and per point: log p at angle i = -pi + eps and at pi - eps (2 eps apart
    along the circle, the other angle anywhere) differ by at most 30 eps, for a flow
    trained on data with mass on both seams (the largest gap is about 12 eps: the
    log-density's slope across the seam is up to about 6)."""
    torch.manual_seed(5)
    other = _angles(256)
    for i in range(2):
        low, high = torch.stack([other, other], dim=-1), torch.stack([other, other], dim=-1)
        low[:, i], high[:, i] = -PI + eps, PI - eps
        with torch.no_grad():
            gap = (trained_torus().log_prob(low) - trained_torus().log_prob(high)).abs()
        assert bool((gap <= 30 * eps).all()), f"angle {i}: largest gap {gap.max():.3g}"


def test_conditional_circular_nsf_is_a_density_for_each_context_within_1e5():
    """Per context, on 65536 midpoints (the densities peak at about 5)."""
    flow = _perturbed(pf.flows.CircularNSF(1, context=2, transforms=2, hidden=(16,), bins=6), 0.5)
    n = 65536
    x = -PI + 2 * PI * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    torch.manual_seed(6)
    for c in torch.randn(3, 2, dtype=torch.float64):
        with torch.no_grad():
            density = flow(c).log_prob(x.unsqueeze(-1)).exp()
        assert density.max() > 2  # far from uniform (1 / 2 pi)
        assert abs(density.sum().item() * 2 * PI / n - 1) < 1e-5
