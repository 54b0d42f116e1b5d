r"""Any zuko lazy transform as a pyro-flowpack layer.

`zuko <https://zuko.readthedocs.io>`_ writes a flow's bijection in the density
direction: a zuko :class:`~zuko.lazy.LazyTransform` called with a context :math:`c`
returns a torch transform :math:`g_c` from the data side to the base side, and a zuko
flow's density is :math:`\log p(x) = \log p_Z(g_c(x)) + \log |\det J_{g_c}(x)|`.
Pyro, torch and pyro-flowpack use the opposite direction, so the layer's forward
(sampling) map is zuko's inverse,

.. math:: f_c = g_c^{-1}, \qquad
          \log |\det J_{f_c}(z)| = -\log |\det J_{g_c}(f_c(z))| .

Where zuko inverts numerically (bisection for NAF, UNAF, SOSPF, BPF and GF layers, an
ODE solve for a CNF), sampling with the layer is slower than density evaluation and only
as accurate as that numerical inverse.

zuko is imported only when a zuko object is wrapped: importing zuko switches off torch's
distribution argument validation for the whole process, and :func:`import_zuko` puts the
user's setting back.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch import Tensor
from torch.distributions import Distribution, Transform
from torch.distributions.utils import _sum_rightmost

from ..checks import ShapeLike, check_int
from .base import FlowTransform

if TYPE_CHECKING:
    from zuko.lazy import LazyTransform

__all__ = ["ZukoTransform", "import_zuko"]


def import_zuko() -> ModuleType:
    r"""Imports and returns :mod:`zuko`, leaving torch's default distribution argument
    validation (``torch.distributions.Distribution._validate_args``) as it was: zuko's
    import sets it to ``False`` for the whole process."""
    saved = Distribution._validate_args
    try:
        import zuko
    except ImportError as error:
        raise ImportError("the zuko adapter needs zuko: pip install zuko") from error
    finally:
        Distribution.set_default_validate_args(saved)
    return zuko


class ZukoTransform(FlowTransform):
    r"""A zuko lazy transform (a layer, or a whole flow's ``transform``) as a layer with
    Pyro's direction: the forward map :math:`f_c = g_c^{-1}` goes from the base side to
    the data side, where :math:`g_c` = ``transform(c)`` is zuko's data-to-base map.

    The zuko module is registered as a submodule, so ``parameters()``, ``state_dict`` and
    ``.to()`` see its parameters and buffers; the layer gets the fused paths, the cache,
    :meth:`condition` and the shape checks of :class:`FlowTransform`. The context is
    broadcast to the batch shape of the input and passed to ``transform(c)``.

    zuko's own numerical inverses decide the cost and accuracy of the forward (sampling)
    map: NAF, UNAF, SOSPF, BPF and GF layers invert by bisection (to about ``1e-6`` on
    ``[-10, 10]``, so data beyond that bound cannot be reached), a CNF by an adaptive ODE
    solve to its ``atol``/``rtol``. zuko lets gradients reach the parameters through a
    numerical solver only in training mode; for a transform that exposes its solver's
    parameters (a CNF's), this layer passes them whenever autograd records, in evaluation
    mode too. The inner bisections of NAF-like layers stay as zuko makes them.

    Arguments:
        transform: A :class:`zuko.lazy.LazyTransform` (any zuko layer, e.g.
            ``zuko.flows.MaskedAutoregressiveTransform``, or ``zuko_flow.transform``).
        features: The event shape: the number of features (an int) or a shape.
        context: The number of context features (0 for an unconditional transform); zuko
            takes vector contexts only.

    Example:
        >>> import zuko
        >>> layer = ZukoTransform(zuko.flows.NSF(3, context=2).transform, features=3, context=2)
        >>> x, c = torch.randn(4, 3), torch.randn(4, 2)
        >>> y, ladj = layer.call_and_ladj(x, c)
        >>> torch.allclose(layer.inverse_and_ladj(y.clone(), c)[0], x, atol=1e-4)
        True
    """

    # zuko's inverse, our forward, is the costly direction (sequential, bisection or an ODE)
    # for all but coupling layers: a log-determinant alone is taken the other way
    sequential = "forward"

    def __init__(self, transform: "LazyTransform", features: ShapeLike, context: int = 0) -> None:
        zuko = import_zuko()
        if not isinstance(transform, zuko.lazy.LazyTransform):
            raise TypeError(
                f"ZukoTransform expects a zuko LazyTransform (a zuko layer or a zuko flow's .transform), "
                f"got {type(transform).__name__}"
            )
        context = check_int(context, "ZukoTransform: context (zuko takes vector contexts)", minimum=0)
        super().__init__(features, context)
        self.lazy_transform: nn.Module = transform

    def _zuko(self, x: Tensor, context: Tensor | None) -> Transform:
        """zuko's data-to-base transform for ``context`` broadcast to the batch of ``x``."""
        if context is not None:
            batch = x.shape[: x.dim() - len(self.event_shape)]
            context = context.expand(batch + self.context_shape)
        transform = self.lazy_transform(context)
        phi = getattr(transform, "phi", None)
        if isinstance(phi, tuple) and torch.is_grad_enabled() and not self.lazy_transform.training:
            # zuko hands its parameters to a numerical solver (an ODE, a bisection) only in
            # training mode; here gradients reach them whenever autograd records
            params = [p for p in self.lazy_transform.parameters() if p.requires_grad]
            transform.phi = tuple({id(t): t for t in (*phi, *params)}.values())
        return transform

    def _summed(self, ladj: Tensor, x: Tensor) -> Tensor:
        # zuko's elementwise transforms leave event dimensions in the log-determinant
        batch = x.dim() - len(self.event_shape)
        return _sum_rightmost(ladj, ladj.dim() - batch)

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        y, ladj = self._zuko(x, context).inv.call_and_ladj(x)
        return y, self._summed(ladj, x)

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        x, ladj = self._zuko(y, context).call_and_ladj(y)
        return x, -self._summed(ladj, y)
