r"""Conditioner networks: they know nothing of flows."""

from .made import MADE, MaskedLinear
from .mlp import MLP, Constant, cat_context
from .resnet import ConvResNet, cat_channels

__all__ = ["MLP", "Constant", "MADE", "MaskedLinear", "ConvResNet", "cat_context", "cat_channels"]
