r"""Masked autoregressive layers: every feature goes through a monotone map whose
parameters depend on the features before it, computed in one pass by a MADE.

In MAF form the network reads the data side:

.. math::
    y_i = \tau(x_i; \theta_i(y_{<i}, c)), \qquad
    \log |\det J| = \sum_i \log \partial_x \tau_i ,

so the density direction (:math:`x` from :math:`y`) is one pass and sampling takes
:math:`D` sequential passes. ``Inverse(layer)`` gives the IAF form, whose network reads the
base side, so that sampling and ``rsample_and_log_prob`` are one pass (the form for
guides).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch.nn as nn
from torch import Tensor

from ..nn import MADE
from .base import FlowTransform
from .monotone import Affine, MonotoneMap, RationalQuadraticSpline

__all__ = ["MaskedAutoregressive", "MaskedAffineAutoregressive", "MaskedSplineAutoregressive"]


class MaskedAutoregressive(FlowTransform):
    r"""A masked autoregressive layer in MAF form: a MADE and a monotone map.

    Arguments:
        features: The number of features :math:`D`.
        monotone: The elementwise monotone map :math:`\tau`.
        context: The number of context features.
        hidden: The hidden sizes of the MADE (any size, also smaller than :math:`D`).
        order: The autoregressive order (see :class:`~pyro_flowpack.nn.MADE`).
        activation: The activation of the MADE.

    References:
        | Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017)
        | https://arxiv.org/abs/1705.07057
    """

    sequential = "forward"

    def __init__(
        self,
        features: int,
        monotone: MonotoneMap,
        context: int = 0,
        hidden: Sequence[int] = (64, 64),
        order: Sequence[int] | Tensor | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(features, context)
        self.monotone = monotone
        self.conditioner = MADE(features, monotone.params, context, hidden, order, activation)

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        # after pass k the features of the first k degrees are exact; the parameters of
        # the last pass only depend on features that were already exact
        y = x
        for _ in range(self.event_shape[0]):
            y, log_d = self.monotone.forward(x, self.conditioner(y, context))
        return y, log_d.sum(-1)

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        x, log_d = self.monotone.inverse(y, self.conditioner(y, context))
        return x, log_d.sum(-1)

    def extra_repr(self) -> str:
        return f"features={self.event_shape[0]}, context={self.context_features}, monotone={self.monotone}"


class MaskedAffineAutoregressive(MaskedAutoregressive):
    r"""The affine masked autoregressive layer of MAF,
    :math:`y_i = x_i \exp(s_i(y_{<i})) + t_i(y_{<i})`, log-scale soft-clamped to
    :math:`|s| < b`. Wrap it in :class:`~pyro_flowpack.transforms.base.Inverse` for IAF.

    Arguments:
        features: The number of features.
        context: The number of context features.
        hidden: The hidden sizes of the MADE.
        order: The autoregressive order.
        bound: The bound :math:`b` on the log-scale.
        activation: The activation of the MADE.

    Example:
        >>> maf = MaskedAffineAutoregressive(3, context=2)
        >>> x, ladj = maf.inverse_and_ladj(torch.randn(4, 3), torch.randn(4, 2))

    References:
        | Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017)
        | https://arxiv.org/abs/1705.07057
        | Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016)
        | https://arxiv.org/abs/1606.04934
    """

    def __init__(self, features: int, context: int = 0, hidden: Sequence[int] = (64, 64),
                 order: Sequence[int] | Tensor | None = None, bound: float = 3.0,
                 activation: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__(features, Affine(bound), context, hidden, order, activation)


class MaskedSplineAutoregressive(MaskedAutoregressive):
    r"""The rational-quadratic spline masked autoregressive layer of neural spline
    flows: :math:`y_i = \tau(x_i; \theta_i(y_{<i}))` with a monotone rational-quadratic
    spline :math:`\tau` of ``bins`` bins on :math:`[-B, B]` and identity tails.

    Arguments:
        features: The number of features.
        context: The number of context features.
        hidden: The hidden sizes of the MADE.
        order: The autoregressive order.
        bins: The number of spline bins.
        bound: The half-width :math:`B` of the spline's interval.
        activation: The activation of the MADE.

    Example:
        >>> layer = MaskedSplineAutoregressive(3, bins=4)
        >>> x, ladj = layer.inverse_and_ladj(torch.randn(4, 3))

    References:
        | Neural Spline Flows (Durkan et al., 2019)
        | https://arxiv.org/abs/1906.04032
    """

    def __init__(self, features: int, context: int = 0, hidden: Sequence[int] = (64, 64),
                 order: Sequence[int] | Tensor | None = None, bins: int = 8, bound: float = 5.0,
                 activation: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__(features, RationalQuadraticSpline(bins, bound), context, hidden, order, activation)
