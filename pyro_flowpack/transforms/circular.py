r"""Layers for angles: a circular rational-quadratic spline and its coupling layer, the
parts of flows on the circle and the torus :math:`[-\pi, \pi)^D` (Rezende et al., 2020).

An angle is a point of the circle; its coordinate lies in :math:`[-\pi, \pi)`, and any
real input is read modulo :math:`2\pi`. A diffeomorphism of the circle must be smooth
across the seam at :math:`\pm\pi`: the circular spline maps :math:`[-\pi, \pi]` onto
itself with equal derivatives at both ends, then rotates, so that its derivative (and
the density of a flow built from it) is continuous on the whole circle. The coupling
layer's conditioner reads :math:`(\cos \theta, \sin \theta)` of its pass-through angles,
so that the spline's parameters are continuous across the seam as well.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.distributions import constraints

from ..checks import check_int
from ..nn import MLP
from .coupling import Coupling, MaskLike
from .monotone import RationalQuadraticSpline, _soft_clamp

__all__ = ["wrap_angle", "CircularRationalQuadraticSpline", "CircularSplineCoupling"]

PI = math.pi


def wrap_angle(x: Tensor) -> Tensor:
    r"""Returns the angle :math:`x` modulo :math:`2\pi` in :math:`[-\pi, \pi)`; angles
    already there are returned exactly.

    Example:
        >>> wrap_angle(torch.tensor([3.0, 4.0, -3.5, torch.pi]))
        tensor([ 3.0000, -2.2832,  2.7832, -3.1416])
    """
    wrapped = torch.remainder(x + PI, 2 * PI) - PI
    # rounding can leave pi itself (the remainder of a tiny negative number is 2 pi)
    wrapped = torch.where(wrapped >= PI, wrapped - 2 * PI, wrapped)
    return torch.where((x >= -PI) & (x < PI), x, wrapped)


#: the circle :math:`[-\pi, \pi)` as a torch constraint
circle = constraints.half_open_interval(-PI, PI)


class CircularRationalQuadraticSpline(RationalQuadraticSpline):
    r"""A diffeomorphism of the circle: a rational-quadratic spline from
    :math:`[-\pi, \pi]` onto itself whose derivatives at :math:`-\pi` and :math:`\pi` are
    equal, followed by a rotation (Rezende et al., 2020),

    .. math:: \tau(x) = \big(s(x \bmod 2\pi) + \phi\big) \bmod 2\pi ,
        \qquad \log \partial_x \tau(x) = \log s'(x \bmod 2\pi) ,

    with both :math:`\bmod 2\pi` in :math:`[-\pi, \pi)`. The spline :math:`s` fixes the
    seam, :math:`s(\pm\pi) = \pm\pi`, and has :math:`s'(-\pi) = s'(\pi)`, so :math:`\tau`
    and its derivative are continuous on the circle; the rotation :math:`\phi` moves the
    seam's image anywhere. As a function on :math:`[-\pi, \pi)` it is increasing except
    for one jump of :math:`-2\pi` (where the rotated image crosses the seam), and it is
    a bijection of :math:`[-\pi, \pi)`.

    The parameters of each feature are (see :attr:`shapes`): :math:`K` unnormalised bin
    widths and :math:`K` heights, soft-clamped and floored as in
    :class:`~pyro_flowpack.transforms.monotone.RationalQuadraticSpline` (so that no bin
    is flat or steep beyond what float32 resolves, whatever the network outputs);
    :math:`K` unnormalised log-derivatives, the first shared by :math:`-\pi` and
    :math:`\pi` and the others at the interior knots, soft-clamped into
    :math:`(\delta_\min, 1 / \delta_\min)`; and the rotation :math:`\phi` in radians
    (periodic, so not clamped). All-zero parameters give the identity.

    Arguments:
        bins: The number of bins :math:`K`.
        min_width: The smallest bin width and height, as a fraction of :math:`2\pi / K`.
        min_derivative: The smallest derivative :math:`\delta_\min` at a knot (its
            inverse is the largest).
        max_bin_ratio: The largest ratio between the widths (or the heights) of two bins,
            before the floor ``min_width``.

    References:
        | Normalizing Flows on Tori and Spheres (Rezende et al., 2020)
        | https://arxiv.org/abs/2002.02428

        | Neural Spline Flows (Durkan et al., 2019)
        | https://arxiv.org/abs/1906.04032

    Example:
        >>> tau = CircularRationalQuadraticSpline(bins=4)
        >>> tau.shapes
        {'widths': (4,), 'heights': (4,), 'derivatives': (4,), 'rotation': ()}
        >>> theta = torch.zeros(2, tau.params)
        >>> theta[:, -1] = 1.0  # a rotation by one radian
        >>> tau.forward(torch.tensor([0.0, 3.0]), theta)
        (tensor([ 1.0000, -2.2832]), tensor([0., 0.]))
    """

    def __init__(self, bins: int = 8, min_width: float = 1e-3, min_derivative: float = 1e-3,
                 max_bin_ratio: float = 100.0) -> None:
        bins = check_int(bins, "CircularRationalQuadraticSpline: bins")
        super().__init__(bins, PI, min_width, min_derivative, max_bin_ratio)
        self.shapes = {"widths": (bins,), "heights": (bins,), "derivatives": (bins,), "rotation": ()}

    def _knots(self, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # the parent pads the derivatives with the tails' 1 at both ends: drop those and
        # close the spline with the seam's derivative instead, s'(pi) = s'(-pi)
        xk, yk, d = super()._knots(theta)
        d = d[..., 1:-1]
        return xk, yk, torch.cat((d, d[..., :1]), dim=-1)

    def _spline(self, value: Tensor, theta: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        out, log_d = super().inverse(value, theta) if inverse else super().forward(value, theta)
        # the parent's interval is open (identity tails); here s(-pi) = -pi with the seam's derivative
        seam = _soft_clamp(self.split(theta)["derivatives"][..., 0], self._log_derivative_bound)
        return out, torch.where(value <= -PI, seam, log_d)

    def forward(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        u, log_d = self._spline(wrap_angle(x), theta, inverse=False)
        return wrap_angle(u + self.split(theta)["rotation"]), log_d

    def inverse(self, y: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        x, log_d = self._spline(wrap_angle(y - self.split(theta)["rotation"]), theta, inverse=True)
        return wrap_angle(x), log_d

    def __repr__(self) -> str:
        return f"CircularRationalQuadraticSpline(bins={self.bins})"


class CircularSplineCoupling(Coupling):
    r"""A coupling layer on the torus :math:`[-\pi, \pi)^D`: the transformed angles go
    through a circular rational-quadratic spline (see
    :class:`CircularRationalQuadraticSpline`) whose parameters an MLP computes from
    :math:`(\cos \theta_b, \sin \theta_b)` of the pass-through angles (and the
    context), so that they are continuous across the seam,

    .. math:: y_b = x_b , \qquad y_{\bar b} = \tau\big(x_{\bar b};
        \mathrm{MLP}(\cos x_b, \sin x_b, c)\big) .

    Inputs are read modulo :math:`2\pi` and outputs lie in :math:`[-\pi, \pi)`. With one
    feature nothing passes through (the mask is ``[False]``): the spline's parameters
    come from the context alone, or are learned constants without a context. The
    conditioner ends in a zero-initialised layer, so the layer starts at the identity.

    Arguments:
        features: The number of angles :math:`D`.
        mask: The pass-through mask (see :func:`~pyro_flowpack.transforms.coupling.coupling_mask`).
        context: The number of context features.
        hidden: The hidden sizes of the MLP.
        bins: The number of spline bins :math:`K`.
        activation: The activation of the conditioner.

    References:
        | Normalizing Flows on Tori and Spheres (Rezende et al., 2020)
        | https://arxiv.org/abs/2002.02428

    Example:
        >>> layer = CircularSplineCoupling(3, bins=4)
        >>> y, ladj = layer.call_and_ladj(torch.rand(10, 3) * 6 - 3)
        >>> bool(((y >= -torch.pi) & (y < torch.pi)).all())
        True
    """

    def __init__(self, features: int, mask: MaskLike = "half", context: int = 0,
                 hidden: Sequence[int] = (64, 64), bins: int = 8,
                 activation: Callable[[], nn.Module] = nn.ReLU) -> None:
        features = check_int(features, "CircularSplineCoupling: features")
        context = check_int(context, "CircularSplineCoupling: context", minimum=0)
        super().__init__(features, CircularRationalQuadraticSpline(bins), mask, context, hidden, activation)
        n_a, n_b = self.index_a.numel(), self.index_b.numel()
        if n_a:  # the conditioner reads two coordinates per pass-through angle
            self.conditioner = MLP(2 * n_a + self.context_features, n_b * self.monotone.params, hidden, activation)

    @property
    def domain(self) -> constraints.Constraint:
        return constraints.independent(circle, 1)

    @property
    def codomain(self) -> constraints.Constraint:
        return constraints.independent(circle, 1)

    def _theta(self, h: Tensor, context: Tensor | None) -> Tensor:
        return super()._theta(torch.cat((h.cos(), h.sin()), dim=-1), context)

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return super()._forward_and_ladj(wrap_angle(x), context)

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return super()._inverse_and_ladj(wrap_angle(y), context)
