r"""Layers: every one a Pyro ``TransformModule`` deriving from :class:`FlowTransform`."""

from .autoregressive import MaskedAffineAutoregressive, MaskedAutoregressive, MaskedSplineAutoregressive
from .base import ConditionedTransform, FlowTransform, Inverse
from .circular import CircularRationalQuadraticSpline, CircularSplineCoupling
from .compose import Compose
from .coupling import AdditiveCoupling, AffineCoupling, Coupling, SplineCoupling
from .dequantization import ColumnDequantization, Dequantization, UniformDequantization, VariationalDequantization
from .elementwise import ElementwiseAffine, Logit, Scale
from .linear import InvertibleConv1x1, LULinear, Permute, Reverse
from .monotone import (
    Additive,
    Affine,
    Bernstein,
    Inverted,
    MonotoneMap,
    RationalQuadraticSpline,
    SoftBoundedAffine,
    SumOfSquares,
)
from .normalization import ActNorm, BatchNorm
from .reshape import FactorOut, Squeeze
from .support import Bounded, Positive, Support, parse_support
from .zuko import ZukoTransform

__all__ = [
    "FlowTransform", "Inverse", "Compose", "ConditionedTransform",
    "Coupling", "AdditiveCoupling", "AffineCoupling", "SplineCoupling", "CircularSplineCoupling",
    "MaskedAutoregressive", "MaskedAffineAutoregressive", "MaskedSplineAutoregressive",
    "Permute", "Reverse", "LULinear", "InvertibleConv1x1", "ActNorm", "BatchNorm", "Logit", "Scale", "ElementwiseAffine",
    "Squeeze", "FactorOut",
    "Dequantization", "UniformDequantization", "VariationalDequantization", "ColumnDequantization",
    "MonotoneMap", "Additive", "Affine", "SoftBoundedAffine", "RationalQuadraticSpline", "Bernstein", "SumOfSquares",
    "Inverted", "CircularRationalQuadraticSpline",
    "Support", "Bounded", "Positive", "parse_support",
    "ZukoTransform",
]
