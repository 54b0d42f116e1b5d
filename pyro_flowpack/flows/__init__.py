r"""Builders: each returns a :class:`~pyro_flowpack.flow.Flow`; and the one registry of
flows by name (:data:`FLOWS`) that the command line, the trainer and the guides read."""

from .autoregressive import IAF, MAF, AutoregressiveFlow
from .circular import CircularNSF
from .coupling import NICE, CouplingFlow, RealNVP
from .image import Glow, MultiscaleRealNVP
from .registry import FLOWS, FlowEntry, flow_entry, flow_names, register_family, register_flow
from .spline import NSF
from .zuko import CNF, from_zuko

__all__ = [
    "NICE",
    "RealNVP",
    "MAF",
    "IAF",
    "NSF",
    "CouplingFlow",
    "AutoregressiveFlow",
    "CircularNSF",
    "Glow",
    "MultiscaleRealNVP",
    "CNF",
    "from_zuko",
    "FLOWS",
    "FlowEntry",
    "flow_entry",
    "flow_names",
    "register_flow",
    "register_family",
]
