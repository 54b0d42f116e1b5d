r"""The layer base class, its inverse and composition.

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

from typing import Any, Sequence

import torch
import torch.nn as nn
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import Size, Tensor
from torch.distributions import Distribution, Transform, constraints
from torch.distributions.utils import _sum_rightmost

__all__ = [
    "FlowTransform",
    "check_features",
    "Inverse",
    "Compose",
    "ConditionedTransform",
    "call_and_ladj",
]

ShapeLike = int | Sequence[int] | Size


def check_features(name: str, features: Any, minimum: int = 1) -> int:
    """Raises a clear error unless ``features`` is an int of at least ``minimum``."""
    if isinstance(features, bool) or not isinstance(features, int) or features < minimum:
        raise ValueError(f"{name} expects features to be an int >= {minimum}, got {features!r}")
    return features


def as_shape(shape: ShapeLike) -> Size:
    """Turns an int (a number of features) or a sequence of positive ints into a
    :class:`torch.Size`, raising a clear error otherwise."""
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    for d in dims:
        check_features("an event shape", d)
    return Size(dims)


def check_tensor(name: str, what: str, value: Any, event_shape: Size) -> None:
    r"""Raises a clear error unless ``value`` is a floating tensor ending in ``event_shape``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} expects the {what} to be a torch.Tensor, got {type(value).__name__}")
    n = len(event_shape)
    if value.dim() < n or value.shape[value.dim() - n :] != event_shape:
        raise ValueError(
            f"{name} expects the {what} to have trailing (event) shape {tuple(event_shape)}, "
            f"got a tensor of shape {tuple(value.shape)}"
        )
    if not value.is_floating_point():
        raise TypeError(f"{name} expects a floating-point {what}, got dtype {value.dtype}")


def check_like(name: str, what: str, value: Tensor, reference: Tensor) -> None:
    r"""Raises a clear error unless ``value`` has the dtype and device of ``reference``."""
    if value.dtype != reference.dtype or value.device != reference.device:
        raise TypeError(
            f"{name} expects a {what} of dtype {reference.dtype} on {reference.device} (the flow's), "
            f"got {value.dtype} on {value.device}; move the flow with .to() or convert the {what}"
        )


def check_finite(name: str, what: str, value: Tensor) -> None:
    r"""Under torch's distribution validation, raises if ``value`` holds NaN or infinity."""
    if Distribution._validate_args and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} got a non-finite {what} (NaN or infinity); expected finite values")


def _collect_tensors(module: nn.Module, out: list[Tensor]) -> None:
    # a direct walk of the module tree: several times cheaper than .parameters(), and it
    # always sees the current tensors, even after parameters or submodules are replaced
    for t in module._parameters.values():
        if t is not None:
            out.append(t)
    for t in module._buffers.values():
        if t is not None:
            out.append(t)
    for m in module._modules.values():
        if m is not None:
            _collect_tensors(m, out)


class _State:
    """What a layer's evaluation depends on besides its inputs: the grad and train modes,
    and each parameter and buffer, by identity and version counter (a tensor replaced by
    another of the same version, or updated in place, both make the state differ)."""

    __slots__ = ("modes", "tensors", "versions")

    def __init__(self, modes: tuple, tensors: list[Tensor]) -> None:
        self.modes, self.tensors = modes, tensors
        self.versions = [t._version for t in tensors]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _State)
            and self.modes == other.modes
            and len(self.tensors) == len(other.tensors)
            and all(a is b for a, b in zip(self.tensors, other.tensors))
            and self.versions == other.versions
        )

    __hash__ = None  # mutable tensors: compared, never hashed


class _CacheEntry:
    """One evaluation of a layer: its inputs, outputs, and what it depends on."""

    __slots__ = ("x", "y", "ladj", "context", "source", "state", "versions")

    def __init__(self, x: Tensor, y: Tensor, ladj: Tensor, context: Tensor | None, source: str, state: _State):
        self.x, self.y, self.ladj, self.context, self.source = x, y, ladj, context, source
        self.state, self.versions = state, self._versions(x, y, context)

    @staticmethod
    def _versions(x: Tensor, y: Tensor, context: Tensor | None) -> tuple:
        return x._version, y._version, None if context is None else context._version

    def valid(self, state: _State | None) -> bool:
        """Whether the layer's state and the tensors (context included) are unchanged."""
        return self.state == state and self.versions == self._versions(self.x, self.y, self.context)


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
        self._cache: _CacheEntry | None = None

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
    def _state_key(self) -> _State | None:
        if not self.caches or torch.is_inference_mode_enabled():
            return None
        tensors: list[Tensor] = []
        _collect_tensors(self, tensors)
        try:
            return _State((torch.is_grad_enabled(), self.training), tensors)
        except RuntimeError:  # inference tensors (made under inference_mode) have no version
            return None

    def _lookup(self, value: Tensor, context: Tensor | None, source: str) -> _CacheEntry | None:
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
        self._cache = _CacheEntry(x, y, ladj, context, source, state)

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


def call_and_ladj(
    transform: Transform, x: Tensor, context: Tensor | None, event_dim: int, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    r"""Applies any transform (fused for pyro-flowpack layers) and returns its output and
    log-abs-det-Jacobian of the forward map summed down to the batch shape, where
    ``event_dim`` is the number of event dimensions of the input."""
    if isinstance(transform, FlowTransform):
        context = context if transform.context_shape else None
        if inverse:
            return transform.inverse_and_ladj(x, context)
        return transform.call_and_ladj(x, context)
    if isinstance(transform, nn.Module) and hasattr(transform, "condition") and context is not None:
        transform = transform.condition(context)
    if inverse:
        y = transform.inv(x)
        ladj = transform.log_abs_det_jacobian(y, x)
    else:
        y = transform(x)
        ladj = transform.log_abs_det_jacobian(x, y)
    batch_dim = x.dim() - event_dim
    return y, _sum_rightmost(ladj, ladj.dim() - batch_dim)


class Compose(FlowTransform):
    r"""The composition :math:`f = f_n \circ \dots \circ f_1` of layers (``f_1`` on the
    base side), with :math:`\log|\det J_f| = \sum_i \log|\det J_{f_i}|`.

    Parts may be pyro-flowpack layers or any :class:`torch.distributions.Transform`;
    context is passed to every conditional part.

    Arguments:
        transforms: The parts, from the base side to the data side.

    Example:
        >>> f = Compose(Reverse(2), AffineCoupling(2))
        >>> y, ladj = f.call_and_ladj(torch.randn(5, 2))
    """

    def __init__(self, *transforms: Transform, event_shape: ShapeLike | None = None) -> None:
        for t in transforms:
            if not isinstance(t, Transform):
                raise TypeError(f"Compose expects torch.distributions.Transform parts, got {type(t).__name__}")
        if event_shape is None:
            if not transforms or not isinstance(transforms[0], FlowTransform):
                raise ValueError("Compose needs event_shape unless its first part is a FlowTransform")
            event_shape = transforms[0].event_shape
        shapes = [as_shape(event_shape)]
        for t in transforms:
            if isinstance(t, FlowTransform) and t.event_shape != shapes[-1]:
                raise ValueError(
                    f"Compose: {type(t).__name__} expects event shape {tuple(t.event_shape)}, "
                    f"but the part before it gives {tuple(shapes[-1])}"
                )
            shapes.append(Size(t.forward_shape(shapes[-1])))
        contexts = {t.context_shape for t in transforms if isinstance(t, FlowTransform)} - {Size()}
        if len(contexts) > 1:
            shapes_ = sorted(tuple(c) for c in contexts)
            raise ValueError(f"Compose: parts disagree on the context shape: {shapes_}")
        super().__init__(shapes[0], contexts.pop() if contexts else 0)
        directions = {getattr(t, "sequential", None) for t in transforms}
        # the direction to avoid for a log-determinant alone
        self.sequential = "forward" if "forward" in directions else ("inverse" if "inverse" in directions else None)
        self.parts = list(transforms)
        self.modules_ = nn.ModuleList([t for t in transforms if isinstance(t, nn.Module)])
        self._shapes = shapes
        self.caches = not any(isinstance(m, FlowTransform) and m.stochastic for m in self.modules_.modules())

    @property
    def output_shape(self) -> Size:
        return self._shapes[-1]

    @property
    def discrete_output(self) -> bool:
        return bool(self.parts) and getattr(self.parts[-1], "discrete_output", False)

    def _run(self, value: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        parts = zip(self.parts, self._shapes, self._shapes[1:])
        if inverse:
            parts = [(t, b, a) for t, a, b in reversed(list(parts))]
        total = None
        for t, shape_in, _ in parts:
            value, ladj = call_and_ladj(t, value, context, len(shape_in), inverse)
            total = ladj if total is None else total + ladj
        if total is None:
            total = value.new_zeros(value.shape[: value.dim() - len(self.output_shape)])
        return value, total

    # the composition caches its own evaluation too, so that ``log_abs_det_jacobian(x, y)``
    # right after ``y = f(x)`` (as Pyro's NeuTraReparam calls them) runs no network again
    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._run(x, context, inverse=False)

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._run(y, context, inverse=True)



    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> Transform:
        return self.parts[i]
