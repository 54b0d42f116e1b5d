r"""Conditioner networks: they know nothing of flows."""

from .made import MADE, MaskedLinear
from .mlp import MLP, cat_context

__all__ = ["MLP", "MADE", "MaskedLinear", "cat_context"]
