r"""Fixed elementwise layers: the logit pre-processing of image flows and a constant scaling.

Both act on each element of an event of any shape, :math:`(D,)` or :math:`(C, H, W)`,
with any batch shape, and have no parameters. They sit on the data side of a flow: the
logit layer maps dequantized pixels in :math:`[0, 1]` to the real line, and the scaling
maps pixel values to :math:`[0, 1)` (or back).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, constraints

from ..checks import ShapeLike, as_shape, check_real
from .base import FlowTransform

__all__ = ["Logit", "Scale", "ElementwiseAffine"]


def _check_number(name: str, what: str, value: object) -> float:
    """Returns ``value`` as a float, raising a clear error unless it is a finite real number
    (a one-element tensor counts as its number)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    return check_real(value, f"{name}: {what}")


class Logit(FlowTransform):
    r"""Creates the logit pre-processing of RealNVP as a bijective layer, for the data
    side of an image flow.

    The data side holds :math:`y \in [0, 1]^D` (dequantized pixels scaled to
    :math:`[0, 1)`), the base side :math:`x \in \mathbb{R}^D`. The inverse (density)
    direction squeezes :math:`y` into :math:`[\alpha, 1 - \alpha]`, away from the
    infinite slopes of the logit at 0 and 1, and takes the logit,

    .. math:: x = \operatorname{logit}\big(\alpha + (1 - 2 \alpha) \, y\big) ,

    and the forward (sampling) direction is

    .. math:: y = \frac{\sigma(x) - \alpha}{1 - 2 \alpha} ,

    with :math:`\sigma` the logistic sigmoid. Since :math:`\sigma'(x) = \sigma(x)
    \sigma(-x)`, the log-determinant of the forward map is, summed over the event,

    .. math:: \log |\det J| = \sum_{i=1}^D \log \sigma(x_i) + \log \sigma(-x_i)
        - \log(1 - 2 \alpha) ,

    computed with ``logsigmoid``, which is stable for any :math:`x`.

    The map is defined for :math:`y` in the open interval
    :math:`\big(\tfrac{-\alpha}{1 - 2\alpha}, \tfrac{1 - \alpha}{1 - 2\alpha}\big)`,
    which contains :math:`[0, 1]` when :math:`\alpha > 0`: samples of the flow may lie
    slightly outside :math:`[0, 1]` and can still be scored. Under torch's distribution
    validation (:meth:`torch.distributions.Distribution.set_default_validate_args`),
    the inverse direction raises a :class:`ValueError` for values outside that interval
    (such as raw pixel values in :math:`[0, 255]`).

    References:
        | Density estimation using Real NVP (Dinh et al., 2016)
        | https://arxiv.org/abs/1605.08803

    Arguments:
        shape: The event shape: an int (the number of features) or a shape such as
            :math:`(C, H, W)`.
        alpha: The margin :math:`\alpha \in [0, 0.5)` kept from 0 and 1.

    Example:
        >>> from pyro_flowpack.transforms.elementwise import Logit
        >>> t = Logit((1, 2, 2), alpha=0.05)
        >>> y = torch.tensor([[[0.0, 0.25], [0.5, 1.0]]])
        >>> x, ladj = t.inverse_and_ladj(y)
        >>> x
        tensor([[[-2.9444, -0.9694],
                 [ 0.0000,  2.9444]]])
        >>> torch.allclose(t(x), y, atol=1e-6)
        True
        >>> t.inv(torch.full((1, 2, 2), 255.0))
        Traceback (most recent call last):
          ...
        ValueError: Logit expects data-side values in [0, 1] (with alpha=0.05 its domain is the open interval (-0.05556, 1.056)), got values in [255, 255]
    """

    def __init__(self, shape: ShapeLike, alpha: float = 0.05) -> None:
        alpha = _check_number("Logit", "alpha", alpha)
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"Logit: alpha must be in [0, 0.5), got {alpha!r}")
        super().__init__(as_shape(shape))
        self.alpha = alpha
        self._log_width = math.log1p(-2 * alpha)  # log(1 - 2 alpha)
        # the open interval where the logit of alpha + (1 - 2 alpha) y is finite
        # (+ 0.0 turns -0.0 into 0.0 for the error message)
        self._low = -alpha / (1 - 2 * alpha) + 0.0
        self._high = (1 - alpha) / (1 - 2 * alpha)

    @property
    def codomain(self) -> constraints.Constraint:
        return constraints.independent(constraints.interval(self._low, self._high), len(self.event_shape))

    def _sum_event(self, value: Tensor) -> Tensor:
        return value.sum(dim=tuple(range(-len(self.event_shape), 0)))

    def _check_range(self, y: Tensor) -> None:
        if not bool(((y > self._low) & (y < self._high)).all()):
            raise ValueError(
                f"Logit expects data-side values in [0, 1] (with alpha={self.alpha:g} its domain is the open "
                f"interval ({self._low:.4g}, {self._high:.4g})), got values in "
                f"[{y.min().item():.4g}, {y.max().item():.4g}]"
            )

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        y = (torch.sigmoid(x) - self.alpha) / (1 - 2 * self.alpha)
        ladj = self._sum_event(F.logsigmoid(x) + F.logsigmoid(-x) - self._log_width)
        return y, ladj

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if Distribution._validate_args:
            self._check_range(y)
        p = self.alpha + (1 - 2 * self.alpha) * y  # sigma(x), so log sigma(+-x) = log p, log(1 - p)
        log_p, log_q = torch.log(p), torch.log1p(-p)
        return log_p - log_q, self._sum_event(log_p + log_q - self._log_width)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.event_shape)}, alpha={self.alpha}"


class Scale(FlowTransform):
    r"""Creates a layer that multiplies every element by a fixed constant,

    .. math:: y = s \, x , \qquad \log |\det J| = D \log |s| ,

    for events of :math:`D` elements; for instance :math:`s = 1 / K` maps pixel values
    in :math:`[0, K)` on the base side to :math:`[0, 1)` on the data side, and
    :math:`s = K` the converse.

    Arguments:
        shape: The event shape: an int (the number of features) or a shape such as
            :math:`(C, H, W)`.
        scale: The constant :math:`s`, a non-zero finite number.

    Example:
        >>> from pyro_flowpack.transforms.elementwise import Scale
        >>> t = Scale((3, 4, 4), 1 / 256)
        >>> y, ladj = t.call_and_ladj(torch.full((3, 4, 4), 128.0))
        >>> y[0, 0, 0], ladj
        (tensor(0.5000), tensor(-266.1685))
    """

    def __init__(self, shape: ShapeLike, scale: float) -> None:
        scale = _check_number("Scale", "scale", scale)
        if scale == 0.0:
            raise ValueError("Scale expects a non-zero scale (the map must be invertible), got 0.0")
        super().__init__(as_shape(shape))
        self.scale = scale
        self._ladj_value = self.event_shape.numel() * math.log(abs(scale))

    def _ladj(self, value: Tensor) -> Tensor:
        return value.new_full(value.shape[: value.dim() - len(self.event_shape)], self._ladj_value)

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return x * self.scale, self._ladj(x)

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return y / self.scale, self._ladj(y)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.event_shape)}, scale={self.scale}"


def check_loc_scale(name: str, loc: Tensor, scale: Tensor, shape: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Copies of a floating ``loc`` and a finite, positive ``scale`` of one shape (``shape``
    if given), in ``loc``'s dtype, or a clear error."""
    loc, scale = torch.as_tensor(loc), torch.as_tensor(scale)
    expected = tuple(loc.shape) if shape is None else tuple(shape)
    if tuple(loc.shape) != expected or tuple(scale.shape) != expected or loc.dim() == 0 or not loc.is_floating_point():
        raise ValueError(f"{name} expects floating loc and scale of shape {expected}, got "
                         f"{tuple(loc.shape)} and {tuple(scale.shape)}")
    if not bool(torch.isfinite(loc).all() and torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"{name} expects a finite loc and a finite, positive scale")
    return loc.clone(), scale.to(loc.dtype).clone()


class ElementwiseAffine(FlowTransform):
    r"""Creates a layer with a fixed elementwise affine map,

    .. math:: y = \mu + \sigma \odot x , \qquad \log |\det J| = \sum_i \log \sigma_i ,

    whose location :math:`\mu` and positive scale :math:`\sigma` are buffers (saved, moved
    and cast with the flow, never trained). It maps a flow fitted to standardised data
    back to the data's units: :func:`~pyro_flowpack.train.load_run` appends one built from
    the run's :class:`~pyro_flowpack.data.Standardizer`.

    Arguments:
        loc: The location :math:`\mu`, a tensor of the event shape.
        scale: The scale :math:`\sigma`, a positive finite tensor of the same shape.

    Example:
        >>> t = ElementwiseAffine(torch.tensor([10.0, 0.0]), torch.tensor([2.0, 0.5]))
        >>> y, ladj = t.call_and_ladj(torch.tensor([1.0, 1.0]))
        >>> y, ladj  # log 2 + log 0.5
        (tensor([12.0000,  0.5000]), tensor(0.))
    """

    def __init__(self, loc: Tensor, scale: Tensor) -> None:
        loc, scale = check_loc_scale("ElementwiseAffine", loc, scale)
        super().__init__(loc.shape)
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)

    def _ladj(self, value: Tensor) -> Tensor:
        batch = value.shape[: value.dim() - len(self.event_shape)]
        return self.scale.log().sum().expand(batch)

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.loc + self.scale * x, self._ladj(x)

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return (y - self.loc) / self.scale, self._ladj(y)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.event_shape)}"
