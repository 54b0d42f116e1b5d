r"""Mass-covering variational objectives for mixture guides, as Pyro losses.

A mixture guide :math:`q(z) = \sum_{k=1}^K \pi_k q_k(z)` (:class:`StratifiedMixture`,
the distribution of ``AutoFlowGuide(model, components=K)``) draws its component at
random, a discrete choice that the reparameterisation trick cannot differentiate.
Stratified sampling removes it: draw :math:`T` samples from *every* component,
:math:`z_{kt} = g_k(\epsilon_{kt})`, and weight component :math:`k` by :math:`\pi_k`.
With the log-weights :math:`\log w_{kt} = \log p(x, z_{kt}) - \log q(z_{kt})`, where
:math:`q` is the mixture's density, the two objectives here are

.. math::
    \mathrm{ELBO} = \sum_k \pi_k \, \frac1T \sum_t \log w_{kt}
    \qquad (:class:`StratifiedELBO`),

an unbiased estimate of :math:`\mathbb{E}_q[\log p(x, z) - \log q(z)]` whose gradient
reaches the weights :math:`\pi` directly, and the stratified importance-weighted bound
of Morningstar et al. (2021),

.. math::
    \mathrm{SIWAE}_T = \log \frac1T \sum_{t=1}^T \sum_{k=1}^K \pi_k w_{kt}
    \qquad (:class:`SIWAE`),

with :math:`\mathrm{ELBO} \le \mathrm{SIWAE}_1 \le \mathrm{SIWAE}_T \le \log p(x)`. The
importance weighting makes it mass-covering: a mode that the mixture misses costs
:math:`\mathrm{SIWAE}` more than a component spread too wide, so components move to
modes that the ELBO would let them abandon. With one component (any other guide, such as
Pyro's ``AutoNormal``) the stratification is void: :class:`SIWAE` is the
importance-weighted bound :math:`\mathrm{IWAE}_T` of Burda et al. and
:class:`StratifiedELBO` is :class:`~pyro.infer.Trace_ELBO` with :math:`T` vectorised
particles, so that every guide can be trained and compared under one objective.

Both can anneal: a temperature :math:`\beta` multiplies the log-density of every observed
site (the likelihood, and ``pyro.factor`` terms), ramped linearly from ``beta0`` to 1 over
the first ``anneal_steps`` gradient steps, so that the first targets are broad (at
:math:`\beta = 0`, the prior). It is an option, not a cure: on ``bench/vi_multimodal.py``
the components merged while the target was the prior, and some seeds then had two
components on one mode.

Every latent site of the guide must be reparameterised, and model and guide must have a
static structure: the :math:`K T` particles are one vectorised run, in a
``pyro.plate("num_particles_vectorized", T)`` left of the model's plates and, for a
mixture guide, a ``pyro.plate("mixture_components", K)`` left of that.

References:
    | Automatic Differentiation Variational Inference with Mixtures (Morningstar, Vikram,
      Ham, Gallagher and Dillon, 2021) https://arxiv.org/abs/2003.01687
    | Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016)
      https://arxiv.org/abs/1509.00519
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any, Callable, Sequence

import pyro
import torch
from pyro.distributions import TorchDistribution
from pyro.infer.elbo import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.util import check_if_enumerated, warn_if_nan
from torch import Size, Tensor
from torch.distributions import Categorical, Distribution

from ..checks import check_int, check_real

__all__ = ["StratifiedMixture", "SIWAE", "StratifiedELBO", "PARTICLE_PLATE", "COMPONENT_PLATE"]

#: The name of the plate over the :math:`T` particles (Pyro's own name for it).
PARTICLE_PLATE = "num_particles_vectorized"
#: The name of the plate over the :math:`K` components of a stratified mixture.
COMPONENT_PLATE = "mixture_components"


class StratifiedMixture(TorchDistribution):
    r"""The mixture :math:`q(z) = \sum_k \pi_k q_k(z)`, :math:`\pi = \mathrm{softmax}(\ell)`,
    of reparameterisable components, which the stratified losses of this module sample one
    component per index of a plate.

    Drawn on its own (``strata_dim=None``), each sample picks its component
    :math:`k \sim \mathrm{Categorical}(\pi)` and is a reparameterised draw of
    :math:`q_k`: the gradient reaches the components but not the weights (the
    expectation of :math:`\nabla_\ell \log q` is zero), so with Pyro's own ELBOs the
    weights stay where they are; the losses :class:`SIWAE` and :class:`StratifiedELBO`
    train them. Stratified (:meth:`stratify`), its batch dimension ``strata_dim`` has size
    :math:`K` and index :math:`k` holds draws of :math:`q_k`. :meth:`log_prob` is always the
    mixture's density, :math:`\log \sum_j \pi_j q_j(z)`, one batched call of each
    component's ``log_prob`` on all the values (for a flow in IAF form, an inverse:
    :math:`D` network passes per layer, whatever the number of values).

    Arguments:
        components: The :math:`K` component distributions, of one event shape and an
            empty batch shape, each with ``rsample``.
        logits: The unnormalised log-weights :math:`\ell`, of shape ``(K,)``.
        stl: Whether :meth:`log_prob` holds the weights fixed, as the components of a
            "sticking the landing" guide hold their parameters.
        strata_dim: The batch dimension (negative) along which the components are
            stratified, or ``None``.
        batch_shape: The batch shape (by default ``()``, or ``(K, 1, ..., 1)`` up to
            ``strata_dim``).

    Example:
        >>> import pyro.distributions as dist
        >>> q = StratifiedMixture([dist.Normal(-2.0, 1.0), dist.Normal(2.0, 1.0)], torch.zeros(2))
        >>> q.sample((3,)).shape
        torch.Size([3])
        >>> q.stratify(-1).rsample((5,)).shape  # index k of the last dimension from component k
        torch.Size([5, 2])
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, components: Sequence[Distribution], logits: Tensor, *, stl: bool = False,
                 strata_dim: int | None = None, batch_shape: Sequence[int] | None = None,
                 validate_args: bool | None = None) -> None:
        components = tuple(components)
        if not components:
            raise ValueError("StratifiedMixture: expected at least one component, got none")
        event_shape = components[0].event_shape
        for i, q in enumerate(components):
            if not q.has_rsample:
                raise ValueError(f"StratifiedMixture: component {i} ({type(q).__name__}) has no rsample")
            if q.batch_shape != () or q.event_shape != event_shape:
                raise ValueError(f"StratifiedMixture: every component must have batch shape () and event shape "
                                 f"{tuple(event_shape)}; component {i} has {tuple(q.batch_shape)} and "
                                 f"{tuple(q.event_shape)}")
        if not isinstance(logits, Tensor) or logits.shape != (len(components),):
            raise ValueError(f"StratifiedMixture: logits must be a tensor of shape ({len(components)},), got "
                             f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
        self.components = components
        self.logits = logits
        self.stl = bool(stl)
        self.strata_dim = strata_dim
        if batch_shape is None:
            batch_shape = () if strata_dim is None else (len(components),) + (1,) * (-strata_dim - 1)
        batch_shape = Size(batch_shape)
        if strata_dim is not None and (len(batch_shape) < -strata_dim or batch_shape[strata_dim] != len(components)):
            raise ValueError(f"StratifiedMixture: a batch shape stratified at dim {strata_dim} needs size "
                             f"{len(components)} there, got {tuple(batch_shape)}")
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    @property
    def support(self) -> Any:
        return self.components[0].support

    @property
    def num_components(self) -> int:
        """The number of components :math:`K`."""
        return len(self.components)

    @property
    def log_weights(self) -> Tensor:
        r"""The log-weights :math:`\log \pi_k`, with their gradient."""
        return torch.log_softmax(self.logits, -1)

    def expand(self, batch_shape: Sequence[int], _instance: Any = None) -> "StratifiedMixture":
        return StratifiedMixture(self.components, self.logits, stl=self.stl, strata_dim=self.strata_dim,
                                 batch_shape=batch_shape, validate_args=self._validate_args)

    def stratify(self, dim: int) -> "StratifiedMixture":
        r"""This mixture with its components stratified along batch dimension ``dim`` (< 0)."""
        if isinstance(dim, bool) or not isinstance(dim, int) or dim >= 0:
            raise ValueError(f"StratifiedMixture.stratify: dim must be a negative int, got {dim!r}")
        shape = [1] * max(-dim, len(self.batch_shape))
        shape[len(shape) - len(self.batch_shape):] = self.batch_shape
        if shape[dim] != 1:
            raise ValueError(f"StratifiedMixture.stratify: batch dim {dim} has size {shape[dim]} already")
        shape[dim] = self.num_components
        return StratifiedMixture(self.components, self.logits, stl=self.stl, strata_dim=dim, batch_shape=shape,
                                 validate_args=self._validate_args)

    def rsample(self, sample_shape: Sequence[int] = Size()) -> Tensor:
        shape = Size(sample_shape) + self.batch_shape
        if self.strata_dim is None:
            draws = torch.stack([q.rsample(shape) for q in self.components], dim=len(shape))
            index = Categorical(logits=self.logits.detach()).sample(shape)
            index = index.reshape(shape + (1,) * (1 + len(self.event_shape))).expand(shape + (1,) + self.event_shape)
            return draws.gather(len(shape), index).squeeze(len(shape))
        position = len(shape) + self.strata_dim
        others = shape[:position] + shape[position + 1:]
        return torch.stack([q.rsample(others) for q in self.components], dim=position)

    def sample(self, sample_shape: Sequence[int] = Size()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_weights = self.log_weights.detach() if self.stl else self.log_weights
        scores = torch.stack([q.log_prob(value) for q in self.components], -1)
        return torch.logsumexp(scores + log_weights, -1)


class _Stratify(Messenger):
    """Stratifies the guide's :class:`StratifiedMixture` sample sites along ``dim``; it
    must be the innermost handler, so that the plates broadcast the stratified site."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def _pyro_sample(self, msg: dict) -> None:
        fn = msg["fn"]
        if isinstance(fn, StratifiedMixture) and fn.strata_dim is None and not msg["is_observed"]:
            msg["fn"] = fn.stratify(self.dim)


def guide_components(guide: Callable) -> int:
    """The number of mixture components a guide declares by its ``components`` attribute
    (1 when it has none)."""
    components = getattr(guide, "components", 1)
    return check_int(components, f"{type(guide).__name__}.components")


class _StratifiedObjective(ELBO):
    r"""The shared machinery: one vectorised run of :math:`K \times T` particles, the
    log-weights :math:`\log w_{kt}` with the observed sites tempered by :math:`\beta`,
    and the mixture's log-weights :math:`\log \pi_k`; subclasses reduce them to a bound."""

    _name = "StratifiedObjective"

    def __init__(self, num_particles: int = 8, max_plate_nesting: float = float("inf"), *, beta0: float = 1.0,
                 anneal_steps: int = 0) -> None:
        num_particles = check_int(num_particles, f"{self._name}: num_particles")
        if max_plate_nesting != float("inf"):
            max_plate_nesting = check_int(max_plate_nesting, f"{self._name}: max_plate_nesting", minimum=0)
        beta0 = check_real(beta0, f"{self._name}: beta0")
        if not 0 <= beta0 <= 1:
            raise ValueError(f"{self._name}: beta0 must be in [0, 1], got {beta0!r}")
        self.anneal_steps = check_int(anneal_steps, f"{self._name}: anneal_steps", minimum=0)
        self.beta0 = beta0
        #: The number of gradient steps taken so far (``loss_and_grads`` and
        #: ``differentiable_loss`` calls); it sets the temperature.
        self.step = 0
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)

    @property
    def beta(self) -> float:
        r"""The current temperature :math:`\beta = \beta_0 + (1 - \beta_0) \min(1, n / N)`
        after :math:`n` steps of the :math:`N` = ``anneal_steps``."""
        if self.anneal_steps == 0:
            return 1.0
        return self.beta0 + (1.0 - self.beta0) * min(1.0, self.step / self.anneal_steps)

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        """The model and guide traces of one vectorised run of all particles (and, for a
        mixture guide, all components)."""
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        nesting = self.max_plate_nesting
        components = guide_components(guide)

        def vectorized(fn: Callable, stratify: bool) -> Callable:
            def wrapped(*a: Any, **k: Any) -> Any:
                with ExitStack() as stack:
                    if components > 1:
                        stack.enter_context(pyro.plate(COMPONENT_PLATE, components, dim=-nesting - 2))
                    stack.enter_context(pyro.plate(PARTICLE_PLATE, self.num_particles, dim=-nesting - 1))
                    if stratify and components > 1:
                        stack.enter_context(_Stratify(-nesting - 2))
                    return fn(*a, **k)

            return wrapped

        model_trace, guide_trace = get_importance_trace("flat", nesting + 2, vectorized(model, False),
                                                        vectorized(guide, True), args, kwargs)
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace

    def _log_weights(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
        r"""Returns :math:`\log w` of shape ``(K, T)`` and :math:`\log \pi` of shape ``(K, 1)``."""
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        nesting, components = self.max_plate_nesting, guide_components(guide)
        beta = self.beta
        log_w: Tensor | float = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                term = self._sum_plates(site, nesting)
                log_w = log_w + (beta * term if site["is_observed"] and beta != 1.0 else term)
        mixtures = []
        for site in guide_trace.nodes.values():
            if site["type"] != "sample":
                continue
            if not site["fn"].has_rsample:
                raise NotImplementedError(f"{self._name}: guide site {site['name']!r} is not reparameterised "
                                          f"({type(site['fn']).__name__}); every latent site must have rsample")
            log_w = log_w - self._sum_plates(site, nesting)
            if isinstance(site["fn"], StratifiedMixture) and site["fn"].strata_dim is not None:
                mixtures.append(site["fn"])
        if components > 1:
            if len(mixtures) != 1 or mixtures[0].num_components != components:
                found = [m.num_components for m in mixtures]
                raise ValueError(f"{self._name}: the guide declares components={components} but its trace has "
                                 f"stratified mixture sites with {found} components; expected one site with "
                                 f"{components}")
            log_pi = mixtures[0].log_weights.unsqueeze(-1)
        else:
            log_pi = torch.zeros(1, 1)
        log_w = torch.as_tensor(log_w).expand(components, self.num_particles)
        return log_w, log_pi.to(log_w)

    def _sum_plates(self, site: dict, nesting: int) -> Tensor:
        """A site's log-density summed over the model's plates, shaped ``(K or 1, T or 1)``."""
        log_prob = site["log_prob"]
        if log_prob.dim() > nesting + 2:
            raise ValueError(f"{self._name}: site {site['name']!r} has a log-density of shape "
                             f"{tuple(log_prob.shape)}, more dimensions than the {nesting} plates of the model, "
                             "the particles and the components (enumerated sites are not supported)")
        log_prob = log_prob.reshape((1,) * (nesting + 2 - log_prob.dim()) + log_prob.shape)
        return log_prob.sum(tuple(range(2, nesting + 2))) if nesting else log_prob

    def _bound(self, log_w: Tensor, log_pi: Tensor) -> Tensor:
        raise NotImplementedError

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> Tensor:
        """The negated bound as a differentiable tensor; counts as one step of the annealing."""
        loss = -self._bound(*self._log_weights(model, guide, args, kwargs))
        self.step += 1
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The negated bound, after back-propagating its gradient; one step of the annealing."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return float(loss.detach())

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The negated bound, without gradients and without advancing the annealing."""
        with torch.no_grad():
            loss = -self._bound(*self._log_weights(model, guide, args, kwargs))
        warn_if_nan(loss, "loss")
        return float(loss)


class SIWAE(_StratifiedObjective):
    r"""The stratified importance-weighted bound of Morningstar et al. (2021),

    .. math::
        \mathrm{SIWAE}_T = \mathbb{E}\Big[\log \frac1T \sum_{t=1}^T \sum_{k=1}^K
        \pi_k \frac{p(x, z_{kt})}{q(z_{kt})}\Big], \qquad z_{kt} \sim q_k ,

    for a mixture guide :math:`q = \sum_k \pi_k q_k` that declares ``components = K``
    (``AutoFlowGuide(model, components=K)``), and the importance-weighted bound
    :math:`\mathrm{IWAE}_T` of Burda et al. for any other reparameterised guide
    (:math:`K = 1`). It is a Pyro loss: ``SVI(model, guide, optim, loss=SIWAE(...))``.

    Its gradient estimate depends on how the guide scores its samples:

    - a guide that scores with its parameters live (Pyro's guides,
      ``AutoFlowGuide(stl=False)``) gives the total derivative of the estimate, every
      sample reparameterised and the weights explicit: unbiased, with normalised weights
      :math:`v_{kt} \propto \pi_k w_{kt}`,
      :math:`\nabla = \sum_{kt} v_{kt} \nabla (\log \pi_k + \log w_{kt})`. Its score
      part :math:`-\sum_{kt} v_{kt} \nabla_\phi \log q_\phi(z_{kt})` does not vanish at the
      optimum and grows noisier relative to the signal as :math:`T` grows (Rainforth et
      al., 2018): on ``bench/vi_multimodal.py`` the flow components drifted into
      far-reaching tails, which barely lower an importance-weighted bound but ruin the ELBO;
    - a guide that holds its parameters fixed in its score (``AutoFlowGuide(stl=True)``,
      the default; :class:`~pyro_flowpack.infer.StickingTheLanding`) gives the path
      estimate :math:`\sum_{kt} v_{kt} \big(\nabla_z \log w(z_{kt})\, \partial_\phi z_{kt}
      + \nabla_\phi \log \pi_k\big)`, the importance-weighted "sticking the landing" of
      Roeder et al. It is biased for an importance-weighted bound (Tucker et al.,
      2018), but the posterior stays a fixed point (there :math:`\log w` is constant
      and :math:`\sum_t v_{kt} = \pi_k`) where every particle's gradient is zero, and it
      moves the weights towards :math:`\pi_k = \sum_t v_{kt}`, the share of the
      posterior's mass that component :math:`k` covers, which the bound itself ignores
      once the components are apart (:math:`\pi_k w_{kt} \approx p / q_k` then). This
      is the estimate that reached the benchmark's goals.

    A mixture guide runs :math:`K T` particles per step; give a one-component peer
    ``num_particles`` :math:`= K T` for the same number of model evaluations.

    Arguments:
        num_particles: :math:`T`, the particles per component.
        max_plate_nesting: The number of nested plates of the model (guessed by one run of
            model and guide if not given).
        beta0: The temperature of the observed sites at the first step.
        anneal_steps: The number of steps over which :math:`\beta` rises linearly to 1
            (0: no annealing).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> loss = SIWAE(num_particles=16)
        >>> round(loss.loss(model, AutoNormal(model, init_scale=1.0)), 6)  # q = p: log Z = 0
        -0.0

    References:
        | Automatic Differentiation Variational Inference with Mixtures (Morningstar et
          al., 2021) https://arxiv.org/abs/2003.01687
        | Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016)
          https://arxiv.org/abs/1509.00519
        | Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
          Inference (Roeder, Wu and Duvenaud, 2017) https://arxiv.org/abs/1703.09194
        | Tighter Variational Bounds are Not Necessarily Better (Rainforth et al., 2018)
          https://arxiv.org/abs/1802.04537
        | Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives (Tucker,
          Lawson, Gu and Maddison, 2018) https://arxiv.org/abs/1810.04152
    """

    _name = "SIWAE"

    def _bound(self, log_w: Tensor, log_pi: Tensor) -> Tensor:
        return torch.logsumexp((log_pi + log_w).reshape(-1), 0) - math.log(self.num_particles)


class StratifiedELBO(_StratifiedObjective):
    r"""The ELBO of a mixture guide from stratified samples,

    .. math::
        \mathrm{ELBO} = \sum_{k=1}^K \pi_k \, \mathbb{E}_{z \sim q_k}
        \big[\log p(x, z) - \log q(z)\big] = \mathbb{E}_{z \sim q}\big[\log p(x, z) - \log q(z)\big],

    estimated with :math:`T` samples of each component. Its gradient reaches the weights
    :math:`\pi` exactly, which the single ancestral draw of Pyro's
    :class:`~pyro.infer.Trace_ELBO` cannot; with a one-component guide it *is*
    ``Trace_ELBO(num_particles=T, vectorize_particles=True)``. Since the stratified
    average is an expectation under :math:`q` itself, the score term
    :math:`\mathbb{E}_q[\nabla \log q] = 0` may be dropped, so the path ("sticking the
    landing") gradient of ``AutoFlowGuide(stl=True)`` stays unbiased here. It is
    mode-seeking: use it to polish a fit, :class:`SIWAE` to find the modes.

    Arguments:
        num_particles: :math:`T`, the particles per component.
        max_plate_nesting: The number of nested plates of the model (guessed if not given).
        beta0: The temperature of the observed sites at the first step.
        anneal_steps: The number of steps over which :math:`\beta` rises linearly to 1.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> round(StratifiedELBO(num_particles=4).loss(model, AutoNormal(model, init_scale=1.0)), 6)
        -0.0
    """

    _name = "StratifiedELBO"

    def _bound(self, log_w: Tensor, log_pi: Tensor) -> Tensor:
        return (log_pi.exp() * log_w.mean(-1, keepdim=True)).sum()
