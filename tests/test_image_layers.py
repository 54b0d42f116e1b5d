r"""What the image pre-processing and reshaping layers (Logit, Scale, Squeeze) promise
beyond the shared property battery (``cases.py``), which checks their round trips,
log-determinants and shapes. Tolerances are in the test names; float64 unless said."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Distribution, Independent, Normal, TransformedDistribution

import pyro_flowpack as pf
from pyro_flowpack.transforms import Inverse
from pyro_flowpack.transforms.elementwise import Logit, Scale
from pyro_flowpack.transforms.reshape import Squeeze


@pytest.fixture
def validation():
    """Restores torch's distribution-validation setting after a test changes it."""
    setting = Distribution._validate_args
    yield
    Distribution.set_default_validate_args(setting)


def _base(layer, dtype=torch.float64):
    shape = layer.event_shape
    return Independent(Normal(torch.zeros(shape, dtype=dtype), torch.ones(shape, dtype=dtype)), len(shape))


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
    with pytest.raises(ValueError, match="Logit: alpha must be"):
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
    with pytest.raises(ValueError, match="(Scale expects a non-zero scale|Scale: scale must be a finite number)"):
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
