r"""Variational-inference benchmark: how close each guide's ELBO comes to a known
:math:`\log Z`.

Every target is a Pyro model whose joint density over its latent sites (with its data
observed) integrates to a known normaliser :math:`Z`, so that for any guide :math:`q`

.. math::

    \log Z - \mathrm{ELBO}(q) = \mathrm{KL}(q \,\|\, p(\cdot \mid \text{data})) \ge 0

is the guide's exact KL gap, and the importance-sampling estimate
:math:`\log \hat Z_{IS} = \log \frac1S \sum_s p(x, z_s) / q(z_s)`,
:math:`z_s \sim q`, shows how usable the guide is as a proposal.

Targets (:data:`TARGETS`):

- ``funnel``: Neal's funnel in 10-D, :math:`v \sim N(0, 3^2)`,
  :math:`x_i \mid v \sim N(0, e^v)`, :math:`i = 1..9`, written without its normalisers,
  so :math:`\log Z = \tfrac12 \log(2\pi \cdot 9) + \tfrac92 \log(2\pi)`;
- ``banana``: :math:`x_1 \sim N(0, 2^2)`, :math:`x_2 \mid x_1 \sim N(\tfrac14 (x_1^2 - 4), 0.5^2)`
  without normalisers, :math:`\log Z = \log(2\pi \cdot 2 \cdot 0.5)`;
- ``mixture``: three equally weighted 2-D Gaussians of standard deviation 0.5 at the
  corners of a triangle of circumradius 3 (about 10 standard deviations apart), each term
  :math:`\exp(-|x - \mu_k|^2 / (2 \sigma^2))`, :math:`\log Z = \log(3 \cdot 2\pi\sigma^2)`;
- ``normal_gamma``: unknown mean and precision, :math:`\tau \sim \mathrm{Gamma}(2, 2)`,
  :math:`\mu \mid \tau \sim N(0, 1/\tau)`, ten observations :math:`y_i \sim N(\mu, 1/\tau)`;
  :math:`\tau > 0` is constrained and the posterior is not Gaussian in
  :math:`(\mu, \log\tau)`; :math:`\log Z = \log p(y)` in closed form
  (:func:`normal_gamma_log_evidence`);
- ``beta_binomial``: two groups, :math:`p_j \sim \mathrm{Beta}(1, 1)`,
  :math:`k_j \sim \mathrm{Binomial}(n_j, p_j)` with :math:`(k, n) = ((3, 20), (41, 50))`;
  :math:`p_j \in (0, 1)` is constrained; :math:`\log Z = \log p(k)` in closed form
  (:func:`beta_binomial_log_evidence`).

The first three are written with a standard normal latent ``z`` and a ``pyro.factor``
that turns the joint into the unnormalised target density,
``pyro.sample("z", Normal(0, 1)); pyro.factor("target", log p~(z) - log N(z; 0, 1))``,
so the joint over ``z`` integrates to exactly :math:`Z`.

Guides (:data:`GUIDES`), all fitted in the unconstrained space that Pyro's autoguides use:
``AutoFlowGuide`` (pyro-flowpack's ``pf.infer.AutoFlowGuide(model)``: affine IAF layers
with the path-derivative gradient; ``AutoFlowGuideNoSTL`` is the same guide with
``stl=False``, an ablation that the goals do not count as a peer),
Pyro's ``AutoNormal``, ``AutoMultivariateNormal``, ``AutoIAFNormal``,
``AutoNormalizingFlow`` with Pyro's rational-quadratic ``SplineAutoregressive`` layers,
and zuko's ``NSF`` used as a guide through ``pyro.contrib.zuko.ZukoToPyro``
(:class:`AutoZukoNSF`). The flow guides get the same depth and hidden sizes
(``--transforms``, ``--hidden``), and the spline guides the same bins and spline bound
(``--bins``, ``--bound``; ``AutoFlowGuide``'s default flow has no spline).

Protocol. For each target, guide and seed: ``pyro.clear_param_store()``,
``pyro.set_rng_seed(seed)``, the guide is built and called once (to create its
parameters), then trained for ``--steps`` steps with
``Trace_ELBO(num_particles=--particles, vectorize_particles=True)`` and
``torch.optim.Adam`` at learning rate ``--lr`` decayed exponentially to ``--lr / 10`` at
the last step, the same for every guide. A step whose loss is not finite makes no update
and is counted. Then, under ``torch.no_grad()`` and with the seed reset,
``--eval-particles`` draws (2000 by default) from the guide give the log-weights
:math:`\log w_s = \log p(x, z_s) - \log q(z_s)`, from which
``gap = log Z - mean(log w)`` (with its standard error ``sd(log w) / sqrt(S)``) and
``IS error = |logsumexp(log w) - log S - log Z|``. With several seeds, tables show the
mean and the standard deviation over seeds. Torch's and Pyro's argument validation is off
during the runs for all guides alike (``pyro.validation_enabled(False)``; importing zuko
switches torch's off anyway); the caller's setting is restored afterwards.

Goals (issue 5): on ``funnel``, ``banana`` and ``mixture`` ``AutoFlowGuide``'s mean gap is
at most half of the best peer's; on the conjugate targets it is at most 0.01 nats.

Run (one thread; the networks are small)::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/vi.py \
        --json vi.json --rst vi.rst
    .venv/bin/python bench/vi.py --steps 500 --targets banana --guides AutoNormal AutoFlowGuide
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

# The networks are small, so OpenMP threads that spin while waiting only steal the cores
# of a shared machine; an explicit setting still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import SplineAutoregressive, iterated
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import (
    AutoContinuous,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from pyro.infer.importance import vectorized_importance_weights
from pyro.nn import AutoRegressiveNN
from torch import Tensor
from torch.distributions import Distribution

import pyro_flowpack as pf

import sys
from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parent))  # bench/ scripts share tables.py
from tables import markdown, rst  # noqa: E402
from pyro_flowpack.train import write_atomically

__all__ = [
    "GUIDES",
    "TARGETS",
    "AutoZukoNSF",
    "FlowOptions",
    "Target",
    "beta_binomial_log_evidence",
    "evaluate",
    "fit",
    "log_joint",
    "main",
    "normal_gamma_log_evidence",
    "run",
]

LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    r"""A Pyro model with a known normaliser.

    Arguments:
        name: The target's name on the command line.
        model: The Pyro model (no arguments); its joint density over the latent sites,
            with the data observed, integrates to :math:`Z`.
        log_z: :math:`\log Z`.
        latent_dim: The number of unconstrained latent dimensions.
        description: One line for the table's caption and the JSON.
        conjugate: Whether the goal is the absolute 0.01-nat one (conjugate targets)
            rather than the half-of-the-best-peer one.
    """

    name: str
    model: Callable[[], None]
    log_z: float
    latent_dim: int
    description: str
    conjugate: bool = False


def unnormalised_density_model(log_density: Callable[[Tensor], Tensor], dim: int) -> Callable[[], None]:
    r"""A model over ``z`` in :math:`\mathbb{R}^{dim}` whose joint density is
    :math:`\exp(\text{log\_density}(z))`: a standard normal sample site corrected by a
    ``pyro.factor``."""

    def model() -> None:
        base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
        z = pyro.sample("z", base)
        pyro.factor("target", log_density(z) - base.log_prob(z))

    return model


FUNNEL_SCALE = 3.0
FUNNEL_DIM = 10


def funnel_log_density(z: Tensor) -> Tensor:
    r"""Neal's funnel without normalisers: :math:`-v^2 / (2 \cdot 9) - \sum_i x_i^2 e^{-v} / 2
    - (D - 1) v / 2` with :math:`z = (v, x_1, \dots, x_{D-1})`."""
    v, x = z[..., 0], z[..., 1:]
    return -0.5 * (v / FUNNEL_SCALE) ** 2 - 0.5 * (x**2).sum(-1) * torch.exp(-v) - 0.5 * x.shape[-1] * v


BANANA_SCALES = (2.0, 0.5)
BANANA_CURVATURE = 0.25


def banana_log_density(z: Tensor) -> Tensor:
    r"""A banana without normalisers: :math:`x_1 \sim N(0, \sigma_1^2)`,
    :math:`x_2 \mid x_1 \sim N(b (x_1^2 - \sigma_1^2), \sigma_2^2)`."""
    (s1, s2), b = BANANA_SCALES, BANANA_CURVATURE
    x1, x2 = z[..., 0], z[..., 1]
    return -0.5 * (x1 / s1) ** 2 - 0.5 * ((x2 - b * (x1**2 - s1**2)) / s2) ** 2


MIXTURE_SCALE = 0.5
MIXTURE_MEANS = torch.tensor(
    [[3.0 * math.cos(math.pi / 2 + 2 * math.pi * k / 3), 3.0 * math.sin(math.pi / 2 + 2 * math.pi * k / 3)]
     for k in range(3)]
)


def mixture_log_density(z: Tensor) -> Tensor:
    r"""Three Gaussian bumps without normalisers:
    :math:`\log \sum_k \exp(-|z - \mu_k|^2 / (2 \sigma^2))`."""
    squared = ((z.unsqueeze(-2) - MIXTURE_MEANS) ** 2).sum(-1)
    return torch.logsumexp(-0.5 * squared / MIXTURE_SCALE**2, dim=-1)


NORMAL_GAMMA_DATA = torch.tensor([2.31, 0.47, 1.85, -0.62, 1.12, 3.05, 0.93, 1.68, -0.15, 2.44])
NORMAL_GAMMA_PRIOR = {"m0": 0.0, "kappa0": 1.0, "a0": 2.0, "b0": 2.0}


def normal_gamma_model() -> None:
    r""":math:`\tau \sim \mathrm{Gamma}(a_0, b_0)`, :math:`\mu \sim N(m_0, 1 / (\kappa_0 \tau))`,
    :math:`y_i \sim N(\mu, 1 / \tau)`."""
    p = NORMAL_GAMMA_PRIOR
    tau = pyro.sample("tau", dist.Gamma(torch.tensor(p["a0"]), torch.tensor(p["b0"])))
    mu = pyro.sample("mu", dist.Normal(p["m0"], (p["kappa0"] * tau).rsqrt()))
    y = NORMAL_GAMMA_DATA
    scale = tau.rsqrt().unsqueeze(-1).expand(tau.shape + y.shape)
    pyro.sample("y", dist.Normal(mu.unsqueeze(-1), scale).to_event(1), obs=y)


def normal_gamma_log_evidence(y: Tensor, m0: float, kappa0: float, a0: float, b0: float) -> float:
    r"""The log marginal likelihood of :math:`y` under the Normal-Gamma model:

    .. math::

        \log p(y) = \log\Gamma(a_n) - \log\Gamma(a_0) + a_0 \log b_0 - a_n \log b_n
                    + \tfrac12 \log(\kappa_0 / \kappa_n) - \tfrac n2 \log(2\pi),

    with :math:`\kappa_n = \kappa_0 + n`, :math:`a_n = a_0 + n/2` and
    :math:`b_n = b_0 + \tfrac12 \sum_i (y_i - \bar y)^2 + \kappa_0 n (\bar y - m_0)^2 / (2 \kappa_n)`.

    Example:
        >>> round(normal_gamma_log_evidence(torch.tensor([0.0]), 0.0, 1.0, 1.0, 1.0), 4)  # Student-t(2, 0, 2): 1/4
        -1.3863

    References:
        | Conjugate Bayesian analysis of the Gaussian distribution (Murphy, 2007)
        | https://www.cs.ubc.ca/~murphyk/Papers/bayesGauss.pdf
    """
    y = y.double()
    n, mean = y.numel(), float(y.mean())
    kappa_n, a_n = kappa0 + n, a0 + n / 2
    b_n = b0 + 0.5 * float(((y - mean) ** 2).sum()) + kappa0 * n * (mean - m0) ** 2 / (2 * kappa_n)
    return (math.lgamma(a_n) - math.lgamma(a0) + a0 * math.log(b0) - a_n * math.log(b_n)
            + 0.5 * math.log(kappa0 / kappa_n) - 0.5 * n * LOG_2PI)


BETA_BINOMIAL_PRIOR = (1.0, 1.0)
BETA_BINOMIAL_TRIALS = torch.tensor([20.0, 50.0])
BETA_BINOMIAL_SUCCESSES = torch.tensor([3.0, 41.0])


def beta_binomial_model() -> None:
    r""":math:`p_j \sim \mathrm{Beta}(\alpha, \beta)`,
    :math:`k_j \sim \mathrm{Binomial}(n_j, p_j)`, for two groups."""
    alpha, beta = BETA_BINOMIAL_PRIOR
    groups = BETA_BINOMIAL_TRIALS.shape
    p = pyro.sample("p", dist.Beta(torch.full(groups, alpha), torch.full(groups, beta)).to_event(1))
    pyro.sample("k", dist.Binomial(BETA_BINOMIAL_TRIALS, p).to_event(1), obs=BETA_BINOMIAL_SUCCESSES)


def beta_binomial_log_evidence(k: Tensor, n: Tensor, alpha: float, beta: float) -> float:
    r"""The log marginal likelihood of successes :math:`k` out of :math:`n` (independent
    groups, each with its own :math:`p_j \sim \mathrm{Beta}(\alpha, \beta)`):

    .. math::

        \log p(k) = \sum_j \log\binom{n_j}{k_j} + \log B(k_j + \alpha, n_j - k_j + \beta)
                    - \log B(\alpha, \beta).

    Example:
        >>> round(beta_binomial_log_evidence(torch.tensor([1.0]), torch.tensor([2.0]), 1.0, 1.0), 4)  # log(1/3)
        -1.0986
    """

    def log_beta(a: float, b: float) -> float:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    total = 0.0
    for kj, nj in zip(k.tolist(), n.tolist()):
        log_choose = math.lgamma(nj + 1) - math.lgamma(kj + 1) - math.lgamma(nj - kj + 1)
        total += log_choose + log_beta(kj + alpha, nj - kj + beta) - log_beta(alpha, beta)
    return total


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target(
            "funnel",
            unnormalised_density_model(funnel_log_density, FUNNEL_DIM),
            0.5 * math.log(2 * math.pi * FUNNEL_SCALE**2) + 0.5 * (FUNNEL_DIM - 1) * LOG_2PI,
            FUNNEL_DIM,
            f"Neal's funnel, D={FUNNEL_DIM}, v ~ N(0, {FUNNEL_SCALE:g}^2)",
        ),
        Target(
            "banana",
            unnormalised_density_model(banana_log_density, 2),
            math.log(2 * math.pi * BANANA_SCALES[0] * BANANA_SCALES[1]),
            2,
            f"banana, x1 ~ N(0, {BANANA_SCALES[0]:g}^2), x2 | x1 ~ N({BANANA_CURVATURE:g}(x1^2 - "
            f"{BANANA_SCALES[0] ** 2:g}), {BANANA_SCALES[1]:g}^2)",
        ),
        Target(
            "mixture",
            unnormalised_density_model(mixture_log_density, 2),
            math.log(3 * 2 * math.pi * MIXTURE_SCALE**2),
            2,
            f"3 equal 2-D Gaussians, sd {MIXTURE_SCALE:g}, circumradius 3",
        ),
        Target(
            "normal_gamma",
            normal_gamma_model,
            normal_gamma_log_evidence(NORMAL_GAMMA_DATA, **NORMAL_GAMMA_PRIOR),
            2,
            f"Normal-Gamma, n={NORMAL_GAMMA_DATA.numel()}, prior NG(0, 1, 2, 2)",
            conjugate=True,
        ),
        Target(
            "beta_binomial",
            beta_binomial_model,
            beta_binomial_log_evidence(BETA_BINOMIAL_SUCCESSES, BETA_BINOMIAL_TRIALS, *BETA_BINOMIAL_PRIOR),
            2,
            "Beta(1, 1)-Binomial, 2 groups, k/n = 3/20, 41/50",
            conjugate=True,
        ),
    ]
}


def log_joint(target: Target, latents: dict[str, Tensor]) -> Tensor:
    r"""The model's joint log density :math:`\log p(\text{data}, z)` at latent values with
    any batch shape (the targets have no plates, so every site's log density has that
    batch shape).

    Example:
        >>> log_joint(TARGETS["banana"], {"z": torch.zeros(3, 2)}).shape
        torch.Size([3])
    """
    trace = poutine.trace(poutine.condition(target.model, data=latents)).get_trace()
    total: Tensor | float = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample":
            total = total + site["fn"].log_prob(site["value"])
    return total


# --------------------------------------------------------------------------- guides


@dataclass(frozen=True)
class FlowOptions:
    """The sizes shared by every flow guide."""

    transforms: int = 4
    hidden: tuple[int, ...] = (64, 64)
    bins: int = 8
    bound: float = 5.0


def _import_zuko() -> Any:
    """Imports zuko and restores torch's distribution validation, which importing zuko
    switches off globally."""
    saved = Distribution._validate_args
    import zuko

    Distribution.set_default_validate_args(saved)
    return zuko


class AutoZukoNSF(AutoContinuous):
    r"""zuko's neural spline flow over the whole unconstrained latent space, as a Pyro
    guide through ``pyro.contrib.zuko.ZukoToPyro``; Pyro's ``AutoContinuous`` maps it to
    the constrained sites.

    The flow is ``zuko.flows.NSF`` (autoregressive rational-quadratic splines, orders
    alternating) inverted with ``zuko.lazy.LazyInverse``, so that, as in an inverse
    autoregressive flow, drawing a sample with its log-density is one pass per layer
    instead of one per dimension.

    Arguments:
        model: The Pyro model.
        options: The flow's depth, hidden sizes and spline bins (zuko's spline bound is 5).
    """

    def __init__(self, model: Callable[..., Any], options: FlowOptions = FlowOptions()) -> None:
        self.options = options
        super().__init__(model)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        zuko = _import_zuko()
        o = self.options
        nsf = zuko.flows.NSF(self.latent_dim, transforms=o.transforms, hidden_features=o.hidden, bins=o.bins)
        self.flow = zuko.lazy.Flow(zuko.lazy.LazyInverse(nsf.transform), nsf.base)

    def get_posterior(self, *args: Any, **kwargs: Any) -> Distribution:
        from pyro.contrib.zuko import ZukoToPyro

        return ZukoToPyro(self.flow())


def flowpack_guide(model: Callable[..., Any], options: FlowOptions, stl: bool = True) -> Any:
    """pyro-flowpack's ``AutoFlowGuide`` with its default flow (affine IAF layers) of the
    shared depth and hidden sizes, with or without the path-derivative gradient."""
    return pf.infer.AutoFlowGuide(model, transforms=options.transforms, hidden=options.hidden, stl=stl)


def pyro_spline_layer(dim: int, options: FlowOptions) -> SplineAutoregressive:
    """Pyro's rational-quadratic autoregressive spline layer (IAF form, a random order).
    Built by hand: Pyro's ``spline_autoregressive`` factory gives the network the four
    outputs of the linear-rational spline whatever ``order`` says."""
    K = options.bins
    network = AutoRegressiveNN(dim, list(options.hidden), param_dims=[K, K, K - 1])
    return SplineAutoregressive(dim, network, count_bins=K, bound=options.bound, order="quadratic")


def pyro_spline_guide(model: Callable[..., Any], options: FlowOptions) -> AutoNormalizingFlow:
    """Pyro's ``AutoNormalizingFlow`` with rational-quadratic ``SplineAutoregressive`` layers
    over a standard normal."""
    return AutoNormalizingFlow(model, partial(iterated, options.transforms, pyro_spline_layer, options=options))


#: ``name: (builder(model, options), description)``; the first is pyro-flowpack's.
GUIDES: dict[str, tuple[Callable[[Callable[..., Any], FlowOptions], Any], str]] = {
    "AutoFlowGuide": (flowpack_guide, "pf.infer.AutoFlowGuide(model) (flow='iaf', stl=True)"),
    "AutoFlowGuideNoSTL": (partial(flowpack_guide, stl=False),
                           "pf.infer.AutoFlowGuide(model, stl=False), an ablation (not a peer)"),
    "AutoNormal": (lambda model, options: AutoNormal(model), "Pyro AutoNormal (mean-field)"),
    "AutoMultivariateNormal": (
        lambda model, options: AutoMultivariateNormal(model), "Pyro AutoMultivariateNormal (full covariance)"
    ),
    "AutoIAFNormal": (
        lambda model, options: AutoIAFNormal(model, hidden_dim=list(options.hidden), num_transforms=options.transforms),
        "Pyro AutoIAFNormal (affine autoregressive layers)",
    ),
    "AutoNormalizingFlow": (pyro_spline_guide, "Pyro AutoNormalizingFlow of SplineAutoregressive(order='quadratic')"),
    "ZukoNSF": (lambda model, options: AutoZukoNSF(model, options), "zuko.flows.NSF, inverted (IAF form), through ZukoToPyro"),
}
OURS = "AutoFlowGuide"
#: Variants of ours, shown in the table but not counted as peers in the goals.
ABLATIONS = {"AutoFlowGuideNoSTL"}


# --------------------------------------------------------------------------- fit and evaluate


def fit(target: Target, guide: Any, steps: int, particles: int, lr: float) -> dict[str, Any]:
    r"""Trains ``guide`` on ``target`` with ``Trace_ELBO(num_particles=particles,
    vectorize_particles=True)`` and Adam, the learning rate decaying exponentially from
    ``lr`` to ``lr / 10`` over the steps. Steps with a non-finite loss make no update.

    Returns:
        ``{"train_seconds", "skipped", "parameters", "final_loss"}``.
    """
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=0)
    guide()  # creates the parameters
    parameters = [p for p in guide.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.1 ** (1 / max(steps - 1, 1)))
    skipped, loss = 0, torch.tensor(float("nan"))
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = elbo.differentiable_loss(target.model, guide)
        if torch.isfinite(loss):
            loss.backward()
            optimizer.step()
        else:
            skipped += 1
        schedule.step()
    return {
        "train_seconds": time.perf_counter() - start,
        "skipped": skipped,
        "parameters": sum(p.numel() for p in parameters),
        "final_loss": float(loss.detach()),
    }


@torch.no_grad()
def evaluate(target: Target, guide: Any, particles: int) -> dict[str, float]:
    r"""The gap :math:`\log Z - \mathrm{ELBO}` and the importance-sampling error from
    ``particles`` draws of the guide.

    Returns:
        ``{"elbo", "elbo_se", "gap", "log_z_is", "is_error"}``.
    """
    log_w, _, _ = vectorized_importance_weights(target.model, guide, num_samples=particles, max_plate_nesting=0)
    log_w = log_w.double()
    elbo = float(log_w.mean())
    log_z_is = float(torch.logsumexp(log_w, 0)) - math.log(particles)
    return {
        "elbo": elbo,
        "elbo_se": float(log_w.std()) / math.sqrt(particles),
        "gap": target.log_z - elbo,
        "log_z_is": log_z_is,
        "is_error": abs(log_z_is - target.log_z),
    }


def run(target: Target, guide_name: str, seed: int, steps: int, particles: int, lr: float,
        eval_particles: int, options: FlowOptions) -> dict[str, Any]:
    """Builds, trains and evaluates one guide on one target with one seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = GUIDES[guide_name][0](target.model, options)
    training = fit(target, guide, steps, particles, lr)
    pyro.set_rng_seed(seed + 10_000)
    result = evaluate(target, guide, eval_particles)
    return {"target": target.name, "guide": guide_name, "seed": seed, "log_z": target.log_z, **training, **result}


# --------------------------------------------------------------------------- tables


HEADER = ["target", "log Z", "guide", "log Z - ELBO", "IS error", "train [s]"]


def mean_sd(values: Sequence[float], digits: int) -> str:
    """``mean`` for one value, ``mean ± sd`` for several."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def grouped(results: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    """Results by (target, guide), in the order they came."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["target"], r["guide"]), []).append(r)
    return groups


def table_body(results: Sequence[dict]) -> list[list[str]]:
    body = []
    for (target, guide), rs in grouped(results).items():
        body.append([
            target,
            f"{rs[0]['log_z']:.4f}",
            guide,
            mean_sd([r["gap"] for r in rs], 4),
            mean_sd([r["is_error"] for r in rs], 4),
            f"{statistics.fmean(r['train_seconds'] for r in rs):.0f}",
        ])
    return body


def goals(results: Sequence[dict]) -> list[str]:
    """The issue's goals for ``AutoFlowGuide``, one line per target where it ran."""
    groups = grouped(results)
    lines = []
    for name, target in TARGETS.items():
        if (name, OURS) not in groups:
            continue
        ours = statistics.fmean(r["gap"] for r in groups[(name, OURS)])
        if target.conjugate:
            verdict = "met" if ours <= 0.01 else "MISSED"
            lines.append(f"{name}: {OURS} gap {ours:.4f} (goal <= 0.01 nats): {verdict}")
            continue
        peers = {g: statistics.fmean(r["gap"] for r in rs) for (t, g), rs in groups.items()
                 if t == name and g != OURS and g not in ABLATIONS}
        if not peers:
            continue
        best = min(peers, key=peers.get)
        verdict = "met" if ours <= 0.5 * peers[best] else "MISSED"
        lines.append(
            f"{name}: {OURS} gap {ours:.4f}, best peer {best} {peers[best]:.4f}, ratio "
            f"{ours / peers[best]:.2f} (goal <= 0.5): {verdict}"
        )
    return lines




# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="SVI steps per guide")
    parser.add_argument("--particles", type=int, default=8, help="vectorised ELBO particles per step")
    parser.add_argument("--eval-particles", type=int, default=2000, help="guide draws for the ELBO and IS estimates")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--guides", nargs="*", default=list(GUIDES), choices=list(GUIDES))
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's initial learning rate (decays to lr/10)")
    parser.add_argument("--transforms", type=int, default=FlowOptions.transforms, help="layers of every flow guide")
    parser.add_argument("--hidden", type=int, nargs="+", default=list(FlowOptions.hidden))
    parser.add_argument("--bins", type=int, default=FlowOptions.bins)
    parser.add_argument("--bound", type=float, default=FlowOptions.bound, help="spline half-width (not zuko's)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--json", metavar="PATH", help="also write the settings and results as JSON")
    parser.add_argument("--rst", metavar="PATH", help="also write the table as an RST list-table")
    parser.add_argument("--include", metavar="PATH", nargs="+", default=[],
                        help="JSON files of earlier runs with the same settings: their results join the table "
                             "and their (target, guide, seed) runs are not repeated")
    args = parser.parse_args(argv)
    counts = (args.steps, args.particles, args.eval_particles, args.transforms, args.bins, args.threads, *args.hidden)
    if min(counts) < 1 or args.lr <= 0 or args.bound <= 0:
        parser.error("--steps, --particles, --eval-particles, --transforms, --hidden, --bins, --threads, --lr "
                     "and --bound must be positive")
    return args


def settings_dict(args: argparse.Namespace, options: FlowOptions) -> dict[str, Any]:
    """The settings that make results comparable (those ``--include`` checks)."""
    return {
        "steps": args.steps, "particles": args.particles, "eval_particles": args.eval_particles,
        "lr": args.lr, "lr_final": args.lr / 10,
        "flow": {"transforms": options.transforms, "hidden": list(options.hidden), "bins": options.bins,
                 "bound": options.bound},
    }


def included_results(paths: Sequence[str], settings: dict[str, Any]) -> list[dict]:
    """The results of earlier runs, which must have been made with the same settings; of
    runs of the same (target, guide, seed) in several files, the first file's is kept."""
    results: dict[tuple[str, str, int], dict] = {}
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        theirs = {k: payload["settings"].get(k) for k in settings}
        if theirs != settings:
            raise ValueError(f"--include {path}: expected results made with {settings}, got {theirs}")
        for r in payload["results"]:
            results.setdefault((r["target"], r["guide"], r["seed"]), r)
    return list(results.values())


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the benchmark and returns the per-seed results (with the included ones)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    options = FlowOptions(args.transforms, tuple(args.hidden), args.bins, args.bound)
    zuko = _import_zuko()
    comparable = settings_dict(args, options)
    results = included_results(args.include, comparable)
    done = {(r["target"], r["guide"], r["seed"]) for r in results}
    settings = (
        f"{args.steps} steps, Trace_ELBO {args.particles} vectorised particles, Adam lr {args.lr:g} decaying to "
        f"{args.lr / 10:g}, flows {options.transforms} layers of hidden {list(options.hidden)}, {options.bins} bins, "
        f"bound {options.bound:g}, {args.eval_particles} evaluation draws, "
        f"seeds {sorted({r['seed'] for r in results} | set(args.seeds))}, {torch.get_num_threads()} thread(s)"
    )
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, zuko {zuko.__version__}, "
          f"pyro-flowpack {pf.__version__}")
    print(settings, flush=True)

    def write_json() -> None:
        if not args.json:
            return
        names = list(dict.fromkeys([*(r["target"] for r in results), *args.targets]))
        guides = list(dict.fromkeys([*(r["guide"] for r in results), *args.guides]))
        payload = {
            "settings": {
                **comparable,
                "seeds": sorted({r["seed"] for r in results}),
                "threads": torch.get_num_threads(),
                "targets": {n: {"log_z": TARGETS[n].log_z, "description": TARGETS[n].description} for n in names},
                "guides": {g: GUIDES[g][1] for g in guides},
                "versions": {"torch": torch.__version__, "pyro": pyro.__version__, "zuko": zuko.__version__,
                             "pyro_flowpack": pf.__version__},
            },
            "results": results,
            "goals": goals(results),
        }
        text = json.dumps(payload, indent=2) + "\n"
        write_atomically(args.json, lambda p: p.write_text(text))

    with pyro.validation_enabled(False):
        saved = Distribution._validate_args
        Distribution.set_default_validate_args(False)
        try:
            for name in args.targets:
                for guide in args.guides:
                    for seed in args.seeds:
                        if (name, guide, seed) in done:
                            continue
                        r = run(TARGETS[name], guide, seed, args.steps, args.particles, args.lr,
                                args.eval_particles, options)
                        results.append(r)
                        write_json()  # after every run, so that a stopped run keeps what it did
                        print(f"{name:>13} {guide:>22} seed {seed}: gap {r['gap']:.4f} ± {r['elbo_se']:.4f}, "
                              f"IS error {r['is_error']:.4f}, {r['train_seconds']:.0f} s"
                              + (f", {r['skipped']} steps skipped" if r["skipped"] else ""), flush=True)
        finally:
            Distribution.set_default_validate_args(saved)

    order = {(t, g): (i, j) for i, t in enumerate(TARGETS) for j, g in enumerate(GUIDES)}
    results.sort(key=lambda r: (*order[(r["target"], r["guide"])], r["seed"]))
    write_json()
    body = table_body(results)
    print()
    print(markdown(HEADER, body, text_columns=3))
    print()
    for line in goals(results):
        print(line)
    if args.rst:
        text = rst(HEADER, body, f"log Z - ELBO and importance-sampling error by guide ({settings})")
        write_atomically(args.rst, lambda p: p.write_text(text))
    return results


if __name__ == "__main__":
    main()
