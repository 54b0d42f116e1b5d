r"""Coupling flows: NICE, RealNVP and the coupling form of NSF (in :mod:`.spline`)."""

from __future__ import annotations

from typing import Sequence

from ..checks import check_int
from ..flow import Flow
from ..transforms.coupling import AdditiveCoupling, AffineCoupling, MaskLike, coupling_mask
from ..transforms.normalization import ActNorm

__all__ = ["NICE", "RealNVP", "alternating_masks"]


def alternating_masks(features, transforms: int, mask: MaskLike = "half") -> list:
    """The pass-through masks of ``transforms`` coupling layers, flipped every other layer."""
    transforms = check_int(transforms, "transforms (the number of layers)")
    return [coupling_mask(features, mask, flip=i % 2 == 1) for i in range(transforms)]


class NICE(Flow):
    r"""NICE: additive (volume-preserving) coupling layers with alternating masks, then a
    learned diagonal scaling (an :class:`~pyro_flowpack.transforms.normalization.ActNorm`
    on the data side, initialised from the first batch).

    Arguments:
        features: The number of features (with one, each layer transforms it with
            parameters from the context alone, or learned constants without context).
        context: The number of context features.
        transforms: The number of coupling layers.
        hidden: The hidden sizes of each conditioner.
        mask: The first layer's pass-through mask; later layers alternate it.

    Example:
        >>> flow = NICE(4, transforms=4)
        >>> flow().log_prob(torch.randn(8, 4)).shape
        torch.Size([8])

    References:
        | NICE: Non-linear Independent Components Estimation (Dinh et al., 2014)
        | https://arxiv.org/abs/1410.8516
    """

    def __init__(self, features: int, context: int = 0, transforms: int = 4,
                 hidden: Sequence[int] = (64, 64), mask: MaskLike = "half") -> None:
        layers = [AdditiveCoupling(features, m, context, hidden) for m in alternating_masks(features, transforms, mask)]
        super().__init__([*layers, ActNorm(features)])


class RealNVP(Flow):
    r"""RealNVP: affine coupling layers with alternating masks and soft-clamped scales.

    Arguments:
        features: The number of features (with one, each layer transforms it with
            parameters from the context alone, or learned constants without context).
        context: The number of context features.
        transforms: The number of coupling layers.
        hidden: The hidden sizes of each conditioner.
        mask: The first layer's pass-through mask; later layers alternate it.
        bound: The bound on each log-scale.

    Example:
        >>> flow = RealNVP(4, context=2)
        >>> flow(torch.randn(2)).sample((3,)).shape
        torch.Size([3, 4])

    References:
        | Density estimation using Real NVP (Dinh et al., 2017)
        | https://arxiv.org/abs/1605.08803
    """

    def __init__(self, features: int, context: int = 0, transforms: int = 4,
                 hidden: Sequence[int] = (64, 64), mask: MaskLike = "half", bound: float = 3.0) -> None:
        masks = alternating_masks(features, transforms, mask)
        super().__init__([AffineCoupling(features, m, context, hidden, bound) for m in masks])
