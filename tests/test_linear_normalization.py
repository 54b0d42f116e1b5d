r"""Layer-specific properties of the linear and normalisation layers.

The shared battery (round trips, autograd Jacobians, shapes) runs on every layer
elsewhere; these tests check what only these layers promise. Tolerances are stated in
the test names or next to the assertions; float64 unless said otherwise.
"""

import pytest
import torch
from torch.distributions import Independent, Normal, TransformedDistribution

from pyro_flowpack.transforms.linear import LULinear, Permute, Reverse
from pyro_flowpack.transforms.normalization import ActNorm, BatchNorm


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# Permute / Reverse -------------------------------------------------------------------


@pytest.mark.parametrize(
    "permutation, message",
    [
        ([0, 0, 1], r"permutation of 0\.\.2 .*got \[0, 0, 1\] \(missing \[2\]\)"),
        ([0, 3, 1], r"permutation of 0\.\.2 .*got \[0, 3, 1\] \(missing \[2\]\)"),
        ([-1, 0, 1], r"permutation of 0\.\.2 .*got \[-1, 0, 1\] \(missing \[2\]\)"),
        ([[0, 1], [1, 0]], r"1-D permutation of shape \(D,\), got shape \(2, 2\)"),
        ([], r"non-empty 1-D permutation of shape \(D,\), got shape \(0,\)"),
    ],
)
def test_permute_rejects_non_permutations_naming_expected_and_got(permutation, message):
    with pytest.raises(ValueError, match=message):
        Permute(torch.tensor(permutation, dtype=torch.long))


def test_permute_rejects_floating_indices():
    with pytest.raises(TypeError, match="integer permutation tensor, got dtype torch.float32"):
        Permute(torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("batch_shape", [(), (5,), (2, 3)])
def test_permute_moves_features_exactly_and_has_zero_ladj(batch_shape):
    t = Permute(torch.tensor([2, 0, 3, 1]))
    x = torch.randn(*batch_shape, 4, dtype=torch.float64)
    y, ladj = t.call_and_ladj(x)
    assert torch.equal(y, x[..., [2, 0, 3, 1]])
    assert torch.equal(ladj, torch.zeros(batch_shape, dtype=torch.float64))
    x_back, ladj_back = t.inverse_and_ladj(y.clone())
    assert torch.equal(x_back, x)
    assert torch.equal(ladj_back, torch.zeros(batch_shape, dtype=torch.float64))


def test_permute_keeps_permutation_and_inverse_in_state_dict():
    t = Permute(torch.tensor([1, 2, 0]))
    state = t.state_dict()
    assert torch.equal(state["permutation"], torch.tensor([1, 2, 0]))
    assert torch.equal(state["inverse_permutation"], torch.tensor([2, 0, 1]))
    other = Permute.random(3)
    other.load_state_dict(state)
    assert torch.equal(other(torch.arange(3.0)), torch.tensor([1.0, 2.0, 0.0]))


def test_permute_random_is_a_permutation_reproducible_from_its_generator():
    a = Permute.random(50, generator=torch.Generator().manual_seed(1))
    b = Permute.random(50, generator=torch.Generator().manual_seed(1))
    c = Permute.random(50, generator=torch.Generator().manual_seed(2))
    assert type(a) is Permute
    assert torch.equal(a.permutation.sort().values, torch.arange(50))
    assert torch.equal(a.permutation, b.permutation)
    assert not torch.equal(a.permutation, c.permutation)


def test_permute_random_rejects_non_positive_features():
    with pytest.raises(ValueError, match="int >= 1, got 0"):
        Permute.random(0)


def test_reverse_reverses_the_order():
    t = Reverse(4)
    assert isinstance(t, Permute)
    assert t.permutation.tolist() == [3, 2, 1, 0]
    assert torch.equal(t(torch.tensor([[1.0, 2.0, 3.0, 4.0]])), torch.tensor([[4.0, 3.0, 2.0, 1.0]]))


@pytest.mark.parametrize("features", [0, -1, 2.0, True])
def test_reverse_rejects_non_positive_int_features(features):
    with pytest.raises(ValueError, match="Reverse: features must be an int >= 1"):
        Reverse(features)


# LULinear ----------------------------------------------------------------------------


def perturbed_lu_linear(features: int) -> LULinear:
    """An LULinear moved away from its orthogonal start, in float64."""
    t = LULinear(features).double()
    with torch.no_grad():
        t.lu.add_(0.3 * torch.randn_like(t.lu))
        t.log_diag.add_(0.5 * torch.randn_like(t.log_diag))
        t.bias.add_(torch.randn_like(t.bias))
    return t


@pytest.mark.parametrize("features", [1, 2, 7])
def test_lu_linear_ladj_equals_slogdet_of_weight_to_1e_10(features):
    t = perturbed_lu_linear(features)
    sign, logabsdet = torch.linalg.slogdet(t.weight)
    x = torch.randn(4, features, dtype=torch.float64)
    _, ladj = t.call_and_ladj(x)
    _, ladj_inv = t.inverse_and_ladj(x)
    assert torch.allclose(ladj, logabsdet.expand(4), atol=1e-10, rtol=0)
    assert torch.allclose(ladj_inv, logabsdet.expand(4), atol=1e-10, rtol=0)


def test_lu_linear_weight_is_p_l_u_with_unit_lower_and_positive_upper_diagonal():
    t = perturbed_lu_linear(5)
    lower, upper = t._factors()
    assert torch.equal(torch.diagonal(lower), torch.ones(5, dtype=torch.float64))
    assert torch.equal(lower, torch.tril(lower)) and torch.equal(upper, torch.triu(upper))
    assert (torch.diagonal(upper) > 0).all()
    p = torch.eye(5, dtype=torch.float64)[t.permutation]
    assert torch.allclose(t.weight, p @ lower @ upper, atol=1e-12, rtol=0)


def test_lu_linear_starts_as_a_rotation_to_1e_6():
    t = LULinear(16)  # float32
    w = t.weight.detach()
    assert torch.allclose(w @ w.T, torch.eye(16), atol=1e-6)
    assert torch.equal(t.bias.detach(), torch.zeros(16))
    assert t.call_and_ladj(torch.randn(3, 16))[1].abs().max() < 1e-5


@pytest.mark.parametrize("batch_shape", [(), (5,), (2, 3), (0,)])
def test_lu_linear_is_affine_and_its_inverse_solves_the_system_to_1e_10(batch_shape):
    t = perturbed_lu_linear(6)
    x = torch.randn(*batch_shape, 6, dtype=torch.float64)
    y, _ = t.call_and_ladj(x)
    assert torch.allclose(y, x @ t.weight.T + t.bias, atol=1e-10, rtol=0)
    # a fresh tensor, so the inverse is computed, not read from the cache
    x_back, _ = t.inverse_and_ladj(y.clone())
    assert x_back.shape == x.shape
    assert torch.allclose(x_back, x, atol=1e-10, rtol=0)


def test_lu_linear_float32_round_trip_to_1e_5():
    t = LULinear(8)
    with torch.no_grad():
        t.lu.add_(0.1 * torch.randn_like(t.lu))
    x = torch.randn(10, 8)
    y = t(x)
    assert y.dtype == torch.float32
    assert torch.allclose(t.inverse_and_ladj(y.clone())[0], x, atol=1e-5)


# ActNorm -----------------------------------------------------------------------------


def test_actnorm_standardises_its_first_batch_to_1e_5():
    t = ActNorm(4).double()
    y = 3.0 + 2.0 * torch.randn(256, 4, dtype=torch.float64) * torch.arange(1.0, 5.0, dtype=torch.float64)
    x, ladj = t.inverse_and_ladj(y)
    assert bool(t.initialized)
    assert torch.allclose(x.mean(dim=0), torch.zeros(4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.std(dim=0, correction=0), torch.ones(4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(ladj, t.log_scale.sum().expand(256))


def test_actnorm_is_per_channel_on_images_to_1e_5():
    t = ActNorm((3, 4, 5)).double()
    scale = torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64).view(3, 1, 1)
    y = torch.tensor([-2.0, 0.0, 7.0], dtype=torch.float64).view(3, 1, 1) + scale * torch.randn(
        2, 8, 3, 4, 5, dtype=torch.float64
    )
    x, ladj = t.inverse_and_ladj(y)
    assert t.loc.shape == t.log_scale.shape == (3, 1, 1)
    zeros, ones = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert torch.allclose(x.mean(dim=(0, 1, 3, 4)), zeros, atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 1, 3, 4), correction=0), ones, atol=1e-5)
    # one log-scale per channel, counted at each of the H W = 20 positions
    assert ladj.shape == (2, 8)
    assert torch.allclose(ladj, 20 * t.log_scale.sum().expand(2, 8), atol=1e-12, rtol=0)


def test_actnorm_initialises_only_once():
    t = ActNorm(3)
    t.inverse_and_ladj(5.0 + torch.randn(64, 3))
    loc, log_scale = t.loc.detach().clone(), t.log_scale.detach().clone()
    t.inverse_and_ladj(-5.0 + 3.0 * torch.randn(64, 3))
    assert torch.equal(t.loc, loc) and torch.equal(t.log_scale, log_scale)


def test_actnorm_does_not_initialise_in_eval_mode_or_forward_direction():
    t = ActNorm(3)
    t.call_and_ladj(5.0 + torch.randn(64, 3))
    assert not bool(t.initialized)
    t.eval()
    x, ladj = t.inverse_and_ladj(5.0 + torch.randn(64, 3))
    assert not bool(t.initialized)
    assert torch.equal(t.loc, torch.zeros(3)) and torch.equal(ladj, torch.zeros(64))


def test_actnorm_state_dict_keeps_initialized_and_loaded_layer_does_not_reinitialise():
    t = ActNorm((2, 3, 3))
    t.inverse_and_ladj(4.0 + 2.0 * torch.randn(16, 2, 3, 3))
    state = t.state_dict()
    assert set(state) == {"loc", "log_scale", "initialized"}
    assert state["initialized"].dtype == torch.bool and bool(state["initialized"])

    loaded = ActNorm((2, 3, 3))
    loaded.load_state_dict(state)
    assert bool(loaded.initialized)
    loaded.inverse_and_ladj(-3.0 + 0.5 * torch.randn(16, 2, 3, 3))  # training mode
    assert torch.equal(loaded.loc, t.loc) and torch.equal(loaded.log_scale, t.log_scale)


def test_actnorm_init_gradients_flow_from_the_new_parameters():
    t = ActNorm(3)
    x, ladj = t.inverse_and_ladj(2.0 + torch.randn(32, 3))
    (x.square().sum() + ladj.sum()).backward()
    assert t.loc.grad is not None and t.log_scale.grad is not None


# BatchNorm ---------------------------------------------------------------------------


def test_batchnorm_train_standardises_the_batch_to_1e_5_and_updates_running_stats():
    t = BatchNorm(3, momentum=0.1).double()
    # scales >= 1.5, so that eps = 1e-5 moves the std by less than 1e-5
    y = torch.tensor([1.0, -2.0, 5.0], dtype=torch.float64) + torch.tensor(
        [1.5, 2.0, 3.0], dtype=torch.float64
    ) * torch.randn(4, 100, 3, dtype=torch.float64)
    x, ladj = t.inverse_and_ladj(y)
    zeros, ones = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert torch.allclose(x.mean(dim=(0, 1)), zeros, atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 1), correction=0), ones, atol=1e-5)

    rows = y.reshape(-1, 3)
    assert torch.allclose(t.running_mean, 0.1 * rows.mean(dim=0), atol=1e-12, rtol=0)
    assert torch.allclose(t.running_var, 0.9 + 0.1 * rows.var(dim=0), atol=1e-12, rtol=0)
    expected = (0.5 * torch.log(rows.var(dim=0, correction=0) + 1e-5)).sum()
    assert ladj.shape == (4, 100)
    assert torch.allclose(ladj, expected.expand(4, 100), atol=1e-10, rtol=0)


def test_batchnorm_train_log_prob_in_plain_torch_distribution_uses_batch_stats_to_1e_10():
    t = BatchNorm(2).double()
    base = Independent(Normal(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)), 1)
    y = 3.0 + 2.0 * torch.randn(64, 2, dtype=torch.float64)
    log_prob = TransformedDistribution(base, [t]).log_prob(y)
    # the reference on a twin layer, so the running statistics start from the same state
    twin = BatchNorm(2).double()
    x, ladj = twin.inverse_and_ladj(y)
    assert torch.allclose(log_prob, base.log_prob(x) - ladj, atol=1e-10, rtol=0)


def test_batchnorm_forward_uses_running_stats_even_in_training():
    t = BatchNorm(3).double()
    t.inverse_and_ladj(2.0 + torch.randn(50, 3, dtype=torch.float64))
    running = (t.running_mean.clone(), t.running_var.clone())
    x = torch.randn(10, 3, dtype=torch.float64)
    y_train, ladj_train = t.call_and_ladj(x)
    assert torch.equal(t.running_mean, running[0]) and torch.equal(t.running_var, running[1])
    t.eval()
    y_eval, ladj_eval = t.call_and_ladj(x)
    assert torch.equal(y_train, y_eval) and torch.equal(ladj_train, ladj_eval)


def test_batchnorm_eval_is_deterministic_and_invertible_to_1e_6():
    t = BatchNorm(4).double()
    for _ in range(3):
        t.inverse_and_ladj(1.0 + 3.0 * torch.randn(32, 4, dtype=torch.float64))
    with torch.no_grad():
        t.log_gamma.add_(0.3 * torch.randn(4, dtype=torch.float64))
        t.beta.add_(torch.randn(4, dtype=torch.float64))
    t.eval()
    running = (t.running_mean.clone(), t.running_var.clone())
    y = 1.0 + 3.0 * torch.randn(7, 4, dtype=torch.float64)
    x1, ladj1 = t.inverse_and_ladj(y)
    x2, ladj2 = t.inverse_and_ladj(y.clone())
    assert torch.equal(x1, x2) and torch.equal(ladj1, ladj2)
    assert torch.equal(t.running_mean, running[0]) and torch.equal(t.running_var, running[1])
    # a single element is fine in eval mode
    assert t.inverse_and_ladj(y[0])[0].shape == (4,)
    y_back, ladj_fwd = t.call_and_ladj(x1.clone())
    assert torch.allclose(y_back, y, atol=1e-6, rtol=0)
    assert torch.allclose(ladj_fwd, ladj1, atol=1e-6, rtol=0)
    expected = (0.5 * torch.log(running[1] + 1e-5) - t.log_gamma).sum()
    assert torch.allclose(ladj1, expected.expand(7), atol=1e-12, rtol=0)


def test_batchnorm_train_inverse_needs_two_elements():
    t = BatchNorm(3)
    with pytest.raises(ValueError, match="at least 2 elements.*got input of shape \\(1, 3\\)"):
        t.inverse_and_ladj(torch.randn(1, 3))
