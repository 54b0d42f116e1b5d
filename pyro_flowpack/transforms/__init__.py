r"""Layers: every one a Pyro ``TransformModule`` deriving from :class:`FlowTransform`."""

from .autoregressive import MaskedAffineAutoregressive, MaskedAutoregressive, MaskedSplineAutoregressive
from .base import ConditionedTransform, FlowTransform, Inverse
from .compose import Compose
from .coupling import AdditiveCoupling, AffineCoupling, Coupling, SplineCoupling
from .dequantization import ColumnDequantization, Dequantization, UniformDequantization, VariationalDequantization
from .elementwise import ElementwiseAffine, Logit, Scale
from .linear import InvertibleConv1x1, LULinear, Permute, Reverse
from .monotone import Additive, Affine, MonotoneMap, RationalQuadraticSpline
from .normalization import ActNorm, BatchNorm
from .reshape import FactorOut, Squeeze
from .zuko import ZukoTransform

__all__ = [
    "FlowTransform", "Inverse", "Compose", "ConditionedTransform",
    "Coupling", "AdditiveCoupling", "AffineCoupling", "SplineCoupling",
    "MaskedAutoregressive", "MaskedAffineAutoregressive", "MaskedSplineAutoregressive",
    "Permute", "Reverse", "LULinear", "InvertibleConv1x1", "ActNorm", "BatchNorm", "Logit", "Scale", "ElementwiseAffine", "Squeeze", "FactorOut",
    "Dequantization", "UniformDequantization", "VariationalDequantization", "ColumnDequantization",
    "MonotoneMap", "Additive", "Affine", "RationalQuadraticSpline",
    "ZukoTransform",
]
