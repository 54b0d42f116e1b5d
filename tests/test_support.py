"""Support layers (Bounded, Positive, Support) and parse_support: the specification.

A flow ending in a support layer is a density on the support: it integrates to one there
(by quadrature, to a stated tolerance), it is zero outside and on the boundary
(``log_prob`` is -inf per point, never NaN, with torch's validation off), values outside
the codomain raise a ValueError under validation, samples lie strictly inside, and the
maps and log-determinants are torch's ``biject_to`` maps, exact and finite in float32 for
any finite input.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch.distributions import Distribution, TransformedDistribution, biject_to, constraints

import pyro_flowpack as pf
from pyro_flowpack.transforms import Bounded, Positive, Support, parse_support

INF = math.inf
# one support of each kind: real, positive, an interval, the half-lines (a, inf) and (-inf, b)
KINDS = {"real": "real", "positive": "positive", "interval": (-1.0, 2.0), "lower": (-1.0, INF), "upper": (-INF, 2.0)}
MIXED = list(KINDS.values())


@contextlib.contextmanager
def validation(enabled: bool):
    """Torch's distribution validation switched on or off, and restored afterwards."""
    before = Distribution._validate_args
    Distribution.set_default_validate_args(enabled)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(before)


def _perturbed(flow: pf.Flow, scale: float, seed: int = 0) -> pf.Flow:
    """The flow in float64 with every parameter moved away from the identity."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow.double().eval()


def _ending_in(inner: pf.Flow, support: Support) -> pf.Flow:
    """A flow whose layers are those of ``inner`` followed by the support layer."""
    return pf.Flow([*inner.transform.parts, support]).double()


def _midpoints(n: int, low: float, high: float) -> tuple[torch.Tensor, float]:
    h = (high - low) / n
    return low + h * (torch.arange(n, dtype=torch.float64) + 0.5), h


def _grid(spec, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    r"""Midpoints ``y`` covering one support, with ``dy/dv`` and the step in ``v``: the
    interval directly, a half-line through ``y = a + exp(sinh v)`` (which resolves both
    ends, y -> a and y -> inf, on |v| < 4, i.e. |log(y - a)| < 27), the line directly."""
    low, high = {"real": (-INF, INF), "positive": (0.0, INF)}.get(spec, spec)
    if math.isfinite(low) and math.isfinite(high):
        y, h = _midpoints(n, low, high)
        return y, torch.ones_like(y), h
    if math.isinf(low) and math.isinf(high):
        y, h = _midpoints(n, -30.0, 30.0)
        return y, torch.ones_like(y), h
    v, h = _midpoints(n, -4.0, 4.0)
    distance = torch.exp(torch.sinh(v))
    y = low + distance if math.isfinite(low) else high - distance
    return y, distance * torch.cosh(v), h


# parse_support -------------------------------------------------------------------------
def test_parse_support_reads_names_intervals_and_open_sides():
    assert parse_support("real,positive,0:1") == ["real", "positive", (0.0, 1.0)]
    assert parse_support(" real , -2.5:1e3 ,0:,:5, -inf:inf, 0:inf") == [
        "real", (-2.5, 1000.0), "positive", (-INF, 5.0), "real", "positive"]


def test_parse_support_broadcasts_one_entry_and_checks_the_number_of_columns():
    assert parse_support("0:1", features=3) == [(0.0, 1.0)] * 3
    assert parse_support("real,positive", features=2) == ["real", "positive"]
    with pytest.raises(ValueError, match=r"expects 1 or 3 entries \(one per column\), got 2"):
        parse_support("real,positive", features=3)


@pytest.mark.parametrize("text, message", [
    ("", "comma-separated spec"),
    ("   ", "comma-separated spec"),
    ("real,,positive", r"column 1 \(''\) must be 'real', 'positive' or 'low:high'"),
    ("real,foo", r"column 1 \('foo'\) must be 'real', 'positive' or 'low:high'"),
    ("Real", r"column 0 \('Real'\)"),
    ("0:1:2", r"column 0 \('0:1:2'\) must be"),
    ("0:b", r"column 0 \('0:b'\): 'b' is not a number"),
    ("1:0", r"column 0 \('1:0'\) must have low < high, got \(1, 0\)"),
    ("1:1", "must have low < high"),
    ("inf:", "must have low < high"),
    ("nan:1", "must be a number"),
], ids=repr)
def test_parse_support_rejects_bad_specs_with_the_column_and_the_expected_form(text, message):
    with pytest.raises(ValueError, match=message):
        parse_support(text)


def test_parse_support_rejects_a_non_string():
    with pytest.raises(ValueError, match="comma-separated spec"):
        parse_support(["real"])


# Construction ------------------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: Support([]), "non-empty list of supports"),
    (lambda: Support("real,positive"), "use parse_support for text"),
    (lambda: Support(["reals"]), "feature 0 must be 'real', 'positive' or a pair"),
    (lambda: Support(["real", (1.0, 0.0)]), r"feature 1 must have low < high, got \(1, 0\)"),
    (lambda: Support([(0.0, 1.0, 2.0)]), "must be 'real', 'positive' or a pair"),
    (lambda: Support([("0", 1.0)]), "low must be a number"),
    (lambda: Support([(0.0, math.nan)]), "high must be a number"),
    (lambda: Support([(True, 2.0)]), "low must be a number"),
    (lambda: Bounded(2, 1.0, 0.0), r"low < high for every feature, got \(1, 0\) for feature 0"),
    (lambda: Bounded(2, torch.tensor([0.0, 0.0, 0.0]), 1.0), r"low to be a number or a tensor of shape \(2,\)"),
    (lambda: Bounded(2, 0.0, INF), "finite bounds .* use Support for half-lines"),
    (lambda: Bounded(2, "0", 1.0), r"low to be a number or a tensor of shape \(2,\), got '0'"),
    (lambda: Bounded(2, 0.0, True), r"high to be a number or a tensor of shape \(2,\), got True"),
    (lambda: Bounded(0), "Bounded: features must be an int >= 1, got 0"),
    (lambda: Positive(0), "Positive: features must be an int >= 1, got 0"),
    (lambda: Positive(True), "Positive: features must be an int >= 1, got True"),
], ids=[
    "empty", "text", "unknown-name", "low>=high", "triple", "string-bound", "nan-bound", "bool-bound",
    "bounded-low>=high", "bounded-shape", "bounded-infinite", "bounded-string", "bounded-bool", "bounded-features",
    "positive-zero", "positive-bool",
])
def test_bad_specs_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_supports_read_back_by_name_and_in_the_text_form():
    layer = Support(parse_support("real,0:,0:1,-1:,:2"))
    assert layer.supports == ["real", "positive", (0.0, 1.0), (-1.0, INF), (-INF, 2.0)]
    assert "supports='real,positive,0:1,-1:,:2'" in repr(layer)
    assert parse_support(repr(layer).split("'")[1]) == layer.supports
    assert Bounded(2, 0.0, torch.tensor([1.0, 3.0])).supports == [(0.0, 1.0), (0.0, 3.0)]
    assert Positive(3).supports == ["positive"] * 3


def test_support_layers_are_unconditional_without_parameters():
    for layer in (Support(MIXED), Bounded(2), Positive(2)):
        assert list(layer.parameters()) == [] and layer.context_features == 0
        assert layer.condition(None) is layer


# Torch's constraints and maps -------------------------------------------------------------------------
def test_codomain_is_torchs_constraint_of_the_support():
    bounded = Bounded(2, torch.tensor([0.0, -1.0]), torch.tensor([1.0, 3.0])).codomain
    assert isinstance(bounded, constraints.independent) and bounded.reinterpreted_batch_ndims == 1
    assert isinstance(bounded.base_constraint, constraints.interval)
    assert bounded.base_constraint.lower_bound.tolist() == [0.0, -1.0]
    assert bounded.base_constraint.upper_bound.tolist() == [1.0, 3.0]
    assert Positive(3).codomain.base_constraint is constraints.positive
    assert Support(["real", "real"]).codomain.base_constraint is constraints.real
    assert isinstance(Support([(1.0, INF)] * 2).codomain.base_constraint, constraints.greater_than)
    assert isinstance(Support([(-INF, 1.0)] * 2).codomain.base_constraint, constraints.less_than)
    mixed = Support(MIXED).codomain
    assert isinstance(mixed, constraints.stack) and mixed.event_dim == 1
    inside = torch.tensor([-7.0, 0.5, 1.9, -0.5, 1.5])
    assert bool(mixed.check(inside).all())
    for i, value in enumerate([math.nan, 0.0, 2.5, -1.0, 2.0]):  # each feature off its support
        outside = inside.clone()
        outside[i] = value
        assert mixed.check(outside).tolist() == [j != i for j in range(5)]  # torch's stack: per feature


@pytest.mark.parametrize("specs", [[s] for s in KINDS.values()] + [MIXED, [(0.0, 1.0), (-3.0, 5.0), (2.0, 2.5)]],
                         ids=[*KINDS, "mixed", "intervals"])
def test_maps_and_log_determinants_are_biject_to_of_the_codomain_within_1e12(specs):
    """Per feature and per point, in float64, at one feature and at several."""
    layer = Support(specs).double()
    torch.manual_seed(0)
    x = 3 * torch.randn(64, len(specs), dtype=torch.float64)
    reference = biject_to(layer.codomain)
    y, ladj = layer.call_and_ladj(x)
    assert torch.allclose(y, reference(x), rtol=1e-12, atol=1e-12)
    expected = reference.log_abs_det_jacobian(x, reference(x))
    if expected.dim() == 2:  # torch's stack transform: per feature
        expected = expected.sum(-1)
    assert torch.allclose(ladj, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("specs", [[s] for s in KINDS.values()] + [MIXED], ids=[*KINDS, "mixed"])
def test_round_trip_and_log_determinants_agree_both_ways_float64_within_1e12(specs):
    layer = Support(specs).double()
    torch.manual_seed(1)
    x = (10 * torch.rand(256, len(specs), dtype=torch.float64) - 5)  # |x| < 5: y resolves x to 1e-13
    y, ladj = layer.call_and_ladj(x)
    x2, ladj2 = layer.inverse_and_ladj(y.clone())
    assert torch.allclose(x2, x, rtol=0, atol=1e-12)
    assert torch.allclose(ladj2, ladj, rtol=0, atol=1e-12)


@pytest.mark.parametrize("specs", [[s] for s in KINDS.values()] + [MIXED], ids=[*KINDS, "mixed"])
def test_log_determinant_equals_autograd_per_point_within_1e10(specs):
    layer = Support(specs).double()
    torch.manual_seed(2)
    for x in 2 * torch.randn(8, len(specs), dtype=torch.float64):
        jacobian = torch.autograd.functional.jacobian(lambda v: layer.call_and_ladj(v)[0], x)
        assert torch.allclose(jacobian, torch.diag(jacobian.diagonal()), rtol=0, atol=0)  # elementwise
        expected = jacobian.diagonal().abs().log().sum()
        assert torch.allclose(layer.call_and_ladj(x)[1], expected, rtol=0, atol=1e-10)


def _exact_log_derivative(spec, x: torch.Tensor) -> torch.Tensor:
    """log |f'(x)| per feature in float64, from the formulas in the support module's docstring."""
    low, high = {"real": (-INF, INF), "positive": (0.0, INF)}.get(spec, spec)
    if math.isinf(low) and math.isinf(high):
        return torch.zeros_like(x)
    if math.isinf(low) or math.isinf(high):
        return x
    return math.log(high - low) - torch.nn.functional.softplus(-x) - torch.nn.functional.softplus(x)


@pytest.mark.parametrize("spec", KINDS.values(), ids=list(KINDS))
def test_float32_log_determinant_is_finite_and_exact_for_large_inputs_within_1e6_relative(spec):
    """No overflow: at |x| up to 1e30 the float32 log-determinant is finite and within a
    relative 1e-6 of the exact float64 value, and y is finite and strictly inside."""
    layer = Support([spec] * 8)
    x = torch.tensor([-1e30, -1e4, -100.0, -20.0, 20.0, 100.0, 1e4, 1e30])
    y, ladj = layer.call_and_ladj(x.unsqueeze(-1).expand(8, 8).contiguous())
    exact = _exact_log_derivative(spec, x.double()) * 8
    assert torch.isfinite(ladj).all() and torch.isfinite(y).all()
    assert torch.allclose(ladj.double(), exact, rtol=1e-6, atol=1e-6)
    if spec != "real":
        low, high = layer.low, layer.high
        assert bool(((y > low) & (y < high)).all())


# Samples ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_samples_lie_strictly_inside_the_support_and_score_finitely(dtype):
    inner = _perturbed(pf.flows.RealNVP(5, transforms=2, hidden=(8, 8)), 0.3)
    flow = _ending_in(inner, Support(MIXED)).to(dtype)
    torch.manual_seed(3)
    samples = flow().sample((4096,))
    low, high = flow.transform.parts[-1].low, flow.transform.parts[-1].high
    assert bool(((samples > low) & (samples < high)).all())
    with validation(True):
        assert torch.isfinite(flow().log_prob(samples)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_far_tail_inputs_map_strictly_inside_and_score_finitely(dtype):
    """Where sigma(x) or exp(x) rounds to a bound (|x| >= 20 in float32) or overflows, the
    sample is clamped to the nearest representable value inside the support."""
    layer = Support(MIXED).to(dtype)
    x = torch.tensor([-1e4, -800.0, -40.0, 40.0, 800.0, 1e4], dtype=dtype).unsqueeze(-1).expand(6, 5)
    y, _ = layer.call_and_ladj(x.contiguous())
    inner = y[:, 1:]  # the real feature is the identity
    assert bool(((inner > layer.low[1:]) & (inner < layer.high[1:])).all())
    assert bool(torch.isfinite(y).all())
    _, ladj = layer.inverse_and_ladj(y.clone())
    assert torch.isfinite(ladj).all()


# Zero density outside the support ------------------------------------------------------------------------------
def _off_support_rows() -> tuple[torch.Tensor, list[str]]:
    """Rows of MIXED values each with one feature off its open support (below, above or on
    a bound), after one row inside."""
    inside = [0.3, 1.5, 0.5, 0.0, 1.0]
    rows, names = [inside], ["inside"]
    off = {1: [-1.0, 0.0], 2: [-1.5, -1.0, 2.0, 3.0], 3: [-2.0, -1.0], 4: [2.0, 3.0]}
    for i, values in off.items():
        for v in values:
            row = list(inside)
            row[i] = v
            rows.append(row)
            names.append(f"feature {i} at {v}")
    return torch.tensor(rows, dtype=torch.float64), names


def test_log_prob_is_minus_infinity_outside_and_on_the_boundary_per_point_without_validation():
    inner = _perturbed(pf.flows.NSF(5, transforms=2, hidden=(8, 8), bins=4), 0.3)
    flow = _ending_in(inner, Support(MIXED))
    y, names = _off_support_rows()
    with validation(False):
        log_p = flow().log_prob(y)
        reference = TransformedDistribution(flow.base(), list(flow.transform.parts)).log_prob(y)
    assert torch.isfinite(log_p[0]), names[0]
    for value, torch_value, name in zip(log_p[1:], reference[1:], names[1:]):
        assert value.item() == -INF, name
        assert torch_value.item() == -INF, f"torch TransformedDistribution, {name}"
    assert torch.allclose(reference[0], log_p[0], rtol=0, atol=1e-12)


def test_gradients_stay_finite_when_a_batch_holds_points_outside_the_support():
    """The placeholder keeps NaN out of the backward pass too (the off-support rows still
    pass their other features through the flow, so their gradients are finite, not zero)."""
    inner = _perturbed(pf.flows.RealNVP(5, transforms=2, hidden=(8, 8)), 0.3)
    flow = _ending_in(inner, Support(MIXED)).train()
    y, _ = _off_support_rows()
    y.requires_grad_(True)
    with validation(False):
        log_p = flow().log_prob(y)
    log_p.sum().backward()
    for name, p in flow.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert torch.isfinite(y.grad).all()


def test_nan_values_give_nan_not_minus_infinity_without_validation():
    flow = _ending_in(_perturbed(pf.flows.RealNVP(5, transforms=1, hidden=(8,)), 0.3), Support(MIXED))
    for i in range(5):
        y = torch.tensor([[0.3, 1.5, 0.5, 0.0, 1.0]], dtype=torch.float64)
        y[0, i] = math.nan
        with validation(False):
            assert torch.isnan(flow().log_prob(y)).all(), i


def test_validation_raises_for_values_outside_the_codomain_as_torch_does():
    """Under validation: a ValueError naming the feature and its support for values off the
    codomain (closed intervals, open half-lines), from the flow as from torch's own
    TransformedDistribution; the end points of an interval are in torch's closed
    interval and score -inf."""
    flow = _ending_in(_perturbed(pf.flows.RealNVP(5, transforms=1, hidden=(8,)), 0.3), Support(MIXED))
    y, names = _off_support_rows()
    layers = list(flow.transform.parts)
    with validation(True):
        for row, name in zip(y[1:], names[1:]):
            i, value = int(name.split()[1]), float(name.split()[-1])
            on_interval_end = i == 2 and value in (-1.0, 2.0)
            if on_interval_end:
                assert flow().log_prob(row).item() == -INF, name
                continue
            support = {1: r"\(0, inf\)", 2: r"\[-1, 2\]", 3: r"\(-1, inf\)", 4: r"\(-inf, 2\)"}[i]
            with pytest.raises(ValueError, match=f"feature {i} must lie in {support}"):
                flow().log_prob(row)
            with pytest.raises(ValueError, match="support"):
                TransformedDistribution(flow.base(), layers, validate_args=True).log_prob(row)


# Normalisation by quadrature --------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", KINDS.values(), ids=list(KINDS))
def test_density_integrates_to_one_in_1d_within_1e6(spec):
    """A perturbed 1-D spline flow ending in the support layer, integrated over the support
    by the midpoint rule on 20000 points (see _grid for the change of variables)."""
    inner = _perturbed(pf.flows.NSF(1, transforms=2, hidden=(16, 16), bins=4), 0.3)
    flow = _ending_in(inner, Support([spec]))
    y, jacobian, h = _grid(spec, 20000)
    with torch.no_grad():
        log_p = flow().log_prob(y.unsqueeze(-1))
    assert abs((log_p.exp() * jacobian).sum().item() * h - 1) < 1e-6


@pytest.mark.parametrize("layer", [lambda: Bounded(1, -1.0, 2.0), lambda: Positive(1)], ids=["Bounded", "Positive"])
def test_bounded_and_positive_layers_integrate_to_one_in_1d_within_1e6(layer):
    inner = _perturbed(pf.flows.RealNVP(1, transforms=2, hidden=(16, 16)), 0.3)
    flow = _ending_in(inner, layer())
    spec = flow.transform.parts[-1].supports[0]
    y, jacobian, h = _grid(spec, 20000)
    with torch.no_grad():
        log_p = flow().log_prob(y.unsqueeze(-1))
    assert abs((log_p.exp() * jacobian).sum().item() * h - 1) < 1e-6


def test_bounded_times_positive_density_integrates_to_one_in_2d_within_1e5():
    """A perturbed 2-D spline flow ending in Support([(-1, 2), "positive"]), on a
    500 x 1000 grid (interval x the half-line's exp-sinh change of variables)."""
    inner = _perturbed(pf.flows.NSF(2, transforms=2, hidden=(8, 8), bins=4), 0.3)
    flow = _ending_in(inner, Support([(-1.0, 2.0), "positive"]))
    y0, j0, h0 = _grid((-1.0, 2.0), 500)
    y1, j1, h1 = _grid("positive", 1000)
    grid = torch.stack(torch.meshgrid(y0, y1, indexing="ij"), dim=-1).reshape(-1, 2)
    jacobian = (j0[:, None] * j1[None, :]).reshape(-1)
    with torch.no_grad():
        log_p = flow().log_prob(grid)
    error = abs((log_p.exp() * jacobian).sum().item() * h0 * h1 - 1)
    assert error < 1e-5
