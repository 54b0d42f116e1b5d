r"""Fully connected conditioner networks."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..checks import check_sizes

__all__ = ["MLP", "Constant", "cat_context"]


def cat_context(h: Tensor, context: Tensor | None) -> Tensor:
    r"""Concatenates features ``(..., F)`` and a context ``(..., C)`` along the last
    dimension, broadcasting their batch shapes."""
    if context is None:
        return h
    batch = torch.broadcast_shapes(h.shape[:-1], context.shape[:-1])
    return torch.cat((h.expand(*batch, h.shape[-1]), context.expand(*batch, context.shape[-1])), dim=-1)


class MLP(nn.Sequential):
    r"""A multi-layer perceptron :math:`\mathbb{R}^{n} \to \mathbb{R}^{m}`.

    The last linear layer is initialised at zero, so that a layer whose parameters it
    outputs starts at the identity map.

    Arguments:
        in_features: The number of input features :math:`n`.
        out_features: The number of output features :math:`m`.
        hidden: The sizes of the hidden layers.
        activation: The activation module constructor.
        zero_last: Whether to initialise the last layer at zero.

    Example:
        >>> net = MLP(3, 4, hidden=(16, 16))
        >>> net(torch.randn(5, 3)).shape
        torch.Size([5, 4])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
        zero_last: bool = True,
    ) -> None:
        hidden = check_sizes(hidden, "MLP: hidden")
        layers: list[nn.Module] = []
        sizes = (in_features, *hidden, out_features)
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            if i > 0:
                layers.append(activation())
            layers.append(nn.Linear(a, b))
        if zero_last:
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)
        super().__init__(*layers)


class Constant(nn.Module):
    r"""A conditioner with nothing to read: learned constants :math:`\theta \in \mathbb{R}^m`,
    initialised at zero, returned for every element of the input's batch shape.

    It is the conditioner of a coupling layer over one feature without context, which
    has no pass-through feature: the layer is then the monotone map with learned
    parameters.

    Arguments:
        out_features: The number of outputs :math:`m`.

    Example:
        >>> net = Constant(4)
        >>> net(torch.randn(5, 0)).shape
        torch.Size([5, 4])
    """

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(out_features))

    def forward(self, h: Tensor) -> Tensor:
        """Returns the constants, of shape ``(*h.shape[:-1], out_features)``."""
        return self.value.expand(*h.shape[:-1], self.value.shape[0])
