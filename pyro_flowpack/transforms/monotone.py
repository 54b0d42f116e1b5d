r"""Elementwise monotone maps, the part of a coupling or autoregressive layer that
transforms each feature given parameters computed by a conditioner network.

A monotone map is a strictly increasing :math:`y = \tau(x; \theta)` applied feature by
feature, with ``theta`` of shape ``(..., D, params)`` for ``x`` of shape ``(..., D)``.
Each map is written once here and shared by every layer family: a family is "a
conditioner + one of these maps + the number of parameters it takes". Every map is the
identity when its parameters are all zero, so layers whose conditioner ends in a
zero-initialised linear layer start at the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MonotoneMap", "Additive", "Affine", "RationalQuadraticSpline"]


class MonotoneMap:
    r"""Base class of the elementwise monotone maps :math:`y = \tau(x; \theta)`.

    Subclasses set :attr:`params` (the number of parameters per feature) and implement
    :meth:`forward` and :meth:`inverse`, both returning :math:`\log \partial_x \tau`
    elementwise at the point :math:`x`.
    """

    params: int = 0

    def forward(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        r"""Returns :math:`y = \tau(x; \theta)` and :math:`\log \partial_x \tau(x; \theta)`."""
        raise NotImplementedError

    def inverse(self, y: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        r"""Returns :math:`x = \tau^{-1}(y; \theta)` and :math:`\log \partial_x \tau(x; \theta)`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Additive(MonotoneMap):
    r"""The shift :math:`\tau(x; t) = x + t`, volume preserving (NICE).

    References:
        | NICE: Non-linear Independent Components Estimation (Dinh et al., 2014)
        | https://arxiv.org/abs/1410.8516
    """

    params = 1

    def forward(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        return x + theta[..., 0], torch.zeros_like(x)

    def inverse(self, y: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        return y - theta[..., 0], torch.zeros_like(y)


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
    """

    params = 2

    def __init__(self, bound: float = 3.0) -> None:
        if not bound > 0:
            raise ValueError(f"Affine: bound must be positive, got {bound!r}")
        self.bound = float(bound)

    def _shift_log_scale(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = theta.unbind(-1)
        return shift, self.bound * torch.tanh(raw / self.bound)

    def forward(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(theta)
        return x * log_scale.exp() + shift, log_scale

    def inverse(self, y: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(theta)
        return (y - shift) * torch.exp(-log_scale), log_scale

    def __repr__(self) -> str:
        return f"Affine(bound={self.bound})"


class RationalQuadraticSpline(MonotoneMap):
    r"""A monotone rational-quadratic spline on :math:`[-B, B]` with :math:`K` bins and
    identity (linear) tails outside (Durkan et al., 2019).

    The parameters are :math:`K` unnormalised widths, :math:`K` unnormalised heights and
    :math:`K - 1` unnormalised interior log-derivatives (boundary derivatives are 1 to
    match the tails). A raw log-derivative :math:`r` is soft-clamped,
    :math:`\delta = \exp(r / (1 + |r| / L))` with :math:`L = -\log \delta_{\min}`, so
    derivatives lie in :math:`(\delta_{\min}, 1 / \delta_{\min})` and change scale as
    fast as the network's output (zuko parameterises them the same way; a softplus learns
    sharp densities more slowly). In bin :math:`k`, with :math:`\xi = (x - x_k) / w_k` and
    :math:`s_k = h_k / w_k`,

    .. math::
        \tau(x) = y_k + \frac{h_k [s_k \xi^2 + \delta_k \xi (1 - \xi)]}
                             {s_k + (\delta_{k+1} + \delta_k - 2 s_k) \xi (1 - \xi)},

    whose inverse is the root of a quadratic. All-zero parameters give the identity.

    Arguments:
        bins: The number of bins :math:`K`.
        bound: The half-width :math:`B` of the interval.
        min_width: The smallest bin width and height, as a fraction of :math:`2B / K`.
        min_derivative: The smallest derivative at a knot (its inverse is the largest).

    References:
        | Neural Spline Flows (Durkan et al., 2019)
        | https://arxiv.org/abs/1906.04032
    """

    def __init__(
        self, bins: int = 8, bound: float = 5.0, min_width: float = 1e-3, min_derivative: float = 1e-3
    ) -> None:
        if not isinstance(bins, int) or bins < 1:
            raise ValueError(f"RationalQuadraticSpline: bins must be a positive int, got {bins!r}")
        if not bound > 0:
            raise ValueError(f"RationalQuadraticSpline: bound must be positive, got {bound!r}")
        if not 0 <= min_width < 1:
            raise ValueError(f"RationalQuadraticSpline: min_width must be in [0, 1), got {min_width!r}")
        if not 0 < min_derivative < 1:
            raise ValueError(f"RationalQuadraticSpline: min_derivative must be in (0, 1), got {min_derivative!r}")
        self.bins = bins
        self.bound = float(bound)
        self.min_width = min_width / bins
        self.min_derivative = min_derivative
        self._log_derivative_bound = -math.log(min_derivative)  # zero parameters: derivative 1
        self.params = 3 * bins - 1

    def _knots(self, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        K, B = self.bins, self.bound
        w, h, d = theta.split((K, K, K - 1), dim=-1)
        knots = []
        for u in (w, h):
            u = self.min_width + (1 - self.min_width * K) * F.softmax(u, dim=-1)
            u = F.pad(torch.cumsum(u, dim=-1), (1, 0))
            knots.append(2 * B * u - B)
        d = torch.exp(d / (1 + d.abs() / self._log_derivative_bound))
        d = F.pad(d, (1, 1), value=1.0)
        return knots[0], knots[1], d

    @staticmethod
    def _bin(knots: Tensor, value: Tensor) -> Tensor:
        index = torch.searchsorted(knots, value.unsqueeze(-1).contiguous()) - 1
        return index.clamp(0, knots.shape[-1] - 2)

    def _gather(self, theta: Tensor, value: Tensor, source: int):
        """The knots of the bin holding each value (source 0: x side, 1: y side)."""
        xk, yk, dk = self._knots(theta)
        k = self._bin((xk, yk)[source], value)
        k1 = k + 1
        x0, x1 = xk.gather(-1, k), xk.gather(-1, k1)
        y0, y1 = yk.gather(-1, k), yk.gather(-1, k1)
        d0, d1 = dk.gather(-1, k), dk.gather(-1, k1)
        return [t.squeeze(-1) for t in (x0, x1, y0, y1, d0, d1)]

    def _log_derivative(self, xi, s, d0, d1, denominator) -> Tensor:
        omx = 1 - xi
        numerator = s.square() * (d1 * xi.square() + 2 * s * xi * omx + d0 * omx.square())
        return numerator.log() - 2 * denominator.log()

    def forward(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        theta = theta.expand(*x.shape, theta.shape[-1])
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
        theta = theta.expand(*y.shape, theta.shape[-1])
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
