r"""Normalizing-flow autoguides for Pyro models.

:class:`AutoFlowGuide` fits all the latent sites of a Pyro model with one flow. As in
Pyro's :class:`~pyro.infer.autoguide.AutoContinuous`, each latent site :math:`\theta_j`
with support :math:`S_j` is mapped to the real line by :math:`u_j = T_j^{-1}(\theta_j)`,
:math:`T_j` = ``biject_to(S_j)``, and the :math:`u_j` are packed into one vector
:math:`u \in \mathbb{R}^D`. The guide is

.. math::
    z \sim \mathcal{N}(0, I_D), \qquad u = \mu + \sigma \odot g(z), \qquad
    \theta_j = T_j(u_j),

where :math:`g` is a flow in IAF form (the network of each layer reads the base side)
and :math:`\mu, \sigma` a learned elementwise affine map (an
:class:`~pyro_flowpack.transforms.ActNorm` set at ``init_loc`` and ``init_scale``).
Its log-density is

.. math::
    \log q(\theta) = \log \mathcal{N}(z) - \log |\det J_g(z)| - \sum_i \log \sigma_i
    - \sum_j \log |\det J_{T_j}(u_j)| ,

so that drawing :math:`\theta` and scoring it can be one forward pass: the flow's layers
keep their evaluation of a sample they just drew, and ``log_prob`` of that very tensor
runs no inverse (``get_posterior().rsample_and_log_prob``, and the ELBO with
``stl=False``). By default the ELBO instead scores its samples with the parameters held
fixed (:class:`StickingTheLanding`), a lower-variance gradient that needs the flow's
Jacobian from the same pass, still no inverse; with at most two latent dimensions the
default flow has spline layers and blends the two gradients (see :class:`AutoFlowGuide`).
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable, Sequence

import pyro
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from torch import Tensor
from torch import nn
from torch.distributions import Transform
from torch.func import functional_call

from ..flow import Flow, FlowDistribution
from ..flows.registry import flow_entry, flow_names
from ..transforms.base import FlowTransform
from ..transforms.normalization import ActNorm
from ..checks import check_int, check_positive, check_real
from .diagnostics import Diagnostics, diagnose
from .losses import StratifiedMixture

__all__ = ["AutoFlowGuide", "StickingTheLanding", "guide_flow"]


def _default_hidden(features: int) -> tuple[int, int]:
    width = max(64, 4 * features)
    return (width, width)


FlowSpec = str | type | Callable[..., Any]


def _check_options(name: str, function: Callable, options: dict[str, Any]) -> None:
    parameters = inspect.signature(function).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [p for p in parameters if p != "features"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"AutoFlowGuide: unknown option(s) {unknown} for flow={name}; expected some of {accepted}")


def _check_spec(flow: FlowSpec, options: dict[str, Any]) -> None:
    if isinstance(flow, str):
        entry = flow_entry(flow, "vector")
        try:
            entry.check_options(options)
        except TypeError as error:
            raise TypeError(f"AutoFlowGuide: {error}") from None
    elif isinstance(flow, type):
        if not issubclass(flow, Flow):
            raise TypeError(f"AutoFlowGuide: a flow class must be a pyro_flowpack Flow builder "
                            f"(such as pf.flows.NSF), got {flow.__name__}")
        _check_options(flow.__name__, flow.__init__, options)
    elif not callable(flow):
        raise TypeError(f"AutoFlowGuide: flow must be a name in {flow_names('vector')}, a Flow builder or a "
                        f"callable(features) returning a Flow, got {type(flow).__name__}")


def guide_flow(flow: FlowSpec, features: int, **options: Any) -> Flow:
    r"""Builds the flow :math:`g` of a guide over ``features`` unconstrained dimensions.

    Arguments:
        flow: A name of the flow registry (:data:`pyro_flowpack.flows.FLOWS`, the names
            ``flowpack train --flow`` takes), built with the registry's guide defaults
            where they differ from density estimation:

            * ``"iaf"`` (the default of :class:`AutoFlowGuide`): ``transforms=4`` affine
              autoregressive layers in IAF form, the order ascending in the first layer
              and reversed every layer, with ``log_scale_bounds=(-5, 3)``, the soft bounds
              of each layer's log-scale in the sampling direction (those of Pyro's
              ``AffineAutoregressive``: a funnel's neck needs scales well below
              :math:`e^{-3}`); ``splines=k`` ends the last ``k`` blocks with a
              rational-quadratic spline layer (``bins``, ``tail_bound``), ``affine=False``
              drops the affine layers (see :class:`~pyro_flowpack.flows.IAF`);
            * ``"nsf"``, ``"realnvp"`` (``transforms=6``), ``"nice"``: coupling flows,
              one pass in both directions;
            * ``"bernstein"``, ``"sos"`` and the other families of
              :func:`~pyro_flowpack.flows.register_family`, in coupling form, or in IAF
              form for ``"bernstein-ar"``, ``"sos-ar"``, with the closed-form direction of
              the map on the sampling side;
            * names of flows that sample in :math:`D` sequential passes per layer
              (``"maf"``, ``"nsf-ar"``) are refused: a guide draws at every step (pass the
              builder class, ``flow=pf.flows.MAF``, to insist).

            ``hidden`` defaults to two layers of :math:`\max(64, 4D)` units. Or a builder
            class such as :class:`~pyro_flowpack.flows.NSF`, called as
            ``flow(features=D, **options)``, or any callable ``flow(D, **options)``
            returning a :class:`~pyro_flowpack.flow.Flow` or a single layer.
        features: The number of dimensions :math:`D`.
        options: Options of the flow.

    Returns:
        The flow, with a standard normal base unless the builder chose another.

    Example:
        >>> g = guide_flow("iaf", 3, transforms=2, splines=1)
        >>> x, log_q = g().rsample_and_log_prob((5,))
        >>> x.shape, log_q.shape
        (torch.Size([5, 3]), torch.Size([5]))
    """
    _check_spec(flow, options)
    if isinstance(flow, str):
        entry = flow_entry(flow, "vector")
        defaults = dict(entry.guide)
        if "hidden" in entry.options():
            defaults["hidden"] = _default_hidden(features)
        made = entry.build(features, **{**defaults, **options})
        if made.transform.sequential == "forward":
            raise ValueError(f"AutoFlowGuide: flow {flow!r} samples in {features} sequential passes per layer, and a "
                             "guide draws at every step; use 'iaf' (its one-pass inverse), a coupling flow such as "
                             f"'nsf', or pass the builder class to insist")
        return made
    if isinstance(flow, type):
        made = flow(features=features, **options)
    else:
        made = flow(features, **options)
    if isinstance(made, Transform) and not isinstance(made, Flow):
        made = Flow([made])
    if not isinstance(made, Flow):
        raise TypeError(f"AutoFlowGuide: the flow callable must return a pyro_flowpack Flow or a layer, "
                        f"got {type(made).__name__}")
    if made.event_shape != (features,) or made.transform.event_shape != (features,):
        raise ValueError(f"AutoFlowGuide: the flow must act on vectors of the {features} latent dimensions, "
                         f"got a flow with event shape {tuple(made.event_shape)}")
    if made.context_features:
        raise ValueError("AutoFlowGuide: the flow must be unconditional (context=0), "
                         f"got one with {made.context_features} context features")
    return made


class _FixedParameterScore(nn.Module):
    """``flow().log_prob(value)`` as a module call, so that ``functional_call`` can run it
    with the flow's parameters swapped for detached copies."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, value: Tensor) -> Tensor:
        return self.flow().log_prob(value)


class StickingTheLanding(FlowDistribution):
    r"""A guide's flow distribution whose :meth:`log_prob` holds the flow's parameters
    fixed: the value is that of :class:`~pyro_flowpack.flow.FlowDistribution`, but the
    gradient reaches the parameters only through the sample, the path-derivative
    ("sticking the landing") estimator of the ELBO's gradient:

    .. math::
        \nabla_\phi \mathrm{ELBO} \approx \frac1S \sum_s
        \big(\nabla_z \log p(x, z) - \nabla_z \log q_\phi(z)\big)\big|_{z = g_\phi(\epsilon_s)}
        \, \partial_\phi g_\phi(\epsilon_s) .

    It drops the score term :math:`\nabla_\phi \log q_\phi(z)`, whose expectation is
    zero, so the estimate stays unbiased, and its variance vanishes as :math:`q` reaches
    the posterior.

    For a value this distribution just drew, :math:`z = g(\epsilon)`, neither an inverse
    nor another forward pass is run: the sampling pass already holds
    :math:`\log q(z) = \log p_Z(\epsilon) - \log|\det J_g(\epsilon)|`, and its graph gives
    the gradient :math:`u = \nabla_\epsilon \log q` and the Jacobian :math:`J_g(\epsilon)`
    (one batched backward pass over the :math:`D` outputs; neither depends on whether the
    parameters are held fixed), and

    .. math::
        \nabla_z \log q(z) = J_g(\epsilon)^{-\top} u ,

    solved in double precision, enters as :math:`\log q(z) + c \cdot (z - \bar z)` with
    :math:`c = \nabla_z \log q(z)` and :math:`\bar z` the detached value. Any other value is
    scored through the flow's inverse with detached parameters (the sequential direction
    of an IAF layer: :math:`D` network passes). Without gradients it is the plain cached
    score, and so it is, with a warning, under ``torch.jit`` tracing
    (:class:`~pyro.infer.JitTrace_ELBO`), where ``functional_call`` is not available.

    With ``weight`` :math:`c < 1` the score is
    :math:`c \log q_{\bar\phi}(z) + (1 - c) \log q_\phi(z)`, the same value, whose
    gradient blends the two estimates: the path derivative and :math:`1 - c` times the score
    term (both unbiased, so the blend is too). Far from the posterior the path estimate
    can be the noisier one (its :math:`\nabla_z \log q` does not cancel
    :math:`\nabla_z \log p` yet), near it the score term is; :math:`c` trades the two.

    Arguments:
        base: The base distribution, with the batch shape.
        transform: The flow's bijection, base side to data side.
        flow: The :class:`~pyro_flowpack.flow.Flow` module that owns the parameters.
        weight: The weight :math:`c \in [0, 1]` of the path estimate (1: the path
            derivative alone; 0: the plain total derivative).

    Example:
        >>> flow = pf.infer.guide_flow("iaf", 2)
        >>> q = StickingTheLanding(flow.base(), flow.transform, flow)
        >>> z = q.rsample((4,))
        >>> log_q = q.log_prob(z)  # the same value as the flow's own log_prob
        >>> bool(torch.allclose(log_q, flow().log_prob(z.detach()), atol=1e-5))
        True
        >>> q.log_prob(z.detach()).requires_grad  # the parameters are held fixed
        False

    References:
        | Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
          Inference (Roeder, Wu and Duvenaud, 2017) https://arxiv.org/abs/1703.09194
        | Advances in Black-Box VI: Normalizing Flows, Importance Weighting, and
          Optimization (Agrawal, Sheldon and Domke, 2020) https://arxiv.org/abs/2006.10343
    """

    def __init__(self, base: torch.distributions.Distribution, transform: FlowTransform, flow: Flow,
                 validate_args: bool | None = None, weight: float = 1.0) -> None:
        super().__init__(base, transform, None, validate_args=validate_args)
        self.flow = flow
        self.weight = float(weight)
        self._drawn: tuple[Tensor, Tensor, Tensor] | None = None

    def expand(self, batch_shape: Sequence[int], _instance: Any = None) -> "StickingTheLanding":
        return StickingTheLanding(self.base_dist.expand(torch.Size(batch_shape)), self.transform, self.flow,
                                  validate_args=self._validate_args, weight=self.weight)

    def rsample(self, sample_shape: Sequence[int] = torch.Size(), temperature: float = 1.0) -> Tensor:
        epsilon = self._base_sample(sample_shape, temperature)
        if torch.is_grad_enabled():
            epsilon = epsilon.detach().requires_grad_()  # so that the graph reaches it
        z, ladj = self.transform.call_and_ladj(epsilon, None)
        self._drawn = (epsilon, z, ladj)
        return z

    def log_prob(self, value: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return super().log_prob(value)
        if torch.jit.is_tracing():
            warnings.warn("StickingTheLanding: under torch.jit tracing (JitTrace_ELBO) the guide's samples are "
                          "scored with the plain, total-derivative gradient; build the guide with stl=False to "
                          "silence this", RuntimeWarning, stacklevel=2)
            return super().log_prob(value)
        value = self._check_value(value)
        if self._drawn is None or value is not self._drawn[1] or not self._drawn[0].requires_grad:
            if self.weight == 1.0:
                fixed = {"flow." + name: p.detach() for name, p in self.flow.named_parameters()}
                # a new tensor object: the layers' caches only answer for the very tensor they
                # made, whose graph runs through the live parameters
                return functional_call(_FixedParameterScore(self.flow), fixed, (value.view_as(value),))
            # one pass through the inverse: the held score is the live one's value with its
            # gradient in the value alone (the first order is all an ELBO's gradient needs)
            live = super().log_prob(value)
            held = live.detach()
            if value.requires_grad:
                (slope,) = torch.autograd.grad(live.sum(), value, retain_graph=True)
                held = held + (slope * (value - value.detach())).sum(-1)
            return self.weight * held + (1.0 - self.weight) * live
        epsilon, z, ladj = self._drawn
        log_q = self.base_dist.log_prob(epsilon) - ladj
        if self.weight == 0.0:
            return log_q
        (u,) = torch.autograd.grad(log_q.sum(), epsilon, retain_graph=True)
        features = z.shape[-1]
        basis = torch.eye(features, dtype=z.dtype, device=z.device).reshape(
            (features,) + (1,) * (z.dim() - 1) + (features,)).expand((features,) + z.shape)
        # rows[i] = dz_i / d epsilon; the graph stays for the ELBO's own backward pass
        (rows,) = torch.autograd.grad(z, epsilon, basis, retain_graph=True, is_grads_batched=True)
        jacobian = rows.movedim(0, -2)
        slope = torch.linalg.solve(jacobian.transpose(-1, -2).double(), u.double().unsqueeze(-1))
        slope = slope.squeeze(-1).to(value.dtype)
        path = log_q.detach() + (slope * (value - value.detach())).sum(-1)
        if self.weight == 1.0:
            return path
        return self.weight * path + (1.0 - self.weight) * log_q


def _check_stl(stl: Any) -> float:
    """The weight :math:`c` of ``stl``: 1 for True, 0 for False, or a number in [0, 1]."""
    expected = f"AutoFlowGuide: stl must be True, False or a weight in [0, 1], got {stl!r}"
    if not isinstance(stl, (int, float)):
        raise TypeError(expected)
    if not 0.0 <= float(stl) <= 1.0:  # also NaN
        raise ValueError(expected)
    return float(stl)


class AutoFlowGuide(AutoContinuous):
    r"""An autoguide over all the latent sites of a Pyro model: a normalizing flow on
    their unconstrained, concatenated values (see the module docstring for the maths).

    Sampling the guide is one forward pass. By default (``stl=True`` once :math:`D > 2`)
    the ELBO scores the guide's samples with the flow's parameters held fixed
    (:class:`StickingTheLanding`):
    the gradient estimate stays unbiased and its noise vanishes as the guide reaches the
    posterior, which on ``bench/vi.py``'s funnel cuts the gap left after 3000 steps about
    3.6-fold. It costs a Jacobian from the sampling pass's graph (1.5
    to 1.8 times the time of a plain step up to :math:`D = 30` latent dimensions, 5.3 times
    at :math:`D = 100`; ``bench/stl_cost.py``). With ``stl=False`` the score reuses the
    sampling pass. It works
    with :class:`~pyro.infer.Trace_ELBO` (also with ``vectorize_particles=True``),
    :class:`~pyro.infer.Predictive` and, when every latent site has real support,
    :class:`~pyro.infer.TraceMeanField_ELBO`. All latent sites must be continuous; hide
    discrete ones with ``poutine.block`` and enumerate them, as for Pyro's autoguides.

    .. warning::
        With a constrained latent site (positive, unit interval, simplex, ...),
        :class:`~pyro.infer.TraceMeanField_ELBO` gives a wrong ELBO, for this guide as
        for every Pyro :class:`~pyro.infer.autoguide.AutoContinuous` guide: Pyro's
        :math:`\mathrm{KL}(\delta \,\|\, p)` of each site's ``Delta`` drops the
        ``Delta``'s ``log_density``, the :math:`\log |\det J_{T_j}|` term above. Use
        :class:`~pyro.infer.Trace_ELBO` there.

    The low-dimensional default: with :math:`D \le 2` latent dimensions
    (:attr:`low_dimension`), the default flow (``"iaf"``, with neither ``splines`` nor
    ``affine`` given, one component) ends every block with a rational-quadratic spline
    layer (``splines=transforms``), and unless ``stl`` is given the gradient blends the
    path and total derivatives with weight :attr:`low_dimension_stl` (0.75). In one
    dimension an affine IAF is a Gaussian, and in two it can bend a density only through
    one conditional mean and scale per layer: on ``bench/vi.py``'s 1-D bimodal target the
    affine layers stay at 0.65 nats above :math:`\log Z` at 8 particles, the splines
    reach 0.02. The pure path gradient made the spline layers unstable at one particle
    (one banana seed ended 8.85 nats above :math:`\log Z`), the pure total derivative
    slow on the concentrated conjugate posteriors (Beta-Binomial 0.34 at 1 particle, the
    mean of two seeds); 0.75 was the best of the weights 0, 0.5, 0.75 and 1 tried there
    (docs: Benchmarks). Above two
    dimensions the affine default with the path gradient led every target of the suite.

    Advice: Adam with a learning rate of about ``1e-2`` to ``3e-3`` and 8 vectorised
    particles; the ELBO of a flow guide keeps improving for thousands of steps.

    Arguments:
        model: A Pyro model.
        flow: The flow: a name of the registry (``"iaf"`` (default), ``"nsf"``,
            ``"realnvp"``, ``"bernstein"``, ...), a builder class such as
            :class:`~pyro_flowpack.flows.NSF` or a callable ``flow(D)`` returning a
            :class:`~pyro_flowpack.flow.Flow`; see :func:`guide_flow`.
        init_loc_fn: A per-site initialisation function, one of Pyro's
            ``pyro.infer.autoguide.initialization`` strategies; the guide starts centred
            there.
        init_scale: The initial scale :math:`\sigma` of every unconstrained dimension
            (1, as the standard normal base of Pyro's flow guides; take about 0.1, as
            ``AutoNormal``, when the likelihood is sharp).
        stl: Whether the ELBO's gradient is the path-derivative ("sticking the
            landing") estimate; ``None`` (default) is ``True``, except
            :attr:`low_dimension_stl` for the low-dimensional default above. Keep it for
            :class:`~pyro.infer.Trace_ELBO` and its relatives; switch it off for
            importance-weighted objectives such as :class:`~pyro.infer.RenyiELBO`, for which
            the path estimate is biased, or when the :math:`D \times D` Jacobian of each
            particle costs too much (hundreds of latent dimensions).
            :class:`~pyro_flowpack.infer.SIWAE` takes either and
            explains what each gives (with ``stl=True``: biased, but far steadier).
            A number :math:`c \in [0, 1]` blends the two unbiased estimates,
            :math:`c \cdot \text{path} + (1 - c) \cdot \text{total}` (``True`` is 1,
            ``False`` 0), the value of the ELBO unchanged: the score term
            :math:`\nabla_\phi \log q_\phi(z)` enters with weight :math:`1 - c` (see
            :class:`StickingTheLanding`; for :class:`~pyro.infer.Trace_ELBO` and its
            relatives, and only with ``components=1``).
        quantile_samples: The number of samples behind :meth:`median` and
            :meth:`quantiles`.
        components: The number :math:`K` of mixture components, for a multimodal
            posterior: with :math:`K > 1` the guide is
            :math:`q(u) = \sum_k \pi_k q_k(u)`, each :math:`q_k` its own flow
            :math:`\mu_k + \sigma_k \odot g_k(z)` and :math:`\pi = \mathrm{softmax}(\ell)`
            learned weights (a :class:`~pyro_flowpack.infer.losses.StratifiedMixture`).
            Train it with :class:`~pyro_flowpack.infer.SIWAE` (mass-covering, finds the
            modes) or :class:`~pyro_flowpack.infer.StratifiedELBO`, which sample every
            component and so train the weights; Pyro's own ELBOs draw one component per
            particle and leave the weights untrained. Scoring a value under :math:`q_j` that
            :math:`q_j` did not draw inverts its flow (:math:`D` passes per IAF layer).
        init_spread: With :math:`K > 1`, the distance of each component's initial
            centre :math:`\mu_k` from ``init_loc_fn``'s point, in units of ``init_scale``
            (default 2): the centres are the vertices of a randomly rotated regular
            simplex when :math:`K \le D + 1` (maximally apart), random directions
            otherwise. Components that start apart claim different modes: on
            ``bench/vi_multimodal.py``, with :class:`~pyro_flowpack.infer.SIWAE`, a spread
            of 2 met the goals in all five seeds, while with 1 the fits were slower (a gap
            up to 0.17 after 1000 steps) and longer runs let two components share a mode.
        options: Options of the flow (``transforms``, ``hidden``, ``bins``, ...).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        ...     pyro.sample("p", dist.Beta(2.0, 2.0))
        >>> guide = AutoFlowGuide(model, transforms=2)
        >>> sorted(guide())
        ['p', 'scale']
        >>> guide.get_posterior().event_shape
        torch.Size([2])
        >>> mixture = AutoFlowGuide(model, components=3, stl=False, transforms=2)
        >>> mixture.get_posterior().num_components
        3
    """

    def __init__(self, model: Callable, flow: FlowSpec = "iaf", *, init_loc_fn: Callable = init_to_median,
                 init_scale: float = 1.0, stl: bool | float | None = None, quantile_samples: int = 4096,
                 components: int = 1, init_spread: float = 2.0, **options: Any) -> None:
        _check_spec(flow, options)
        components = check_int(components, "AutoFlowGuide: components")
        init_spread = check_real(init_spread, "AutoFlowGuide: init_spread")
        if init_spread < 0:
            raise ValueError(f"AutoFlowGuide: init_spread must be a number >= 0, got {init_spread!r}")
        init_scale = check_positive(init_scale, "AutoFlowGuide: init_scale")
        quantile_samples = check_int(quantile_samples, "AutoFlowGuide: quantile_samples")
        if stl is not None:
            _check_stl(stl)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._raw_model = (model,)  # without Pyro's InitMessenger; a tuple, not a submodule
        self._flow_spec = flow
        self._flow_options = options
        self.init_scale = float(init_scale)
        self.quantile_samples = quantile_samples
        self.components = components
        self.init_spread = init_spread
        self.stl = stl

    #: The latent dimension up to which the default flow is the low-dimensional recipe.
    low_dimension: int = 2
    #: The path weight of the low-dimensional recipe when ``stl`` is not given.
    low_dimension_stl: float = 0.75

    @property
    def stl(self) -> bool | float | None:
        """The ``stl`` the guide was given (``None``: chosen with the flow, see the class docstring)."""
        return self._stl

    @stl.setter
    def stl(self, value: bool | float | None) -> None:
        weight = None if value is None else _check_stl(value)
        if self.components > 1 and weight not in (None, 0.0, 1.0):
            raise ValueError(f"AutoFlowGuide: with components={self.components}, stl must be True or False, "
                             f"got {value!r}")
        self._given_weight = weight
        self._stl = value

    def _low_dimensional(self) -> bool:
        r"""Whether the guide builds the low-dimensional recipe: the default flow, options
        that choose neither ``splines`` nor ``affine``, one component, :math:`D \le`
        :attr:`low_dimension`."""
        return (self._flow_spec == "iaf" and self.components == 1
                and not {"splines", "affine"} & set(self._flow_options) and self.latent_dim <= self.low_dimension)

    @property
    def _path_weight(self) -> float:
        if self._given_weight is not None:
            return self._given_weight
        if self.prototype_trace is not None and self._low_dimensional():
            return self.low_dimension_stl
        return 1.0

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        loc = self._init_loc()
        if self.components == 1:
            self.flow = self._affine_flow(loc)
            return
        offsets = self._component_offsets(self.components, self.latent_dim).to(loc)
        spread = self.init_scale * self.init_spread
        self.flows = nn.ModuleList([self._affine_flow(loc + spread * offset) for offset in offsets])
        self.mixture_logits = nn.Parameter(torch.zeros(self.components, dtype=loc.dtype, device=loc.device))

    def _affine_flow(self, loc: Tensor) -> Flow:
        """The guide's flow :math:`g` followed by the affine map set at ``loc`` and ``init_scale``."""
        options = dict(self._flow_options)
        if self._low_dimensional():
            options["splines"] = options.get("transforms", flow_entry("iaf", "vector").guide["transforms"])
        inner = guide_flow(self._flow_spec, self.latent_dim, **options)
        scale = ActNorm(self.latent_dim)
        with torch.no_grad():
            scale.loc.copy_(loc)
            scale.log_scale.fill_(math.log(self.init_scale))
            scale.initialized.fill_(True)
        return Flow([inner.transform, scale], base=inner.base_argument()).to(dtype=loc.dtype, device=loc.device)

    @staticmethod
    def _component_offsets(components: int, features: int) -> Tensor:
        r"""``components`` unit vectors in :math:`\mathbb{R}^D`: the vertices of a regular
        simplex centred at 0 in a random orientation when there are at most :math:`D + 1`,
        random directions otherwise."""
        if components > features + 1:
            directions = torch.randn(components, features)
            return directions / directions.norm(dim=-1, keepdim=True)
        centred = torch.eye(components) - 1.0 / components
        basis, _ = torch.linalg.qr(centred[:, :components - 1])  # orthonormal, orthogonal to (1, ..., 1)
        rotation, _ = torch.linalg.qr(torch.randn(features, components - 1))
        vertices = centred @ basis @ rotation.T
        return vertices / vertices.norm(dim=-1, keepdim=True)

    def _one_flow(self, what: str) -> Flow:
        if self.components > 1:
            raise NotImplementedError(f"AutoFlowGuide.{what}: a guide with components={self.components} is a "
                                      "mixture of flows, with no single base and bijection (NeuTra needs one)")
        return self.flow

    def get_base_dist(self) -> torch.distributions.Distribution:
        """The base distribution of the flow (a standard normal unless the builder chose
        another); not defined for a mixture (``components > 1``)."""
        return self._one_flow("get_base_dist").base()

    def get_transform(self, *args: Any, **kwargs: Any) -> FlowTransform:
        r"""The bijection from the base to the unconstrained latent vector, :math:`\mu + \sigma \odot g`;
        not defined for a mixture (``components > 1``)."""
        return self._one_flow("get_transform").transform

    def get_posterior(self, *args: Any, **kwargs: Any) -> FlowDistribution | StratifiedMixture:
        """The flow's distribution over the unconstrained latent vector, or with
        ``components > 1`` the mixture of the flows' distributions (the model is run
        once with ``*args, **kwargs`` first if the guide has not been called yet)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self.components == 1:
            return self.flow()
        return StratifiedMixture([flow() for flow in self.flows], self.mixture_logits)

    def sample_latent(self, *args: Any, **kwargs: Any) -> Tensor:
        """Draws the unconstrained latent vector at the guide's auxiliary sample site; its
        distribution is :class:`StickingTheLanding` (each component's, for a mixture, whose
        weights are then held fixed too) when ``stl`` is set, so that the ELBO scores it
        with the flow's parameters held fixed."""
        posterior = self.get_posterior(*args, **kwargs)
        weight = self._path_weight
        if weight > 0:
            if self.components == 1:
                posterior = self._sticking_the_landing(self.flow, weight)
            else:
                posterior = StratifiedMixture([self._sticking_the_landing(flow, weight) for flow in self.flows],
                                              self.mixture_logits, stl=True)
        return pyro.sample(f"_{self._pyro_name}_latent", posterior, infer={"is_auxiliary": True})

    @staticmethod
    def _sticking_the_landing(flow: Flow, weight: float = 1.0) -> StickingTheLanding:
        posterior = flow()
        return StickingTheLanding(posterior.base_dist, posterior.transform, flow,
                                  validate_args=posterior._validate_args, weight=weight)

    def diagnose(self, *args: Any, num_particles: int = 1000, max_plate_nesting: int | None = None,
                 **kwargs: Any) -> Diagnostics:
        r"""How far to trust this guide as an approximation of the posterior of its model
        given ``*args, **kwargs``: :func:`~pyro_flowpack.infer.diagnostics.diagnose` of
        ``(model, self)``, the model it was built with, from ``num_particles`` draws (the ELBO, the importance
        sampled :math:`\log Z` with its standard error, the Pareto :math:`\hat k` and the
        effective sample size; printing it gives a verdict)."""
        return diagnose(self._raw_model[0], self, *args, num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                        **kwargs)

    def _posterior_samples(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.get_posterior(*args, **kwargs).sample((self.quantile_samples,))

    def _constrain(self, latent: Tensor) -> dict[str, Tensor]:
        return {site["name"]: biject_to(site["fn"].support)(value) for site, value in self._unpack_latent(latent)}

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        r"""A Monte Carlo estimate (from ``quantile_samples`` draws) of the posterior
        median of each unconstrained dimension, mapped to each site's support (the
        median of the site itself for a one-dimensional monotone ``biject_to``, such as
        a positive or interval support).

        Returns:
            A dict from site name to median tensor.
        """
        return self._constrain(self._posterior_samples(*args, **kwargs).median(0).values)

    @torch.no_grad()
    def quantiles(self, quantiles: Sequence[float] | Tensor, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        r"""Monte Carlo estimates of posterior quantiles, computed per unconstrained
        dimension and mapped to each site's support, as in Pyro's
        :meth:`~pyro.infer.autoguide.AutoContinuous.quantiles`.

        Arguments:
            quantiles: The levels, between 0 and 1.

        Returns:
            A dict from site name to a tensor of shape ``(len(quantiles), *site_shape)``.
        """
        samples = self._posterior_samples(*args, **kwargs)
        levels = torch.as_tensor(quantiles, dtype=samples.dtype, device=samples.device)
        if levels.dim() != 1 or not bool(((levels >= 0) & (levels <= 1)).all()):
            raise ValueError(f"AutoFlowGuide.quantiles expects a list of levels in [0, 1], got {quantiles!r}")
        latents = torch.quantile(samples, levels, dim=0)
        result: dict[str, list[Tensor]] = {}
        for latent in latents:
            for name, value in self._constrain(latent).items():
                result.setdefault(name, []).append(value)
        return {name: torch.stack(values) for name, values in result.items()}
