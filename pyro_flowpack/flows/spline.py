r"""Neural spline flows, in coupling or autoregressive form."""

from __future__ import annotations

from typing import Sequence

from ..flow import Flow
from ..transforms.autoregressive import MaskedSplineAutoregressive
from ..transforms.coupling import MaskLike, SplineCoupling
from .autoregressive import alternating_orders
from .coupling import alternating_masks

__all__ = ["NSF"]


class NSF(Flow):
    r"""A neural spline flow: monotone rational-quadratic spline layers with identity
    tails, in coupling form (alternating masks; both directions one pass) or, with
    ``autoregressive=True``, in MAF form (alternating orders; one-pass density).

    Arguments:
        features: The number of features (with one, each coupling layer transforms it
            with parameters from the context alone, or learned constants without context).
        context: The number of context features.
        transforms: The number of layers.
        hidden: The hidden sizes of each conditioner.
        bins: The number of spline bins.
        bound: The half-width of the spline's interval :math:`[-B, B]`.
        autoregressive: Whether to use masked autoregressive layers.
        mask: The first coupling layer's pass-through mask (coupling form only).

    Example:
        >>> flow = NSF(features=2, transforms=6, hidden=(128, 128))
        >>> flow().sample((1000,)).shape
        torch.Size([1000, 2])

    References:
        | Neural Spline Flows (Durkan et al., 2019)
        | https://arxiv.org/abs/1906.04032
    """

    def __init__(self, features: int, context: int = 0, transforms: int = 3,
                 hidden: Sequence[int] = (64, 64), bins: int = 8, bound: float = 5.0,
                 autoregressive: bool = False, mask: MaskLike = "half") -> None:
        if autoregressive:
            layers = [MaskedSplineAutoregressive(features, context, hidden, o, bins, bound)
                      for o in alternating_orders(features, transforms)]
        else:
            layers = [SplineCoupling(features, m, context, hidden, bins, bound)
                      for m in alternating_masks(features, transforms, mask)]
        super().__init__(layers)
