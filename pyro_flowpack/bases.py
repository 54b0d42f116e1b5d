r"""Learnable base distributions, and sampling a base at a temperature.

A flow's base :math:`p_Z` need not be fixed: a base with trainable parameters lets a
flow put its mass on several modes (:class:`GaussianMixture`) or give it heavy tails
(:class:`StudentT`) without asking the layers to do it. Each base here is an
:class:`~torch.nn.Module` whose call returns a Pyro distribution with batch shape
``()`` and event shape ``(features,)``, rebuilt from the module's parameters at each
call, as zuko's lazy distributions are; pass it as the ``base`` of a
:class:`~pyro_flowpack.flow.Flow`, which keeps it as a submodule, so that its
parameters train with the layers, sit in ``state_dict`` and move with ``.to()``.

:class:`DiagonalNormalMixture` is the distribution behind :class:`GaussianMixture`: a
mixture of diagonal Normals with reparameterised samples, which torch's
``MixtureSameFamily`` lacks.

Example:
    >>> flow = pf.Flow([AffineCoupling(2)], base=GaussianMixture(2, components=3))
    >>> x = flow().rsample((5,))
    >>> x.shape, sorted(name for name, _ in flow.named_parameters() if name.startswith("base"))
    (torch.Size([5, 2]), ['base_module.loc', 'base_module.log_scale', 'base_module.logits'])
"""

from __future__ import annotations

import math
from typing import Sequence

import pyro.distributions as pdist
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Size, Tensor
from torch.distributions import (
    AffineTransform,
    Categorical,
    Cauchy,
    Distribution,
    Independent,
    Laplace,
    MixtureSameFamily,
    Normal,
    TransformedDistribution,
    constraints,
)

from .checks import check_int, check_positive, check_real

__all__ = ["LearnableBase", "DiagonalGaussian", "StudentT", "GaussianMixture", "DiagonalNormalMixture", "temper"]


class LearnableBase(nn.Module):
    r"""A base distribution with trainable parameters: a module whose call returns the
    distribution :math:`p_Z`, with batch shape ``()`` and event shape ``(features,)``.

    Arguments:
        features: The number of features :math:`D`.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        #: The number of features :math:`D`.
        self.features = check_int(features, f"{type(self).__name__}: features")

    def forward(self) -> Distribution:
        r"""Returns the distribution :math:`p_Z`, built from the current parameters."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"features={self.features}"


class DiagonalGaussian(LearnableBase):
    r"""A Gaussian base with a learnable mean and a learnable diagonal scale,

    .. math:: p_Z(z) = \prod_{d=1}^D \mathcal{N}(z_d ; \mu_d, e^{2 s_d}) ,

    the scale kept positive as :math:`\sigma_d = e^{s_d}`; it starts as the standard
    normal (:math:`\mu = 0`, :math:`s = 0`).

    Arguments:
        features: The number of features :math:`D`.

    Example:
        >>> base = DiagonalGaussian(3)
        >>> base().log_prob(torch.zeros(3))
        tensor(-2.7568, grad_fn=<SumBackward1>)
    """

    def __init__(self, features: int) -> None:
        super().__init__(features)
        #: The means :math:`\mu`, shape ``(D,)``.
        self.loc = nn.Parameter(torch.zeros(self.features))
        #: The log-scales :math:`s`, shape ``(D,)``.
        self.log_scale = nn.Parameter(torch.zeros(self.features))

    def forward(self) -> Distribution:
        return pdist.Normal(self.loc, self.log_scale.exp(), validate_args=False).to_event(1)


def _inverse_softplus(value: Tensor) -> Tensor:
    return value + torch.log(-torch.expm1(-value))


class StudentT(LearnableBase):
    r"""A heavy-tailed base: independent Student-t marginals with learnable locations
    and scales and, if asked, learnable degrees of freedom,

    .. math::
        p_Z(z) = \prod_{d=1}^D \frac{\Gamma(\frac{\nu_d + 1}{2})}
            {\Gamma(\frac{\nu_d}{2}) \sqrt{\pi \nu_d}\, \sigma_d}
            \left(1 + \frac{1}{\nu_d} \Big(\frac{z_d - \mu_d}{\sigma_d}\Big)^2\right)^{-\frac{\nu_d + 1}{2}} ,

    with :math:`\sigma_d = e^{s_d}` (starting at 1) and :math:`\mu_d` starting at 0. With
    ``learn_df=True`` each feature has its own :math:`\nu_d = \mathrm{softplus}(r_d) > 0`
    (starting at ``df``), the tail-adaptive flows of Jaini et al.: nothing holds
    :math:`\nu_d` above 1 or 2, so the fitted tails may be as heavy as the data's, with
    no mean or variance. Samples are reparameterised in :math:`\mu, \sigma` and
    :math:`\nu` (torch's Gamma sampler has implicit gradients).

    Arguments:
        features: The number of features :math:`D`.
        df: The degrees of freedom :math:`\nu > 0` (the starting value if learnt).
        learn_df: Whether :math:`\nu` is a trainable parameter (else a buffer).

    References:
        | Tails of Lipschitz Triangular Flows (Jaini et al., 2020)
        | https://arxiv.org/abs/1907.04481

    Example:
        >>> base = StudentT(2, df=3.0, learn_df=True)
        >>> base().base_dist.df
        tensor([3., 3.], grad_fn=<SoftplusBackward0>)
    """

    def __init__(self, features: int, df: float = 5.0, learn_df: bool = False) -> None:
        super().__init__(features)
        df = check_positive(df, "StudentT: df")
        if not isinstance(learn_df, bool):
            raise TypeError(f"StudentT: learn_df must be True or False, got {learn_df!r}")
        self.loc = nn.Parameter(torch.zeros(self.features))
        self.log_scale = nn.Parameter(torch.zeros(self.features))
        start = torch.full((self.features,), df)
        if learn_df:
            #: The raw degrees of freedom :math:`r`, :math:`\nu = \mathrm{softplus}(r)`.
            self.raw_df = nn.Parameter(_inverse_softplus(start))
        else:
            self.register_buffer("fixed_df", start)

    @property
    def learn_df(self) -> bool:
        """Whether the degrees of freedom are trainable."""
        return hasattr(self, "raw_df")

    @property
    def df(self) -> Tensor:
        r"""The degrees of freedom :math:`\nu`, shape ``(D,)``."""
        return F.softplus(self.raw_df) if self.learn_df else self.fixed_df

    def forward(self) -> Distribution:
        return pdist.StudentT(self.df, self.loc, self.log_scale.exp(), validate_args=False).to_event(1)

    def extra_repr(self) -> str:
        return f"features={self.features}, learn_df={self.learn_df}"


def _component_normal(component: Distribution) -> Normal | None:
    """The Normal of a mixture's components (a Normal, or an Independent Normal with one
    reinterpreted dimension), or ``None`` if they are not diagonal Normals."""
    if isinstance(component, Independent):
        if component.reinterpreted_batch_ndims != 1:
            return None
        component = component.base_dist
    return component if isinstance(component, Normal) else None


def _implicit_shift(z: Tensor, logits: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    r"""A tensor equal to zero whose derivative in the parameters is the implicit
    reparameterisation gradient :math:`\partial z / \partial \theta` of mixture samples
    ``z`` (shape ``(..., D)``; ``logits`` ``(..., K)``, ``loc`` and ``scale``
    ``(..., K, D)``): :math:`-y` with :math:`J y = F(z; \theta) - F(z; \bar\theta)`
    (:math:`\bar\theta` the detached parameters) and :math:`J` held constant, whose entries are

    .. math::
        J_{dd} = p(z_d \mid z_{<d}) = \sum_k w_{kd}\, \mathcal{N}(z_d ; \mu_{kd}, \sigma_{kd}^2),
        \qquad J_{dj} = \sum_k w_{kd} \big(a_{kj} - \textstyle\sum_l w_{ld} a_{lj}\big) \Phi_{kd}
        \quad (j < d),

    :math:`a_{kj} = -(z_j - \mu_{kj}) / \sigma_{kj}^2`; so row :math:`d` of the forward
    substitution needs only :math:`S_k = \sum_{j<d} a_{kj} y_j`, :math:`O(K)` work. See
    :class:`DiagonalNormalMixture`."""
    u = (z.unsqueeze(-2) - loc) / scale
    log_normal = -0.5 * u**2 - scale.log() - 0.5 * math.log(2 * math.pi)
    before = torch.cat([torch.zeros_like(log_normal[..., :1]), log_normal[..., :-1]], -1).cumsum(-1)
    log_w = (logits.log_softmax(-1).unsqueeze(-1) + before).log_softmax(-2)  # w_k(z_{<d})
    cdf = (log_w.exp() * torch.special.ndtr(u)).sum(-2)  # F_d(z_d | z_{<d})
    delta = cdf - cdf.detach()
    # forward substitution of J y = delta, J = dF/dz lower triangular, held constant
    with torch.no_grad():
        w, phi = log_w.exp(), torch.special.ndtr(u)
        score = -u / scale  # d log N(z_d; mu_kd, sigma_kd) / dz_d
        pdf = (w * log_normal.exp()).sum(-2).clamp_min(torch.finfo(z.dtype).tiny)  # p(z_d | z_{<d})
    total = torch.zeros_like(logits.expand(z.shape[:-1] + logits.shape[-1:]))  # S_k = sum_{j<d} a_kj y_j
    shifts = []
    for d in range(z.shape[-1]):
        w_d = w[..., d]
        centred = total - (w_d * total).sum(-1, keepdim=True)
        y_d = (delta[..., d] - (w_d * phi[..., d] * centred).sum(-1)) / pdf[..., d]
        total = total + score[..., d] * y_d.unsqueeze(-1)
        shifts.append(y_d)
    return -torch.stack(shifts, -1)


class DiagonalNormalMixture(pdist.MixtureSameFamily):
    r"""A mixture of diagonal Normals whose samples are reparameterised,

    .. math:: p(z) = \sum_{k=1}^K \pi_k \prod_{d=1}^D \mathcal{N}(z_d ; \mu_{kd}, \sigma_{kd}^2) ,

    built as torch's ``MixtureSameFamily`` is, from a ``Categorical`` and components
    that are an ``Independent`` Normal of event shape ``(D,)`` (or a Normal, for a
    mixture of scalars). :meth:`rsample` draws ancestrally and differentiates by
    implicit reparameterisation: with the distributional transform
    :math:`u_d = F_d(z_d \mid z_{<d}) = \sum_k w_{kd}\, \Phi\big((z_d - \mu_{kd}) / \sigma_{kd}\big)`,
    :math:`w_{kd} \propto \pi_k \prod_{j<d} \mathcal{N}(z_j ; \mu_{kj}, \sigma_{kj}^2)`,
    held fixed, the sample moves with the parameters as

    .. math:: \frac{\partial z}{\partial \theta} = -J^{-1} \frac{\partial F}{\partial \theta},
        \qquad J = \frac{\partial F}{\partial z} \text{ (lower triangular)},

    solved by forward substitution in :math:`O(KD)` per sample. The gradients are exact
    to first order (not twice differentiable); any batch shape and :math:`D = 1` work.

    Arguments:
        mixture_distribution: The ``Categorical`` of the weights :math:`\pi`.
        component_distribution: The components, batch shape ``(..., K)``.
        validate_args: Whether to validate arguments (torch's default if ``None``).

    References:
        | Stochastic Backpropagation through Mixture Density Distributions (Graves, 2016)
        | https://arxiv.org/abs/1607.05690
        | Implicit Reparameterization Gradients (Figurnov, Mohamed and Mnih, 2018)
        | https://arxiv.org/abs/1805.08498

    Example:
        >>> loc = torch.tensor([[-2.0], [2.0]], requires_grad=True)
        >>> d = DiagonalNormalMixture(Categorical(logits=torch.zeros(2)),
        ...                           Independent(Normal(loc, torch.ones(2, 1)), 1))
        >>> d.rsample((1000,)).mean().backward()
        >>> round(loc.grad.sum().item(), 4)  # shifting every mean shifts every sample
        1.0
    """

    has_rsample = True

    @staticmethod
    def supports(component_distribution: Distribution) -> bool:
        """Whether the components are diagonal Normals, as this mixture needs."""
        return _component_normal(component_distribution) is not None

    def __init__(
        self,
        mixture_distribution: Categorical,
        component_distribution: Distribution,
        validate_args: bool | None = None,
    ) -> None:
        if not self.supports(component_distribution):
            raise TypeError(
                "DiagonalNormalMixture expects components that are a Normal or an Independent Normal "
                f"with one reinterpreted dimension, got {type(component_distribution).__name__}"
            )
        super().__init__(mixture_distribution, component_distribution, validate_args=validate_args)

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        # the real line, not torch's MixtureSameFamilyConstraint, so that biject_to works
        return constraints.real_vector if self.event_shape else constraints.real

    def expand(self, batch_shape: Sequence[int], _instance: DiagonalNormalMixture | None = None) -> DiagonalNormalMixture:
        new = self._get_checked_instance(DiagonalNormalMixture, _instance)
        return super().expand(batch_shape, _instance=new)

    def rsample(self, sample_shape: Sequence[int] = Size()) -> Tensor:
        with torch.no_grad():
            z = self.sample(Size(sample_shape))
        normal = _component_normal(self.component_distribution)
        loc, scale = normal.loc, normal.scale
        if not self.event_shape:  # scalar components: one feature
            loc, scale, z = loc.unsqueeze(-1), scale.unsqueeze(-1), z.unsqueeze(-1)
        z = z + _implicit_shift(z, self.mixture_distribution.logits, loc, scale)
        return z if self.event_shape else z.squeeze(-1)


class GaussianMixture(LearnableBase):
    r"""A learnable mixture of :math:`K` diagonal Gaussians, for multimodal data,

    .. math:: p_Z(z) = \sum_{k=1}^K \mathrm{softmax}(\ell)_k
        \prod_{d=1}^D \mathcal{N}(z_d ; \mu_{kd}, e^{2 s_{kd}}) ,

    returned as a :class:`DiagonalNormalMixture`, so samples are reparameterised and the
    base serves variational guides (``rsample_and_log_prob``) as well as density
    estimation. It starts with equal weights (:math:`\ell = 0`), unit scales
    (:math:`s = 0`) and means spread apart without randomness:
    :math:`\mu_{kd} = c_{(k + d) \bmod K}` with :math:`c_k = a\,((2k + 1)/K - 1)` the
    midpoints of :math:`K` equal cells of :math:`[-a, a]` (:math:`a` the ``spread``),
    shifted cyclically along the features so that the means are distinct points.

    Arguments:
        features: The number of features :math:`D`.
        components: The number of components :math:`K`.
        spread: The half-width :math:`a \geq 0` of the starting means.

    Example:
        >>> base = GaussianMixture(2, components=3)
        >>> base.loc
        Parameter containing:
        tensor([[-0.6667,  0.0000],
                [ 0.0000,  0.6667],
                [ 0.6667, -0.6667]], requires_grad=True)
    """

    def __init__(self, features: int, components: int = 2, spread: float = 1.0) -> None:
        super().__init__(features)
        self.components = check_int(components, "GaussianMixture: components")
        spread = check_real(spread, "GaussianMixture: spread")
        if spread < 0:
            raise ValueError(f"GaussianMixture: spread must be a finite number >= 0, got {spread!r}")
        K, D = self.components, self.features
        centres = spread * ((2 * torch.arange(K) + 1) / K - 1)
        cells = (torch.arange(K).unsqueeze(-1) + torch.arange(D)) % K
        #: The mixture logits :math:`\ell`, shape ``(K,)``.
        self.logits = nn.Parameter(torch.zeros(K))
        #: The means :math:`\mu`, shape ``(K, D)``.
        self.loc = nn.Parameter(centres[cells])
        #: The log-scales :math:`s`, shape ``(K, D)``.
        self.log_scale = nn.Parameter(torch.zeros(K, D))

    def forward(self) -> Distribution:
        return DiagonalNormalMixture(
            pdist.Categorical(logits=self.logits, validate_args=False),
            pdist.Normal(self.loc, self.log_scale.exp(), validate_args=False).to_event(1),
            validate_args=False,
        )

    def extra_repr(self) -> str:
        return f"features={self.features}, components={self.components}"


_LOCATION_SCALE = {Normal: pdist.Normal, Laplace: pdist.Laplace, Cauchy: pdist.Cauchy}


def temper(distribution: Distribution, temperature: float) -> Distribution:
    r"""The distribution at temperature :math:`T`: every location-scale part keeps its
    location and has its scale multiplied by :math:`T`, Glow's reduced-temperature
    sampling (for a Gaussian, :math:`p_Z^{1/T^2}` normalised).

    Normal, Laplace, Cauchy and Student-t parts scale about their location;
    ``Independent`` wrappers are kept; a mixture tempers its components, each about its
    own mean, with the weights unchanged (scaling the whole mixture about its mean
    would pull the modes together). Any other distribution with a finite mean
    :math:`m` becomes that of :math:`m + T (z - m)`.

    Arguments:
        distribution: The distribution (a flow's base).
        temperature: The temperature :math:`T > 0`.

    Example:
        >>> temper(Normal(torch.tensor(1.0), torch.tensor(2.0)), 0.5).scale
        tensor(1.)
    """
    t = check_positive(temperature, "temper: temperature")
    if isinstance(distribution, Independent):
        inner = temper(distribution.base_dist, t)
        return pdist.Independent(inner, distribution.reinterpreted_batch_ndims, validate_args=False)
    if isinstance(distribution, MixtureSameFamily):
        cls = DiagonalNormalMixture if isinstance(distribution, DiagonalNormalMixture) else pdist.MixtureSameFamily
        component = temper(distribution.component_distribution, t)
        return cls(distribution.mixture_distribution, component, validate_args=False)
    if isinstance(distribution, pdist.MixtureOfDiagNormals):
        return pdist.MixtureOfDiagNormals(distribution.locs, t * distribution.coord_scale, distribution.component_logits)
    if isinstance(distribution, torch.distributions.StudentT):
        return pdist.StudentT(distribution.df, distribution.loc, t * distribution.scale, validate_args=False)
    for family, cls in _LOCATION_SCALE.items():
        if isinstance(distribution, family):
            return cls(distribution.loc, t * distribution.scale, validate_args=False)
    mean = distribution.mean
    if not bool(torch.isfinite(mean).all()):
        raise ValueError(
            f"temper: a temperature needs a location-scale base (Normal, StudentT, Laplace, Cauchy, a mixture "
            f"of them) or one with a finite mean; {type(distribution).__name__} has a mean that is not finite"
        )
    affine = AffineTransform((1 - t) * mean, t, event_dim=len(distribution.event_shape))
    return TransformedDistribution(distribution, [affine], validate_args=False)
