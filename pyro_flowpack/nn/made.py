r"""MADE: masked autoencoders for autoregressive conditioners."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_int, check_sizes
from .mlp import Constant, cat_context

__all__ = ["MaskedLinear", "MADE"]


class MaskedLinear(nn.Linear):
    r"""A linear layer :math:`y = (W \odot M) x + b` with a fixed binary mask :math:`M`.

    Arguments:
        mask: The boolean mask, of shape ``(out_features, in_features)``.
    """

    def __init__(self, mask: Tensor) -> None:
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    r"""A masked autoencoder (MADE) giving, for each feature :math:`i`, ``params``
    outputs that depend only on the features that come before :math:`i` in ``order``
    (and on the context, if any).

    Each input feature gets a degree :math:`m(i) \in \{1, \dots, D\}` from ``order``;
    hidden units get degrees spread evenly and sorted over :math:`\{1, \dots, D - 1\}`,
    or over :math:`\{0, \dots, D - 1\}` when there is a context, so any hidden size
    works, including sizes smaller than :math:`D` (Pyro's ``AutoRegressiveNN`` refuses
    those). A hidden unit of degree :math:`m` sees inputs of degree :math:`\le m`; an
    output of feature :math:`i` sees hidden units of degree :math:`< m(i)`.

    Context features have degree 0, so they reach every hidden unit, and with a context
    every hidden layer starts with units of degree 0, which see the context alone: they
    carry the context to the outputs of the first feature in the order (degree 1), which
    see no input feature. Without them those outputs would be constants and the layer
    would ignore the context for that feature. We chose these units over a direct linear
    path from the context to the outputs so that the first feature depends on the context
    through the same non-linear network as the others. Without a context the outputs of
    the first feature are learned constants (the biases of the last layer), and with one
    feature and no context the network is just those constants
    (:class:`~pyro_flowpack.nn.Constant`). The outputs are laid out as
    ``(..., D, params)`` and the last layer is initialised at zero.

    Arguments:
        features: The number of features :math:`D`.
        params: The number of outputs per feature.
        context: The number of context features.
        hidden: The sizes of the hidden layers.
        order: A permutation of ``range(features)``: ``order[i]`` is the position of
            feature ``i`` in the autoregressive order (default: the identity).
        activation: The activation module constructor.

    Example:
        >>> made = MADE(5, params=2, hidden=(3,))
        >>> made(torch.randn(7, 5)).shape
        torch.Size([7, 5, 2])
        >>> one = MADE(1, params=2, context=3, hidden=(8,))  # one feature: the context alone
        >>> one(torch.randn(7, 1), torch.randn(7, 3)).shape
        torch.Size([7, 1, 2])

    References:
        | MADE: Masked Autoencoder for Distribution Estimation (Germain et al., 2015)
        | https://arxiv.org/abs/1502.03509
    """

    def __init__(
        self,
        features: int,
        params: int,
        context: int = 0,
        hidden: Sequence[int] = (64, 64),
        order: Sequence[int] | Tensor | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        features = check_int(features, "MADE: features")
        hidden = check_sizes(hidden, "MADE: hidden", allow_empty=False)
        if order is None:
            order = torch.arange(features)
        order = torch.as_tensor(order, dtype=torch.long)
        if order.shape != (features,) or not torch.equal(order.sort().values, torch.arange(features)):
            raise ValueError(f"MADE: order must be a permutation of range({features}), got {order.tolist()}")
        self.features, self.params, self.context = features, params, context
        self.register_buffer("order", order)

        if features == 1 and not context:  # no output sees anything: learned constants
            self.net = Constant(params)
            return
        degrees_in = order + 1
        layers: list[nn.Module] = []
        previous = torch.cat((degrees_in, torch.zeros(context, dtype=torch.long)))
        lowest = 0 if context else 1
        for i, h in enumerate(hidden):
            # evenly spread, sorted degrees in lowest..D-1 (all 1 when D = 1 without a
            # context); with a context the first unit of every layer has degree 0
            degrees = lowest + torch.arange(h) * max(features - lowest, 1) // h
            if i > 0:
                layers.append(activation())
            layers.append(MaskedLinear(degrees[:, None] >= previous[None, :]))
            previous = degrees
        degrees_out = degrees_in.repeat_interleave(params)
        last = MaskedLinear(degrees_out[:, None] > previous[None, :])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers += [activation(), last]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Returns the parameters, of shape ``(..., features, params)``."""
        return self.net(cat_context(x, context)).unflatten(-1, (self.features, self.params))
