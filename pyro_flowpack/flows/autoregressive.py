r"""Masked autoregressive flows: any monotone map in MADE layers
(:class:`AutoregressiveFlow`), MAF (one-pass density) and IAF (one-pass sampling)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..checks import check_int
from ..flow import Flow
from ..transforms.autoregressive import MaskedAffineAutoregressive, MaskedAutoregressive, MaskedSplineAutoregressive
from ..transforms.base import FlowTransform, Inverse
from ..transforms.monotone import MonotoneMap, SoftBoundedAffine
from .coupling import oriented

__all__ = ["AutoregressiveFlow", "MAF", "IAF", "alternating_orders"]


def alternating_orders(features: int, transforms: int) -> list[torch.Tensor]:
    """Autoregressive orders for ``transforms`` layers: ascending, descending, ascending..."""
    transforms = check_int(transforms, "transforms (the number of layers)")
    ascending = torch.arange(features)
    return [ascending if i % 2 == 0 else ascending.flip(0) for i in range(transforms)]


class AutoregressiveFlow(Flow):
    r"""Masked autoregressive layers of any elementwise monotone map :math:`\tau`, the order
    reversed every other layer: :math:`y_i = \tau(x_i; \theta_i(y_{<i}, c))`. The MADE's
    output size is the map's parameter count, so a new family needs only its map.

    In ``form="maf"`` the network reads the data side (``log_prob`` one pass per layer,
    sampling ``features`` passes); in ``form="iaf"`` the layers are inverted (sampling and
    ``rsample_and_log_prob`` one pass, the form for guides). ``closed_form`` chooses the
    direction evaluated in closed form for a map without a closed-form inverse (see
    :class:`~pyro_flowpack.flows.CouplingFlow`).

    Arguments:
        features: The number of features.
        monotone: The monotone map.
        context: The number of context features.
        transforms: The number of layers.
        hidden: The hidden sizes of each MADE (any sizes).
        form: ``"maf"`` or ``"iaf"``.
        closed_form: ``"density"`` or ``"sampling"`` (maps without a closed-form inverse).

    Example:
        >>> from pyro_flowpack.transforms.monotone import SumOfSquares
        >>> flow = AutoregressiveFlow(3, SumOfSquares(), transforms=2)
        >>> flow().log_prob(torch.randn(4, 3)).shape
        torch.Size([4])

    References:
        | Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017)
        | https://arxiv.org/abs/1705.07057
    """

    def __init__(self, features: int, monotone: MonotoneMap, context: int = 0, transforms: int = 3,
                 hidden: Sequence[int] = (64, 64), form: str = "maf", closed_form: str = "density") -> None:
        if form not in ("maf", "iaf"):
            raise ValueError(f"AutoregressiveFlow: form must be 'maf' or 'iaf', got {form!r}")
        # a MAF layer applies monotone.forward when sampling; an IAF layer (its inverse) when scoring
        monotone = oriented(monotone, closed_form, forward_is="sampling" if form == "maf" else "density")
        layers: list[FlowTransform] = [MaskedAutoregressive(features, monotone, context, hidden, order)
                                       for order in alternating_orders(features, transforms)]
        super().__init__(layers if form == "maf" else [Inverse(layer) for layer in layers])


class MAF(Flow):
    r"""A masked autoregressive flow: affine MADE layers in MAF form, with the order
    reversed every other layer. ``log_prob`` is one pass per layer; sampling takes
    ``features`` passes per layer.

    Arguments:
        features: The number of features.
        context: The number of context features.
        transforms: The number of layers.
        hidden: The hidden sizes of each MADE (any sizes).
        bound: The bound on each log-scale.

    Example:
        >>> flow = MAF(8, context=3)
        >>> flow(torch.randn(10, 3)).log_prob(torch.randn(10, 8)).shape
        torch.Size([10])

    References:
        | Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017)
        | https://arxiv.org/abs/1705.07057
    """

    def __init__(self, features: int, context: int = 0, transforms: int = 3,
                 hidden: Sequence[int] = (64, 64), bound: float = 3.0) -> None:
        orders = alternating_orders(features, transforms)
        super().__init__([MaskedAffineAutoregressive(features, context, hidden, o, bound) for o in orders])


class IAF(Flow):
    r"""An inverse autoregressive flow: affine MAF layers inverted, so that the network
    reads the base side and ``rsample`` / ``rsample_and_log_prob`` are one pass per layer
    (the form for variational guides); ``log_prob`` of external data takes ``features``
    passes.

    Each layer's log-scale in the sampling direction is soft-clamped into ``(-bound,
    bound)``, or into ``log_scale_bounds = (low, high)`` when given (see
    :class:`~pyro_flowpack.transforms.monotone.SoftBoundedAffine`; guides use
    :math:`(-5, 3)`, the bounds of Pyro's ``AffineAutoregressive``). The last ``splines``
    layers are each followed by a rational-quadratic spline layer in IAF form of ``bins``
    bins on :math:`[-B, B]`, :math:`B` = ``tail_bound``; ``affine=False`` drops the affine
    layers (then ``splines`` must be at least 1).

    Arguments:
        features: The number of features.
        context: The number of context features.
        transforms: The number of blocks (an affine layer, and a spline layer in the last
            ``splines`` blocks), the order reversed every block.
        hidden: The hidden sizes of each MADE (any sizes).
        bound: The symmetric bound on each log-scale.
        log_scale_bounds: Asymmetric bounds ``(low, high)``, ``low < 0 < high``, instead.
        splines: The number of blocks, from the last, that end with a spline layer.
        bins: The number of bins of each spline.
        tail_bound: The half-width :math:`B` of each spline's interval.
        affine: Whether each block has its affine layer.

    Example:
        >>> flow = IAF(8)
        >>> x, log_p = flow().rsample_and_log_prob((5,))
        >>> IAF(3, transforms=2, splines=1, log_scale_bounds=(-5.0, 3.0))().rsample((2,)).shape
        torch.Size([2, 3])

    References:
        | Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016)
        | https://arxiv.org/abs/1606.04934
        | Neural Spline Flows (Durkan et al., 2019)
        | https://arxiv.org/abs/1906.04032
    """

    def __init__(self, features: int, context: int = 0, transforms: int = 3,
                 hidden: Sequence[int] = (64, 64), bound: float = 3.0,
                 log_scale_bounds: tuple[float, float] | None = None, splines: int = 0, bins: int = 8,
                 tail_bound: float = 5.0, affine: bool = True) -> None:
        if log_scale_bounds is None:
            log_scale_bounds = (-bound, bound)
        if isinstance(log_scale_bounds, (str, bytes)) or len(tuple(log_scale_bounds)) != 2:
            raise ValueError(f"IAF: log_scale_bounds must be a pair (low, high), got {log_scale_bounds!r}")
        low, high = (float(b) for b in log_scale_bounds)
        if not low < 0 < high:
            raise ValueError(f"IAF: log_scale_bounds must be (low, high) with low < 0 < high, got {(low, high)!r}")
        splines = check_int(splines, f"IAF: splines (the number of blocks ending with a spline, of "
                                     f"transforms={transforms})", minimum=0, maximum=transforms)
        if not affine and splines == 0:
            raise ValueError("IAF: affine=False needs splines >= 1 (otherwise there is no layer)")
        # the MAF layer that an IAF layer inverts has the negated log-scale bounds
        scale = SoftBoundedAffine(-high, -low)
        layers: list[FlowTransform] = []
        for i, order in enumerate(alternating_orders(features, transforms)):
            if affine:
                layers.append(Inverse(MaskedAutoregressive(features, scale, context, hidden, order)))
            if i >= transforms - splines:
                layers.append(Inverse(MaskedSplineAutoregressive(features, context, hidden, order, bins, tail_bound)))
        super().__init__(layers)
