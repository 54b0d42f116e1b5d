r"""Convolutional conditioner networks for image layers."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from ..checks import check_int

__all__ = ["ConvResNet", "cat_channels"]


def cat_channels(h: Tensor, context: Tensor | None) -> Tensor:
    r"""Concatenates images ``(..., C, H, W)`` and an image-like context
    ``(..., C', H, W)`` along the channels, broadcasting their batch shapes."""
    if context is None:
        return h
    batch = torch.broadcast_shapes(h.shape[:-3], context.shape[:-3])
    return torch.cat((h.expand(*batch, *h.shape[-3:]), context.expand(*batch, *context.shape[-3:])), dim=-3)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, activation: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.net = nn.Sequential(
            activation(), nn.Conv2d(channels, channels, 3, padding=1),
            activation(), nn.Conv2d(channels, channels, 1),
        )

    def forward(self, h: Tensor) -> Tensor:
        return h + self.net(h)


class ConvResNet(nn.Module):
    r"""A convolutional network mapping images ``(..., C_in, H, W)`` to
    ``(..., C_out, H, W)``: a 3x3 input convolution, a hidden layer, and a 3x3 output
    convolution initialised at zero, so that a layer whose parameters it outputs starts at
    the identity (Glow). Any batch shape is accepted.

    The hidden layer is either Glow's own (``blocks=0``): an activation and a 1x1
    convolution, which makes the network of the Glow paper and of normflows'
    ``GlowBlock``, 3x3, 1x1 then 3x3 convolutions with activations between them; or
    ``blocks`` residual blocks, each :math:`h + \mathrm{conv}_{1 \times 1}(a(\mathrm{conv}_{3 \times 3}(a(h))))`
    with the activation :math:`a`. With :math:`h` hidden channels the network has

    .. math:: (9 C_\text{in} + 1) h + n(h) + (9 h + 1) C_\text{out}

    parameters, where :math:`n(h) = h^2 + h` for ``blocks=0`` and
    :math:`n(h) = \text{blocks} \cdot (10 h^2 + 2 h)` otherwise: the residual blocks'
    3x3 convolutions dominate the count for any width past a few channels.

    Arguments:
        in_channels: The number of input channels.
        out_channels: The number of output channels.
        hidden_channels: The number of hidden channels.
        blocks: The number of residual blocks, or 0 for Glow's 1x1 hidden layer.
        activation: The activation module constructor.

    Example:
        >>> net = ConvResNet(2, 6, hidden_channels=16)
        >>> net(torch.randn(5, 3, 2, 8, 8)).shape
        torch.Size([5, 3, 6, 8, 8])
        >>> glow = ConvResNet(2, 4, hidden_channels=64, blocks=0)  # Glow's 3x3, 1x1, 3x3
        >>> sum(p.numel() for p in glow.parameters()) == (9 * 2 + 1) * 64 + 64**2 + 64 + (9 * 64 + 1) * 4
        True

    References:
        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma et al., 2018)
        | https://arxiv.org/abs/1807.03039
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = 64,
        blocks: int = 2,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        in_channels = check_int(in_channels, "ConvResNet: in_channels")
        out_channels = check_int(out_channels, "ConvResNet: out_channels")
        hidden_channels = check_int(hidden_channels, "ConvResNet: hidden_channels")
        blocks = check_int(blocks, "ConvResNet: blocks", minimum=0)
        if blocks:
            hidden = [_ResidualBlock(hidden_channels, activation) for _ in range(blocks)]
        else:
            hidden = [activation(), nn.Conv2d(hidden_channels, hidden_channels, 1)]
        last = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            *hidden,
            activation(),
            last,
        )

    def forward(self, h: Tensor) -> Tensor:
        batch = h.shape[:-3]
        out = self.net(h.reshape(-1, *h.shape[-3:]))
        return out.reshape(*batch, *out.shape[-3:])
