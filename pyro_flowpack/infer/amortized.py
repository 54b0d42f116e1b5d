r"""Amortized variational distributions: an encoder and a conditional flow give
:math:`q(z \mid x)` for every observation :math:`x` at once.

In a model with one local latent variable :math:`z_n` per observation :math:`x_n`
(a variational autoencoder, say), a separate variational distribution per data point
does not scale and does not generalise to new points. An amortized guide shares one
network instead: an encoder :math:`e_\phi` maps :math:`x` to a context
:math:`h = e_\phi(x)`, and a conditional flow :math:`f_\psi(\cdot\,; h)` pushes a standard
normal forward,

.. math:: z = f_\psi(\varepsilon; h), \quad \varepsilon \sim \mathcal{N}(0, I), \qquad
    \log q(z \mid x) = \log \mathcal{N}(\varepsilon; 0, I)
        - \log \left| \det \frac{\partial f_\psi(\varepsilon; h)}{\partial \varepsilon} \right| .

The evidence lower bound of each observation,

.. math:: \log p(x) \geq \mathbb{E}_{q(z \mid x)}\left[ \log p(x, z) - \log q(z \mid x) \right] ,

is maximised jointly in the model's and the guide's parameters (a VAE when the model's
likelihood is a decoder network).

With ``affine=True`` the encoder also gives a location :math:`\mu(x)` and a scale
:math:`\sigma(x)`, applied after the flow,

.. math:: z = \mu(x) + \sigma(x) \odot f_\psi(\varepsilon; h(x)) , \qquad
    \log q(z \mid x) = \log q_\psi(u \mid h(x)) - \textstyle\sum_i \log \sigma_i(x) ,
    \quad u = (z - \mu(x)) / \sigma(x) .

A freshly built flow is the identity, so this guide starts as the usual diagonal Gaussian
posterior of a VAE and the flow only has to learn the departure from it (as in the IAF
VAE of Kingma et al.). Use a flow in IAF form (:class:`~pyro_flowpack.flows.IAF`,
or layers wrapped in :class:`~pyro_flowpack.transforms.Inverse`): then drawing :math:`z`
and scoring it, which is all that SVI does with a guide, is one pass per layer, because a
value that was just sampled is scored from the layers' cached evaluation.
"""

from __future__ import annotations

import pyro.distributions as pdist
import torch.nn as nn
from torch import Tensor
from torch.distributions import AffineTransform
from torch.nn.functional import softplus

from ..flow import Flow, FlowDistribution

__all__ = ["AmortizedFlow"]


class AmortizedFlow(nn.Module):
    r"""An amortized conditional flow :math:`q(z \mid x) = q_\psi(z \mid e_\phi(x))`: an
    :class:`~torch.nn.Module` whose call on observations returns their variational
    distributions as one :class:`~pyro_flowpack.flow.FlowDistribution`.

    ``amortized(x)`` runs the encoder on ``x`` and returns ``flow(encoder(x))``, whose batch
    shape is the encoder output's batch shape (everything but its last dimension) and
    whose event shape is the flow's. Use it in a Pyro guide as any distribution, after
    registering its parameters with :func:`pyro.module`:

    .. code-block:: python

        amortized = AmortizedFlow(encoder, pf.flows.IAF(latent, context=hidden))

        def guide(x):
            pyro.module("amortized", amortized)
            with pyro.plate("data", len(x)):
                pyro.sample("z", amortized(x))

    With ``affine=True`` (vector latents and contexts only), the encoder returns
    ``2 D + C`` features for a flow over ``D`` features: a location, a pre-softplus scale
    and the context, and ``amortized(x)`` is the flow's distribution moved and scaled
    elementwise, a Pyro :class:`~pyro.distributions.TransformedDistribution` whose base
    is the flow's. The affine map caches its input, so scoring a value that was just
    sampled still runs no inverse of the flow.

    Arguments:
        encoder: The network :math:`e_\phi`; it maps observations of shape
            ``(..., *obs)`` to contexts of shape ``(..., C)`` (or ``(..., *context)`` for a
            flow with an image-shaped context), or to ``(..., 2 D + C)`` with ``affine``.
        flow: A conditional :class:`~pyro_flowpack.flow.Flow` on ``C`` context features,
            preferably in IAF form so that sampling is one pass.
        affine: Whether the encoder also gives the location and scale of ``z``.

    Example:
        >>> encoder = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> amortized = AmortizedFlow(encoder, IAF(2, context=4, hidden=(16,)))
        >>> q = amortized(torch.randn(10, 6))
        >>> q.batch_shape, q.event_shape
        (torch.Size([10]), torch.Size([2]))
        >>> z, log_q = q.rsample_and_log_prob()
        >>> z.shape, log_q.shape
        (torch.Size([10, 2]), torch.Size([10]))
        >>> encoder = torch.nn.Linear(6, 2 * 2 + 4)
        >>> amortized = AmortizedFlow(encoder, IAF(2, context=4, hidden=(16,)), affine=True)
        >>> amortized(torch.randn(10, 6)).log_prob(torch.randn(10, 2)).shape
        torch.Size([10])

    References:
        | Auto-Encoding Variational Bayes (Kingma et al., 2014)
        | https://arxiv.org/abs/1312.6114

        | Variational Inference with Normalizing Flows (Rezende et al., 2015)
        | https://arxiv.org/abs/1505.05770

        | Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016)
        | https://arxiv.org/abs/1606.04934
    """

    MIN_SCALE = 1e-4  # added to the softplus scale with ``affine=True``

    def __init__(self, encoder: nn.Module, flow: Flow, affine: bool = False) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"AmortizedFlow: encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        if not isinstance(flow, Flow):
            raise TypeError(f"AmortizedFlow: flow must be a pyro_flowpack Flow, got {type(flow).__name__}")
        if flow.context_features == 0:
            raise ValueError(
                "AmortizedFlow: flow must be conditional (built with context=C > 0) to take the encoder's "
                "output as its context, got an unconditional flow (context=0)"
            )
        if affine and (len(flow.event_shape) != 1 or len(flow.transform.context_shape) != 1):
            raise ValueError(
                "AmortizedFlow: affine=True needs a flow over vectors with a vector context, got event shape "
                f"{tuple(flow.event_shape)} and context shape {tuple(flow.transform.context_shape)}"
            )
        self.encoder = encoder
        self.flow = flow
        self.affine = bool(affine)

    def forward(self, x: Tensor) -> FlowDistribution | pdist.TransformedDistribution:
        r"""Returns :math:`q(z \mid x)`, of batch shape ``encoder(x).shape[:-1]``."""
        out = self.encoder(x)
        shape = self.flow.transform.context_shape
        if self.affine:
            features = self.flow.event_shape[0]
            shape = (2 * features + shape[0],)
        if not isinstance(out, Tensor) or out.dim() < len(shape) or out.shape[out.dim() - len(shape):] != shape:
            got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            what = "location, scale and context" if self.affine else "context"
            raise ValueError(
                f"AmortizedFlow: the encoder must return a {what} tensor of shape (..., {', '.join(map(str, shape))}) "
                f"for the flow, got {got}"
            )
        if not self.affine:
            return self.flow(out)
        loc, scale, context = out.split([features, features, out.shape[-1] - 2 * features], dim=-1)
        affine = AffineTransform(loc, softplus(scale) + self.MIN_SCALE, event_dim=1, cache_size=1)
        return pdist.TransformedDistribution(self.flow(context), [affine])
