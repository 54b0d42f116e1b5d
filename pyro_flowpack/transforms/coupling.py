r"""Coupling layers: half of the features, selected by a mask, pass through unchanged and
condition a monotone map applied to the other half.

With a boolean mask :math:`b` (``True`` for the features that pass through),

.. math::
    y_b = x_b, \qquad y_{\bar b} = \tau(x_{\bar b}; \theta(x_b, c)), \qquad
    \log |\det J| = \sum_{i \in \bar b} \log \partial_x \tau_i ,

so both directions and the log-determinant take one pass of the conditioner
:math:`\theta`. A vector of one feature has nothing to pass through: the feature is
transformed by the monotone map, its parameters computed from the context alone (or
learned constants without a context). A family is a :class:`Coupling` with a monotone map:
:class:`AdditiveCoupling` (NICE), :class:`AffineCoupling` (RealNVP) and
:class:`SplineCoupling` (neural spline flows).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch import Size, Tensor

from ..nn import MLP, Constant, ConvResNet, cat_channels, cat_context
from ..checks import as_shape
from .base import FlowTransform
from .monotone import Additive, Affine, MonotoneMap, RationalQuadraticSpline

__all__ = ["Coupling", "AdditiveCoupling", "AffineCoupling", "SplineCoupling", "coupling_mask"]

MaskLike = str | Sequence[bool] | Tensor
ShapeOrFeatures = int | Sequence[int]


def coupling_mask(shape: ShapeOrFeatures, mask: MaskLike = "half", flip: bool = False) -> Tensor:
    r"""Returns a boolean coupling mask over an event shape (``True``: passes through).

    Arguments:
        shape: The number of features of a vector, or an image shape ``(C, H, W)``.
        mask: For vectors, ``"half"`` (the first :math:`\lceil D/2 \rceil` features) or
            ``"alternating"`` (even positions); for images, ``"checkerboard"`` (pixels
            whose row plus column is even) or ``"channel"`` (the first
            :math:`\lceil C/2 \rceil` channels); or any boolean tensor of the event shape.
            For one feature every named mask is ``[False]`` (nothing passes through).
        flip: Whether to negate the mask (used to alternate masks between layers); a
            one-feature mask stays ``[False]``.

    A mask may not be all ``True`` (the identity). On vectors it may be all ``False``:
    every feature is then transformed with parameters from the context alone.

    Example:
        >>> coupling_mask(5, "alternating").tolist()
        [True, False, True, False, True]
        >>> coupling_mask(1, "half", flip=True).tolist()
        [False]
    """
    shape = as_shape(shape)
    names = {1: ("half", "alternating"), 3: ("checkerboard", "channel")}.get(len(shape))
    if names is None:
        raise ValueError(f"coupling masks are for vectors (D,) or images (C, H, W), got event shape {tuple(shape)}")
    if isinstance(mask, str):
        if mask not in names:
            raise ValueError(
                f"mask must be {names[0]!r}, {names[1]!r} or a boolean tensor for event shape "
                f"{tuple(shape)}, got {mask!r}"
            )
        if shape == (1,):  # one feature: nothing can pass through
            return torch.zeros(1, dtype=torch.bool)
        if mask in ("half", "channel"):
            index = torch.arange(shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
            result = (index < (shape[0] + 1) // 2).expand(shape)
        elif mask == "alternating":
            result = torch.arange(shape[0]) % 2 == 0
        else:
            rows, cols = torch.arange(shape[1])[:, None], torch.arange(shape[2])
            result = ((rows + cols) % 2 == 0).expand(shape)
    else:
        result = torch.as_tensor(mask)
        if result.dtype != torch.bool:
            raise TypeError(f"mask must be a boolean tensor, got dtype {result.dtype}")
        if result.shape != shape:
            raise ValueError(f"mask must have shape {tuple(shape)}, got {tuple(result.shape)}")
    if flip:
        result = ~result
    if result.all() or (len(shape) == 3 and not result.any()):
        what = "one False (transformed) entry" if len(shape) == 1 else \
            "one True (pass-through) and one False (transformed) entry"
        raise ValueError(f"mask must have at least {what}, got {result.int().tolist()}")
    return result.contiguous()


class Coupling(FlowTransform):
    r"""A coupling layer on vectors or images: a conditioner network and a monotone map.

    On vectors the conditioner is an MLP reading the pass-through features. On images
    ``(C, H, W)`` it is a :class:`~pyro_flowpack.nn.ConvResNet`: with a channel mask it
    reads the pass-through channels; with any other mask (checkerboard) it reads the
    image with the transformed entries set to zero and gives parameters for every
    entry. An image-shaped context ``(C', H, W)`` is concatenated to its input channels.

    Arguments:
        features: The number of features :math:`D` (one feature is transformed with
            parameters from the context alone), or an image shape ``(C, H, W)``.
        monotone: The elementwise monotone map :math:`\tau`.
        mask: The pass-through mask (see :func:`coupling_mask`).
        context: The number of context features, or the shape of an image context.
        hidden: The hidden sizes of the MLP (vectors), or the hidden channels of the
            ResNet (images).
        activation: The activation of the conditioner.
        blocks: The number of residual blocks of the ResNet (images).

    References:
        | Density estimation using Real NVP (Dinh et al., 2017)
        | https://arxiv.org/abs/1605.08803
    """

    def __init__(
        self,
        features: ShapeOrFeatures,
        monotone: MonotoneMap,
        mask: MaskLike = "half",
        context: ShapeOrFeatures = 0,
        hidden: Sequence[int] | int = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
        blocks: int = 2,
    ) -> None:
        shape = as_shape(features)
        super().__init__(shape, context)
        self.monotone = monotone
        if len(shape) == 3 and mask == "half":
            mask = "channel"
        mask = coupling_mask(shape, mask)
        self.register_buffer("mask", mask)
        image = len(shape) == 3
        # channel-separable masks split along one dimension with an index; others
        # (checkerboard) keep the image whole and select the output with the mask
        split = mask.flatten(1).all(1) | ~mask.flatten(1).any(1) if image else None
        self._dim = -1 if not image else (-3 if bool(split.all()) else None)
        P = monotone.params
        if self._dim is None:
            ctx = self.context_shape[0] if self.context_shape else 0
            self.conditioner = ConvResNet(shape[0] + ctx, shape[0] * P, self._channels(hidden), blocks, activation)
            return
        along = mask if not image else mask[:, 0, 0]
        self.register_buffer("index_a", along.nonzero().squeeze(-1))
        self.register_buffer("index_b", (~along).nonzero().squeeze(-1))
        # position of each feature in cat(x_a, x_b), to put the halves back in place
        self.register_buffer("merge", torch.cat((self.index_a, self.index_b)).argsort())
        n_a, n_b = self.index_a.numel(), self.index_b.numel()
        if image:
            ctx = self.context_shape[0] if self.context_shape else 0
            self.conditioner = ConvResNet(n_a + ctx, n_b * P, self._channels(hidden), blocks, activation)
        else:
            if len(self.context_shape) > 1:
                raise ValueError(f"{type(self).__name__} on vectors takes a vector context, got {tuple(self.context_shape)}")
            if n_a + self.context_features == 0:  # nothing to read: learned parameters
                self.conditioner = Constant(n_b * P)
            else:
                self.conditioner = MLP(n_a + self.context_features, n_b * P, hidden, activation)

    def _channels(self, hidden: Sequence[int] | int) -> int:
        if len(self.context_shape) not in (0, 3) or self.context_shape[1:] not in (Size(), self.event_shape[1:]):
            raise ValueError(
                f"{type(self).__name__} on images takes an image context of shape (C', "
                f"{self.event_shape[1]}, {self.event_shape[2]}), got {tuple(self.context_shape)}"
            )
        if isinstance(hidden, bool) or not isinstance(hidden, int):
            raise TypeError(f"{type(self).__name__} on images takes hidden as an int (channels), got {hidden!r}")
        return hidden

    def _theta(self, h: Tensor, context: Tensor | None) -> Tensor:
        P = self.monotone.params
        if self._dim == -1:
            return self.conditioner(cat_context(h, context)).unflatten(-1, (-1, P))
        theta = self.conditioner(cat_channels(h, context))
        return theta.unflatten(-3, (-1, P)).movedim(-3, -1)

    def _couple(self, value: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        apply = self.monotone.inverse if inverse else self.monotone.forward
        event = tuple(range(-len(self.event_shape), 0))
        if self._dim is None:
            theta = self._theta(value * self.mask, context)
            out, log_d = apply(value, theta)
            return torch.where(self.mask, value, out), log_d.masked_fill(self.mask, 0).sum(event)
        a = value.index_select(self._dim, self.index_a)
        b = value.index_select(self._dim, self.index_b)
        out, log_d = apply(b, self._theta(a, context))
        merged = torch.cat((a, out), dim=self._dim).index_select(self._dim, self.merge)
        return merged, log_d.sum(event)

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._couple(x, context, inverse=False)

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._couple(y, context, inverse=True)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.event_shape)}, context={tuple(self.context_shape)}, monotone={self.monotone}"


class AdditiveCoupling(Coupling):
    r"""The additive (volume-preserving) coupling layer of NICE,
    :math:`y_{\bar b} = x_{\bar b} + t(x_b)`, with :math:`\log|\det J| = 0`.

    Arguments:
        features: The number of features, or an image shape ``(C, H, W)``.
        mask: The pass-through mask (see :func:`coupling_mask`).
        context: The number of context features, or an image context shape.
        hidden: The hidden sizes of the MLP, or the hidden channels of the ResNet (images).
        activation: The activation of the conditioner.
        blocks: The number of residual blocks of the ResNet (images).

    Example:
        >>> layer = AdditiveCoupling(4)
        >>> y, ladj = layer.call_and_ladj(torch.randn(10, 4))

    References:
        | NICE: Non-linear Independent Components Estimation (Dinh et al., 2014)
        | https://arxiv.org/abs/1410.8516
    """

    def __init__(self, features: ShapeOrFeatures, mask: MaskLike = "half", context: ShapeOrFeatures = 0,
                 hidden: Sequence[int] | int = (64, 64), activation: Callable[[], nn.Module] = nn.ReLU,
                 blocks: int = 2) -> None:
        super().__init__(features, Additive(), mask, context, hidden, activation, blocks)


class AffineCoupling(Coupling):
    r"""The affine coupling layer of RealNVP,
    :math:`y_{\bar b} = x_{\bar b} \exp(s(x_b)) + t(x_b)`, with the log-scale soft-clamped
    to :math:`|s| < b` (see :class:`~pyro_flowpack.transforms.monotone.Affine`).

    Arguments:
        features: The number of features, or an image shape ``(C, H, W)``.
        mask: The pass-through mask (see :func:`coupling_mask`).
        context: The number of context features, or an image context shape.
        hidden: The hidden sizes of the MLP, or the hidden channels of the ResNet (images).
        bound: The bound :math:`b` on the log-scale.
        activation: The activation of the conditioner.
        blocks: The number of residual blocks of the ResNet (images).

    Example:
        >>> layer = AffineCoupling(4, context=2)
        >>> y, ladj = layer.call_and_ladj(torch.randn(10, 4), torch.randn(10, 2))

    References:
        | Density estimation using Real NVP (Dinh et al., 2017)
        | https://arxiv.org/abs/1605.08803
    """

    def __init__(self, features: ShapeOrFeatures, mask: MaskLike = "half", context: ShapeOrFeatures = 0,
                 hidden: Sequence[int] | int = (64, 64), bound: float = 3.0,
                 activation: Callable[[], nn.Module] = nn.ReLU, blocks: int = 2) -> None:
        super().__init__(features, Affine(bound), mask, context, hidden, activation, blocks)


class SplineCoupling(Coupling):
    r"""The rational-quadratic spline coupling layer of neural spline flows: each
    transformed feature goes through a monotone rational-quadratic spline on
    :math:`[-B, B]` with ``bins`` bins and identity tails (see
    :class:`~pyro_flowpack.transforms.monotone.RationalQuadraticSpline`).

    Arguments:
        features: The number of features, or an image shape ``(C, H, W)``.
        mask: The pass-through mask (see :func:`coupling_mask`).
        context: The number of context features, or an image context shape.
        hidden: The hidden sizes of the MLP, or the hidden channels of the ResNet (images).
        bins: The number of spline bins :math:`K`.
        bound: The half-width :math:`B` of the spline's interval.
        activation: The activation of the conditioner.
        blocks: The number of residual blocks of the ResNet (images).

    Example:
        >>> layer = SplineCoupling(4, bins=8)
        >>> y, ladj = layer.call_and_ladj(torch.randn(10, 4))

    References:
        | Neural Spline Flows (Durkan et al., 2019)
        | https://arxiv.org/abs/1906.04032
    """

    def __init__(self, features: ShapeOrFeatures, mask: MaskLike = "half", context: ShapeOrFeatures = 0,
                 hidden: Sequence[int] | int = (64, 64), bins: int = 8, bound: float = 5.0,
                 activation: Callable[[], nn.Module] = nn.ReLU, blocks: int = 2) -> None:
        super().__init__(features, RationalQuadraticSpline(bins, bound), mask, context, hidden, activation, blocks)
