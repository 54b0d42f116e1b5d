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

:class:`ColumnDequantization` does the same for the integer-valued columns of a table
whose other columns are real.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, constraints

from ..checks import ShapeLike, as_shape, check_int
from .base import FlowTransform
from .compose import Compose
from .coupling import AffineCoupling, coupling_mask
from .elementwise import check_loc_scale

__all__ = ["Dequantization", "UniformDequantization", "VariationalDequantization", "ColumnDequantization"]


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
        num_bins = check_int(num_bins, f"{type(self).__name__}: num_bins", minimum=2)
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
        steps = check_int(steps, "VariationalDequantization: steps")
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


class ColumnDequantization(FlowTransform):
    r"""Uniform dequantization of the integer-valued columns :math:`I` of a table whose
    other columns are real, seen through the standardisation :math:`x = (k - \mu) / \sigma`
    of the data's units (:math:`\mu = 0, \sigma = 1`: the integers themselves).

    On the data side, column :math:`j \in I` takes values on the grid
    :math:`\{(k - \mu_j) / \sigma_j : k \in \mathbb{Z}\}`, the integers :math:`k` of the
    file standardised:

    * the inverse (density) map adds fresh noise at every call,
      :math:`y_j = x_j + u_j / \sigma_j` with :math:`u \sim \mathcal{U}[0, 1)^{|I|}`, and
      leaves the other columns as they are;
    * the forward (sampling) map goes back to the grid,
      :math:`x_j = (\lfloor \sigma_j y_j + \mu_j \rfloor - \mu_j) / \sigma_j`;
    * both report the log-abs-det-Jacobian :math:`\log q(y \mid x) = \sum_{j \in I} \log
      \sigma_j`, the log-density of :math:`y`, uniform on the cell of widths
      :math:`1 / \sigma_j` above :math:`x`,

    so that ``flow().log_prob(x)`` is a one-sample estimate of the bound

    .. math:: \log P(x) = \log \int_{\mathrm{cell}(x)} p_Y(y) \, dy_I
        \ge \mathbb{E}_u [\log p_Y(y) - \log q(y \mid x)]

    (Jensen: :math:`\mathbb{E}_u [p_Y(y) / q(y \mid x)] = P(x)`), where :math:`P` is a
    probability over the columns :math:`I` and a density over the others, and
    :func:`~pyro_flowpack.infer.iw_log_prob` tightens it. In the data's units, with
    :math:`p_X` the flow's density there, a probability has no units, so only the other
    columns bring a Jacobian:

    .. math:: \log P_X(k, x_{\setminus I}) = \log P(x) - \sum_{j \notin I} \log \sigma_j
        \ge \mathbb{E}_u [\log p_X(k + u, x_{\setminus I})] .

    This layer with :math:`\mu = 0, \sigma = 1` (log-determinant 0), after an
    :class:`~pyro_flowpack.transforms.ElementwiseAffine` map to the data's units, is the
    same bound on raw rows, and samples exact integers.

    Arguments:
        columns: Which columns are integer-valued: booleans of shape ``(D,)``, at least one
            true.
        loc: The location :math:`\mu` of the standardisation, of shape ``(D,)`` (zeros).
        scale: Its positive scale :math:`\sigma`, of shape ``(D,)`` (ones).

    Example:
        >>> layer = ColumnDequantization([True, False], torch.tensor([3.0, 0.0]), torch.tensor([2.0, 1.0]))
        >>> x = torch.tensor([[(5 - 3) / 2, 0.7]])  # the integer 5 standardised, and a real value
        >>> y, ladj = layer.inverse_and_ladj(x)
        >>> bool(1.0 <= y[0, 0] < 1.5), round(float(ladj), 4)  # noise of width 1/2; log 2
        (True, 0.6931)
        >>> layer(y)  # back to the grid
        tensor([[1.0000, 0.7000]])

    References:
        | A note on the evaluation of generative models (Theis et al., 2016)
        | https://arxiv.org/abs/1511.01844
    """

    caches = False
    stochastic = True

    def __init__(self, columns: Sequence[bool] | Tensor, loc: Tensor | None = None,
                 scale: Tensor | None = None) -> None:
        columns = torch.as_tensor(columns)
        if columns.dtype != torch.bool or columns.dim() != 1 or not bool(columns.any()):
            raise ValueError(f"ColumnDequantization expects columns to be booleans of shape (D,) with at least one "
                             f"true, got {columns.dtype} of shape {tuple(columns.shape)}")
        loc = torch.zeros(len(columns)) if loc is None else torch.as_tensor(loc)
        scale = torch.ones(len(columns), dtype=loc.dtype) if scale is None else scale
        loc, scale = check_loc_scale("ColumnDequantization", loc, scale, columns.shape)
        super().__init__(columns.shape)
        self.register_buffer("columns", columns.clone())
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)

    def _log_q(self, value: Tensor) -> Tensor:
        batch = value.shape[:-1]
        return self.scale.log().masked_fill(~self.columns, 0).sum().expand(batch)

    def _check_grid(self, x: Tensor) -> None:
        if not Distribution._validate_args:
            return
        k = x * self.scale + self.loc
        # the rounding of an integer standardised in float32 (the training precision) or
        # finer, generously bounded: a check against unstandardised or real values
        tolerance = 64 * torch.finfo(torch.float32).eps * (1 + self.loc.abs() + (x * self.scale).abs())
        off = ((k - k.round()).abs() > tolerance) & self.columns
        if bool(off.any()):
            names = ", ".join(str(j) for j in off.reshape(-1, off.shape[-1]).any(0).nonzero().flatten().tolist())
            raise ValueError(f"ColumnDequantization expects integers (standardised with its loc and scale) in "
                             f"columns {names} (counted from 0), got other values")

    def _forward_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        k = torch.floor(y * self.scale + self.loc)
        return torch.where(self.columns, (k - self.loc) / self.scale, y), self._log_q(y)

    def _inverse_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        self._check_grid(x)
        u = torch.rand_like(x).masked_fill(~self.columns, 0)
        return x + u / self.scale, self._log_q(x)

    def extra_repr(self) -> str:
        return f"features={self.event_shape[0]}, columns={self.columns.nonzero().flatten().tolist()}"
