r"""Convolutional conditioner networks for image layers."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

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
    r"""A convolutional residual network mapping images ``(..., C_in, H, W)`` to
    ``(..., C_out, H, W)``: a 3x3 convolution, residual blocks (3x3 then 1x1 convolutions),
    and a 3x3 output convolution initialised at zero, so that a layer whose parameters
    it outputs starts at the identity (Glow). Any batch shape is accepted.

    Arguments:
        in_channels: The number of input channels.
        out_channels: The number of output channels.
        hidden_channels: The number of hidden channels.
        blocks: The number of residual blocks.
        activation: The activation module constructor.

    Example:
        >>> net = ConvResNet(2, 6, hidden_channels=16)
        >>> net(torch.randn(5, 3, 2, 8, 8)).shape
        torch.Size([5, 3, 6, 8, 8])

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
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("hidden_channels", hidden_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ConvResNet: {name} must be a positive int, got {value!r}")
        if not isinstance(blocks, int) or blocks < 0:
            raise ValueError(f"ConvResNet: blocks must be a non-negative int, got {blocks!r}")
        last = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            *(_ResidualBlock(hidden_channels, activation) for _ in range(blocks)),
            activation(),
            last,
        )

    def forward(self, h: Tensor) -> Tensor:
        batch = h.shape[:-3]
        out = self.net(h.reshape(-1, *h.shape[-3:]))
        return out.reshape(*batch, *out.shape[-3:])
