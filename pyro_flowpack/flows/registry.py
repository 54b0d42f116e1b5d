r"""The one registry of flows by name, read by the builders' users: the ``flowpack``
command, :func:`~pyro_flowpack.train.build_flow` (and so :func:`~pyro_flowpack.train.load_run`)
and :class:`~pyro_flowpack.infer.AutoFlowGuide`.

An entry is a builder (a :class:`~pyro_flowpack.flow.Flow` subclass or a function
returning one), the kind of events it models (``"vector"`` for :math:`(D,)`,
``"image"`` for :math:`(C, H, W)`), options fixed by the name, and the defaults a guide
uses where they differ from density estimation. Its options are read from the builder's
signature, so nothing else lists them.

A family of elementwise monotone maps becomes flows with one line,
:func:`register_family`: the map's class is wrapped in coupling layers (the name itself)
and in masked autoregressive layers (``name + "-ar"``), and the map's own constructor
arguments become options of both:

.. code-block:: python

    class MyMap(pf.transforms.MonotoneMap):   # forward(x, theta), shapes; the inverse is generic
        ...

    pf.flows.register_family("mymap", MyMap)  # "mymap" and "mymap-ar", everywhere

Example:
    >>> flow_entry("nsf").build(2, transforms=2, hidden=(8,)).event_shape
    torch.Size([2])
    >>> sorted(flow_entry("bernstein").options())[:3]
    ['bound', 'closed_form', 'degree']
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..flow import Flow
from ..transforms.monotone import Bernstein, SumOfSquares
from .autoregressive import IAF, MAF, AutoregressiveFlow
from .circular import CircularNSF
from .coupling import NICE, CouplingFlow, RealNVP
from .image import Glow, MultiscaleRealNVP
from .spline import NSF
from .zuko import CNF

__all__ = ["FlowEntry", "FLOWS", "register_flow", "register_family", "flow_entry", "flow_names"]

KINDS = ("vector", "image")
# the arguments of a builder that are not options: the event and the context
_EVENT_ARGUMENTS = {"vector": ("features", "context"), "image": ("shape",)}


@dataclass(frozen=True)
class FlowEntry:
    r"""A flow known by name.

    Arguments:
        name: The name (``"nsf"``).
        builder: The :class:`~pyro_flowpack.flow.Flow` class or function building it,
            called as ``builder(features, context=..., **options)`` for vectors and
            ``builder(shape, **options)`` for images.
        kind: ``"vector"`` or ``"image"``.
        summary: One line for listings (``flowpack train --help``).
        fixed: Options the name fixes (``{"autoregressive": True}`` for ``"nsf-ar"``).
        guide: Defaults :class:`~pyro_flowpack.infer.AutoFlowGuide` uses instead of the
            builder's (a guide draws every step, so its layers favour the sampling
            direction).
        monotone: For a family (:func:`register_family`), the monotone map's class,
            whose constructor arguments are options too.
    """

    name: str
    builder: Callable[..., Flow]
    kind: str = "vector"
    summary: str = ""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    guide: Mapping[str, Any] = field(default_factory=dict)
    monotone: type | None = None

    def _builder_options(self) -> dict[str, inspect.Parameter]:
        skip = {*_EVENT_ARGUMENTS[self.kind], *self.fixed, "monotone"}
        return {n: p for n, p in inspect.signature(self.builder).parameters.items()
                if n not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}

    def _monotone_options(self) -> dict[str, inspect.Parameter]:
        if self.monotone is None:
            return {}
        return {n: p for n, p in inspect.signature(self.monotone).parameters.items()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}

    def options(self) -> dict[str, Any]:
        r"""The options of this flow and their defaults (``inspect.Parameter.empty`` if required)."""
        return {n: p.default for n, p in {**self._builder_options(), **self._monotone_options()}.items()}

    def check_options(self, options: Mapping[str, Any]) -> None:
        r"""Raises a ``TypeError`` naming the accepted options if ``options`` holds others."""
        unknown = sorted(set(options) - set(self.options()))
        if unknown:
            raise TypeError(f"flow {self.name!r} takes no option(s) {', '.join(unknown)}; its options are "
                            f"{', '.join(sorted(self.options())) or 'none'}")

    def build(self, event: int | tuple, context: int = 0, **options: Any) -> Flow:
        r"""Builds the flow for ``event`` (the number of features, or an image shape)."""
        self.check_options(options)
        builder_options = {**self.fixed, **{k: v for k, v in options.items() if k in self._builder_options()}}
        if self.monotone is not None:
            monotone = self.monotone(**{k: v for k, v in options.items() if k in self._monotone_options()})
            builder_options["monotone"] = monotone
        if self.kind == "image":
            if context:
                raise ValueError(f"flow {self.name!r} is an unconditional image flow, got context={context}")
            return self.builder(event, **builder_options)
        return self.builder(event, context=context, **builder_options)


#: Every flow by kind and name: ``FLOWS["vector"]["nsf"]`` is a :class:`FlowEntry`.
FLOWS: dict[str, dict[str, FlowEntry]] = {kind: {} for kind in KINDS}


def register_flow(name: str, builder: Callable[..., Flow], kind: str = "vector", summary: str = "",
                  fixed: Mapping[str, Any] | None = None, guide: Mapping[str, Any] | None = None,
                  monotone: type | None = None) -> FlowEntry:
    r"""Adds a flow to :data:`FLOWS` (replacing one of the same kind and name) and returns its entry."""
    if kind not in KINDS:
        raise ValueError(f"register_flow: kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_flow: name must be a non-empty string, got {name!r}")
    entry = FlowEntry(name, builder, kind, summary, dict(fixed or {}), dict(guide or {}), monotone)
    entry.options()  # a builder whose signature cannot be read fails here, not at first use
    FLOWS[kind][name] = entry
    return entry


def register_family(name: str, monotone: type, summary: str = "") -> tuple[FlowEntry, FlowEntry]:
    r"""Registers the monotone map class ``monotone`` as two flows: ``name`` (coupling
    layers, :class:`~pyro_flowpack.flows.CouplingFlow`) and ``name + "-ar"`` (masked
    autoregressive layers in MAF form, :class:`~pyro_flowpack.flows.AutoregressiveFlow`).
    A guide builds the same flows with the closed-form direction of the map on the
    sampling side (``closed_form="sampling"``)."""
    what = summary or f"{monotone.__name__} maps"
    guide = {"closed_form": "sampling"}
    return (
        register_flow(name, CouplingFlow, summary=f"coupling layers of {what}", guide=guide, monotone=monotone),
        register_flow(f"{name}-ar", AutoregressiveFlow, summary=f"autoregressive layers of {what}",
                      guide={**guide, "form": "iaf"}, monotone=monotone),
    )


def flow_names(kind: str = "vector") -> list[str]:
    r"""The names of the flows of one kind, in registration order."""
    return list(FLOWS[kind])


def flow_entry(name: str, kind: str = "vector") -> FlowEntry:
    r"""The entry of ``name`` among the flows of ``kind``, with a clear error otherwise."""
    if kind not in KINDS:
        raise ValueError(f"flow kind must be one of {KINDS}, got {kind!r}")
    if name in FLOWS[kind]:
        return FLOWS[kind][name]
    other = next(k for k in KINDS if k != kind)
    what = {"vector": "vectors (D,)", "image": "images (C, H, W)"}
    if name in FLOWS[other]:
        raise ValueError(f"flow {name!r} is for {what[other]}; for {what[kind]} choose one of "
                         f"{', '.join(FLOWS[kind])}")
    raise ValueError(f"unknown flow {name!r}; for {what[kind]} choose one of {', '.join(FLOWS[kind])}")


register_flow("nsf", NSF, summary="rational-quadratic spline couplings (the default for vectors)")
register_flow("nsf-ar", NSF, summary="rational-quadratic spline autoregressive layers (MAF form)",
              fixed={"autoregressive": True})
register_flow("maf", MAF, summary="affine autoregressive layers, one-pass density")
register_flow("iaf", IAF, summary="affine autoregressive layers, one-pass sampling",
              guide={"transforms": 4, "log_scale_bounds": (-5.0, 3.0)})
register_flow("realnvp", RealNVP, summary="affine couplings", guide={"transforms": 6})
register_flow("nice", NICE, summary="additive couplings and a diagonal scaling")
register_flow("cnf", CNF, summary="a continuous flow (zuko's ODE solver)")
register_flow("circular-nsf", CircularNSF, summary="circular spline couplings: angles in [-pi, pi)")
register_family("bernstein", Bernstein, "Bernstein polynomials")
register_family("sos", SumOfSquares, "sum-of-squares polynomials")
register_flow("glow", Glow, kind="image", summary="Glow: ActNorm, 1x1 convolutions, couplings (the default)")
register_flow("realnvp", MultiscaleRealNVP, kind="image", summary="the multi-scale RealNVP")
