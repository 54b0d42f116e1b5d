r"""Composition of layers: :class:`Compose`, and :func:`call_and_ladj` for any transform."""

from __future__ import annotations

import torch.nn as nn
from torch import Size, Tensor
from torch.distributions import Transform, constraints
from torch.distributions.utils import _sum_rightmost

from ..checks import ShapeLike, as_shape
from .base import FlowTransform

__all__ = ["Compose", "call_and_ladj"]


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


def _with_event_dim(constraint: constraints.Constraint, event_dim: int) -> constraints.Constraint:
    """``constraint`` over ``event_dim`` event dimensions (an elementwise part's, such as
    Pyro's ``Spline``, is reinterpreted)."""
    missing = event_dim - constraint.event_dim
    return constraints.independent(constraint, missing) if missing > 0 else constraint


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

    # the first part's domain and the last part's codomain, so that a flow ending in a
    # support layer (Bounded, Positive, circular) reports its support
    @property
    def domain(self) -> constraints.Constraint:
        return _with_event_dim(self.parts[0].domain, len(self.event_shape)) if self.parts else super().domain

    @property
    def codomain(self) -> constraints.Constraint:
        return _with_event_dim(self.parts[-1].codomain, len(self.output_shape)) if self.parts else super().codomain

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
