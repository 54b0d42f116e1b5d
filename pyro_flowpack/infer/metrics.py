r"""Evaluation metrics of density models: bits per dimension and the importance-weighted
log-likelihood of discrete data under a dequantized flow.

For discrete data :math:`x \in \{0, \dots, K - 1\}^D` (pixels), a flow models a density
:math:`p_Y` of :math:`y = (x + u) / K \in [0, 1)^D`, with dequantization noise
:math:`u \sim q(u \mid x)` on :math:`[0, 1)^D` (uniform, or learned as in Flow++). The
density of :math:`y` given :math:`x` is :math:`q(y \mid x) = K^D q(u \mid x)`, and the
probability of :math:`x` is

.. math:: P(x) = \int_{[0, 1)^D} p_Y\Big(\frac{x + u}{K}\Big) K^{-D} \, du
    = \mathbb{E}_{u \sim q(u \mid x)} \left[ \frac{p_Y(y)}{q(y \mid x)} \right] .
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Size, Tensor
from torch.distributions import Distribution

from ..checks import check_int

__all__ = [
    "bits_per_dim",
    "iw_log_prob",
]


def bits_per_dim(log_prob: Tensor, event_shape: int | Sequence[int] | Size) -> Tensor:
    r"""Converts log-likelihoods (in nats) of events of :math:`D` elements to bits per
    dimension,

    .. math:: \mathrm{bpd} = -\frac{\log P(x)}{D \ln 2} .

    For images, :math:`D = C H W`. With data scaled to :math:`[0, 1)`, the
    :math:`D \log K` of the scaling belongs to the log-likelihood itself (see the module
    docstring), so ``log_prob`` is the log-probability of the discrete pixels.

    Arguments:
        log_prob: The log-likelihoods :math:`\log P(x)`, of any (batch) shape.
        event_shape: The event shape, or its number of elements :math:`D` as an int.

    Returns:
        The bits per dimension, of the shape of ``log_prob``.

    Example:
        >>> from pyro_flowpack.infer.metrics import bits_per_dim
        >>> import math
        >>> bits_per_dim(torch.tensor([-3072 * math.log(2), 0.0]), (3, 32, 32))
        tensor([1., -0.])
    """
    dims = tuple(event_shape) if isinstance(event_shape, Sequence) else (event_shape,)
    for d in dims:
        check_int(d, f"bits_per_dim: event_shape {event_shape!r}: each entry")
    return -log_prob / (math.prod(dims) * math.log(2))


def iw_log_prob(dist: Distribution, x: Tensor, k: int, chunk: int | None = None) -> Tensor:
    r"""Estimates the log-likelihood of ``x`` by importance weighting ``k`` stochastic
    evaluations of ``dist.log_prob``.

    With a dequantized flow, each call of ``dist.log_prob(x)`` draws fresh noise
    :math:`u \sim q(u \mid x)` and returns the one-sample lower bound

    .. math:: \log p_Y(y) - \log q(y \mid x) , \qquad y = \frac{x + u}{K} ,
        \quad q(y \mid x) = K^D q(u \mid x) ,

    whose expectation is the variational bound :math:`\log P(x) - \mathrm{KL}`. The
    importance-weighted estimate with :math:`k` independent draws :math:`u_1, \dots, u_k`,

    .. math:: \log P(x) \approx \log \frac{1}{k} \sum_{i=1}^k
        \frac{p_Y(y_i)}{q(y_i \mid x)} ,

    is, by Jensen's inequality, a lower bound in expectation that tightens as :math:`k`
    grows and converges to :math:`\log P(x)` (IWAE). For :math:`k = 1` it is one
    evaluation of the bound; for a deterministic ``log_prob`` it is ``log_prob`` itself.

    All draws are evaluated in one batched call: ``x`` is expanded (without a copy) to
    shape ``(k, *x.shape)`` and the result reduced with ``logsumexp`` over the first
    dimension, minus :math:`\log k`. Set ``chunk`` to evaluate at most that many draws
    per call and bound the memory. Gradients flow as usual; wrap the call in
    :func:`torch.no_grad` for evaluation.

    References:
        | Importance Weighted Autoencoders (Burda et al., 2016)
        | https://arxiv.org/abs/1509.00519

        | Flow++: Improving Flow-Based Generative Models with Variational Dequantization
          and Architecture Design (Ho et al., 2019)
        | https://arxiv.org/abs/1902.00275

    Arguments:
        dist: A distribution whose ``log_prob`` returns a one-sample (possibly
            stochastic) estimate of :math:`\log P(x)`, such as a dequantized flow.
        x: The data, of shape ``(*batch, *event)``.
        k: The number of importance samples, at least 1.
        chunk: The most samples per call of ``dist.log_prob`` (all ``k`` at once if
            :py:`None`).

    Returns:
        The estimates of :math:`\log P(x)`, of the batch shape of ``dist.log_prob(x)``.

    Example:
        >>> from pyro_flowpack.infer.metrics import iw_log_prob
        >>> d = torch.distributions.Normal(0.0, 1.0)
        >>> x = torch.tensor([0.0, 1.0])
        >>> torch.allclose(iw_log_prob(d, x, k=16, chunk=5), d.log_prob(x))
        True
    """
    k = check_int(k, "iw_log_prob: k (the number of samples)")
    chunk = k if chunk is None else check_int(chunk, "iw_log_prob: chunk (samples per call)")
    if not isinstance(x, Tensor):
        raise TypeError(f"iw_log_prob expects x to be a torch.Tensor, got {type(x).__name__}")
    log_w = torch.cat([dist.log_prob(x.expand(min(chunk, k - i), *x.shape)) for i in range(0, k, chunk)])
    return torch.logsumexp(log_w, dim=0) - math.log(k)
