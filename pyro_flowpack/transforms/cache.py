r"""The evaluation cache of a layer, which can never go stale.

A layer keeps its last evaluation (inputs, outputs, log-determinant) together with what
the evaluation depended on: the grad and train modes and each parameter and buffer, by
identity and version counter. The entry is reused only for the very same tensors and
only while none of those has changed, so ``log_prob`` after an ``optimizer.step()``, a
``load_state_dict`` or a replaced parameter is computed afresh.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

__all__ = ["CacheEntry", "LayerState", "collect_tensors"]


def collect_tensors(module: nn.Module, out: list[Tensor]) -> None:
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
            collect_tensors(m, out)


class LayerState:
    """What a layer's evaluation depends on besides its inputs: the grad and train modes,
    and each parameter and buffer, by identity and version counter (a tensor replaced by
    another of the same version, or updated in place, both make the state differ)."""

    __slots__ = ("modes", "tensors", "versions")

    def __init__(self, modes: tuple, tensors: list[Tensor]) -> None:
        self.modes, self.tensors = modes, tensors
        self.versions = [t._version for t in tensors]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, LayerState)
            and self.modes == other.modes
            and len(self.tensors) == len(other.tensors)
            and all(a is b for a, b in zip(self.tensors, other.tensors))
            and self.versions == other.versions
        )

    __hash__ = None  # mutable tensors: compared, never hashed


class CacheEntry:
    """One evaluation of a layer: its inputs, outputs, and what it depends on."""

    __slots__ = ("x", "y", "ladj", "context", "source", "state", "versions")

    def __init__(self, x: Tensor, y: Tensor, ladj: Tensor, context: Tensor | None, source: str, state: LayerState):
        self.x, self.y, self.ladj, self.context, self.source = x, y, ladj, context, source
        self.state, self.versions = state, self._versions(x, y, context)

    @staticmethod
    def _versions(x: Tensor, y: Tensor, context: Tensor | None) -> tuple:
        return x._version, y._version, None if context is None else context._version

    def valid(self, state: LayerState | None) -> bool:
        """Whether the layer's state and the tensors (context included) are unchanged."""
        return self.state == state and self.versions == self._versions(self.x, self.y, self.context)
