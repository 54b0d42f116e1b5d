r"""The 2-D toy data sets: shapes, dtypes, seeding, scale and argument errors.

Scale tolerances are stated in the assertions; with ``SCALE_POINTS`` points the sampling
error of a mean or standard deviation is about 0.003, far inside them.
"""

import ast
import math
from pathlib import Path

import pytest
import torch

import pyro_flowpack.data as data
from pyro_flowpack.data import TOY_DATASETS, checkerboard, circles, eight_gaussians, toy_dataset

NAMES = list(TOY_DATASETS)
SCALE_POINTS = 100_000


def test_registry_names_the_six_sets_and_toy_dataset_uses_it():
    assert NAMES == ["two_moons", "circles", "eight_gaussians", "checkerboard", "pinwheel", "two_spirals"]
    for name in NAMES:
        assert torch.equal(toy_dataset(name, 50, seed=3), TOY_DATASETS[name](50, 3))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_shape_is_n_by_2_and_values_finite(name, n):
    x = toy_dataset(name, n)
    assert x.shape == (n, 2)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_the_default_floating_dtype(name, dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        assert toy_dataset(name, 10).dtype == dtype
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_identical_data_and_different_seeds_differ(name):
    assert torch.equal(toy_dataset(name, 500, seed=7), toy_dataset(name, 500, seed=7))
    assert not torch.equal(toy_dataset(name, 500, seed=7), toy_dataset(name, 500, seed=8))
    assert not torch.equal(toy_dataset(name, 500, seed=None), toy_dataset(name, 500, seed=None))


@pytest.mark.parametrize("name", NAMES)
def test_global_rng_is_neither_read_nor_changed(name):
    torch.manual_seed(1)
    first = toy_dataset(name, 100, seed=5)
    torch.manual_seed(2)
    assert torch.equal(toy_dataset(name, 100, seed=5), first)
    state = torch.get_rng_state()
    toy_dataset(name, 100, seed=None)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", NAMES)
def test_scale_is_roughly_standardised(name):
    x = toy_dataset(name, SCALE_POINTS)
    # Centred: |mean| < 0.05 per coordinate.
    assert x.mean(0).abs().max() < 0.05
    # Unit scale: the RMS over both coordinates is within 5% of 1 (default noise adds at
    # most 2%), and each coordinate's standard deviation lies in [0.5, 1.5] (the moons
    # are wider than tall).
    assert abs(x.pow(2).mean().sqrt().item() - 1) < 0.05
    assert ((x.std(0) > 0.5) & (x.std(0) < 1.5)).all()


def test_noiseless_circles_have_two_radii_in_ratio_two():
    radius = circles(1000, noise=0.0).norm(dim=-1)
    outer = radius.max()
    # float32 rounding: radii agree to 1e-5.
    assert ((radius - outer).abs() < 1e-5).logical_or((radius - outer / 2).abs() < 1e-5).all()
    assert radius.min() == pytest.approx(outer.item() / 2, abs=1e-5)


def test_noiseless_eight_gaussians_sit_on_eight_points():
    points = eight_gaussians(1000, noise=0.0)
    assert len(points.round(decimals=4).unique(dim=0)) == 8


def test_checkerboard_points_lie_on_black_squares():
    # Undo the 1/sqrt(4/3) scaling: black squares have an even sum of integer parts.
    x = checkerboard(10_000) * math.sqrt(4 / 3)
    parity = (x.floor().sum(-1)).remainder(2)
    assert (parity == 0).all()
    assert (x.abs() <= 2 + 1e-5).all()


def test_unknown_name_raises_listing_valid_names():
    with pytest.raises(ValueError, match="unknown toy data set 'moons'; valid names are two_moons, circles, "):
        toy_dataset("moons", 10)


@pytest.mark.parametrize("n", [0, -5, 2.5, True, "10"])
def test_n_must_be_a_positive_int(n):
    with pytest.raises(ValueError, match=r"n \(the number of points\) must be an int >= 1"):
        toy_dataset("two_moons", n)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("noise", [-0.1, float("nan")])
def test_noise_must_be_non_negative(name, noise):
    with pytest.raises(ValueError, match=f"{name}: noise must be a non-negative float"):
        TOY_DATASETS[name](10, noise=noise)


def test_data_package_imports_nothing_of_the_flows():
    # DESIGN.md: data/ knows nothing of flows, so it imports only from itself and from
    # the package's argument checks (pyro_flowpack/checks.py, which imports only torch)
    for path in Path(data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 2 and node.module == "checks":
                    continue
                assert node.level <= 1, f"{path.name} imports from a parent package"
                assert node.level == 1 or not (node.module or "").startswith("pyro_flowpack"), path.name
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("pyro_flowpack") for alias in node.names), path.name
