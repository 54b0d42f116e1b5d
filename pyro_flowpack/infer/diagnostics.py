r"""How far to trust a guide: the ELBO, importance sampling and the Pareto :math:`\hat k`.

For a model :math:`p(x, z)` and a guide :math:`q(z)`, the log importance weights of
:math:`S` draws :math:`z_s \sim q` are :math:`\log w_s = \log p(x, z_s) - \log q(z_s)`.
From them

.. math::
    \mathrm{ELBO} = \frac1S \sum_s \log w_s, \qquad
    \log \hat Z = \log \frac1S \sum_s w_s ,

the second an importance-sampling estimate of the evidence :math:`\log p(x)` (a lower
bound in expectation, consistent as :math:`S \to \infty`), whose standard error is
:math:`\mathrm{sd}(w) / (\sqrt S \, \bar w)` by the delta method; the gap
:math:`\log \hat Z - \mathrm{ELBO}` estimates :math:`\mathrm{KL}(q \,\|\, p(\cdot \mid x))`.
The effective sample size is Kish's :math:`(\sum_s w_s)^2 / \sum_s w_s^2`.

The Pareto :math:`\hat k` of Yao et al. (2018) fits a generalized Pareto distribution to
the largest weights (those above the :math:`\min(0.2 S, 3\sqrt S)`-th largest), exactly as
Pyro's :func:`~pyro.infer.importance.psis_diagnostic` does, with
:func:`pyro.ops.stats.fit_generalized_pareto`. It estimates how heavy the tail of the
weights is, that is, how much posterior mass the guide misses:

- :math:`\hat k < 0.5`: the weights have a finite variance; the guide is a good
  approximation and importance-sampled estimates converge quickly;
- :math:`0.5 \le \hat k \le 0.7`: usable with care; importance sampling still works,
  slowly (more particles);
- :math:`\hat k > 0.7`: do not trust the guide; it misses mass the posterior has (a mode,
  a tail), and neither its ELBO nor importance sampling with it is reliable.

:math:`\hat k` itself needs many draws (a few thousand) to be stable. It measures the
*shape* of the tail, not its weight: a guide so close that the weights barely vary (an
effective sample size near :math:`S`) can still show :math:`\hat k > 0.7` when its tails
are lighter than the posterior's, and the verdict then says so. And it cannot see mass
that no draw reaches: a guide that sits on one of two separated modes has constant
weights, a low :math:`\hat k`, and a :math:`\log \hat Z` too small by :math:`\log 2`.

References:
    | Yes, but Did It Work?: Evaluating Variational Inference (Yao, Vehtari, Simpson and
      Gelman, 2018) https://arxiv.org/abs/1802.02538
    | Pareto Smoothed Importance Sampling (Vehtari, Simpson, Gelman, Yao and Gabry, 2015)
      https://arxiv.org/abs/1507.02646
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import pyro.poutine as poutine
import torch
from pyro.infer.importance import vectorized_importance_weights
from pyro.ops.stats import fit_generalized_pareto
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from ..checks import check_int

__all__ = ["Diagnostics", "diagnose", "pareto_khat"]

#: The :math:`\hat k` thresholds of Yao et al.: below the first the guide is good, above
#: the second it is not to be trusted.
KHAT_GOOD, KHAT_BAD = 0.5, 0.7
#: The share of effective draws above which a heavy tail (high :math:`\hat k`) is said to
#: carry little mass.
ESS_STEADY = 0.9


@dataclass(frozen=True)
class Diagnostics:
    r"""The result of :func:`diagnose`; ``str()`` of it is a two-line report with a verdict.

    Attributes:
        elbo: The ELBO estimate :math:`\frac1S \sum_s \log w_s`.
        elbo_se: Its standard error, :math:`\mathrm{sd}(\log w) / \sqrt S`.
        log_z: The importance-sampled :math:`\log \hat Z`.
        log_z_se: Its standard error (delta method).
        khat: The Pareto :math:`\hat k` (``inf`` when too few draws reach the tail,
            ``-inf`` when all the weights are equal).
        ess: Kish's effective sample size of the weights.
        num_particles: The number of draws :math:`S`.
    """

    elbo: float
    elbo_se: float
    log_z: float
    log_z_se: float
    khat: float
    ess: float
    num_particles: int

    @property
    def gap(self) -> float:
        r""":math:`\log \hat Z - \mathrm{ELBO}`, an estimate of :math:`\mathrm{KL}(q \,\|\, p(\cdot \mid x))`."""
        return self.log_z - self.elbo

    @property
    def verdict(self) -> str:
        r"""One sentence on the guide, from :math:`\hat k`."""
        if math.isnan(self.khat) or self.khat == math.inf:
            return "k-hat undefined: too few draws reached the tail of the weights; increase num_particles"
        if self.khat < KHAT_GOOD:
            return (f"k-hat {self.khat:.2f} < {KHAT_GOOD}: good; importance sampling with this guide is reliable, "
                    f"and the gap estimates its KL from the posterior")
        if self.khat <= KHAT_BAD:
            return (f"k-hat {self.khat:.2f} in [{KHAT_GOOD}, {KHAT_BAD}]: usable with care; importance sampling "
                    "converges slowly, use many particles")
        verdict = (f"k-hat {self.khat:.2f} > {KHAT_BAD}: do not trust the guide; it misses posterior mass (a mode "
                   "or a tail), and its ELBO and importance-sampled estimates are unreliable")
        share = self.ess / self.num_particles
        if share >= ESS_STEADY:
            verdict += (f" (though the weights barely vary, ESS {100 * share:.0f}%: the tail is heavy but light in "
                        "mass, and the estimates are close at this number of draws)")
        return verdict

    def as_dict(self) -> dict[str, Any]:
        """The fields, the gap and the verdict, for JSON."""
        return {**asdict(self), "gap": self.gap, "verdict": self.verdict}

    def __str__(self) -> str:
        return (f"ELBO {self.elbo:.4f} ± {self.elbo_se:.4f}   log Z (IS) {self.log_z:.4f} ± {self.log_z_se:.4f}   "
                f"gap {self.gap:.4f}   k-hat {self.khat:.2f}   ESS {self.ess:.0f} of {self.num_particles}\n"
                f"{self.verdict}")


def pareto_khat(log_weights: Tensor) -> float:
    r"""The Pareto :math:`\hat k` of log importance weights, computed as Pyro's
    :func:`~pyro.infer.importance.psis_diagnostic` does: a generalized Pareto fit
    (:func:`pyro.ops.stats.fit_generalized_pareto`) to the weights above the
    :math:`\lceil\min(0.2 S, 3 \sqrt S)\rceil + 1`-th largest, shifted by it; ``inf``
    with a warning when fewer than 10 weights are in that tail, and ``-inf`` when all the
    weights are equal (bounded: no tail at all; Pyro returns ``inf`` there).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> pareto_khat(0.1 * torch.randn(4000)) < 0.5  # log-normal weights of small spread
        True
        >>> pareto_khat(3.0 * torch.randn(4000)) > 0.7  # a heavy tail
        True
    """
    if not isinstance(log_weights, Tensor) or log_weights.dim() != 1:
        raise ValueError(f"pareto_khat expects a 1-D tensor of log-weights, got "
                         f"{tuple(log_weights.shape) if isinstance(log_weights, Tensor) else type(log_weights).__name__}")
    count = log_weights.numel()
    if bool(log_weights.max() == log_weights.min()):
        return float("-inf")
    log_weights = torch.sort(log_weights.double() - log_weights.max(), descending=False)[0]
    cutoff_index = -int(math.ceil(min(0.2 * count, 3.0 * math.sqrt(count)))) - 1
    if -cutoff_index > count:
        cutoff_index = -count
    lw_cutoff = max(math.log(1.0e-15), float(log_weights[cutoff_index]))
    tail = log_weights[log_weights > lw_cutoff]
    if len(tail) < 10:
        warnings.warn("pareto_khat: not enough tail samples to compute k-hat; increase num_particles",
                      RuntimeWarning, stacklevel=2)
        return float("inf")
    khat, _ = fit_generalized_pareto(tail.exp() - math.exp(lw_cutoff))
    return float(khat)


def _guess_max_plate_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """The number of nested plates of one run of the guide and of the model replayed on it."""
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    dims = [frame.dim for trace in (prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace))
            for site in trace.nodes.values() if site["type"] == "sample"
            for frame in site["cond_indep_stack"] if frame.vectorized]
    return -min(dims) if dims else 0


@torch.no_grad()
def diagnose(model: Callable, guide: Callable, *args: Any, num_particles: int = 1000,
             max_plate_nesting: int | None = None, **kwargs: Any) -> Diagnostics:
    r"""Diagnoses a guide from ``num_particles`` vectorised draws: the ELBO, the
    importance-sampled :math:`\log Z`, the Pareto :math:`\hat k` and the effective sample
    size (see the module docstring for how to read them). Any Pyro guide works, mixtures
    included (its log-density is the mixture's); model and guide need a static structure.

    Arguments:
        model: The Pyro model.
        guide: A Pyro guide of that model.
        args: The arguments of the model and the guide (the data).
        num_particles: The number of draws :math:`S` (at least 2; a few thousand for a
            stable :math:`\hat k`).
        max_plate_nesting: The number of nested plates of the model (guessed by one run of
            model and guide if not given).
        kwargs: Keyword arguments of the model and the guide.

    Returns:
        A :class:`Diagnostics`.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> d = diagnose(model, AutoNormal(model, init_scale=1.0), num_particles=500)
        >>> round(d.log_z, 6), d.ess, d.khat  # the guide is the posterior: every weight is 1
        (0.0, 500.0, -inf)
    """
    if not callable(model) or not callable(guide):
        raise TypeError(f"diagnose(model, guide, *args, num_particles=..., **kwargs) expects a model and a guide "
                        f"(callables), got {type(model).__name__} and {type(guide).__name__}")
    num_particles = check_int(num_particles, "diagnose: num_particles", minimum=2)
    if max_plate_nesting is None:
        max_plate_nesting = _guess_max_plate_nesting(model, guide, args, kwargs)
    else:
        max_plate_nesting = check_int(max_plate_nesting, "diagnose: max_plate_nesting", minimum=0)
    log_w, _, _ = vectorized_importance_weights(model, guide, *args, num_samples=num_particles,
                                                max_plate_nesting=max_plate_nesting, **kwargs)
    log_w = log_w.double().reshape(-1)
    if log_w.numel() != num_particles:
        raise ValueError(f"diagnose: expected {num_particles} log-weights, got shape {tuple(log_w.shape)}; "
                         "are model and guide vectorisable (static structure, plates declared)?")
    if torch.isnan(log_w).any() or torch.isposinf(log_w).any():
        raise ValueError("diagnose: some log importance weights are NaN or +inf; the model's or the guide's "
                         "log-density is not finite at the guide's draws")
    weights = torch.exp(log_w - log_w.max())
    mean = weights.mean()
    return Diagnostics(
        elbo=float(log_w.mean()),
        elbo_se=float(log_w.std()) / math.sqrt(num_particles),
        log_z=float(torch.logsumexp(log_w, 0)) - math.log(num_particles),
        log_z_se=float(weights.std() / (mean * math.sqrt(num_particles))),
        khat=pareto_khat(log_w),
        ess=float(weights.sum() ** 2 / (weights**2).sum()),
        num_particles=num_particles,
    )
