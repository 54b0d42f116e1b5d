r"""Builders: each returns a :class:`~pyro_flowpack.flow.Flow`."""

from .autoregressive import IAF, MAF
from .coupling import NICE, RealNVP
from .image import Glow, MultiscaleRealNVP
from .spline import NSF

__all__ = ["NICE", "RealNVP", "MAF", "IAF", "NSF", "Glow", "MultiscaleRealNVP"]
