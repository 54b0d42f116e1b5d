r"""Normalisation layers: activation normalisation (Glow) and batch normalisation (MAF).

Both are elementwise affine maps whose scale and shift are set from data: ActNorm once,
from its first batch, BatchNorm from every training batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..checks import ShapeLike, as_shape, check_int
from .base import FlowTransform

__all__ = [
    "ActNorm",
    "BatchNorm",
]


class ActNorm(FlowTransform):
    r"""Creates an activation normalisation layer: a per-channel affine map whose
    parameters are initialised from data.

    For events of shape :math:`(C, \dots)`, with a location :math:`b_c` and a log-scale
    :math:`s_c` per channel (the first event dimension), shared by the :math:`N`
    positions of the remaining event dimensions (:math:`N = 1` for vectors),

    .. math:: y_{c,n} = x_{c,n} \exp(s_c) + b_c , \qquad
        \log |\det J| = N \sum_{c=1}^C s_c .

    Data-dependent initialisation: the first time the inverse (density) direction runs
    in training mode, :math:`b_c` and :math:`s_c` are set to the mean and to
    :math:`\log(\sigma_c + \epsilon)`, where :math:`\sigma_c` is the standard deviation,
    of that input over the batch and the positions, so that the base-side output of
    this first batch has zero mean and unit variance per channel. The boolean buffer
    ``initialized`` records it: it is saved in the ``state_dict``, and a layer restored
    with ``load_state_dict`` is not initialised again. Until then the layer is the
    identity; the forward (sampling) direction and eval mode never initialise. The first
    batch should be representative, with several values per channel.

    References:
        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma et al., 2018)
        | https://arxiv.org/abs/1807.03039

    Arguments:
        shape: The event shape: an int (the number of features) or a shape
            :math:`(C, \dots)` such as :math:`(C, H, W)`.
        eps: The constant :math:`\epsilon` added to the standard deviation.

    Example:
        >>> t = ActNorm((3, 8, 8))
        >>> y = 5 + 2 * torch.randn(64, 3, 8, 8)
        >>> x, ladj = t.inverse_and_ladj(y)
        >>> bool(t.initialized)
        True
        >>> torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
        True
    """

    def __init__(self, shape: ShapeLike, eps: float = 1e-6) -> None:
        event_shape = as_shape(shape)
        if len(event_shape) == 0 or any(s < 1 for s in event_shape):
            raise ValueError(f"ActNorm expects a non-empty shape of positive sizes, got {tuple(event_shape)}")
        if eps <= 0:
            raise ValueError(f"ActNorm expects eps > 0, got {eps!r}")
        super().__init__(event_shape)
        self.eps = eps
        # (C, 1, ..., 1): broadcasts over the positions of the remaining event dimensions
        param_shape = event_shape[:1] + (1,) * (len(event_shape) - 1)
        self.loc = nn.Parameter(torch.zeros(param_shape))
        self.log_scale = nn.Parameter(torch.zeros(param_shape))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, y: Tensor) -> None:
        channel = y.dim() - len(self.event_shape)
        values = y.detach().movedim(channel, 0).reshape(self.event_shape[0], -1)
        std, mean = torch.std_mean(values, dim=1, correction=0)
        self.loc.copy_(mean.view_as(self.loc))
        self.log_scale.copy_(torch.log(std + self.eps).view_as(self.log_scale))
        self.initialized.fill_(True)

    def _ladj(self, value: Tensor) -> Tensor:
        positions = self.event_shape[1:].numel()
        batch_shape = value.shape[: value.dim() - len(self.event_shape)]
        return (self.log_scale.sum() * positions).expand(batch_shape)

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return x * self.log_scale.exp() + self.loc, self._ladj(x)

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.training and not self.initialized:
            self._initialize(y)
        return (y - self.loc) * torch.exp(-self.log_scale), self._ladj(y)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.event_shape)}, eps={self.eps}"


class BatchNorm(FlowTransform):
    r"""Creates a batch normalisation layer, as a bijection on vectors.

    In the inverse (density) direction,

    .. math:: x = \frac{y - \mu}{\sqrt{\sigma^2 + \epsilon}} \exp(\gamma) + \beta ,

    with learned :math:`\gamma` (log-scale) and :math:`\beta` (shift), and the forward
    (sampling) map is its inverse, with

    .. math:: \log |\det J| = \sum_{i=1}^D \tfrac{1}{2} \log(\sigma_i^2 + \epsilon) - \gamma_i .

    Which statistics :math:`\mu, \sigma^2` are used:

    * training mode, inverse direction: those of the batch (over all batch dimensions,
      with the biased variance), so that the batch is standardised before the affine
      map. The map then couples the elements of the batch, and gradients flow through
      the statistics, as in MAF. Each such call also updates the buffers
      ``running_mean`` and ``running_var`` (unbiased variance), as
      :math:`r \gets (1 - m) \, r + m \, \hat{r}` with momentum :math:`m`; it needs at
      least two elements in the batch.
    * forward (sampling) direction, in either mode, and inverse direction in eval mode:
      the running statistics, so the layer is a fixed elementwise affine bijection.

    Call ``.eval()`` before evaluating densities of held-out data or comparing them with
    samples: only then are both directions the same deterministic map.

    References:
        | Density estimation using Real NVP (Dinh et al., 2016)
        | https://arxiv.org/abs/1605.08803

        | Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017)
        | https://arxiv.org/abs/1705.07057

    Arguments:
        features: The number of features :math:`D`.
        momentum: The weight :math:`m` of a batch in the running statistics.
        eps: The constant :math:`\epsilon` added to the variance.

    Example:
        >>> t = BatchNorm(3)
        >>> y = 5 + 2 * torch.randn(256, 3)
        >>> x, ladj = t.inverse_and_ladj(y)
        >>> torch.allclose(x.mean(dim=0), torch.zeros(3), atol=1e-5)
        True
        >>> t.running_mean.shape
        torch.Size([3])
    """

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        check_int(features, "BatchNorm: features")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm expects a momentum in [0, 1], got {momentum!r}")
        if eps <= 0:
            raise ValueError(f"BatchNorm expects eps > 0, got {eps!r}")
        super().__init__(features)
        self.momentum = momentum
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(features))
        self.beta = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def _ladj(self, var: Tensor, batch_shape: torch.Size) -> Tensor:
        return (0.5 * torch.log(var + self.eps) - self.log_gamma).sum().expand(batch_shape)

    def _forward_and_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        mean, var = self.running_mean, self.running_var
        y = (x - self.beta) * torch.exp(-self.log_gamma) * torch.sqrt(var + self.eps) + mean
        return y, self._ladj(var, x.shape[:-1])

    def _inverse_and_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.training:
            rows = y.reshape(-1, y.shape[-1])
            if rows.shape[0] < 2:
                raise ValueError(
                    "BatchNorm in training mode expects a batch of at least 2 elements in the inverse "
                    f"direction, got input of shape {tuple(y.shape)}; call .eval() to use the running statistics"
                )
            var, mean = torch.var_mean(rows, dim=0, correction=0)
            with torch.no_grad():
                n = rows.shape[0]
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        x = (y - mean) * torch.rsqrt(var + self.eps) * torch.exp(self.log_gamma) + self.beta
        return x, self._ladj(var, y.shape[:-1])

    def extra_repr(self) -> str:
        return f"features={self.beta.shape[-1]}, momentum={self.momentum}, eps={self.eps}"
