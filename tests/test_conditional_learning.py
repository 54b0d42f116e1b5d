r"""Conditional flows learn a conditional density, the first feature of every layer
included.

Data: :math:`x = A c + \sigma \epsilon` with :math:`c \sim N(0, I_C)`,
:math:`\epsilon \sim N(0, I_D)` and :math:`\sigma = 0.1`, so that
:math:`p(x \mid c) = N(A c, \sigma^2 I)` and the true conditional NLL (the conditional
entropy) is :math:`H(x \mid c) = D \cdot \tfrac12 \log(2\pi e \sigma^2)`. Every builder,
trained by maximum likelihood, must come within ``TOLERANCE`` nats of it on held-out
pairs. A flow for which the context never reaches feature :math:`i` (as MADE's first
feature did before hidden units of degree 0 carried it there) does no better than
:math:`H(x \mid c) + H(x_i) - H(x_i \mid c)`, and one that ignores the context entirely
no better than the marginal entropy :math:`H(x)`; both are more than 2 nats above
:math:`H(x \mid c)` here, so the tolerance separates them.

The per-pair NLL of the true density has standard deviation :math:`\sqrt{D/2}`, so the
held-out mean over ``TEST_PAIRS`` pairs is within about 0.007 nats of :math:`H(x \mid c)`:
the flow's own excess may be up to about 0.04 nats. The training recipe (3 layers of
hidden (32, 32), 400 Adam steps on 512 fresh pairs, learning rate 1e-2 with cosine decay)
was chosen on all ten cases with seeds 0, 1 and 2: the largest excess was 0.033 nats
(``NSF`` coupling, D = 2, seed 1), the affine flows' below 0.02.

With the MADE of before commit d7bce86 (no hidden units of degree 0), ``MAF``, ``IAF``
and ``NSF(autoregressive=True)`` fail on ``D1-C1`` at the marginal NLL (test NLL 1.415
against 1.424 marginal and -0.884 true), and the coupling builders refused one feature.
On ``D2-C2`` they pass even then: with alternating orders, the next layer carries the
context to the feature that comes first in one layer's order.
"""

from __future__ import annotations

import math

import pytest
import torch

import pyro_flowpack as pf

SIGMA = 0.1
TOLERANCE = 0.05  # nats, on the held-out mean NLL summed over features
TEST_PAIRS = 20000
STEPS, BATCH, LR = 400, 512, 1e-2
TRANSFORMS, HIDDEN, BINS = 3, (32, 32), 8

#: ``A`` of shape (D, C); every feature, the first one too, depends on the context. The
#: features stay well inside the splines' interval [-5, 5] (beyond it they are identity).
MATRICES = {
    "D2-C2": torch.tensor([[0.8, -0.5], [0.6, 0.9]]),
    "D1-C1": torch.tensor([[1.0]]),
}

BUILDERS = {
    "MAF": lambda d, c: pf.flows.MAF(d, context=c, transforms=TRANSFORMS, hidden=HIDDEN),
    "IAF": lambda d, c: pf.flows.IAF(d, context=c, transforms=TRANSFORMS, hidden=HIDDEN),
    "NSF": lambda d, c: pf.flows.NSF(d, context=c, transforms=TRANSFORMS, hidden=HIDDEN, bins=BINS),
    "NSF-autoregressive": lambda d, c: pf.flows.NSF(d, context=c, transforms=TRANSFORMS, hidden=HIDDEN, bins=BINS,
                                                    autoregressive=True),
    "RealNVP": lambda d, c: pf.flows.RealNVP(d, context=c, transforms=TRANSFORMS, hidden=HIDDEN),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def true_conditional_nll(features: int, sigma: float) -> float:
    r""":math:`H(x \mid c) = D \cdot \tfrac12 \log(2\pi e \sigma^2)`."""
    return features * 0.5 * math.log(2 * math.pi * math.e * sigma**2)


def marginal_nll(matrix: torch.Tensor, sigma: float) -> float:
    r""":math:`H(x) = \tfrac12 \log\det(2\pi e (A A^\top + \sigma^2 I))`, the best NLL of
    any density of :math:`x` alone."""
    a = matrix.double()
    covariance = a @ a.T + sigma**2 * torch.eye(a.shape[0], dtype=torch.float64)
    return 0.5 * float(torch.logdet(2 * math.pi * math.e * covariance))


def one_feature_blind_nll(matrix: torch.Tensor, sigma: float, feature: int) -> float:
    r"""The best NLL of a density :math:`q(x_i) q(x_{-i} \mid x_i, c)` in which the context
    does not reach feature :math:`i`: :math:`H(x \mid c) + H(x_i) - H(x_i \mid c)`, the
    features being independent given :math:`c`."""
    variance = float((matrix[feature].double() ** 2).sum()) + sigma**2
    return true_conditional_nll(matrix.shape[0], sigma) + 0.5 * math.log(variance / sigma**2)


def pairs(matrix: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.randn(n, matrix.shape[1], generator=generator)
    return c @ matrix.T + SIGMA * torch.randn(n, matrix.shape[0], generator=generator), c


def held_out(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return pairs(matrix, TEST_PAIRS, torch.Generator().manual_seed(12345))


@pytest.mark.parametrize("setting", list(MATRICES))
def test_true_nll_formula_matches_the_true_density_on_the_held_out_pairs_within_4_standard_errors(setting):
    matrix = MATRICES[setting]
    x, c = held_out(matrix)
    empirical = -torch.distributions.Normal(c @ matrix.T, SIGMA).log_prob(x).sum(-1).double().mean()
    standard_error = math.sqrt(matrix.shape[0] / 2 / TEST_PAIRS)
    assert abs(float(empirical) - true_conditional_nll(matrix.shape[0], SIGMA)) < 4 * standard_error


@pytest.mark.parametrize("setting", list(MATRICES))
def test_flows_blind_to_the_context_or_to_it_for_one_feature_miss_the_tolerance_by_over_2_nats(setting):
    matrix = MATRICES[setting]
    truth = true_conditional_nll(matrix.shape[0], SIGMA)
    assert marginal_nll(matrix, SIGMA) - truth > 2.0 + TOLERANCE
    for feature in range(matrix.shape[0]):
        assert one_feature_blind_nll(matrix, SIGMA, feature) - truth > 2.0 + TOLERANCE


@pytest.mark.parametrize("setting", list(MATRICES))
@pytest.mark.parametrize("name", list(BUILDERS))
def test_conditional_flow_reaches_the_true_conditional_nll_within_0_05_nats(name, setting):
    matrix = MATRICES[setting]
    features, context = matrix.shape
    torch.manual_seed(0)
    flow = BUILDERS[name](features, context)
    optimizer = torch.optim.Adam(flow.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        x, c = pairs(matrix, BATCH, generator)
        loss = -flow(c).log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()

    x, c = held_out(matrix)
    with torch.no_grad():
        test_nll = -float(flow(c).log_prob(x).double().mean())
    truth = true_conditional_nll(features, SIGMA)
    assert test_nll == pytest.approx(truth, abs=TOLERANCE), (
        f"{name} on {setting}: test NLL {test_nll:.4f}, true conditional NLL {truth:.4f}, "
        f"marginal NLL {marginal_nll(matrix, SIGMA):.4f}"
    )
