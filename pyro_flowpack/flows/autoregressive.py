r"""Masked autoregressive flows: MAF (one-pass density) and IAF (one-pass sampling)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..checks import check_int
from ..flow import Flow
from ..transforms.autoregressive import MaskedAffineAutoregressive
from ..transforms.base import Inverse

__all__ = ["MAF", "IAF", "alternating_orders"]


def alternating_orders(features: int, transforms: int) -> list[torch.Tensor]:
    """Autoregressive orders for ``transforms`` layers: ascending, descending, ascending..."""
    transforms = check_int(transforms, "transforms (the number of layers)")
    ascending = torch.arange(features)
    return [ascending if i % 2 == 0 else ascending.flip(0) for i in range(transforms)]


class MAF(Flow):
    r"""A masked autoregressive flow: affine MADE layers in MAF form, with the order
    reversed every other layer. ``log_prob`` is one pass per layer; sampling takes
    ``features`` passes per layer.

    Arguments:
        features: The number of features.
        context: The number of context features.
        transforms: The number of layers.
        hidden: The hidden sizes of each MADE (any sizes).
        bound: The bound on each log-scale.

    Example:
        >>> flow = MAF(8, context=3)
        >>> flow(torch.randn(10, 3)).log_prob(torch.randn(10, 8)).shape
        torch.Size([10])

    References:
        | Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017)
        | https://arxiv.org/abs/1705.07057
    """

    def __init__(self, features: int, context: int = 0, transforms: int = 3,
                 hidden: Sequence[int] = (64, 64), bound: float = 3.0) -> None:
        orders = alternating_orders(features, transforms)
        super().__init__([MaskedAffineAutoregressive(features, context, hidden, o, bound) for o in orders])


class IAF(Flow):
    r"""An inverse autoregressive flow: the MAF layers inverted, so that the network
    reads the base side and ``rsample`` / ``rsample_and_log_prob`` are one pass per layer
    (the form for variational guides); ``log_prob`` of external data takes ``features``
    passes.

    Arguments:
        features: The number of features.
        context: The number of context features.
        transforms: The number of layers.
        hidden: The hidden sizes of each MADE (any sizes).
        bound: The bound on each log-scale.

    Example:
        >>> flow = IAF(8)
        >>> x, log_p = flow().rsample_and_log_prob((5,))

    References:
        | Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016)
        | https://arxiv.org/abs/1606.04934
    """

    def __init__(self, features: int, context: int = 0, transforms: int = 3,
                 hidden: Sequence[int] = (64, 64), bound: float = 3.0) -> None:
        orders = alternating_orders(features, transforms)
        super().__init__([Inverse(MaskedAffineAutoregressive(features, context, hidden, o, bound)) for o in orders])
