r"""The layer protocol: the base class of every layer, a layer bound to a context, and
the inverse of a layer.

Every pyro-flowpack layer derives from :class:`FlowTransform`, a Pyro
:class:`~pyro.distributions.torch_transform.TransformModule` (so both a
:class:`torch.nn.Module` and a :class:`torch.distributions.Transform`). A layer is a
bijection :math:`y = f(x)` whose forward map goes from the base side to the data side
(the sampling direction) and whose inverse goes from data to base (the density
direction). For any layer,

.. math:: \log p_Y(y) = \log p_X(f^{-1}(y)) - \log |\det J_f(f^{-1}(y))| .

A subclass implements two fused methods, each running its network once:

* ``_forward_and_ladj(x, context) -> (y, ladj)``;
* ``_inverse_and_ladj(y, context) -> (x, ladj)``;

where ``ladj`` is always :math:`\log |\det J_f|` of the *forward* map at that point,
summed over the event dimensions (its shape is the batch shape).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import Size, Tensor
from torch.distributions import Transform, constraints

from ..checks import ShapeLike, as_shape, check_finite, check_tensor
from .cache import CacheEntry, LayerState, collect_tensors

__all__ = ["FlowTransform", "ConditionedTransform", "Inverse"]


class FlowTransform(TransformModule, ConditionalTransformModule):
    r"""Base class of every pyro-flowpack layer.

    Every layer is both a Pyro ``TransformModule`` and a Pyro
    ``ConditionalTransformModule``, so that it works in Pyro's conditional API
    (``ConditionalTransformedDistribution``, ``ConditionalComposeTransformModule``):
    ``condition(context)`` binds a conditional layer to a context and returns an
    unconditional layer itself. ``layer.inv`` is torch's inverse transform for an
    unconditional layer and Pyro's conditional inverse for a conditional one, so that
    ``layer.inv.condition(context)`` is the bound layer's inverse.

    It adds to Pyro's ``TransformModule``:

    * fused evaluation :meth:`call_and_ladj` and :meth:`inverse_and_ladj`, each running the
      layer's network once;
    * a cache that is never stale: the result of an evaluation is reused only to invert
      its own output (``inverse_and_ladj(y)`` right after ``y = call_and_ladj(x)[0]``, or
      the converse, and for ``log_abs_det_jacobian(x, y)`` of that very pair), only for the
      very same tensor objects, and only while no parameter or buffer of the layer has
      changed (each is tracked by identity and version counter, so an
      ``optimizer.step()``, ``load_state_dict`` or a parameter replaced by a new tensor
      invalidates it), with the same grad mode and train/eval mode. Writes through
      ``.data`` bypass version counters and cannot be seen: call :meth:`clear_cache`
      (or ``Flow.clear_cache()``) after them;
    * :meth:`condition` for conditional layers (Pyro's conditional API);
    * shape checks with clear errors, and any batch shape.

    Arguments:
        event_shape: The event shape of the base side (an int for vectors).
        context: The number of context features (0 for an unconditional layer), or the
            shape of an image-like context such as ``(C, H, W)``.
    """

    bijective = True
    #: The direction that needs sequential passes (``"forward"`` for a MAF layer,
    #: ``"inverse"`` for an IAF layer), or ``None`` if both are one pass.
    sequential: str | None = None
    #: Whether the layer caches at all (composite layers rely on their parts).
    caches: bool = True
    #: Whether the data side holds discrete values (a dequantization layer).
    discrete_output: bool = False
    #: Whether an evaluation draws random numbers (a dequantization layer), so that no
    #: composition holding the layer may reuse a result.
    stochastic: bool = False

    def __init__(self, event_shape: ShapeLike, context: ShapeLike = 0) -> None:
        super().__init__(cache_size=0)
        if isinstance(context, int) and not isinstance(context, bool) and context < 0:
            raise ValueError(f"context must be a non-negative int (number of context features), got {context!r}")
        self.event_shape = as_shape(event_shape)
        #: The shape of the context (empty for an unconditional layer).
        self.context_shape = Size() if context == 0 else as_shape(context)
        self._cache: CacheEntry | None = None

    @property
    def context_features(self) -> int:
        """The number of context features (0 for an unconditional layer)."""
        return self.context_shape.numel() if self.context_shape else 0

    def _context_description(self) -> str:
        if len(self.context_shape) == 1:
            return f"{self.context_shape[0]} context features"
        return f"a context of shape {tuple(self.context_shape)}"

    # Shapes -----------------------------------------------------------------------
    @property
    def output_shape(self) -> Size:
        """The event shape of the data side (the same as ``event_shape`` unless reshaping)."""
        return self.event_shape

    @property
    def domain(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def codomain(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, len(self.output_shape))

    def forward_shape(self, shape: Sequence[int]) -> Size:
        n = len(self.event_shape)
        return Size(shape[: len(shape) - n]) + self.output_shape

    def inverse_shape(self, shape: Sequence[int]) -> Size:
        n = len(self.output_shape)
        return Size(shape[: len(shape) - n]) + self.event_shape

    # Subclass hooks ---------------------------------------------------------------
    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # Checks -----------------------------------------------------------------------
    def _check_context(self, context: Tensor | None, name: str | None = None) -> Tensor | None:
        name = name or type(self).__name__
        if not self.context_shape:
            if context is not None:
                raise ValueError(f"{name} is unconditional (context=0) but a context was given")
            return None
        if context is None:
            raise ValueError(
                f"{name} is conditional on {self._context_description()} but no context "
                "was given; call layer.condition(context) or flow(context)"
            )
        check_tensor(name, "context", context, self.context_shape)
        return context

    def _broadcast(self, x: Tensor, context: Tensor | None, shape: Size) -> Tensor:
        if context is None:
            return x
        try:
            n = len(self.context_shape)
            batch = torch.broadcast_shapes(x.shape[: x.dim() - len(shape)], context.shape[: context.dim() - n])
        except RuntimeError:
            raise ValueError(
                f"{type(self).__name__}: the batch shapes of the input {tuple(x.shape)} and of the "
                f"context {tuple(context.shape)} do not broadcast"
            ) from None
        return x.expand(batch + shape)

    # Cache --------------------------------------------------------------------------
    def _state_key(self) -> LayerState | None:
        if not self.caches or torch.is_inference_mode_enabled():
            return None
        tensors: list[Tensor] = []
        collect_tensors(self, tensors)
        try:
            return LayerState((torch.is_grad_enabled(), self.training), tensors)
        except RuntimeError:  # inference tensors (made under inference_mode) have no version
            return None

    def _lookup(self, value: Tensor, context: Tensor | None, source: str) -> CacheEntry | None:
        """The cached entry computed from ``source`` whose output is ``value``, if still valid."""
        entry = self._cache
        if entry is None or entry.source != source or entry.context is not context:
            return None
        out = entry.y if source == "x" else entry.x
        if out is not value or not entry.valid(self._state_key()):
            return None
        return entry

    def _store(self, x, y, ladj, context, source) -> None:
        state = self._state_key()
        if state is None or x.is_inference() or y.is_inference():
            self._cache = None
            return
        self._cache = CacheEntry(x, y, ladj, context, source, state)

    def clear_cache(self) -> None:
        """Forgets the cached evaluation (it is never needed for correctness)."""
        self._cache = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_cache"] = None  # never pickle or deepcopy graph tensors
        return state

    # Fused paths ------------------------------------------------------------------
    def call_and_ladj(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Returns :math:`y = f(x)` and :math:`\log |\det J_f(x)|`, running the network once."""
        check_tensor(type(self).__name__, "input", x, self.event_shape)
        context = self._check_context(context)
        entry = self._lookup(x, context, "y")
        if entry is not None:
            return entry.y, entry.ladj
        y, ladj = self._forward_and_ladj(self._broadcast(x, context, self.event_shape), context)
        self._store(x, y, ladj, context, "x")
        return y, ladj

    def inverse_and_ladj(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r"""Returns :math:`x = f^{-1}(y)` and :math:`\log |\det J_f(x)|` (of the forward map)."""
        check_tensor(type(self).__name__, "input", y, self.output_shape)
        context = self._check_context(context)
        entry = self._lookup(y, context, "x")
        if entry is not None:
            return entry.x, entry.ladj
        x, ladj = self._inverse_and_ladj(self._broadcast(y, context, self.output_shape), context)
        self._store(x, y, ladj, context, "y")
        return x, ladj

    def ladj(self, x: Tensor, y: Tensor, context: Tensor | None = None) -> Tensor:
        r"""The log-abs-det-Jacobian of the forward map for the pair ``y = f(x)``."""
        entry = self._cache
        if entry is not None and entry.x is x and entry.y is y and entry.context is context:
            if entry.valid(self._state_key()):
                return entry.ladj
        if self.sequential == "forward":
            return self.inverse_and_ladj(y, context)[1]
        return self.call_and_ladj(x, context)[1]

    # torch.distributions.Transform API -------------------------------------------
    def condition(self, context: Tensor | None) -> Transform:
        """This layer bound to ``context`` (Pyro's conditional API); itself if unconditional."""
        if not self.context_shape:
            return self
        return ConditionedTransform(self, self._check_context(context))

    @property
    def inv(self) -> Transform:
        """The inverse: torch's for an unconditional layer, Pyro's conditional inverse
        (whose ``condition(context)`` is ``self.condition(context).inv``) for a conditional
        one. Use :class:`Inverse` for an inverse that is itself a layer."""
        if self.context_shape:
            return ConditionalTransformModule.inv.fget(self)
        return Transform.inv.fget(self)

    def with_cache(self, cache_size: int = 1) -> "FlowTransform":
        return self  # the cache is built in and never stale

    def __call__(self, x: Tensor) -> Tensor:
        check_finite(type(self).__name__, "input", x)
        return self.call_and_ladj(x)[0]

    def _inv_call(self, y: Tensor) -> Tensor:
        check_finite(type(self).__name__, "input", y)
        return self.inverse_and_ladj(y)[0]

    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_ladj(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.ladj(x, y)

    def __repr__(self) -> str:
        return nn.Module.__repr__(self)


class ConditionedTransform(FlowTransform):
    r"""A conditional layer bound to a context tensor, as returned by
    :meth:`FlowTransform.condition`. It shares the parameters of the layer.

    Arguments:
        layer: The conditional layer.
        context: The context, of shape ``(..., layer.context_features)``.
    """

    caches = False

    def __init__(self, layer: FlowTransform, context: Tensor) -> None:
        super().__init__(layer.event_shape)
        self.layer = layer
        self.context = context
        self.sequential = layer.sequential

    @property
    def domain(self) -> constraints.Constraint:
        return self.layer.domain

    @property
    def codomain(self) -> constraints.Constraint:
        return self.layer.codomain

    @property
    def output_shape(self) -> Size:
        return self.layer.output_shape

    @property
    def discrete_output(self) -> bool:
        return self.layer.discrete_output

    def call_and_ladj(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.layer.call_and_ladj(x, self.context)

    def inverse_and_ladj(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.layer.inverse_and_ladj(y, self.context)

    def ladj(self, x: Tensor, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.layer.ladj(x, y, self.context)

    def condition(self, context: Tensor | None) -> Transform:
        return self.layer.condition(context)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["context"] = self.context.detach()
        return state


class Inverse(FlowTransform):
    r"""The inverse :math:`f^{-1}` of a layer, as a layer whose parameters stay registered.

    Its forward map is the layer's inverse and vice versa, with
    :math:`\log |\det J_{f^{-1}}(y)| = -\log |\det J_f(f^{-1}(y))|`. Unlike torch's
    ``layer.inv``, it is an :class:`~torch.nn.Module`, so optimizers and ``state_dict``
    see the parameters. An autoregressive layer in MAF form becomes one in IAF form.

    Arguments:
        layer: The layer to invert.

    Example:
        >>> layer = Inverse(MaskedAffineAutoregressive(3))
        >>> y, ladj = layer.call_and_ladj(torch.randn(3))
    """

    caches = False

    def __init__(self, layer: FlowTransform) -> None:
        if not isinstance(layer, FlowTransform):
            raise TypeError(f"Inverse expects a FlowTransform layer, got {type(layer).__name__}")
        super().__init__(layer.output_shape, layer.context_shape or 0)
        self.layer = layer
        self.sequential = {"forward": "inverse", "inverse": "forward"}.get(layer.sequential)

    @property
    def domain(self) -> constraints.Constraint:
        return self.layer.codomain

    @property
    def codomain(self) -> constraints.Constraint:
        return self.layer.domain

    @property
    def output_shape(self) -> Size:
        return self.layer.event_shape

    def call_and_ladj(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, ladj = self.layer.inverse_and_ladj(x, context)
        return y, -ladj

    def inverse_and_ladj(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, ladj = self.layer.call_and_ladj(y, context)
        return x, -ladj

    def ladj(self, x: Tensor, y: Tensor, context: Tensor | None = None) -> Tensor:
        return -self.layer.ladj(y, x, context)
