r"""Coupling layers: half of the features, selected by a mask, pass through unchanged and
condition a monotone map applied to the other half.

With a boolean mask :math:`b` (``True`` for the features that pass through),

.. math::
    y_b = x_b, \qquad y_{\bar b} = \tau(x_{\bar b}; \theta(x_b, c)), \qquad
    \log |\det J| = \sum_{i \in \bar b} \log \partial_x \tau_i ,

so both directions and the log-determinant take one pass of the conditioner
:math:`\theta`. A family is a :class:`Coupling` with a monotone map:
:class:`AdditiveCoupling` (NICE), :class:`AffineCoupling` (RealNVP) and
:class:`SplineCoupling` (neural spline flows).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..nn import MLP, cat_context
from .base import FlowTransform, check_features
from .monotone import Additive, Affine, MonotoneMap, RationalQuadraticSpline

__all__ = ["Coupling", "AdditiveCoupling", "AffineCoupling", "SplineCoupling", "coupling_mask"]

MaskLike = str | Sequence[bool] | Tensor


def coupling_mask(features: int, mask: MaskLike = "half", flip: bool = False) -> Tensor:
    r"""Returns a boolean coupling mask over ``features`` (``True``: passes through).

    Arguments:
        features: The number of features.
        mask: ``"half"`` (the first :math:`\lceil D/2 \rceil` features), ``"alternating"``
            (even positions), or any boolean sequence or tensor of length ``features``.
        flip: Whether to negate the mask (used to alternate masks between layers).
    """
    if isinstance(mask, str):
        index = torch.arange(features)
        if mask == "half":
            result = index < (features + 1) // 2
        elif mask == "alternating":
            result = index % 2 == 0
        else:
            raise ValueError(f"mask must be 'half', 'alternating' or a boolean tensor, got {mask!r}")
    else:
        result = torch.as_tensor(mask)
        if result.dtype != torch.bool:
            raise TypeError(f"mask must be a boolean tensor, got dtype {result.dtype}")
        if result.shape != (features,):
            raise ValueError(f"mask must have shape ({features},), got {tuple(result.shape)}")
    if flip:
        result = ~result
    if result.all() or not result.any():
        raise ValueError(
            f"mask must have at least one True (pass-through) and one False (transformed) "
            f"entry, got {result.int().tolist()}"
        )
    return result


class Coupling(FlowTransform):
    r"""A coupling layer on vectors: a conditioner network and a monotone map.

    Arguments:
        features: The number of features :math:`D` (at least 2).
        monotone: The elementwise monotone map :math:`\tau`.
        mask: The pass-through mask (see :func:`coupling_mask`).
        context: The number of context features.
        hidden: The hidden sizes of the MLP conditioner.
        activation: The activation of the conditioner.

    References:
        | Density estimation using Real NVP (Dinh et al., 2017)
        | https://arxiv.org/abs/1605.08803
    """

    def __init__(
        self,
        features: int,
        monotone: MonotoneMap,
        mask: MaskLike = "half",
        context: int = 0,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        check_features(type(self).__name__, features, minimum=2)
        super().__init__(features, context)
        mask = coupling_mask(features, mask)
        self.monotone = monotone
        self.register_buffer("mask", mask)
        self.register_buffer("index_a", mask.nonzero().squeeze(-1))
        self.register_buffer("index_b", (~mask).nonzero().squeeze(-1))
        # position of each feature in cat(x_a, x_b), to put the halves back in place
        self.register_buffer("merge", torch.cat((self.index_a, self.index_b)).argsort())
        n_b = self.index_b.numel()
        self.conditioner = MLP(self.index_a.numel() + context, n_b * monotone.params, hidden, activation)
        self._split = (self.index_a.numel(), n_b)

    def _theta(self, x_a: Tensor, context: Tensor | None) -> Tensor:
        return self.conditioner(cat_context(x_a, context)).unflatten(-1, (self._split[1], self.monotone.params))

    def _couple(self, value: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        a = value.index_select(-1, self.index_a)
        b = value.index_select(-1, self.index_b)
        theta = self._theta(a, context)
        out, log_d = (self.monotone.inverse if inverse else self.monotone.forward)(b, theta)
        merged = torch.cat((a, out), dim=-1).index_select(-1, self.merge)
        return merged, log_d.sum(-1)

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._couple(x, context, inverse=False)

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._couple(y, context, inverse=True)

    def extra_repr(self) -> str:
        return f"features={self.event_shape[0]}, context={self.context_features}, monotone={self.monotone}"


class AdditiveCoupling(Coupling):
    r"""The additive (volume-preserving) coupling layer of NICE,
    :math:`y_{\bar b} = x_{\bar b} + t(x_b)`, with :math:`\log|\det J| = 0`.

    Arguments:
        features: The number of features.
        mask: The pass-through mask (see :func:`coupling_mask`).
        context: The number of context features.
        hidden: The hidden sizes of the MLP conditioner.
        activation: The activation of the conditioner.

    Example:
        >>> layer = AdditiveCoupling(4)
        >>> y, ladj = layer.call_and_ladj(torch.randn(10, 4))

    References:
        | NICE: Non-linear Independent Components Estimation (Dinh et al., 2014)
        | https://arxiv.org/abs/1410.8516
    """

    def __init__(self, features: int, mask: MaskLike = "half", context: int = 0,
                 hidden: Sequence[int] = (64, 64), activation: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__(features, Additive(), mask, context, hidden, activation)


class AffineCoupling(Coupling):
    r"""The affine coupling layer of RealNVP,
    :math:`y_{\bar b} = x_{\bar b} \exp(s(x_b)) + t(x_b)`, with the log-scale soft-clamped
    to :math:`|s| < b` (see :class:`~pyro_flowpack.transforms.monotone.Affine`).

    Arguments:
        features: The number of features.
        mask: The pass-through mask (see :func:`coupling_mask`).
        context: The number of context features.
        hidden: The hidden sizes of the MLP conditioner.
        bound: The bound :math:`b` on the log-scale.
        activation: The activation of the conditioner.

    Example:
        >>> layer = AffineCoupling(4, context=2)
        >>> y, ladj = layer.call_and_ladj(torch.randn(10, 4), torch.randn(10, 2))

    References:
        | Density estimation using Real NVP (Dinh et al., 2017)
        | https://arxiv.org/abs/1605.08803
    """

    def __init__(self, features: int, mask: MaskLike = "half", context: int = 0,
                 hidden: Sequence[int] = (64, 64), bound: float = 3.0,
                 activation: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__(features, Affine(bound), mask, context, hidden, activation)


class SplineCoupling(Coupling):
    r"""The rational-quadratic spline coupling layer of neural spline flows: each
    transformed feature goes through a monotone rational-quadratic spline on
    :math:`[-B, B]` with ``bins`` bins and identity tails (see
    :class:`~pyro_flowpack.transforms.monotone.RationalQuadraticSpline`).

    Arguments:
        features: The number of features.
        mask: The pass-through mask (see :func:`coupling_mask`).
        context: The number of context features.
        hidden: The hidden sizes of the MLP conditioner.
        bins: The number of spline bins :math:`K`.
        bound: The half-width :math:`B` of the spline's interval.
        activation: The activation of the conditioner.

    Example:
        >>> layer = SplineCoupling(4, bins=8)
        >>> y, ladj = layer.call_and_ladj(torch.randn(10, 4))

    References:
        | Neural Spline Flows (Durkan et al., 2019)
        | https://arxiv.org/abs/1906.04032
    """

    def __init__(self, features: int, mask: MaskLike = "half", context: int = 0,
                 hidden: Sequence[int] = (64, 64), bins: int = 8, bound: float = 5.0,
                 activation: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__(features, RationalQuadraticSpline(bins, bound), mask, context, hidden, activation)
