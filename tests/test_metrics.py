r"""Evaluation metrics: bits per dimension and the importance-weighted log-likelihood.

The importance-weighted estimate is checked on a dequantized model whose discrete
likelihood is known in closed form: ``D`` independent pixels ``x`` in ``{0..K-1}``, each
modelled by the density ``p(y) = 2 y`` on ``[0, 1)`` of ``y = (x + u) / K``, with
``u ~ U[0, 1)``. Then ``P(x) = (2 x + 1) / K^2`` and the expected one-sample bound is
``log 2 - 2 log K + (x + 1) log(x + 1) - x log x - 1``, per pixel.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Size, Tensor
from torch.distributions import Distribution

import pyro_flowpack as pf
from pyro_flowpack.infer import bits_per_dim, iw_log_prob
from pyro_flowpack.transforms import AffineCoupling

K = 8
PIXELS = torch.tensor([0.0, 3.0, 7.0], dtype=torch.float64)


class UniformlyDequantizedLinearDensity(Distribution):
    """The stand-in dequantized model: each ``log_prob`` call draws fresh noise ``u``."""

    arg_constraints = {}

    def __init__(self, pixels: int, bins: int = K) -> None:
        super().__init__(Size(), Size((pixels,)), validate_args=False)
        self.bins = bins
        self.calls: list[Size] = []

    def log_prob(self, x: Tensor) -> Tensor:
        self.calls.append(x.shape)
        y = (x + torch.rand(x.shape, dtype=x.dtype)) / self.bins
        return (math.log(2) + torch.log(y) - math.log(self.bins)).sum(-1)

    @staticmethod
    def exact_log_prob(x: Tensor) -> Tensor:
        return torch.log((2 * x + 1) / K**2).sum(-1)

    @staticmethod
    def expected_bound(x: Tensor) -> Tensor:
        return (math.log(2) - 2 * math.log(K) + torch.xlogy(x + 1, x + 1) - torch.xlogy(x, x) - 1).sum(-1)


def _data(replicas: int) -> Tensor:
    return PIXELS.expand(replicas, len(PIXELS))


# bits_per_dim --------------------------------------------------------------------------------
@pytest.mark.parametrize("event_shape", [3072, (3, 32, 32), Size((3, 32, 32)), [3072]], ids=repr)
def test_bits_per_dim_of_minus_d_ln2_is_one(event_shape):
    log_prob = torch.tensor([-3072 * math.log(2), -8 * 3072 * math.log(2)], dtype=torch.float64)
    expected = torch.tensor([1.0, 8.0], dtype=torch.float64)
    assert torch.allclose(bits_per_dim(log_prob, event_shape), expected, rtol=0, atol=1e-12)


def test_bits_per_dim_keeps_the_batch_shape_and_gradient():
    log_prob = torch.randn(4, 5, requires_grad=True)
    bpd = bits_per_dim(log_prob, (1, 2, 2))
    assert bpd.shape == (4, 5)
    bpd.sum().backward()
    assert torch.allclose(log_prob.grad, torch.full((4, 5), -1 / (4 * math.log(2))))


@pytest.mark.parametrize("event_shape", [0, -3, (3, 0, 2), 2.5, (2.0, 3), True])
def test_bits_per_dim_rejects_non_positive_or_non_integer_shapes(event_shape):
    with pytest.raises(ValueError, match="bits_per_dim: event_shape .*must be an int >= 1"):
        bits_per_dim(torch.zeros(2), event_shape)


# iw_log_prob ----------------------------------------------------------------------------------
def test_iw_with_k1_is_one_call_of_log_prob_for_a_fixed_seed():
    d = UniformlyDequantizedLinearDensity(3)
    x = _data(10)
    torch.manual_seed(1)
    expected = d.log_prob(x)
    torch.manual_seed(1)
    assert torch.equal(iw_log_prob(d, x, k=1), expected)


def test_iw_with_k1_has_the_expected_one_sample_bound_within_0_03():
    d = UniformlyDequantizedLinearDensity(3)
    x = _data(20000)  # standard error of the mean below 0.008
    estimate = iw_log_prob(d, x, k=1).mean()
    assert abs(estimate - d.expected_bound(PIXELS)) < 0.03


def test_iw_is_above_the_mean_one_sample_bound_and_below_the_exact_value_on_average():
    d = UniformlyDequantizedLinearDensity(3)
    x = _data(2000)
    bound = d.log_prob(x).mean()
    iw = iw_log_prob(d, x, k=10).mean()
    exact = d.exact_log_prob(PIXELS)
    assert bound < iw < exact
    assert iw - bound > 0.2  # the gap of the bound is about 0.31 nats, mostly closed at k = 10


def test_iw_approaches_the_exact_log_likelihood_as_k_grows_within_0_01_at_k1000():
    d = UniformlyDequantizedLinearDensity(3)
    x = _data(2000)
    exact = d.exact_log_prob(PIXELS)
    gaps = [(exact - iw_log_prob(d, x, k=k, chunk=100).mean()).item() for k in (1, 10, 100)]
    # the bias (about 0.3, 0.02, 0.002 nats) shrinks faster than the noise of the mean (0.001 at k = 100)
    assert gaps[0] > gaps[1] > abs(gaps[2]) and gaps[1] > 0, gaps
    assert abs(exact - iw_log_prob(d, x, k=1000, chunk=100).mean()) < 0.01


@pytest.mark.parametrize("chunk", [1, 3, 10, 50])
def test_chunking_gives_the_same_estimate_for_a_fixed_seed_within_1e12(chunk):
    d = UniformlyDequantizedLinearDensity(3)
    x = _data(6)
    torch.manual_seed(2)
    expected = iw_log_prob(d, x, k=10)
    torch.manual_seed(2)
    assert torch.allclose(iw_log_prob(d, x, k=10, chunk=chunk), expected, rtol=0, atol=1e-12)


def test_samples_are_evaluated_in_batched_calls_of_at_most_chunk_samples():
    d = UniformlyDequantizedLinearDensity(3)
    x = _data(6).reshape(2, 3, 3)
    assert iw_log_prob(d, x, k=7).shape == (2, 3)
    assert d.calls == [(7, 2, 3, 3)]
    d.calls.clear()
    iw_log_prob(d, x, k=7, chunk=3)
    assert d.calls == [(3, 2, 3, 3), (3, 2, 3, 3), (1, 2, 3, 3)]


def test_iw_of_a_deterministic_flow_is_its_log_prob_within_1e10():
    flow = pf.Flow([AffineCoupling(2)]).to(torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    estimate = iw_log_prob(flow(), x, k=5, chunk=2)
    assert torch.allclose(estimate, flow().log_prob(x), rtol=0, atol=1e-10)
    estimate.sum().backward()
    assert all(p.grad is not None for p in flow.parameters())


@pytest.mark.parametrize("k, chunk", [(0, None), (-2, None), (1.5, None), (True, None), (4, 0), (4, 2.0)])
def test_iw_rejects_non_positive_k_or_chunk(k, chunk):
    with pytest.raises(ValueError, match=r"iw_log_prob: (k|chunk).* must be an int >= 1"):
        iw_log_prob(UniformlyDequantizedLinearDensity(3), _data(2), k, chunk)
