r"""Variational-inference benchmark: how close each guide's ELBO comes to :math:`\log Z`.

Every target is a Pyro model whose joint density over its latent sites (with its data
observed) integrates to a normaliser :math:`Z` that is known (in closed form, by
quadrature, or by a long reference run), so that for any guide :math:`q`

.. math::

    \log Z - \mathrm{ELBO}(q) = \mathrm{KL}(q \,\|\, p(\cdot \mid \text{data})) \ge 0

is the guide's KL gap, and the importance-sampling estimate
:math:`\log \hat Z_{IS} = \log \frac1S \sum_s p(x, z_s) / q(z_s)`,
:math:`z_s \sim q`, shows how usable the guide is as a proposal.

Targets (:data:`TARGETS`), with how :math:`\log Z` is known:

- ``funnel``: Neal's funnel in 10-D, :math:`v \sim N(0, 3^2)`,
  :math:`x_i \mid v \sim N(0, e^v)`, :math:`i = 1..9`, written without its normalisers;
  closed form :math:`\log Z = \tfrac12 \log(2\pi \cdot 9) + \tfrac92 \log(2\pi)`;
- ``banana``: :math:`x_1 \sim N(0, 2^2)`, :math:`x_2 \mid x_1 \sim N(\tfrac14 (x_1^2 - 4), 0.5^2)`
  without normalisers; closed form :math:`\log Z = \log(2\pi \cdot 2 \cdot 0.5)`;
- ``mixture``: three equally weighted 2-D Gaussians of standard deviation 0.5 at the
  corners of a triangle of circumradius 3 (about 10 standard deviations apart), each term
  :math:`\exp(-|x - \mu_k|^2 / (2 \sigma^2))`; closed form :math:`\log Z = \log(3 \cdot 2\pi\sigma^2)`;
- ``normal_gamma``: unknown mean and precision, :math:`\tau \sim \mathrm{Gamma}(2, 2)`,
  :math:`\mu \mid \tau \sim N(0, 1/\tau)`, ten observations :math:`y_i \sim N(\mu, 1/\tau)`;
  :math:`\tau > 0` is constrained; closed-form evidence (:func:`normal_gamma_log_evidence`);
- ``beta_binomial``: two groups, :math:`p_j \sim \mathrm{Beta}(1, 1)`,
  :math:`k_j \sim \mathrm{Binomial}(n_j, p_j)` with :math:`(k, n) = ((3, 20), (41, 50))`;
  closed-form evidence (:func:`beta_binomial_log_evidence`);
- ``crescent``: a Gaussian warped onto an arc, in polar coordinates
  :math:`r \sim N(2, 0.25^2)` and angle :math:`\phi \sim N(\pi/2, 0.7^2)` (wrapped to
  :math:`(-\pi, \pi]` about :math:`\pi/2`), the density :math:`\exp(-(r - 2)^2 / (2 \cdot 0.25^2)
  - (\phi - \pi/2)^2 / (2 \cdot 0.7^2))` in the plane; closed form
  (:func:`crescent_log_z`: the radial integral :math:`\int_0^\infty r\, e^{\dots} dr` and the
  truncated angular Gaussian);
- ``student_t``: a 5-D multivariate Student-t with 3 degrees of freedom,
  :math:`(1 + |x|^2 / 3)^{-(3 + 5)/2}`; closed form
  :math:`\log Z = \log\Gamma(3/2) + \tfrac52 \log(3\pi) - \log\Gamma(4)`;
- ``eight_schools`` and ``eight_schools_nc``: Rubin's eight schools, centred
  (:math:`\theta_j \sim N(\mu, \tau)`) and non-centred (:math:`\tilde\theta_j \sim N(0, 1)`,
  :math:`\theta_j = \mu + \tau \tilde\theta_j`), :math:`\mu \sim N(0, 5)`,
  :math:`\tau \sim \mathrm{HalfCauchy}(5)`, :math:`y_j \sim N(\theta_j, \sigma_j)`, 10-D.
  Both integrate to the same evidence :math:`p(y)`. It has no closed form, but
  :math:`\mu` and :math:`\theta` are conjugate given :math:`\tau`, so
  :math:`p(y) = \int p(\tau)\, N(y; 0, \mathrm{diag}(\sigma^2 + \tau^2) + 25 \cdot 11^\top)\, d\tau`,
  a smooth 1-D integral, computed by quadrature (:func:`eight_schools_log_evidence`;
  accurate to about 1e-9). A long NUTS run on the non-centred model followed by importance
  sampling, the method of ``logistic``, is cached with it as a check of that method;
- ``logistic``: Bayesian logistic regression, 20 weights :math:`w \sim N(0, I)`, 100
  observations on a fixed synthetic data set (seeded, :func:`logistic_data`). No closed
  form and no low-dimensional integral: the reference is a large importance-sampling run,
  :math:`2^{20}` draws from a multivariate Student-t proposal (5 degrees of freedom) whose
  location and scale are the posterior mean and covariance of a long NUTS run
  (:func:`reference_run`). The posterior is close to Gaussian, so this proposal covers it
  with a wide margin; the estimate's standard error (from the effective sample size) is
  recorded and is about 1e-3. So its ``log Z - ELBO`` is a KL gap up to that error (a gap
  below it is not resolved, and may come out slightly negative);
- ``gaussian``: a 10-D Gaussian with covariance eigenvalues :math:`10^{-2}` to :math:`10`
  (condition number 1000), log-spaced, in a seeded random rotation; closed form
  :math:`\log Z = \tfrac{10}{2} \log 2\pi + \tfrac12 \log\det\Sigma`;
- ``bimodal``: a 1-D mixture :math:`\tfrac13 N(-1.5, 0.5^2) + \tfrac23 N(1.5, 0.5^2)`
  without normalisers (each term :math:`w_k e^{-(x - m_k)^2 / (2 s^2)}`); closed form
  :math:`\log Z = \log(s \sqrt{2\pi})`.

Targets given as a density on :math:`\mathbb{R}^D` are written with a standard normal
latent ``z`` and a ``pyro.factor`` that turns the joint into the unnormalised target
density, ``pyro.sample("z", Normal(0, 1)); pyro.factor("target", log p~(z) - log N(z; 0, 1))``,
so the joint over ``z`` integrates to exactly :math:`Z`.

The reference runs (NUTS, then importance sampling) are made once and cached in
``bench/vi_reference.json`` (written atomically; keyed by the data and the reference
settings, and redone when either changes; about 5 minutes of one core).

Guides (:data:`GUIDES`), all fitted in the unconstrained space that Pyro's autoguides use.
Ours: the recipes of :data:`RECIPES`, each ``pf.infer.AutoFlowGuide(model, flow, **options)``;
``AutoFlowGuide`` is the library's default, ``pf.infer.AutoFlowGuide(model)`` (which at
:math:`D \le 2` is ``AFG-spline4-stl0.75``, and above is ``AFG-affine``), and the
other recipes are the candidates screened for a new default (only the default and
:data:`RECOMMENDED` run unless named). Peers (:data:`PEERS`): Pyro's ``AutoNormal``,
``AutoMultivariateNormal``, ``AutoIAFNormal``, ``AutoNormalizingFlow`` with Pyro's
rational-quadratic ``SplineAutoregressive`` layers, and zuko's ``NSF`` used as a guide
through ``pyro.contrib.zuko.ZukoToPyro`` (:class:`AutoZukoNSF`). The peer flows share
depth and hidden sizes (``--transforms``, ``--hidden``), and the spline peers the bins and
spline bound (``--bins``, ``--bound``); our recipes carry their own options.

Protocol. For each target, guide, budget and seed: ``pyro.clear_param_store()``,
``pyro.set_rng_seed(seed)``, the guide is built and called once (to create its
parameters), then trained for ``--steps`` steps with
``Trace_ELBO(num_particles=P, vectorize_particles=True)`` for each budget ``P`` of
``--particles`` (1 and 8 by default; the same steps) and ``torch.optim.Adam`` at learning
rate ``--lr`` decayed exponentially to ``--lr / 10`` at the last step, the same for every
guide. A step whose loss is not finite makes no update and is counted. Then, under
``torch.no_grad()`` and with the seed reset, ``--eval-particles`` draws (2000 by default)
from the guide give the log-weights :math:`\log w_s = \log p(x, z_s) - \log q(z_s)`, from
which ``gap = log Z - mean(log w)`` (with its standard error ``sd(log w) / sqrt(S)``) and
``IS error = |logsumexp(log w) - log S - log Z|``. A run *diverged* if its gap is not
finite, or above 1 nat on a target and budget where the best peer's mean gap is below 0.1.
Tables show the mean ± standard deviation over seeds and the number of diverged seeds.
Torch's and Pyro's argument validation is off during the runs for all guides alike
(``pyro.validation_enabled(False)``; importing zuko switches torch's off anyway); the
caller's setting is restored afterwards.

Goals (issue 13), for each of our recipes, on every target and budget: the mean gap over
seeds is no worse than the best peer's, and no seed diverges. ``goals`` says "met" when
the mean gap is at most the best peer's, "within 0.01" when it is at most 0.01 nats more
(the size of the evaluation's noise, from 2000 draws, and of the logistic reference's
error), and "MISSED" otherwise.

Run (one thread; the networks are small), resuming from ``--json`` if it exists::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/vi.py \
        --seeds 0 1 2 3 4 --json bench/results/vi.json --rst vi.rst
    .venv/bin/python bench/vi.py --steps 500 --targets banana --guides AutoNormal AutoFlowGuide
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, Callable, Sequence

# The networks are small, so OpenMP threads that spin while waiting only steal the cores
# of a shared machine; an explicit setting still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import SplineAutoregressive, biject_to, iterated
from pyro.infer import MCMC, NUTS, Trace_ELBO
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
from pyro_flowpack.train import write_atomically

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ scripts share tables.py
from tables import markdown, rst  # noqa: E402

__all__ = [
    "GUIDES",
    "PEERS",
    "RECIPES",
    "RECOMMENDED",
    "TARGETS",
    "AutoZukoNSF",
    "FlowOptions",
    "ReferenceSettings",
    "Target",
    "beta_binomial_log_evidence",
    "crescent_log_z",
    "eight_schools_log_evidence",
    "eight_schools_log_likelihood",
    "evaluate",
    "fit",
    "goal_table",
    "goals",
    "importance_log_z",
    "log_joint",
    "logistic_data",
    "main",
    "normal_gamma_log_evidence",
    "nuts_moments",
    "reference_run",
    "run",
    "unconstrained_log_joint",
    "verdicts",
]

#: pyro-flowpack's guide recipes, ``name: (flow, options)`` for
#: ``pf.infer.AutoFlowGuide(model, flow, **options)``; a flow of ``None`` is the library's
#: default flow. Every recipe the benchmark knows is here, so that a renamed flow changes
#: in one place.
RECIPES: dict[str, tuple[str | type | None, dict[str, Any]]] = {
    "AutoFlowGuide": (None, {}),
    "AFG-affine": ("iaf", {"splines": 0, "stl": True}),
    "AFG-spline1": ("iaf", {"splines": 1}),
    "AFG-spline1-t6": ("iaf", {"splines": 1, "transforms": 6}),
    "AFG-spline1-h128": ("iaf", {"splines": 1, "hidden": (128, 128)}),
    "AFG-spline1-init0.3": ("iaf", {"splines": 1, "init_scale": 0.3}),
    "AFG-spline1-ls3": ("iaf", {"splines": 1, "log_scale_bounds": (-3.0, 3.0)}),
    "AFG-spline1-nostl": ("iaf", {"splines": 1, "stl": False}),
    "AFG-spline2": ("iaf", {"splines": 2}),
    "AFG-spline2-bins16": ("iaf", {"splines": 2, "bins": 16}),
    "AFG-spline4": ("iaf", {"splines": 4}),
    "AFG-spline-only": ("iaf", {"affine": False, "splines": 4}),
    "AFG-nsf": ("nsf", {}),
    "AFG-spline4-nostl": ("iaf", {"splines": 4, "stl": False}),
    "AFG-spline-only-nostl": ("iaf", {"affine": False, "splines": 4, "stl": False}),
    "AFG-spline2-bins16-nostl": ("iaf", {"splines": 2, "bins": 16, "stl": False}),
    "AFG-spline-only-bins16": ("iaf", {"affine": False, "splines": 4, "bins": 16}),
    "AFG-spline4-stl0.5": ("iaf", {"splines": 4, "stl": 0.5}),
    "AFG-spline4-stl0.75": ("iaf", {"splines": 4, "stl": 0.75}),
}
#: Our default guide and the spline recipe that screened best as a new default for every
#: dimension (issue 13), the two that run unless ``--guides`` names others. It was not
#: adopted: it fixes the 1-D bimodal target but loses on eight schools, the funnel and the
#: Gaussian at 1 particle and diverged once. The default took splines only at D <= 2
#: (``AFG-spline4-stl0.75``, the same guide there; ``AFG-affine`` is the former default;
#: docs/benchmarks.rst).
OURS = "AutoFlowGuide"
RECOMMENDED = "AFG-spline2-bins16"

LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    r"""A Pyro model with a known normaliser.

    Arguments:
        name: The target's name on the command line.
        model: The Pyro model (no arguments); its joint density over the latent sites,
            with the data observed, integrates to :math:`Z`.
        normaliser: A function returning :math:`(\log Z, \text{its standard error})`;
            called once, when :attr:`log_z` is first read.
        latent_dim: The number of unconstrained latent dimensions.
        description: One line for the table's caption and the JSON.
        reference: How :math:`\log Z` is known.
    """

    name: str
    model: Callable[[], None]
    normaliser: Callable[[], tuple[float, float]]
    latent_dim: int
    description: str
    reference: str = "closed form"

    @property
    def log_z(self) -> float:
        r""":math:`\log Z`."""
        return _normalise(self)[0]

    @property
    def log_z_se(self) -> float:
        r"""The standard error of :attr:`log_z` (0 unless it is an estimate)."""
        return _normalise(self)[1]


@cache
def _normalise(target: Target) -> tuple[float, float]:
    return target.normaliser()


def exactly(log_z: float) -> Callable[[], tuple[float, float]]:
    """The normaliser of a target whose :math:`\\log Z` is known exactly."""
    return lambda: (log_z, 0.0)


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


CRESCENT_RADIUS, CRESCENT_RADIAL_SCALE = 2.0, 0.25
CRESCENT_ANGLE, CRESCENT_ANGULAR_SCALE = math.pi / 2, 0.7


def crescent_log_density(z: Tensor) -> Tensor:
    r"""A Gaussian in polar coordinates :math:`(r, \phi)` around the point of radius
    :math:`R` and angle :math:`\phi_0`, as a density in the plane, without normalisers:
    :math:`-(r - R)^2 / (2 s_r^2) - \delta^2 / (2 s_\phi^2)`, :math:`\delta` the angle from
    :math:`\phi_0` wrapped to :math:`(-\pi, \pi]`."""
    r = torch.linalg.vector_norm(z, dim=-1)
    delta = torch.remainder(torch.atan2(z[..., 1], z[..., 0]) - CRESCENT_ANGLE + math.pi, 2 * math.pi) - math.pi
    return -0.5 * ((r - CRESCENT_RADIUS) / CRESCENT_RADIAL_SCALE) ** 2 - 0.5 * (delta / CRESCENT_ANGULAR_SCALE) ** 2


def crescent_log_z(radius: float, radial_scale: float, angular_scale: float) -> float:
    r"""The normaliser of :func:`crescent_log_density` (area element :math:`r\,dr\,d\phi`):

    .. math::

        Z = \Big(s_r^2 e^{-R^2 / (2 s_r^2)} + R s_r \sqrt{2\pi}\, \Phi(R / s_r)\Big)
            \cdot s_\phi \sqrt{2\pi} \big(2 \Phi(\pi / s_\phi) - 1\big).

    Example:
        >>> round(crescent_log_z(0.0, 1.0, 1e3) - math.log(2 * math.pi), 4)  # N(0, I) in 2-D, nearly flat angle
        0.0
    """
    R, s = radius, radial_scale
    radial = math.log(s**2 * math.exp(-0.5 * (R / s) ** 2)
                      + R * s * math.sqrt(2 * math.pi) * 0.5 * math.erfc(-R / s / math.sqrt(2)))
    angular = math.log(angular_scale * math.sqrt(2 * math.pi) * math.erf(math.pi / angular_scale / math.sqrt(2)))
    return radial + angular


STUDENT_DF, STUDENT_DIM = 3.0, 5


def student_t_log_density(z: Tensor) -> Tensor:
    r"""A standard multivariate Student-t without normalisers:
    :math:`-\tfrac{\nu + D}{2} \log(1 + |z|^2 / \nu)`."""
    return -0.5 * (STUDENT_DF + z.shape[-1]) * torch.log1p((z**2).sum(-1) / STUDENT_DF)


EIGHT_SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
EIGHT_SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
EIGHT_SCHOOLS_PRIOR = {"mu_scale": 5.0, "tau_scale": 5.0}


def eight_schools_model(centered: bool) -> Callable[[], None]:
    r"""Rubin's eight schools: :math:`\mu \sim N(0, 5)`, :math:`\tau \sim \mathrm{HalfCauchy}(5)`,
    :math:`\theta_j \sim N(\mu, \tau)` (centred) or :math:`\theta_j = \mu + \tau \tilde\theta_j`,
    :math:`\tilde\theta_j \sim N(0, 1)` (non-centred), :math:`y_j \sim N(\theta_j, \sigma_j)`."""
    y, sigma = EIGHT_SCHOOLS_Y, EIGHT_SCHOOLS_SIGMA

    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, EIGHT_SCHOOLS_PRIOR["mu_scale"]))
        tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(EIGHT_SCHOOLS_PRIOR["tau_scale"])))
        shape = mu.shape + y.shape
        if centered:
            theta = pyro.sample("theta", dist.Normal(mu.unsqueeze(-1), tau.unsqueeze(-1)).expand(shape).to_event(1))
        else:
            raw = pyro.sample("theta_raw", dist.Normal(torch.zeros(shape), 1.0).to_event(1))
            theta = mu.unsqueeze(-1) + tau.unsqueeze(-1) * raw
        pyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)

    return model


def eight_schools_log_likelihood(y: Tensor, sigma: Tensor, tau: Tensor, mu_scale: float) -> Tensor:
    r""":math:`\log p(y \mid \tau)` of the eight-schools model, :math:`\mu` and
    :math:`\theta` integrated out: :math:`N(y; 0, \mathrm{diag}(\sigma^2 + \tau^2) + s_\mu^2 11^\top)`,
    for each :math:`\tau` of a 1-D tensor."""
    covariance = torch.diag_embed(sigma**2 + tau.unsqueeze(-1) ** 2) + mu_scale**2
    return torch.distributions.MultivariateNormal(torch.zeros_like(y), covariance).log_prob(y)


def eight_schools_log_evidence(y: Tensor, sigma: Tensor, mu_scale: float, tau_scale: float,
                               nodes: int = 2001) -> float:
    r"""The log evidence of the eight-schools model, :math:`\mu` and :math:`\theta`
    integrated out in closed form (:func:`eight_schools_log_likelihood`) and :math:`\tau`
    by quadrature:

    .. math::

        p(y) = \int_0^\infty \mathrm{HalfCauchy}(\tau; s_\tau)\, p(y \mid \tau)\, d\tau
             = \frac2\pi \int_0^{\pi/2} p(y \mid \tau = s_\tau \tan\varphi)\, d\varphi ,

    the trapezoid rule on ``nodes`` points of :math:`\varphi` (a smooth integrand on a
    finite interval, vanishing at :math:`\pi/2`), in double precision; 201 nodes already
    agree with 20001 to 1e-9.
    """
    y, sigma = y.double(), sigma.double()
    phi = torch.linspace(0, math.pi / 2, nodes, dtype=torch.float64)[:-1]  # the integrand is 0 at pi/2
    log_f = eight_schools_log_likelihood(y, sigma, tau_scale * torch.tan(phi), mu_scale)
    log_f = torch.cat([log_f, torch.tensor([-math.inf], dtype=torch.float64)])
    step = (math.pi / 2) / (nodes - 1)
    log_weights = torch.full((nodes,), math.log(step), dtype=torch.float64)
    log_weights[[0, -1]] -= math.log(2)
    return float(torch.logsumexp(log_f + log_weights, 0)) + math.log(2 / math.pi)


LOGISTIC_FEATURES, LOGISTIC_OBSERVATIONS, LOGISTIC_SEED = 20, 100, 20240613


@cache
def logistic_data() -> tuple[Tensor, Tensor]:
    r"""The fixed synthetic data set of the logistic regression: features
    :math:`x_{ij} \sim N(0, 1)`, true weights :math:`w_j \sim N(0, 0.5^2)`,
    :math:`y_i \sim \mathrm{Bernoulli}(\sigma(x_i^\top w))`, from a seeded generator.

    Returns:
        ``(x, y)`` of shapes ``(100, 20)`` and ``(100,)``.
    """
    generator = torch.Generator().manual_seed(LOGISTIC_SEED)
    x = torch.randn(LOGISTIC_OBSERVATIONS, LOGISTIC_FEATURES, generator=generator, dtype=torch.float64)
    w = 0.5 * torch.randn(LOGISTIC_FEATURES, generator=generator, dtype=torch.float64)
    u = torch.rand(LOGISTIC_OBSERVATIONS, generator=generator, dtype=torch.float64)
    y = (u < torch.sigmoid(x @ w)).double()
    return x.float(), y.float()


def logistic_model() -> None:
    r""":math:`w \sim N(0, I_{20})`, :math:`y_i \sim \mathrm{Bernoulli}(\sigma(x_i^\top w))`."""
    x, y = logistic_data()
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[-1]), 1.0).to_event(1))
    pyro.sample("y", dist.Bernoulli(logits=w @ x.T).to_event(1), obs=y)


GAUSSIAN_DIM, GAUSSIAN_CONDITION, GAUSSIAN_SEED = 10, 1000.0, 7


@cache
def gaussian_covariance() -> Tensor:
    r"""The covariance :math:`Q \,\mathrm{diag}(\lambda) Q^\top` of the ill-conditioned
    Gaussian: :math:`\lambda` log-spaced from :math:`10^{-2}` to :math:`10^{-2} \cdot 1000`,
    :math:`Q` a seeded random rotation (double precision)."""
    generator = torch.Generator().manual_seed(GAUSSIAN_SEED)
    q, r = torch.linalg.qr(torch.randn(GAUSSIAN_DIM, GAUSSIAN_DIM, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    eigenvalues = 1e-2 * GAUSSIAN_CONDITION ** torch.linspace(0, 1, GAUSSIAN_DIM, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


def gaussian_log_density(z: Tensor) -> Tensor:
    r""":math:`-\tfrac12 z^\top \Sigma^{-1} z`."""
    precision = torch.linalg.inv(gaussian_covariance()).to(z.dtype)
    return -0.5 * ((z @ precision) * z).sum(-1)


BIMODAL_WEIGHTS, BIMODAL_MEANS, BIMODAL_SCALE = (1 / 3, 2 / 3), (-1.5, 1.5), 0.5


def bimodal_log_density(z: Tensor) -> Tensor:
    r""":math:`\log \sum_k w_k \exp(-(z - m_k)^2 / (2 s^2))`, :math:`\sum_k w_k = 1`."""
    x = z[..., 0].unsqueeze(-1)
    means, log_w = torch.tensor(BIMODAL_MEANS), torch.log(torch.tensor(BIMODAL_WEIGHTS))
    return torch.logsumexp(log_w - 0.5 * ((x - means) / BIMODAL_SCALE) ** 2, -1)


def _reference_log_z(name: str) -> tuple[float, float]:
    entry = reference_run(name)
    return entry["log_z"], entry["log_z_se"]


def _eight_schools_log_z() -> tuple[float, float]:
    return eight_schools_log_evidence(EIGHT_SCHOOLS_Y, EIGHT_SCHOOLS_SIGMA, **EIGHT_SCHOOLS_PRIOR), 0.0


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target(
            "funnel",
            unnormalised_density_model(funnel_log_density, FUNNEL_DIM),
            exactly(0.5 * math.log(2 * math.pi * FUNNEL_SCALE**2) + 0.5 * (FUNNEL_DIM - 1) * LOG_2PI),
            FUNNEL_DIM,
            f"Neal's funnel, D={FUNNEL_DIM}, v ~ N(0, {FUNNEL_SCALE:g}^2)",
        ),
        Target(
            "banana",
            unnormalised_density_model(banana_log_density, 2),
            exactly(math.log(2 * math.pi * BANANA_SCALES[0] * BANANA_SCALES[1])),
            2,
            f"banana, x1 ~ N(0, {BANANA_SCALES[0]:g}^2), x2 | x1 ~ N({BANANA_CURVATURE:g}(x1^2 - "
            f"{BANANA_SCALES[0] ** 2:g}), {BANANA_SCALES[1]:g}^2)",
        ),
        Target(
            "mixture",
            unnormalised_density_model(mixture_log_density, 2),
            exactly(math.log(3 * 2 * math.pi * MIXTURE_SCALE**2)),
            2,
            f"3 equal 2-D Gaussians, sd {MIXTURE_SCALE:g}, circumradius 3",
        ),
        Target(
            "normal_gamma",
            normal_gamma_model,
            exactly(normal_gamma_log_evidence(NORMAL_GAMMA_DATA, **NORMAL_GAMMA_PRIOR)),
            2,
            f"Normal-Gamma, n={NORMAL_GAMMA_DATA.numel()}, prior NG(0, 1, 2, 2)",
        ),
        Target(
            "beta_binomial",
            beta_binomial_model,
            exactly(beta_binomial_log_evidence(BETA_BINOMIAL_SUCCESSES, BETA_BINOMIAL_TRIALS, *BETA_BINOMIAL_PRIOR)),
            2,
            "Beta(1, 1)-Binomial, 2 groups, k/n = 3/20, 41/50",
        ),
        Target(
            "crescent",
            unnormalised_density_model(crescent_log_density, 2),
            exactly(crescent_log_z(CRESCENT_RADIUS, CRESCENT_RADIAL_SCALE, CRESCENT_ANGULAR_SCALE)),
            2,
            f"crescent, r ~ N({CRESCENT_RADIUS:g}, {CRESCENT_RADIAL_SCALE:g}^2), angle ~ N(pi/2, "
            f"{CRESCENT_ANGULAR_SCALE:g}^2)",
        ),
        Target(
            "student_t",
            unnormalised_density_model(student_t_log_density, STUDENT_DIM),
            exactly(math.lgamma(STUDENT_DF / 2) + 0.5 * STUDENT_DIM * math.log(STUDENT_DF * math.pi)
                    - math.lgamma((STUDENT_DF + STUDENT_DIM) / 2)),
            STUDENT_DIM,
            f"multivariate Student-t, {STUDENT_DF:g} degrees of freedom, D={STUDENT_DIM}",
        ),
        Target(
            "eight_schools",
            eight_schools_model(centered=True),
            _eight_schools_log_z,
            10,
            "eight schools, centred, mu ~ N(0, 5), tau ~ HalfCauchy(5)",
            "quadrature over tau (mu, theta integrated in closed form)",
        ),
        Target(
            "eight_schools_nc",
            eight_schools_model(centered=False),
            _eight_schools_log_z,
            10,
            "eight schools, non-centred, mu ~ N(0, 5), tau ~ HalfCauchy(5)",
            "quadrature over tau (mu, theta integrated in closed form)",
        ),
        Target(
            "logistic",
            logistic_model,
            partial(_reference_log_z, "logistic"),
            LOGISTIC_FEATURES,
            f"logistic regression, {LOGISTIC_FEATURES} weights ~ N(0, 1), {LOGISTIC_OBSERVATIONS} synthetic "
            f"observations (seed {LOGISTIC_SEED})",
            "importance sampling from a Student-t fitted to a NUTS run",
        ),
        Target(
            "gaussian",
            unnormalised_density_model(gaussian_log_density, GAUSSIAN_DIM),
            exactly(0.5 * GAUSSIAN_DIM * LOG_2PI + 0.5 * float(torch.logdet(gaussian_covariance()))),
            GAUSSIAN_DIM,
            f"Gaussian, D={GAUSSIAN_DIM}, condition number {GAUSSIAN_CONDITION:g}, rotated",
        ),
        Target(
            "bimodal",
            unnormalised_density_model(bimodal_log_density, 1),
            exactly(math.log(BIMODAL_SCALE * math.sqrt(2 * math.pi))),
            1,
            f"1-D mixture 1/3 N({BIMODAL_MEANS[0]:g}, {BIMODAL_SCALE:g}^2) + 2/3 N({BIMODAL_MEANS[1]:g}, "
            f"{BIMODAL_SCALE:g}^2)",
        ),
    ]
}


def log_joint(target: Target | Callable[[], None], latents: dict[str, Tensor]) -> Tensor:
    r"""The model's joint log density :math:`\log p(\text{data}, z)` at latent values with
    any batch shape (the targets have no plates, so every site's log density has that
    batch shape).

    Example:
        >>> log_joint(TARGETS["banana"], {"z": torch.zeros(3, 2)}).shape
        torch.Size([3])
    """
    model = target.model if isinstance(target, Target) else target
    trace = poutine.trace(poutine.condition(model, data=latents)).get_trace()
    total: Tensor | float = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample":
            total = total + site["fn"].log_prob(site["value"])
    return total


# --------------------------------------------------------------------------- reference runs


@dataclass(frozen=True)
class ReferenceSettings:
    """The budget of a reference run: NUTS steps, importance-sampling draws (in batches)
    and the degrees of freedom of the Student-t proposal."""

    warmup: int = 1000
    samples: int = 4000
    draws: int = 2**20
    batch: int = 2**16
    df: float = 5.0
    seed: int = 0


REFERENCE_PATH = Path(__file__).resolve().parent / "vi_reference.json"
REFERENCE_SETTINGS = ReferenceSettings()
#: The models that get a NUTS-and-importance-sampling reference: the logistic
#: regression's is its log Z; eight schools' checks the method against the quadrature.
REFERENCE_MODELS: dict[str, Callable[[], None]] = {
    "logistic": logistic_model,
    "eight_schools_nc": eight_schools_model(centered=False),
}


def latent_sites(model: Callable[[], None]) -> list[tuple[str, torch.Size, Any]]:
    """The model's latent sites in the order Pyro's ``AutoContinuous`` packs them:
    ``(name, shape, biject_to(support))``."""
    trace = poutine.trace(model).get_trace()
    return [(name, site["value"].shape, biject_to(site["fn"].support)) for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]]


def unconstrained_log_joint(model: Callable[[], None], u: Tensor) -> Tensor:
    r"""The joint log density of the model's unconstrained latent vector :math:`u` (batch
    shape ``u.shape[:-1]``): :math:`\log p(x, T(u)) + \log|\det J_T(u)|`, ``T`` each site's
    ``biject_to``."""
    batch, latents, log_det, offset = u.shape[:-1], {}, 0.0, 0
    for name, shape, transform in latent_sites(model):
        size = shape.numel()
        x = u[..., offset:offset + size].reshape(batch + shape)
        offset += size
        latents[name] = transform(x)
        log_det = log_det + transform.log_abs_det_jacobian(x, latents[name]).reshape(batch + (-1,)).sum(-1)
    return log_joint(model, latents) + log_det


def nuts_moments(model: Callable[[], None], warmup: int, samples: int, seed: int) -> dict[str, Any]:
    """The mean and covariance of the unconstrained latent vector over a NUTS run, with
    its diagnostics.

    Returns:
        ``{"mean", "covariance"}`` (tensors) and ``{"divergences", "min_n_eff", "max_r_hat"}``
        (split-chain statistics of the one chain, over all coordinates).
    """
    pyro.set_rng_seed(seed)
    mcmc = MCMC(NUTS(model, jit_compile=False), num_samples=samples, warmup_steps=warmup, disable_progbar=True)
    mcmc.run()
    draws = mcmc.get_samples()
    u = torch.cat([transform.inv(draws[name]).reshape(samples, -1) for name, _, transform in latent_sites(model)],
                  -1).double()
    diagnostics = mcmc.diagnostics()
    sites = [name for name, _, _ in latent_sites(model)]
    return {
        "mean": u.mean(0),
        "covariance": torch.cov(u.T).reshape(u.shape[-1], u.shape[-1]),
        "divergences": len(diagnostics["divergences"]["chain 0"]),
        "min_n_eff": min(float(diagnostics[s]["n_eff"].min()) for s in sites),
        "max_r_hat": max(float(diagnostics[s]["r_hat"].max()) for s in sites),
    }


@torch.no_grad()
def importance_log_z(model: Callable[[], None], loc: Tensor, covariance: Tensor, draws: int, df: float,
                     batch: int = 2**16) -> dict[str, float]:
    r"""The importance-sampling estimate of :math:`\log Z` with a multivariate Student-t
    proposal of location ``loc`` and scale matrix ``covariance`` over the unconstrained
    latent vector.

    Returns:
        ``{"log_z", "log_z_se", "ess"}``: the estimate, its delta-method standard error
        :math:`\sqrt{(S / \mathrm{ESS} - 1) / S}`, and the effective sample size
        :math:`(\sum w)^2 / \sum w^2`.
    """
    proposal = dist.MultivariateStudentT(torch.tensor(df), loc.float(), torch.linalg.cholesky(covariance).float())
    log_w = []
    for start in range(0, draws, batch):
        u = proposal.sample((min(batch, draws - start),))
        log_w.append((unconstrained_log_joint(model, u) - proposal.log_prob(u)).double())
    log_w = torch.cat(log_w)
    log_z = float(torch.logsumexp(log_w, 0)) - math.log(draws)
    ess = math.exp(2 * float(torch.logsumexp(log_w, 0)) - float(torch.logsumexp(2 * log_w, 0)))
    return {"log_z": log_z, "log_z_se": math.sqrt(max(draws / ess - 1, 0.0) / draws), "ess": ess}


def _data_digest(name: str) -> str:
    """A digest of everything a reference depends on besides its settings: the data."""
    if name == "logistic":
        x, y = logistic_data()
        data = x.numpy().tobytes() + y.numpy().tobytes()
    else:
        data = EIGHT_SCHOOLS_Y.numpy().tobytes() + EIGHT_SCHOOLS_SIGMA.numpy().tobytes()
        data += json.dumps(EIGHT_SCHOOLS_PRIOR).encode()
    return hashlib.sha256(data).hexdigest()


def reference_run(name: str, path: str | os.PathLike[str] | None = None,
                  settings: ReferenceSettings | None = None) -> dict[str, Any]:
    r"""The NUTS-and-importance-sampling reference of one of :data:`REFERENCE_MODELS`,
    from the cache file if it holds one made with the same data and settings, else made
    now (a NUTS run gives the posterior mean and covariance of the unconstrained latent
    vector; a Student-t of that location and scale is the importance-sampling proposal)
    and written to the cache, atomically.

    Arguments:
        name: A key of :data:`REFERENCE_MODELS`.
        path: The cache file (:data:`REFERENCE_PATH`).
        settings: The budget (:data:`REFERENCE_SETTINGS`).

    Returns:
        ``{"log_z", "log_z_se", "ess", "mean", "sd", "divergences", "min_n_eff",
        "max_r_hat", "seconds", "key"}``, ``mean`` and ``sd`` those of the unconstrained
        latent vector over the NUTS run.
    """
    path = Path(REFERENCE_PATH if path is None else path)
    settings = REFERENCE_SETTINGS if settings is None else settings
    key = {"data": _data_digest(name), **asdict(settings)}
    cached = json.loads(path.read_text()) if path.exists() else {}
    if name in cached and cached[name]["key"] == key:
        return cached[name]
    print(f"making the reference for {name} (NUTS {settings.warmup} + {settings.samples}, {settings.draws} "
          f"importance draws), cached in {path}", flush=True)
    start = time.perf_counter()
    model = REFERENCE_MODELS[name]
    with pyro.validation_enabled(False):
        moments = nuts_moments(model, settings.warmup, settings.samples, settings.seed)
        pyro.set_rng_seed(settings.seed + 1)
        estimate = importance_log_z(model, moments["mean"], moments["covariance"], settings.draws, settings.df,
                                    settings.batch)
    entry = {
        **estimate,
        "mean": moments["mean"].tolist(),
        "sd": moments["covariance"].diagonal().sqrt().tolist(),
        **{k: moments[k] for k in ("divergences", "min_n_eff", "max_r_hat")},
        "seconds": time.perf_counter() - start,
        "key": key,
    }
    cached = json.loads(path.read_text()) if path.exists() else {}  # another process may have written meanwhile
    cached[name] = entry
    text = json.dumps(cached, indent=2) + "\n"
    write_atomically(path, lambda p: p.write_text(text))
    return entry


# --------------------------------------------------------------------------- guides


@dataclass(frozen=True)
class FlowOptions:
    """The sizes shared by every peer flow guide."""

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


def recipe_guide(model: Callable[..., Any], options: FlowOptions, recipe: str) -> Any:
    """pyro-flowpack's ``AutoFlowGuide`` built from one of :data:`RECIPES` (the peers'
    ``options`` do not apply to it)."""
    flow, flow_options = RECIPES[recipe]
    return pf.infer.AutoFlowGuide(model, **({} if flow is None else {"flow": flow}), **flow_options)


def recipe_description(recipe: str) -> str:
    flow, options = RECIPES[recipe]
    if flow is None and not options:
        return "pf.infer.AutoFlowGuide(model), the library default"
    shown = getattr(flow, "__qualname__", repr(flow))
    return f"pf.infer.AutoFlowGuide(model, flow={shown}" + "".join(f", {k}={v!r}" for k, v in options.items()) + ")"


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


GuideBuilder = Callable[[Callable[..., Any], FlowOptions], Any]

#: The peers, ``name: (builder(model, options), description)``.
PEERS: dict[str, tuple[GuideBuilder, str]] = {
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

#: Every guide, ours (the recipes) first: ``name: (builder(model, options), description)``.
GUIDES: dict[str, tuple[GuideBuilder, str]] = {
    **{name: (partial(recipe_guide, recipe=name), recipe_description(name)) for name in RECIPES},
    **PEERS,
}
DEFAULT_GUIDES = list(dict.fromkeys([OURS, RECOMMENDED, *PEERS]))


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
    ``particles`` draws of the guide (a draw with a non-finite log-weight makes both
    non-finite: the run diverged).

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
    """Builds, trains and evaluates one guide on one target with one seed and budget."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = GUIDES[guide_name][0](target.model, options)
    training = fit(target, guide, steps, particles, lr)
    pyro.set_rng_seed(seed + 10_000)
    result = evaluate(target, guide, eval_particles)
    return {"target": target.name, "guide": guide_name, "particles": particles, "seed": seed,
            "log_z": target.log_z, **training, **result}


# --------------------------------------------------------------------------- tables

#: A run diverged if its gap is above this while the best peer's mean gap is below
#: :data:`PEER_SOLVED` (or if its gap is not finite).
DIVERGED, PEER_SOLVED = 1.0, 0.1
#: The slack of the "within" verdict: about the evaluation's noise.
GOAL_SLACK = 0.01


def mean_sd(values: Sequence[float], digits: int) -> str:
    """``mean`` for one value, ``mean ± sd`` for several."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    bad = sum(1 for v in values if not math.isfinite(v))
    if bad:
        return f"{bad} non-finite"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def grouped(results: Sequence[dict]) -> dict[tuple[str, int, str], list[dict]]:
    """Results by (target, particles, guide), in the order they came."""
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["target"], r["particles"], r["guide"]), []).append(r)
    return groups


def best_peer(groups: dict[tuple[str, int, str], list[dict]], target: str, particles: int) -> tuple[str, float] | None:
    """The peer with the lowest mean gap on a target and budget, and that gap."""
    peers = {g: statistics.fmean(r["gap"] for r in rs) for (t, p, g), rs in groups.items()
             if t == target and p == particles and g in PEERS}
    if not peers:
        return None
    name = min(peers, key=peers.get)
    return name, peers[name]


def diverged(runs: Sequence[dict], best: tuple[str, float] | None) -> int:
    """The number of runs whose gap is not finite, or above :data:`DIVERGED` where the best
    peer's mean gap is below :data:`PEER_SOLVED`."""
    solved = best is not None and best[1] < PEER_SOLVED
    return sum(1 for r in runs if not math.isfinite(r["gap"]) or (solved and r["gap"] > DIVERGED))


def header(budgets: Sequence[int]) -> list[str]:
    columns = ["target", "log Z", "guide"]
    for p in budgets:
        columns += [f"gap, {p} p.", f"IS error, {p} p.", f"div., {p} p."]
    return columns + ["train [s]"]


def table_body(results: Sequence[dict], budgets: Sequence[int]) -> list[list[str]]:
    """One row per (target, guide): for each budget the mean ± sd over seeds of the gap and
    of the IS error, and the diverged seeds out of the seeds run."""
    groups = grouped(results)
    rows: dict[tuple[str, str], list[str]] = {}
    for target, guide in dict.fromkeys((r["target"], r["guide"]) for r in results):
        runs = [r for r in results if r["target"] == target and r["guide"] == guide]
        row = [target, f"{TARGETS[target].log_z:.4f}", guide]
        for p in budgets:
            rs = groups.get((target, p, guide), [])
            if rs:
                row += [mean_sd([r["gap"] for r in rs], 4), mean_sd([r["is_error"] for r in rs], 4),
                        f"{diverged(rs, best_peer(groups, target, p))}/{len(rs)}"]
            else:
                row += ["", "", ""]
        row.append(f"{statistics.fmean(r['train_seconds'] for r in runs):.0f}")
        rows[(target, guide)] = row
    return list(rows.values())


def verdicts(results: Sequence[dict], ours: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The issue's goals for each of our recipes in ``ours`` (by default all that ran) on
    each target and budget where a peer ran too.

    Returns:
        One dict per recipe, target and budget: ``guide``, ``target``, ``particles``,
        ``gap`` (the mean over seeds), ``peer`` and ``peer_gap`` (the best peer's),
        ``verdict`` ("met", "within" :data:`GOAL_SLACK`, "MISSED"), ``diverged`` and ``seeds``.
    """
    groups = grouped(results)
    names = [g for g in dict.fromkeys(r["guide"] for r in results) if g in RECIPES] if ours is None else ours
    found = []
    for guide in names:
        for (target, p, g), rs in groups.items():
            best = best_peer(groups, target, p)
            if g != guide or best is None:
                continue
            mean = statistics.fmean(r["gap"] for r in rs)
            verdict = "met" if mean <= best[1] else "within" if mean <= best[1] + GOAL_SLACK else "MISSED"
            found.append({"guide": guide, "target": target, "particles": p, "gap": mean, "peer": best[0],
                          "peer_gap": best[1], "verdict": verdict, "diverged": diverged(rs, best), "seeds": len(rs)})
    return found


def goals(results: Sequence[dict], ours: Sequence[str] | None = None) -> list[str]:
    """:func:`verdicts` as lines of text, then one summary line per recipe."""
    found = verdicts(results, ours)
    lines = [f"{v['target']} [{v['particles']} p.]: {v['guide']} gap {v['gap']:.4f}, best peer {v['peer']} "
             f"{v['peer_gap']:.4f}: {v['verdict']}" + (f" {GOAL_SLACK:g}" if v["verdict"] == "within" else "")
             + f"; diverged {v['diverged']}/{v['seeds']}" for v in found]
    for guide in dict.fromkeys(v["guide"] for v in found):
        mine = [v for v in found if v["guide"] == guide]
        count = {k: sum(v["verdict"] == k for v in mine) for k in ("met", "within", "MISSED")}
        lines.append(f"{guide}: met {count['met']}, within {GOAL_SLACK:g} {count['within']}, missed "
                     f"{count['MISSED']} of {len(mine)}; {sum(v['diverged'] for v in mine)} diverged seed(s)")
    return lines


def goal_table(results: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """The goals as a table: one row per target and budget, the best peer's mean gap,
    then for each of our recipes its mean gap, verdict and diverged seeds."""
    found = verdicts(results)
    ours = list(dict.fromkeys(v["guide"] for v in found))
    columns = ["target", "budget", "best peer", "its gap"]
    for guide in ours:
        columns += [guide, "goal", "div."]
    rows: dict[tuple[str, int], list[str]] = {}
    for v in found:
        key = (v["target"], v["particles"])
        if key not in rows:
            rows[key] = [v["target"], f"{v['particles']} p.", v["peer"], f"{v['peer_gap']:.4f}"]
            rows[key] += [""] * (3 * len(ours))
        i = 4 + 3 * ours.index(v["guide"])
        rows[key][i:i + 3] = [f"{v['gap']:.4f}", v["verdict"], f"{v['diverged']}/{v['seeds']}"]
    return columns, list(rows.values())


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="SVI steps per guide (every budget)")
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 8],
                        help="the budgets: vectorised ELBO particles per step")
    parser.add_argument("--eval-particles", type=int, default=2000, help="guide draws for the ELBO and IS estimates")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--guides", nargs="*", default=DEFAULT_GUIDES, choices=list(GUIDES))
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's initial learning rate (decays to lr/10)")
    parser.add_argument("--transforms", type=int, default=FlowOptions.transforms, help="layers of every peer flow")
    parser.add_argument("--hidden", type=int, nargs="+", default=list(FlowOptions.hidden))
    parser.add_argument("--bins", type=int, default=FlowOptions.bins)
    parser.add_argument("--bound", type=float, default=FlowOptions.bound, help="spline half-width (not zuko's)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--json", metavar="PATH",
                        help="write the settings and results as JSON after every run; if PATH exists (same "
                             "settings), its runs are kept and not repeated, so a rerun resumes")
    parser.add_argument("--rst", metavar="PATH", help="also write the table as an RST list-table")
    parser.add_argument("--show", nargs="+", choices=list(GUIDES), metavar="GUIDE",
                        help="the guides of the table and the goals (default: every guide that ran or was "
                             "included; the JSON keeps them all)")
    parser.add_argument("--references", action="store_true",
                        help="only make (or read from the cache) the NUTS-and-importance-sampling references and "
                             "print them, with eight schools' quadrature beside its check")
    parser.add_argument("--include", metavar="PATH", nargs="+", default=[],
                        help="JSON files of earlier runs with the same settings: their results join the table "
                             "and their (target, guide, budget, seed) runs are not repeated")
    args = parser.parse_args(argv)
    counts = (args.steps, *args.particles, args.eval_particles, args.transforms, args.bins, args.threads,
              *args.hidden)
    if min(counts) < 1 or args.lr <= 0 or args.bound <= 0:
        parser.error("--steps, --particles, --eval-particles, --transforms, --hidden, --bins, --threads, --lr "
                     "and --bound must be positive")
    return args


def settings_dict(args: argparse.Namespace, options: FlowOptions) -> dict[str, Any]:
    """The settings that make results comparable (those ``--include`` checks)."""
    return {
        "steps": args.steps, "eval_particles": args.eval_particles, "lr": args.lr, "lr_final": args.lr / 10,
        "flow": {"transforms": options.transforms, "hidden": list(options.hidden), "bins": options.bins,
                 "bound": options.bound},
    }


def _key(r: dict) -> tuple[str, str, int, int]:
    return r["target"], r["guide"], r["particles"], r["seed"]


def included_results(paths: Sequence[str], settings: dict[str, Any]) -> list[dict]:
    """The results of earlier runs, which must have been made with the same settings; of
    runs of the same (target, guide, budget, seed) in several files, the first file's is
    kept."""
    results: dict[tuple[str, str, int, int], dict] = {}
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        theirs = {k: payload["settings"].get(k) for k in settings}
        if theirs != settings:
            raise ValueError(f"--include {path}: expected results made with {settings}, got {theirs}")
        for r in payload["results"]:
            results.setdefault(_key(r), r)
    return list(results.values())


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the benchmark and returns the per-seed results (with the included ones)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.references:
        for name in REFERENCE_MODELS:
            r = reference_run(name)
            exact = f", quadrature {TARGETS[name].log_z:.5f}" if TARGETS[name].log_z_se == 0 else ""
            print(f"{name}: log Z {r['log_z']:.5f} ± {r['log_z_se']:.5f} (ESS {r['ess']:.0f} of "
                  f"{REFERENCE_SETTINGS.draws}{exact}); NUTS {r['divergences']} divergences, min n_eff "
                  f"{r['min_n_eff']:.0f}, max r_hat {r['max_r_hat']:.4f}, {r['seconds']:.0f} s")
        return []
    options = FlowOptions(args.transforms, tuple(args.hidden), args.bins, args.bound)
    zuko = _import_zuko()
    comparable = settings_dict(args, options)
    resumed = [args.json] if args.json and os.path.exists(args.json) else []
    results = included_results([*resumed, *args.include], comparable)
    done = {_key(r) for r in results}
    budgets = sorted({r["particles"] for r in results} | set(args.particles))
    settings = (
        f"{args.steps} steps, Trace_ELBO with {' and '.join(map(str, budgets))} vectorised particles, Adam lr "
        f"{args.lr:g} decaying to {args.lr / 10:g}, peer flows {options.transforms} layers of hidden "
        f"{list(options.hidden)}, {options.bins} bins, bound {options.bound:g}, {args.eval_particles} evaluation "
        f"draws, seeds {sorted({r['seed'] for r in results} | set(args.seeds))}, {torch.get_num_threads()} thread(s)"
    )
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, zuko {zuko.__version__}, "
          f"pyro-flowpack {pf.__version__}")
    print(settings, flush=True)
    names = list(dict.fromkeys([*(r["target"] for r in results), *args.targets]))
    for name in names:  # the references first, so that a missing one is made before the runs
        target = TARGETS[name]
        print(f"{name}: log Z = {target.log_z:.4f}" + (f" ± {target.log_z_se:.4f}" if target.log_z_se else "")
              + f" ({target.reference})", flush=True)

    def write_json() -> None:
        if not args.json:
            return
        guides = list(dict.fromkeys([*(r["guide"] for r in results), *args.guides]))
        payload = {
            "settings": {
                **comparable,
                "particles": budgets,
                "seeds": sorted({r["seed"] for r in results}),
                "threads": torch.get_num_threads(),
                "targets": {n: {"log_z": TARGETS[n].log_z, "log_z_se": TARGETS[n].log_z_se,
                                "reference": TARGETS[n].reference, "description": TARGETS[n].description}
                            for n in names},
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
            # seeds outermost, so that a stopped run has whole tables for its first seeds
            for seed in args.seeds:
                for particles in args.particles:
                    for name in args.targets:
                        for guide in args.guides:
                            if (name, guide, particles, seed) in done:
                                continue
                            r = run(TARGETS[name], guide, seed, args.steps, particles, args.lr,
                                    args.eval_particles, options)
                            results.append(r)
                            write_json()  # after every run, so that a stopped run keeps what it did
                            print(f"{name:>16} {guide:>22} {particles} p. seed {seed}: gap {r['gap']:.4f} ± "
                                  f"{r['elbo_se']:.4f}, IS error {r['is_error']:.4f}, {r['train_seconds']:.0f} s"
                                  + (f", {r['skipped']} steps skipped" if r["skipped"] else ""), flush=True)
        finally:
            Distribution.set_default_validate_args(saved)

    target_order, guide_order = ({n: i for i, n in enumerate(names)} for names in (TARGETS, GUIDES))
    results.sort(key=lambda r: (target_order[r["target"]], guide_order[r["guide"]], r["particles"], r["seed"]))
    write_json()
    shown = [r for r in results if r["guide"] in args.show] if args.show else results
    body = table_body(shown, budgets)
    print()
    print(markdown(header(budgets), body, text_columns=3))
    print()
    for line in goals(shown):
        print(line)
    if args.rst:
        text = rst(header(budgets), body, f"log Z - ELBO, importance-sampling error and diverged seeds by guide "
                                          f"({settings})")
        columns, goal_rows = goal_table(shown)
        if goal_rows:
            text += "\n" + rst(columns, goal_rows, "The goals: mean gap of each of our recipes against the best "
                                                    "peer's, by target and budget, and its diverged seeds")
        write_atomically(args.rst, lambda p: p.write_text(text))
    return results


if __name__ == "__main__":
    main()
