r"""Layers: every one a Pyro ``TransformModule`` deriving from :class:`FlowTransform`."""

from .autoregressive import MaskedAffineAutoregressive, MaskedAutoregressive, MaskedSplineAutoregressive
from .base import Compose, ConditionedTransform, FlowTransform, Inverse
from .coupling import AdditiveCoupling, AffineCoupling, Coupling, SplineCoupling
from .elementwise import Logit, Scale
from .linear import LULinear, Permute, Reverse
from .monotone import Additive, Affine, MonotoneMap, RationalQuadraticSpline
from .normalization import ActNorm, BatchNorm
from .reshape import Squeeze

__all__ = [
    "FlowTransform", "Inverse", "Compose", "ConditionedTransform",
    "Coupling", "AdditiveCoupling", "AffineCoupling", "SplineCoupling",
    "MaskedAutoregressive", "MaskedAffineAutoregressive", "MaskedSplineAutoregressive",
    "Permute", "Reverse", "LULinear", "ActNorm", "BatchNorm", "Logit", "Scale", "Squeeze",
    "MonotoneMap", "Additive", "Affine", "RationalQuadraticSpline",
]
