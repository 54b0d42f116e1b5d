r"""Builders: each returns a :class:`~pyro_flowpack.flow.Flow`."""

from .autoregressive import IAF, MAF
from .coupling import NICE, RealNVP
from .image import Glow, MultiscaleRealNVP
from .spline import NSF
from .zuko import CNF, from_zuko

__all__ = ["NICE", "RealNVP", "MAF", "IAF", "NSF", "Glow", "MultiscaleRealNVP", "CNF", "from_zuko"]
