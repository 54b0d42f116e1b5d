r"""Properties of the image pre-processing and reshaping layers: Logit, Scale, Squeeze.

The shared battery (``cases.py``) works on vector events of ``FEATURES`` elements; these
layers act on image events, so the same properties are checked here on small image
shapes: round trips, log-determinants against autograd Jacobians, batch shapes inside
torch's, Pyro's and pyro-flowpack's distributions, plus what each layer alone promises.
Tolerances are stated in the test names or next to the assertions; float64 unless said
otherwise.
"""

from __future__ import annotations

import math

import pyro.distributions as pdist
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Distribution, Independent, Normal, TransformedDistribution

import pyro_flowpack as pf
from pyro_flowpack.transforms import Compose, Inverse
from pyro_flowpack.transforms.elementwise import Logit, Scale
from pyro_flowpack.transforms.reshape import Squeeze

LAYERS = {
    "Logit": lambda: Logit((1, 4, 4)),
    "Logit-alpha0": lambda: Logit((2, 2, 2), alpha=0.0),
    "Logit-vector": lambda: Logit(5, alpha=0.1),
    "Scale": lambda: Scale((2, 2, 2), -0.5),
    "Scale-pixels": lambda: Scale((1, 4, 4), 1 / 256),
    "Squeeze": lambda: Squeeze((1, 4, 4)),
    "Squeeze-channels": lambda: Squeeze((2, 2, 2)),
    "Inverse-Squeeze": lambda: Inverse(Squeeze((1, 4, 4))),
    "Compose-Squeeze-Logit": lambda: Compose(Squeeze((1, 4, 4)), Logit((1, 4, 4))),
}


@pytest.fixture(params=list(LAYERS), ids=list(LAYERS))
def layer(request):
    return LAYERS[request.param]()


@pytest.fixture
def validation():
    """Restores torch's distribution-validation setting after a test changes it."""
    setting = Distribution._validate_args
    yield
    Distribution.set_default_validate_args(setting)


def _base(layer, dtype=torch.float64):
    shape = layer.event_shape
    return Independent(Normal(torch.zeros(shape, dtype=dtype), torch.ones(shape, dtype=dtype)), len(shape))


# Properties shared by every layer ----------------------------------------------------------
def test_round_trip_float64_within_1e8(layer):
    x = 3 * torch.randn(64, *layer.event_shape, dtype=torch.float64)
    y, ladj = layer.call_and_ladj(x)
    assert y.shape == (64, *layer.output_shape)
    x2, ladj2 = layer.inverse_and_ladj(y.clone())  # a clone: no cache, a real inverse
    assert torch.allclose(x2, x, rtol=0, atol=1e-8)
    assert torch.allclose(ladj2, ladj, rtol=0, atol=1e-8)
    y2, _ = layer.call_and_ladj(x2.clone())
    assert torch.allclose(y2, y, rtol=0, atol=1e-8)


def test_round_trip_float32_within_1e4_up_to_4(layer):
    # Logit is ill-conditioned where the sigmoid saturates: a float32 y near 1 carries
    # about 1e-7 / sigma'(x) of x, so 1e-4 holds up to |x| = 6 (2e-3 at |x| = 10)
    x = torch.linspace(-4, 4, 64 * layer.event_shape.numel()).reshape(64, *layer.event_shape)
    x = x.flatten(1)[:, torch.randperm(layer.event_shape.numel())].reshape_as(x)
    y, _ = layer.to(torch.float32).call_and_ladj(x)
    x2, _ = layer.inverse_and_ladj(y.clone())
    assert torch.allclose(x2, x, rtol=0, atol=1e-4)


def test_ladj_equals_autograd_jacobian_float64_within_1e6(layer):
    shape = layer.event_shape
    for _ in range(4):
        x = 2 * torch.randn(shape, dtype=torch.float64)
        flat = lambda v: layer.call_and_ladj(v.reshape(shape))[0].flatten()  # noqa: E731
        jac = torch.autograd.functional.jacobian(flat, x.flatten())
        expected = torch.linalg.slogdet(jac)[1]
        y, ladj = layer.call_and_ladj(x)
        _, ladj_inverse = layer.inverse_and_ladj(y.clone())
        ladj_torch = layer.log_abs_det_jacobian(x, y)
        for value in (ladj, ladj_inverse, ladj_torch):
            assert value.shape == ()
            assert torch.allclose(value, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch", [(), (3,), (3, 4)], ids=str)
def test_batch_shapes_in_torch_pyro_and_flowpack_distributions(layer, batch):
    x = torch.randn(*batch, *layer.event_shape, dtype=torch.float64)
    y, ladj = layer.call_and_ladj(x)
    assert y.shape == batch + layer.output_shape and ladj.shape == batch
    x2, ladj2 = layer.inverse_and_ladj(y)
    assert x2.shape == x.shape and ladj2.shape == batch
    y = y.clone()
    expected = _base(layer).log_prob(layer.inv(y)) - ladj
    for d in (
        TransformedDistribution(_base(layer), [layer]),
        pdist.TransformedDistribution(_base(layer), [layer]),
        pf.Flow([layer]).to(torch.float64)(),
    ):
        assert d.event_shape == layer.output_shape
        log_p = d.log_prob(y)
        assert log_p.shape == batch
        assert torch.allclose(log_p, expected, rtol=0, atol=1e-10)
        for sample_shape in [(), (2,), (2, 3)]:
            assert d.sample(sample_shape).shape == sample_shape + layer.output_shape


def test_samples_are_scored_like_rsample_and_log_prob_under_validation_within_1e8(layer, validation):
    Distribution.set_default_validate_args(True)
    d = pf.Flow([layer]).to(torch.float64)()
    y, log_p = d.rsample_and_log_prob((64,))
    assert torch.allclose(d.log_prob(y.clone()), log_p, rtol=0, atol=1e-8)


# Logit -----------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.3])
def test_logit_inverse_is_logit_of_the_squeezed_pixels_within_1e12(alpha):
    y = torch.rand(8, 3, 4, 4, dtype=torch.float64)
    x, ladj = Logit((3, 4, 4), alpha).inverse_and_ladj(y)
    p = alpha + (1 - 2 * alpha) * y
    assert torch.allclose(x, torch.logit(p), rtol=0, atol=1e-12)
    expected = torch.log(p * (1 - p) / (1 - 2 * alpha)).sum(dim=(-3, -2, -1))
    assert torch.allclose(ladj, expected, rtol=0, atol=1e-12)


def test_logit_ladj_is_finite_and_exact_where_the_sigmoid_saturates():
    layer = Logit(4, alpha=0.05)
    x = torch.tensor([-60.0, -30.0, 30.0, 60.0], dtype=torch.float64)
    _, ladj = layer.call_and_ladj(x)
    # log sigma(x) + log sigma(-x) = -|x| - 2 log(1 + exp(-|x|)) -> -|x|
    expected = (-x.abs() - math.log(0.9)).sum()
    assert torch.isfinite(ladj) and torch.allclose(ladj, expected, rtol=0, atol=1e-10)


def test_logit_maps_zero_and_one_to_finite_values_with_positive_alpha():
    x = Logit(2, alpha=0.05).inv(torch.tensor([0.0, 1.0]))
    assert torch.allclose(x, torch.tensor([math.log(0.05 / 0.95), math.log(0.95 / 0.05)]), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "values, got",
    [([0.5, 255.0], r"got values in \[0.5, 255\]"), ([-1.0, 0.5], r"got values in \[-1, 0.5\]")],
)
def test_logit_rejects_out_of_range_data_naming_range_and_values(values, got, validation):
    Distribution.set_default_validate_args(True)
    layer = Logit(2, alpha=0.05)
    y = torch.tensor(values)
    message = r"Logit expects data-side values in \[0, 1\] .*open interval \(-0.05556, 1.056\)\), " + got
    with pytest.raises(ValueError, match=message):
        layer.inverse_and_ladj(y)
    with pytest.raises(ValueError, match=message):
        pf.Flow([layer])().log_prob(y)


def test_logit_with_zero_alpha_rejects_exact_zero_and_one(validation):
    Distribution.set_default_validate_args(True)
    with pytest.raises(ValueError, match=r"open interval \(0, 1\)\), got values in \[0, 1\]"):
        Logit(2, alpha=0.0).inv(torch.tensor([0.0, 1.0]))


def test_logit_does_not_check_the_range_without_validation(validation):
    Distribution.set_default_validate_args(False)
    x = Logit(2).inv(torch.tensor([0.5, 2.0]))
    assert x[0] == 0 and torch.isnan(x[1])


@pytest.mark.parametrize("alpha", [-0.1, 0.5, 0.7, float("nan"), "0.1", True])
def test_logit_rejects_alpha_outside_zero_to_half(alpha):
    with pytest.raises(ValueError, match="Logit expects alpha"):
        Logit(3, alpha)


def test_logit_support_is_its_data_side_interval():
    support = TransformedDistribution(_base(Logit((1, 2, 2))), [Logit((1, 2, 2))]).support
    assert support.event_dim == 3
    assert bool(support.check(torch.tensor([[[0.0, 1.0], [1.05, -0.05]]])).all())
    assert not bool(support.check(torch.full((1, 2, 2), 1.1)))


# Scale --------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1 / 256, 2.0, -3.0])
def test_scale_multiplies_and_has_ladj_d_log_abs_scale_within_1e12(scale):
    layer = Scale((3, 4, 4), scale)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    y, ladj = layer.call_and_ladj(x)
    assert torch.equal(y, x * scale)
    expected = torch.full((5,), 48 * math.log(abs(scale)), dtype=torch.float64)
    assert ladj.shape == (5,) and torch.allclose(ladj, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [0, 0.0, float("inf"), float("nan"), "2", None])
def test_scale_rejects_zero_or_non_finite_scale(scale):
    with pytest.raises(ValueError, match="Scale expects (a non-zero scale|scale to be a finite real number)"):
        Scale(3, scale)


# Squeeze -----------------------------------------------------------------------------------
def test_squeeze_sides_base_is_squeezed_and_data_is_unsqueezed():
    layer = Squeeze((3, 8, 6))
    assert layer.event_shape == (12, 4, 3) and layer.output_shape == (3, 8, 6)
    inverse = Inverse(layer)
    assert inverse.event_shape == (3, 8, 6) and inverse.output_shape == (12, 4, 3)
    assert pf.Flow([layer]).event_shape == (3, 8, 6)


def test_squeeze_moves_each_2x2_block_into_four_channels():
    image = torch.arange(16.0).reshape(1, 4, 4)
    x, ladj = Squeeze((1, 4, 4)).inverse_and_ladj(image)
    expected = torch.tensor(
        [
            [[0.0, 2.0], [8.0, 10.0]],  # top-left pixel of each block
            [[1.0, 3.0], [9.0, 11.0]],  # top-right
            [[4.0, 6.0], [12.0, 14.0]],  # bottom-left
            [[5.0, 7.0], [13.0, 15.0]],  # bottom-right
        ]
    )
    assert torch.equal(x, expected) and ladj == 0


@pytest.mark.parametrize("batch", [(), (2,), (2, 3)], ids=str)
def test_squeeze_matches_pixel_unshuffle_and_round_trips_exactly(batch):
    layer = Squeeze((3, 4, 6))
    y = torch.randn(*batch, 3, 4, 6)
    x, ladj = layer.inverse_and_ladj(y)
    assert torch.equal(x, F.pixel_unshuffle(y, 2))
    assert torch.equal(ladj, torch.zeros(batch))
    y2, ladj2 = layer.call_and_ladj(x.clone())
    assert torch.equal(y2, y) and torch.equal(ladj2, torch.zeros(batch))


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 3, 4), r"even height and width .*got \(1, 3, 4\)"),
        ((2, 4, 5), r"even height and width .*got \(2, 4, 5\)"),
        ((4, 4), r"shape \(C, H, W\), got \(4, 4\)"),
        (16, r"shape \(C, H, W\), got \(16,\)"),
    ],
)
def test_squeeze_rejects_odd_or_non_image_shapes_naming_the_shape(shape, message):
    with pytest.raises(ValueError, match=message):
        Squeeze(shape)


def test_squeeze_rejects_an_unsqueezed_input_on_the_base_side():
    with pytest.raises(ValueError, match=r"trailing \(event\) shape \(4, 2, 2\), got a tensor of shape \(1, 4, 4\)"):
        Squeeze((1, 4, 4)).call_and_ladj(torch.randn(1, 4, 4))
