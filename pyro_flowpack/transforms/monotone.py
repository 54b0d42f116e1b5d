r"""Elementwise monotone maps, the part of a coupling or autoregressive layer that
transforms each feature given parameters computed by a conditioner network.

A monotone map is a strictly increasing bijection :math:`y = \tau(x; \theta)` of
:math:`\mathbb{R}`, applied feature by feature, with ``theta`` of shape
``(..., D, params)`` for ``x`` of shape ``(..., D)``. Each map is written once here and
shared by every layer family: a family is "a conditioner + one of these maps + the shapes
of its parameters". A map declares those shapes in :attr:`MonotoneMap.shapes` (name to
shape per feature); :attr:`MonotoneMap.params` is their total size, which sizes the
conditioner's output, and :meth:`MonotoneMap.split` cuts ``theta`` into the named parts.

Every map is the identity when its parameters are all zero, so layers whose conditioner
ends in a zero-initialised linear layer start at the identity. Both directions return
:math:`\log \partial_x \tau` at the :math:`x`-side point. Maps with a formula for the
inverse set :attr:`MonotoneMap.closed_inverse`; the others (:class:`Bernstein`,
:class:`SumOfSquares`) inherit a generic inverse by bracketed Newton root finding whose
result carries exact gradients, and :class:`Inverted` swaps the two directions of any map
so that the cheap one runs where it is needed most.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_int, check_positive, check_real

__all__ = [
    "MonotoneMap",
    "Inverted",
    "Additive",
    "Affine",
    "SoftBoundedAffine",
    "RationalQuadraticSpline",
    "Bernstein",
    "SumOfSquares",
]


def _soft_clamp(x: Tensor, bound: float) -> Tensor:
    r"""The soft clamp :math:`x / (1 + |x| / b)` into :math:`(-b, b)`, with slope 1 at 0."""
    return x / (1 + x.abs() / bound)


def _check_fraction(value: float, what: str, closed_low: bool) -> float:
    r"""Returns ``value`` as a float in :math:`[0, 1)` (``closed_low``) or :math:`(0, 1)`."""
    number = check_real(value, what)
    if not (0 <= number < 1 if closed_low else 0 < number < 1):
        raise ValueError(f"{what} must be in {'[' if closed_low else '('}0, 1), got {value!r}")
    return number


class MonotoneMap:
    r"""Base class of the elementwise monotone maps :math:`y = \tau(x; \theta)`.

    A subclass declares :attr:`shapes`, the name and shape per feature of each parameter
    (``theta[..., d, :]`` is their concatenation, each flattened, in that order), and
    implements :meth:`forward`. It overrides :meth:`inverse` and sets
    :attr:`closed_inverse` when the inverse has a formula; otherwise the inverse is found
    by the root finder below.

    The default :meth:`inverse` solves :math:`\tau(x; \theta) = y` for every element at
    once. The bracket starts as :math:`[y - 1, y + 1]` and each end that does not hold the
    root moves away geometrically, :math:`y \mp 2^k`, for at most
    :attr:`max_doublings` :math:`= 64` doublings (a ``RuntimeError`` otherwise). Newton
    steps follow, safeguarded by the bracket: a step that leaves the bracket, or is more
    than half the previous step, is replaced by bisection. An element stops when its step
    or its bracket is at most :math:`4 \epsilon (1 + |x|)`, with :math:`\epsilon` the
    machine epsilon of the dtype (about :math:`9 \times 10^{-16}` in float64,
    :math:`5 \times 10^{-7}` in float32), or after :attr:`max_iterations` :math:`= 100`
    iterations, when the last estimate (inside a bracket that holds the root) is returned.
    Non-finite values of :math:`y` raise a ``ValueError``.

    The root :math:`x_0` is found without gradients; the returned
    :math:`x = x_0 - (r - \mathrm{sg}(r)) / \mathrm{sg}(\partial_x \tau(x_0))`, with
    :math:`r = \tau(x_0; \theta) - y` and :math:`\mathrm{sg}` stopping gradients, has the
    value :math:`x_0` and, by the implicit function theorem, the exact first derivatives
    :math:`\partial x / \partial y = 1 / \partial_x \tau` and
    :math:`\partial x / \partial \theta = -\partial_\theta \tau / \partial_x \tau`
    (second derivatives through the solver are not exact).
    """

    #: The name and shape per feature of each parameter, in the order of ``theta``.
    shapes: dict[str, tuple[int, ...]] = {}
    #: Whether :meth:`inverse` is a formula (``False``: the generic root finder).
    closed_inverse: bool = False
    #: The root finder's cap on the doublings of each end of the bracket.
    max_doublings: int = 64
    #: The root finder's cap on Newton or bisection iterations.
    max_iterations: int = 100

    @property
    def params(self) -> int:
        r"""The number of parameters per feature, the total size of :attr:`shapes`."""
        return sum(math.prod(shape) for shape in self.shapes.values())

    def split(self, theta: Tensor) -> dict[str, Tensor]:
        r"""Cuts ``theta`` of shape ``(..., D, params)`` into its named parts, each of shape
        ``(..., D, *shapes[name])``."""
        if theta.dim() < 1 or theta.shape[-1] != self.params:
            raise ValueError(
                f"{self!r} expects parameters of shape (..., D, {self.params}), "
                f"got a tensor of shape {tuple(theta.shape)}"
            )
        sizes = [math.prod(shape) for shape in self.shapes.values()]
        parts = theta.split(sizes, dim=-1)
        return {
            name: part.reshape(part.shape[:-1] + shape)
            for (name, shape), part in zip(self.shapes.items(), parts)
        }

    def forward(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        r"""Returns :math:`y = \tau(x; \theta)` and :math:`\log \partial_x \tau(x; \theta)`."""
        raise NotImplementedError

    def inverse(self, y: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        r"""Returns :math:`x = \tau^{-1}(y; \theta)` and :math:`\log \partial_x \tau(x; \theta)`,
        here by the bracketed root finder of the class docstring."""
        with torch.no_grad():
            x0 = self._solve(y.detach(), theta.detach())
        if not (torch.is_grad_enabled() and (y.requires_grad or theta.requires_grad)):
            return x0, self.forward(x0, theta)[1]
        fx, log_d = self.forward(x0, theta)
        residual = fx - y
        x = x0 - (residual - residual.detach()) / log_d.detach().exp()
        return x, self.forward(x, theta)[1]

    def _solve(self, y: Tensor, theta: Tensor) -> Tensor:
        finite = torch.isfinite(y)
        if not bool(finite.all()):
            raise ValueError(
                f"{self!r}.inverse expects finite values, got {int((~finite).sum())} non-finite (NaN or infinity)"
            )
        shape = torch.broadcast_shapes(y.shape, theta.shape[:-1])
        y, theta = y.expand(shape), theta.expand(*shape, theta.shape[-1])
        tol = 4 * torch.finfo(y.dtype).eps
        # the bracket [y - step_lo, y + step_hi]: each end moves out until it holds the root
        steps = torch.ones((2, *shape), dtype=y.dtype, device=y.device)
        sign = torch.tensor([-1.0, 1.0], dtype=y.dtype, device=y.device).view(2, *[1] * len(shape))
        for _ in range(self.max_doublings + 1):
            ends = y + sign * steps
            f_ends = self.forward(ends, theta)[0]
            outside = torch.stack((f_ends[0] > y, f_ends[1] < y))
            if not bool(outside.any()):
                break
            steps = torch.where(outside, 2 * steps, steps)
        else:
            bad = outside.any(0)
            raise RuntimeError(
                f"{self!r}.inverse could not bracket the root of tau(x) = y for {int(bad.sum())} "
                f"value(s) within {self.max_doublings} doublings of the interval [y - 1, y + 1] (y from "
                f"{y[bad].min().item():.6g} to {y[bad].max().item():.6g}); expected parameters for "
                f"which tau maps R onto R"
            )
        lo, hi = ends.unbind(0)
        x = y.clone()
        step_before = hi - lo
        done = torch.zeros(shape, dtype=torch.bool, device=y.device)
        for _ in range(self.max_iterations):
            fx, log_d = self.forward(x, theta)
            below = fx < y
            lo, hi = torch.where(below, x, lo), torch.where(below, hi, x)
            newton = x - (fx - y) / log_d.exp()
            step = (newton - x).abs()
            use_newton = (newton >= lo) & (newton <= hi) & (2 * step <= step_before)
            new = torch.where(use_newton, newton, (lo + hi) / 2)
            step_before = torch.where(use_newton, step, (hi - lo) / 2)
            scale = tol * (1 + x.abs())
            done = done | ((new - x).abs() <= scale) | (hi - lo <= scale)
            x = torch.where(done, x, new)
            if bool(done.all()):
                break
        return x

    def _broadcast(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        r"""``x`` and ``theta`` expanded to their common batch shape."""
        shape = torch.broadcast_shapes(x.shape, theta.shape[:-1])
        return x.expand(shape), theta.expand(*shape, theta.shape[-1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Inverted(MonotoneMap):
    r"""The map :math:`\tau^{-1}`: its forward is ``monotone.inverse`` and its inverse is
    ``monotone.forward``, with the log-derivative that of :math:`\tau^{-1}` at its own
    :math:`x`-side point,

    .. math:: \log \partial_y \tau^{-1}(y) = -\log \partial_x \tau(\tau^{-1}(y)).

    A builder puts a map whose inverse has no formula (:class:`Bernstein`) in the
    direction where only its closed-form forward runs, say the density direction of a
    masked autoregressive layer. Shapes and parameters are those of ``monotone``.

    Arguments:
        monotone: The monotone map :math:`\tau` to invert.

    Example:
        >>> m = Inverted(Bernstein(degree=4))
        >>> m.closed_inverse, m.params
        (True, 5)
        >>> theta = torch.linspace(-1.0, 1.0, 10).reshape(2, 5)
        >>> x = torch.tensor([-1.0, 7.0])
        >>> y, log_d = m.forward(x, theta)  # Bernstein's inverse: the root finder
        >>> x2, log_d2 = m.inverse(y, theta)  # Bernstein's forward: a formula
        >>> torch.allclose(x2, x, atol=1e-5), torch.allclose(log_d2, log_d, atol=1e-5)
        (True, True)
    """

    closed_inverse = True

    def __init__(self, monotone: MonotoneMap) -> None:
        if not isinstance(monotone, MonotoneMap):
            raise ValueError(f"Inverted: monotone must be a MonotoneMap, got {monotone!r}")
        self.monotone = monotone

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:  # type: ignore[override]
        return self.monotone.shapes

    def split(self, theta: Tensor) -> dict[str, Tensor]:
        return self.monotone.split(theta)

    def forward(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        y, log_d = self.monotone.inverse(x, theta)
        return y, -log_d

    def inverse(self, y: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        x, log_d = self.monotone.forward(y, theta)
        return x, -log_d

    def __repr__(self) -> str:
        return f"Inverted({self.monotone!r})"


class Additive(MonotoneMap):
    r"""The shift :math:`\tau(x; t) = x + t`, volume preserving (NICE).

    References:
        | NICE: Non-linear Independent Components Estimation (Dinh et al., 2014)
        | https://arxiv.org/abs/1410.8516

    Example:
        >>> Additive().forward(torch.tensor([1.0]), torch.tensor([[0.5]]))
        (tensor([1.5000]), tensor([0.]))
    """

    shapes = {"shift": ()}
    closed_inverse = True

    def forward(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        y = x + self.split(theta)["shift"]
        return y, torch.zeros_like(y)

    def inverse(self, y: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        x = y - self.split(theta)["shift"]
        return x, torch.zeros_like(x)


class Affine(MonotoneMap):
    r"""The affine map :math:`\tau(x; t, r) = x \exp(s) + t` with a soft-clamped log-scale

    .. math:: s = b \tanh(r / b),

    so that :math:`|s| < b` and the scale stays within :math:`[e^{-b}, e^{b}]` whatever the
    network outputs (RealNVP).

    Arguments:
        bound: The bound :math:`b` on the log-scale.

    References:
        | Density estimation using Real NVP (Dinh et al., 2017)
        | https://arxiv.org/abs/1605.08803

    Example:
        >>> Affine(bound=3.0).forward(torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]))
        (tensor([2.]), tensor([0.]))
    """

    shapes = {"shift": (), "log_scale": ()}
    closed_inverse = True

    def __init__(self, bound: float = 3.0) -> None:
        self.bound = check_positive(bound, f"{type(self).__name__}: bound")

    def _shift_log_scale(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        parts = self.split(theta)
        return parts["shift"], self.bound * torch.tanh(parts["log_scale"] / self.bound)

    def forward(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(theta)
        y = x * log_scale.exp() + shift
        return y, log_scale.expand_as(y)

    def inverse(self, y: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(theta)
        x = (y - shift) * torch.exp(-log_scale)
        return x, log_scale.expand_as(x)

    def __repr__(self) -> str:
        return f"Affine(bound={self.bound})"


class SoftBoundedAffine(Affine):
    r"""The affine map :math:`\tau(x; t, r) = x \exp(s) + t` with the log-scale
    soft-clamped into an interval :math:`(a, b)`, :math:`a < 0 < b`, that need not be
    symmetric:

    .. math:: s = c + h \tanh\big((r + r_0) / h\big), \quad c = \frac{a + b}{2}, \quad
              h = \frac{b - a}{2}, \quad r_0 = h \, \mathrm{artanh}(-c / h),

    so that a raw output :math:`r = 0` is the identity, as for :class:`Affine`. Guides use
    it to keep a posterior's scales within bounds of their own.

    Arguments:
        low: The lower bound :math:`a < 0` of the log-scale.
        high: The upper bound :math:`b > 0` of the log-scale.

    Example:
        >>> m = SoftBoundedAffine(-1.0, 3.0)
        >>> m
        SoftBoundedAffine(low=-1.0, high=3.0)
        >>> m.forward(torch.tensor([1.0]), torch.zeros(1, 2))
        (tensor([1.]), tensor([0.]))
    """

    def __init__(self, low: float, high: float) -> None:
        low = check_real(low, "SoftBoundedAffine: low")
        high = check_real(high, "SoftBoundedAffine: high")
        if not low < 0:
            raise ValueError(f"SoftBoundedAffine: low must be < 0, got {low!r}")
        if not high > 0:
            raise ValueError(f"SoftBoundedAffine: high must be > 0, got {high!r}")
        super().__init__(max(-low, high))
        self.low, self.high = low, high
        self.center, self.half = (high + low) / 2, (high - low) / 2
        self.offset = self.half * math.atanh(-self.center / self.half)

    def _shift_log_scale(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        parts = self.split(theta)
        raw = parts["log_scale"]
        return parts["shift"], self.center + self.half * torch.tanh((raw + self.offset) / self.half)

    def __repr__(self) -> str:
        return f"SoftBoundedAffine(low={self.low}, high={self.high})"


class RationalQuadraticSpline(MonotoneMap):
    r"""A monotone rational-quadratic spline on :math:`[-B, B]` with :math:`K` bins and
    identity (linear) tails outside (Durkan et al., 2019).

    The parameters are :math:`K` unnormalised widths, :math:`K` unnormalised heights and
    :math:`K - 1` unnormalised interior log-derivatives (boundary derivatives are 1 to
    match the tails). As in zuko, every raw value is soft-clamped,
    :math:`\bar{u} = u / (1 + |u| / A)`, before it is used, so that no bin is flat or
    steep beyond repair whatever the network outputs: widths and heights are
    :math:`w_\min + (1 - K w_\min) \, \mathrm{softmax}(\bar{u})` (times :math:`2B`) with
    :math:`A = \frac{1}{2} \log r_\max`, so two bins differ at most by the ratio
    :math:`r_\max` (before the floor :math:`w_\min`); the interior derivatives are
    :math:`\delta = \exp(\bar{u})` with :math:`A = -\log \delta_\min`, so they lie in
    :math:`(\delta_\min, 1 / \delta_\min)`, a log-parameterisation that changes scale as
    fast as the network's output. In bin :math:`k`, with :math:`\xi = (x - x_k) / w_k` and
    :math:`s_k = h_k / w_k`,

    .. math::
        \tau(x) = y_k + \frac{h_k [s_k \xi^2 + \delta_k \xi (1 - \xi)]}
                             {s_k + (\delta_{k+1} + \delta_k - 2 s_k) \xi (1 - \xi)},

    whose inverse is the root of a quadratic. All-zero parameters give the identity.

    Within a bin the derivative can fall to about :math:`4 s_k^2 / (\delta_k + \delta_{k+1})`,
    and a float32 round trip loses about :math:`2^{-24} |y| / \partial_x \tau` there: the
    clamp on the widths and heights is what keeps the float32 round trip within
    :math:`10^{-4}` for raw parameters of unit scale.

    Arguments:
        bins: The number of bins :math:`K`.
        bound: The half-width :math:`B` of the interval.
        min_width: The smallest bin width and height, as a fraction of :math:`2B / K`.
        min_derivative: The smallest derivative at a knot (its inverse is the largest).
        max_bin_ratio: The largest ratio :math:`r_\max > 1` between the widths (or the
            heights) of two bins, before the floor ``min_width``.

    References:
        | Neural Spline Flows (Durkan et al., 2019)
        | https://arxiv.org/abs/1906.04032

    Example:
        >>> spline = RationalQuadraticSpline(bins=4, bound=3.0)
        >>> spline.shapes
        {'widths': (4,), 'heights': (4,), 'derivatives': (3,)}
        >>> theta = torch.linspace(-2.0, 2.0, 33).reshape(3, spline.params)
        >>> x = torch.tensor([-4.0, 0.5, 2.0])
        >>> y, log_d = spline.forward(x, theta)
        >>> x2, log_d2 = spline.inverse(y, theta)
        >>> torch.allclose(x2, x, atol=1e-5), torch.allclose(log_d2, log_d, atol=1e-5)
        (True, True)
    """

    closed_inverse = True

    def __init__(
        self,
        bins: int = 8,
        bound: float = 5.0,
        min_width: float = 1e-3,
        min_derivative: float = 1e-3,
        max_bin_ratio: float = 100.0,
    ) -> None:
        name = "RationalQuadraticSpline"
        self.bins = check_int(bins, f"{name}: bins")
        self.bound = check_positive(bound, f"{name}: bound")
        min_width = _check_fraction(min_width, f"{name}: min_width", closed_low=True)
        self.min_derivative = _check_fraction(min_derivative, f"{name}: min_derivative", closed_low=False)
        self.max_bin_ratio = check_real(max_bin_ratio, f"{name}: max_bin_ratio")
        if not self.max_bin_ratio > 1:
            raise ValueError(f"{name}: max_bin_ratio must be > 1, got {max_bin_ratio!r}")
        self.min_width = min_width / self.bins
        self._log_bin_bound = math.log(self.max_bin_ratio) / 2
        self._log_derivative_bound = -math.log(self.min_derivative)
        self.shapes = {"widths": (self.bins,), "heights": (self.bins,), "derivatives": (self.bins - 1,)}

    def _knots(self, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        K, B = self.bins, self.bound
        parts = self.split(theta)
        knots = []
        for raw in (parts["widths"], parts["heights"]):
            u = F.softmax(_soft_clamp(raw, self._log_bin_bound), dim=-1)
            u = self.min_width + (1 - self.min_width * K) * u
            u = F.pad(torch.cumsum(u, dim=-1), (1, 0))
            knots.append(2 * B * u - B)
        d = torch.exp(_soft_clamp(parts["derivatives"], self._log_derivative_bound))
        d = F.pad(d, (1, 1), value=1.0)
        return knots[0], knots[1], d

    @staticmethod
    def _bin(knots: Tensor, value: Tensor) -> Tensor:
        index = torch.searchsorted(knots, value.unsqueeze(-1).contiguous()) - 1
        return index.clamp(0, knots.shape[-1] - 2)

    def _gather(self, theta: Tensor, value: Tensor, source: int) -> list[Tensor]:
        """The knots of the bin holding each value (source 0: x side, 1: y side)."""
        xk, yk, dk = self._knots(theta)
        k = self._bin((xk, yk)[source], value)
        k1 = k + 1
        x0, x1 = xk.gather(-1, k), xk.gather(-1, k1)
        y0, y1 = yk.gather(-1, k), yk.gather(-1, k1)
        d0, d1 = dk.gather(-1, k), dk.gather(-1, k1)
        return [t.squeeze(-1) for t in (x0, x1, y0, y1, d0, d1)]

    @staticmethod
    def _log_derivative(xi: Tensor, s: Tensor, d0: Tensor, d1: Tensor, denominator: Tensor) -> Tensor:
        omx = 1 - xi
        numerator = s.square() * (d1 * xi.square() + 2 * s * xi * omx + d0 * omx.square())
        return numerator.log() - 2 * denominator.log()

    def forward(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        x, theta = self._broadcast(x, theta)
        inside = x.abs() < self.bound
        xc = x.clamp(-self.bound, self.bound)
        x0, x1, y0, y1, d0, d1 = self._gather(theta, xc, 0)
        w, h = x1 - x0, y1 - y0
        s = h / w
        xi = ((xc - x0) / w).clamp(0, 1)
        xi1 = xi * (1 - xi)
        denominator = s + (d1 + d0 - 2 * s) * xi1
        y = y0 + h * (s * xi.square() + d0 * xi1) / denominator
        log_d = self._log_derivative(xi, s, d0, d1, denominator)
        return torch.where(inside, y, x), torch.where(inside, log_d, torch.zeros_like(log_d))

    def inverse(self, y: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        y, theta = self._broadcast(y, theta)
        inside = y.abs() < self.bound
        yc = y.clamp(-self.bound, self.bound)
        x0, x1, y0, y1, d0, d1 = self._gather(theta, yc, 1)
        w, h = x1 - x0, y1 - y0
        s = h / w
        dy = yc - y0
        c2 = d1 + d0 - 2 * s
        a = h * (s - d0) + dy * c2
        b = h * d0 - dy * c2
        c = -s * dy
        # the numerically stable root of a xi^2 + b xi + c = 0 in [0, 1]
        discriminant = (b.square() - 4 * a * c).clamp(min=0)
        xi = ((2 * c) / (-b - discriminant.sqrt())).clamp(0, 1)
        x = x0 + xi * w
        denominator = s + c2 * xi * (1 - xi)
        log_d = self._log_derivative(xi, s, d0, d1, denominator)
        return torch.where(inside, x, y), torch.where(inside, log_d, torch.zeros_like(log_d))

    def __repr__(self) -> str:
        return f"RationalQuadraticSpline(bins={self.bins}, bound={self.bound})"


def _de_casteljau(coefficients: Tensor, u: Tensor) -> Tensor:
    r"""The polynomial :math:`\sum_i c_i b_{i,M}(u)` in the Bernstein basis of degree
    :math:`M` (``coefficients`` of shape ``(..., M + 1)``), by repeated convex combinations
    of neighbours: stable on :math:`[0, 1]`, and positive for positive coefficients."""
    u = u.unsqueeze(-1)
    while coefficients.shape[-1] > 1:
        coefficients = torch.lerp(coefficients[..., :-1], coefficients[..., 1:], u)
    return coefficients.squeeze(-1)


class Bernstein(MonotoneMap):
    r"""A monotone Bernstein polynomial of degree :math:`M` on :math:`[-B, B]` with linear
    tails outside (Ramasinghe et al., 2021; zuko's ``BernsteinTransform``).

    With :math:`u = (x + B) / 2B` and the Bernstein basis
    :math:`b_{i,M}(u) = \binom{M}{i} u^i (1 - u)^{M - i}`,

    .. math::
        \tau(x) = t - B + 2B \sum_{i=0}^{M} \beta_i \, b_{i,M}(u), \qquad
        \beta_i = \frac{1}{M} \sum_{j=1}^{i} \sigma_j, \qquad
        \sigma_j = \exp\big(r_j / (1 + |r_j| / L)\big),

    with :math:`L = -\log \delta_\min`: increasing coefficients built from cumulative
    positive increments. Its derivative is itself a Bernstein polynomial,

    .. math:: \partial_x \tau(x) = \sum_{i=0}^{M-1} \sigma_{i+1} \, b_{i,M-1}(u),

    a convex combination of the slopes :math:`\sigma_j`, so it lies between
    :math:`\min_j \sigma_j` and :math:`\max_j \sigma_j`, within
    :math:`(\delta_\min, 1 / \delta_\min)`. Outside :math:`[-B, B]`, :math:`\tau`
    continues along its tangent at :math:`\pm B` (slope :math:`\sigma_1` or
    :math:`\sigma_M`), so it is :math:`C^1` and a bijection of :math:`\mathbb{R}`. Both
    polynomials are evaluated by de Casteljau's algorithm. The parameters are the shift
    :math:`t` and the :math:`M` raw slopes :math:`r_j`; all zero, :math:`\beta_i = i / M`
    and :math:`\tau` is the identity. The inverse is the generic root finder of
    :class:`MonotoneMap` (see :class:`Inverted` for the other direction).

    Arguments:
        degree: The degree :math:`M \geq 1` of the polynomial.
        bound: The half-width :math:`B` of the interval.
        min_derivative: The smallest derivative :math:`\delta_\min \in (0, 1)` (its
            inverse is the largest).

    References:
        | Robust normalizing flows using Bernstein-type polynomials (Ramasinghe et al., 2021)
        | https://arxiv.org/abs/2102.03509

    Example:
        >>> m = Bernstein(degree=4, bound=3.0)
        >>> m.shapes
        {'shift': (), 'slopes': (4,)}
        >>> theta = torch.linspace(-1.0, 1.0, 10).reshape(2, m.params)
        >>> y, log_d = m.forward(torch.tensor([-4.0, 1.0]), theta)
        >>> x, _ = m.inverse(y, theta)
        >>> torch.allclose(x, torch.tensor([-4.0, 1.0]), atol=1e-5)
        True
    """

    def __init__(self, degree: int = 16, bound: float = 5.0, min_derivative: float = 1e-3) -> None:
        self.degree = check_int(degree, "Bernstein: degree")
        self.bound = check_positive(bound, "Bernstein: bound")
        self.min_derivative = _check_fraction(min_derivative, "Bernstein: min_derivative", closed_low=False)
        self._log_slope_bound = -math.log(self.min_derivative)
        self.shapes = {"shift": (), "slopes": (self.degree,)}

    def forward(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        B, M = self.bound, self.degree
        parts = self.split(theta)
        slopes = torch.exp(_soft_clamp(parts["slopes"], self._log_slope_bound))
        beta = F.pad(torch.cumsum(slopes, dim=-1) / M, (1, 0))
        xc = x.clamp(-B, B)
        u = (xc + B) / (2 * B)
        derivative = _de_casteljau(slopes, u)
        y = parts["shift"] - B + 2 * B * _de_casteljau(beta, u) + derivative * (x - xc)
        return y, derivative.log()

    def __repr__(self) -> str:
        return f"Bernstein(degree={self.degree}, bound={self.bound})"


def _gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    r"""The :math:`n` nodes and weights of Gauss-Legendre quadrature on :math:`[0, 1]`
    (Golub-Welsch: the eigenvalues of the Jacobi matrix), exact for polynomials of degree
    at most :math:`2n - 1`."""
    k = torch.arange(1, n, dtype=torch.float64)
    beta = k / torch.sqrt(4 * k.square() - 1)
    nodes, vectors = torch.linalg.eigh(torch.diag(beta, 1) + torch.diag(beta, -1))
    return (nodes + 1) / 2, vectors[0].square()


class SumOfSquares(MonotoneMap):
    r"""A sum-of-squares polynomial map (Jaini et al., 2019; zuko's
    ``SOSPolynomialTransform``): the integral of a positive polynomial, a mean of
    :math:`K` squares of polynomials of degree :math:`L`, on :math:`[-B, B]` with linear
    tails outside.

    With :math:`v = x / B` and :math:`q_k(v) = 1 + \sum_{i=0}^{L} a_{ki} v^i`,

    .. math::
        \partial_x \tau(x) = \epsilon + (1 - \epsilon) \frac{1}{K} \sum_{k=1}^{K} q_k(v)^2,
        \qquad
        \tau(x) = t + \int_0^x \partial_x \tau(x') \, dx',

    a polynomial of degree :math:`2L + 1`. The floor :math:`\epsilon` makes :math:`\tau`
    strictly increasing where every :math:`q_k` vanishes, and all-zero parameters
    (:math:`q_k = 1`, :math:`t = 0`) give the identity. The integral is computed exactly by
    Gauss-Legendre quadrature with :math:`L + 1` nodes from the squares themselves, a sum
    of positive terms: expanding :math:`\sum_k q_k^2` into monomials instead would lose
    digits to cancellation exactly where :math:`\tau` is flat.

    Polynomials of high degree are ill-conditioned on a large domain, so the polynomial
    lives on :math:`[-B, B]` only, where :math:`|v| \le 1` keeps every power
    :math:`|v^i| \le 1`, and :math:`\tau` continues along its tangent at :math:`\pm B`
    outside (:math:`C^1`, a bijection of :math:`\mathbb{R}`). A squashed argument
    (:math:`\tanh x`) would also bound the powers, but the integral would no longer be a
    polynomial, and the slope would vanish in the tails. The inverse is the generic root
    finder of :class:`MonotoneMap` (see :class:`Inverted` for the other direction).

    Arguments:
        polynomials: The number :math:`K` of squared polynomials.
        degree: The degree :math:`L \geq 1` of each polynomial.
        bound: The half-width :math:`B` of the interval.
        min_derivative: The floor :math:`\epsilon \in (0, 1)` on the derivative.

    References:
        | Sum-of-Squares Polynomial Flow (Jaini et al., 2019)
        | https://arxiv.org/abs/1905.02325

    Example:
        >>> m = SumOfSquares(polynomials=2, degree=3)
        >>> m.shapes
        {'shift': (), 'coefficients': (2, 4)}
        >>> theta = torch.linspace(-0.5, 0.5, 18).reshape(2, m.params)
        >>> y, log_d = m.forward(torch.tensor([-7.0, 1.0]), theta)
        >>> x, _ = m.inverse(y, theta)
        >>> torch.allclose(x, torch.tensor([-7.0, 1.0]), atol=1e-4)
        True
    """

    def __init__(
        self, polynomials: int = 3, degree: int = 4, bound: float = 5.0, min_derivative: float = 1e-3
    ) -> None:
        self.polynomials = check_int(polynomials, "SumOfSquares: polynomials")
        self.degree = check_int(degree, "SumOfSquares: degree")
        self.bound = check_positive(bound, "SumOfSquares: bound")
        self.min_derivative = _check_fraction(min_derivative, "SumOfSquares: min_derivative", closed_low=False)
        self.shapes = {"shift": (), "coefficients": (self.polynomials, self.degree + 1)}
        self._nodes, self._weights = _gauss_legendre(self.degree + 1)

    @staticmethod
    def _horner(coefficients: Tensor, v: Tensor) -> Tensor:
        r""":math:`\sum_i c_i v^i` for ``coefficients`` of shape ``(..., n)``."""
        value = coefficients[..., -1]
        for i in range(coefficients.shape[-1] - 2, -1, -1):
            value = value * v + coefficients[..., i]
        return value

    def forward(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        B, eps = self.bound, self.min_derivative
        parts = self.split(theta)
        unit = theta.new_zeros(self.degree + 1)
        unit[0] = 1
        q = (parts["coefficients"] + unit).unsqueeze(-3)  # (..., D, 1, K, L + 1)
        xc = x.clamp(-B, B)
        v = (xc / B).unsqueeze(-1)
        # mean_k q_k^2 at the quadrature nodes of [0, v] and at v itself
        points = torch.cat((v * self._nodes.to(v), v), dim=-1)
        squares = self._horner(q, points.unsqueeze(-1)).square().mean(-1)
        integral = v.squeeze(-1) * (squares[..., :-1] * self._weights.to(v)).sum(-1)
        derivative = eps + (1 - eps) * squares[..., -1]
        y = parts["shift"] + eps * xc + (1 - eps) * B * integral + derivative * (x - xc)
        return y, derivative.log()

    def __repr__(self) -> str:
        return f"SumOfSquares(polynomials={self.polynomials}, degree={self.degree}, bound={self.bound})"
