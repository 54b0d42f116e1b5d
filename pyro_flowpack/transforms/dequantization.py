r"""Dequantization layers: the last layer of a flow over discrete data.

Discrete data :math:`x \in \{0, \dots, K - 1\}^D` (pixels with :math:`K` levels) has no
density. A dequantization layer, placed last in a flow (on the data side), relates it to
a continuous :math:`y \in [0, 1)^D` modelled by the rest of the flow:

* the forward (sampling) map quantizes, :math:`x = \lfloor K y \rfloor`;
* the inverse (density) map draws :math:`y = (x + u) / K` with fresh noise
  :math:`u \sim q(u \mid x)` on :math:`[0, 1)^D` at every call;
* the log-abs-det-Jacobian it reports is :math:`\log q(y \mid x) = \log q(u \mid x) +
  D \log K`,

so that ``flow().log_prob(x)`` is a one-sample estimate of the variational lower bound

.. math:: \log P(x) \ge \mathbb{E}_{q(y \mid x)} [\log p_Y(y) - \log q(y \mid x)] ,

and ``flow().sample()`` returns integers. Averaging :math:`k` importance weights
(:func:`~pyro_flowpack.infer.iw_log_prob`) gives a tighter estimate.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, constraints

from .base import Compose, FlowTransform, ShapeLike, as_shape
from .coupling import AffineCoupling, coupling_mask

__all__ = ["Dequantization", "UniformDequantization", "VariationalDequantization"]


class Dequantization(FlowTransform):
    r"""Base class of the dequantization layers: subclasses define the noise
    distribution :math:`q(u \mid x)` by implementing :meth:`noise` and :meth:`log_q`.

    Arguments:
        shape: The event shape of the data.
        num_bins: The number of levels :math:`K` of each discrete value.
    """

    # fresh noise at every call: never reuse an evaluation, not even for a value that
    # the flow itself just sampled
    caches = False
    stochastic = True
    discrete_output = True

    def __init__(self, shape: ShapeLike, num_bins: int) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"{type(self).__name__} expects num_bins to be an int >= 2, got {num_bins!r}")
        super().__init__(as_shape(shape))
        self.num_bins = num_bins
        self._log_bins = self.event_shape.numel() * math.log(num_bins)

    @property
    def codomain(self) -> constraints.Constraint:
        return constraints.independent(constraints.integer_interval(0, self.num_bins - 1), len(self.event_shape))

    def noise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Draws :math:`u \sim q(u \mid x)` (reparameterised) and returns it with
        :math:`\log q(u \mid x)`, summed over the event."""
        raise NotImplementedError

    def log_q(self, x: Tensor, u: Tensor) -> Tensor:
        r"""Returns :math:`\log q(u \mid x)`, summed over the event."""
        raise NotImplementedError

    def _check_discrete(self, x: Tensor) -> None:
        if not Distribution._validate_args:
            return
        name, K = type(self).__name__, self.num_bins
        if not bool((x == x.round()).all()):
            raise ValueError(f"{name} expects integer values in [0, {K}), got non-integer values")
        low, high = x.min().item(), x.max().item()
        if low < 0 or high > K - 1:
            raise ValueError(f"{name} expects integer values in [0, {K}), got values in [{low:g}, {high:g}]")

    def _forward_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        x = torch.floor(y * self.num_bins).clamp(0, self.num_bins - 1)
        u = (y * self.num_bins - x).clamp(0, 1)
        return x, self.log_q(x, u) + self._log_bins

    def _inverse_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        self._check_discrete(x)
        u, log_q = self.noise(x)
        return (x + u) / self.num_bins, log_q + self._log_bins

    def extra_repr(self) -> str:
        return f"shape={tuple(self.event_shape)}, num_bins={self.num_bins}"


class UniformDequantization(Dequantization):
    r"""Uniform dequantization: :math:`u \sim \mathcal{U}[0, 1)^D`, so that
    :math:`\log q(y \mid x) = D \log K` and the bound is
    :math:`\log p_Y((x + u) / K) - D \log K`.

    Arguments:
        shape: The event shape of the data.
        num_bins: The number of levels :math:`K`.

    Example:
        >>> layer = UniformDequantization((1, 2, 2), num_bins=4)
        >>> y, ladj = layer.inverse_and_ladj(torch.tensor([[[[0.0, 3.0], [1.0, 2.0]]]]))
        >>> bool(((y >= 0) & (y < 1)).all())
        True

    References:
        | A note on the evaluation of generative models (Theis et al., 2016)
        | https://arxiv.org/abs/1511.01844
    """

    def noise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.rand_like(x), x.new_zeros(x.shape[: x.dim() - len(self.event_shape)])

    def log_q(self, x: Tensor, u: Tensor) -> Tensor:
        return x.new_zeros(x.shape[: x.dim() - len(self.event_shape)])


class VariationalDequantization(Dequantization):
    r"""Variational dequantization (Flow++): the noise is
    :math:`u = \sigma(g(\epsilon; x))` with :math:`\epsilon \sim \mathcal{N}(0, I)` and
    :math:`g` a conditional flow of affine coupling layers whose conditioners read
    :math:`x` (scaled to :math:`[-1, 1]`), so

    .. math:: \log q(u \mid x) = \log \mathcal{N}(\epsilon)
        - \log |\det J_g(\epsilon)| - \sum_i \log \sigma'(v_i), \quad v = g(\epsilon; x) .

    It is trained jointly with the flow by the same bound, through the
    reparameterisation. On images ``(C, H, W)`` the couplings use alternating
    checkerboard masks and a convolutional conditioner; on vectors, alternating masks
    and an MLP.

    Arguments:
        shape: The event shape of the data: ``(C, H, W)`` or ``(D,)`` with ``D >= 2``.
        num_bins: The number of levels :math:`K`.
        steps: The number of coupling layers of :math:`g`.
        hidden: The hidden channels of the ResNet (images) or sizes of the MLP (vectors).
        blocks: The number of residual blocks of each ResNet (images).

    Example:
        >>> layer = VariationalDequantization((1, 4, 4), num_bins=17, hidden=8)
        >>> x = torch.randint(0, 17, (2, 1, 4, 4)).float()
        >>> y, log_q = layer.inverse_and_ladj(x)
        >>> y.shape, log_q.shape
        (torch.Size([2, 1, 4, 4]), torch.Size([2]))

    References:
        | Flow++: Improving Flow-Based Generative Models with Variational Dequantization
        | and Architecture Design (Ho et al., 2019)
        | https://arxiv.org/abs/1902.00275
    """

    def __init__(self, shape: ShapeLike, num_bins: int, steps: int = 4,
                 hidden: Sequence[int] | int = 32, blocks: int = 1) -> None:
        super().__init__(shape, num_bins)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"VariationalDequantization expects steps >= 1, got {steps!r}")
        image = len(self.event_shape) == 3
        mask = "checkerboard" if image else "alternating"
        hidden = hidden if image or not isinstance(hidden, int) else (hidden, hidden)
        self.g = Compose(*(
            AffineCoupling(self.event_shape, coupling_mask(self.event_shape, mask, flip=i % 2 == 1),
                           self.event_shape, hidden, blocks=blocks)
            for i in range(steps)
        ))

    def _features(self, x: Tensor) -> Tensor:
        return 2 * x / (self.num_bins - 1) - 1

    def _log_sigmoid_derivative(self, v: Tensor) -> Tensor:
        return (F.logsigmoid(v) + F.logsigmoid(-v)).sum(tuple(range(-len(self.event_shape), 0)))

    def _log_normal(self, eps: Tensor) -> Tensor:
        dims = tuple(range(-len(self.event_shape), 0))
        return -0.5 * eps.square().sum(dims) - 0.5 * self.event_shape.numel() * math.log(2 * math.pi)

    def noise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        eps = torch.randn_like(x)
        v, ladj = self.g.call_and_ladj(eps, self._features(x))
        return torch.sigmoid(v), self._log_normal(eps) - ladj - self._log_sigmoid_derivative(v)

    def log_q(self, x: Tensor, u: Tensor) -> Tensor:
        tiny = torch.finfo(u.dtype).eps
        v = torch.logit(u.clamp(tiny, 1 - tiny))
        eps, ladj = self.g.inverse_and_ladj(v, self._features(x))
        return self._log_normal(eps) - ladj - self._log_sigmoid_derivative(v)
