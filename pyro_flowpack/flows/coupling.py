r"""Coupling flows: any monotone map in coupling layers (:class:`CouplingFlow`), NICE,
RealNVP, and the coupling form of NSF (in :mod:`.spline`)."""

from __future__ import annotations

from typing import Sequence

from ..checks import check_int
from ..flow import Flow
from ..transforms.coupling import AdditiveCoupling, AffineCoupling, Coupling, MaskLike, coupling_mask
from ..transforms.monotone import Inverted, MonotoneMap
from ..transforms.normalization import ActNorm

__all__ = ["CouplingFlow", "NICE", "RealNVP", "alternating_masks", "oriented"]


def alternating_masks(features, transforms: int, mask: MaskLike = "half") -> list:
    """The pass-through masks of ``transforms`` coupling layers, flipped every other layer."""
    transforms = check_int(transforms, "transforms (the number of layers)")
    return [coupling_mask(features, mask, flip=i % 2 == 1) for i in range(transforms)]


def oriented(monotone: MonotoneMap, closed_form: str, forward_is: str) -> MonotoneMap:
    r"""The map to give a layer so that the closed-form direction of ``monotone`` serves
    ``closed_form`` (``"density"`` or ``"sampling"``), where ``forward_is`` names the
    direction of the flow in which the layer applies the map's ``forward``. A map with a
    closed-form inverse is returned as it is; another is wrapped in
    :class:`~pyro_flowpack.transforms.monotone.Inverted` when the two differ."""
    if closed_form not in ("density", "sampling"):
        raise ValueError(f"closed_form must be 'density' or 'sampling', got {closed_form!r}")
    if monotone.closed_inverse or closed_form == forward_is:
        return monotone
    return Inverted(monotone)


class CouplingFlow(Flow):
    r"""Coupling layers of any elementwise monotone map :math:`\tau`, with alternating
    masks: :math:`y_{\bar b} = \tau(x_{\bar b}; \theta(x_b, c))`. The conditioner's output
    size is the map's parameter count (``monotone.params``), so a new family needs only
    its map.

    A map without a closed-form inverse (``monotone.closed_inverse`` false, such as
    :class:`~pyro_flowpack.transforms.monotone.Bernstein`) is evaluated in closed form in
    one direction and by the generic bracketed solver in the other: ``closed_form``
    chooses which (``"density"``: ``log_prob`` is closed form, for maximum likelihood;
    ``"sampling"``: ``rsample`` is, for variational guides).

    Arguments:
        features: The number of features (with one, each layer transforms it with
            parameters from the context alone, or learned constants without context).
        monotone: The monotone map, a :class:`~pyro_flowpack.transforms.monotone.MonotoneMap`.
        context: The number of context features.
        transforms: The number of coupling layers.
        hidden: The hidden sizes of each conditioner.
        mask: The first layer's pass-through mask; later layers alternate it.
        closed_form: ``"density"`` or ``"sampling"`` (maps without a closed-form inverse).

    Example:
        >>> from pyro_flowpack.transforms.monotone import Bernstein
        >>> flow = CouplingFlow(3, Bernstein(degree=6), transforms=2)
        >>> flow().log_prob(torch.randn(4, 3)).shape
        torch.Size([4])
    """

    def __init__(self, features: int, monotone: MonotoneMap, context: int = 0, transforms: int = 4,
                 hidden: Sequence[int] = (64, 64), mask: MaskLike = "half", closed_form: str = "density") -> None:
        # a coupling layer's forward (sampling) direction applies monotone.forward
        monotone = oriented(monotone, closed_form, forward_is="sampling")
        super().__init__([Coupling(features, monotone, m, context, hidden)
                          for m in alternating_masks(features, transforms, mask)])


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
