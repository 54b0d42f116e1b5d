"""Bad input gets a clear error naming what was expected and what came in."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import pyro_flowpack as pf
from pyro_flowpack.nn import MADE
from pyro_flowpack.transforms import (
    ActNorm,
    AffineCoupling,
    Compose,
    Inverse,
    MaskedAffineAutoregressive,
    RationalQuadraticSpline,
    Reverse,
    SplineCoupling,
)
from pyro_flowpack.transforms.monotone import Affine

BUILDERS = [pf.flows.NICE, pf.flows.RealNVP, pf.flows.MAF, pf.flows.IAF, pf.flows.NSF]


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_wrong_event_size_names_expected_and_got(builder):
    d = builder(4)()
    with pytest.raises(ValueError, match=r"trailing \(event\) shape \(4,\), got a tensor of shape \(7, 3\)"):
        d.log_prob(torch.randn(7, 3))


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_wrong_context_size_names_expected_and_got(builder):
    flow = builder(4, context=3)
    with pytest.raises(ValueError, match=r"context to have trailing \(event\) shape \(3,\), got .* \(7, 2\)"):
        flow(torch.randn(7, 2))


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_missing_context_for_conditional_flow(builder):
    with pytest.raises(ValueError, match="conditional on 3 context features but no context was given"):
        builder(4, context=3)()


def test_context_given_to_unconditional_flow():
    with pytest.raises(ValueError, match="unconditional"):
        pf.flows.MAF(4)(torch.randn(3))


def test_conditional_layer_without_context():
    layer = AffineCoupling(4, context=2)
    with pytest.raises(ValueError, match="conditional on 2 context features"):
        layer.call_and_ladj(torch.randn(4))
    with pytest.raises(ValueError, match="conditional on 2 context features"):
        layer(torch.randn(4))  # the torch Transform API too


def test_non_broadcastable_context_batch():
    flow = pf.flows.RealNVP(4, context=2)
    with pytest.raises(ValueError, match=r"batch shapes of the input \(5, 4\) and of the context \(3, 2\)"):
        flow(torch.randn(3, 2)).log_prob(torch.randn(5, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_with_validation_on(bad):
    torch.distributions.Distribution.set_default_validate_args(True)
    x = torch.randn(5, 4)
    x[2, 1] = bad
    with pytest.raises(ValueError, match="non-finite value"):
        pf.flows.NSF(4)().log_prob(x)
    with pytest.raises(ValueError, match="non-finite input"):
        AffineCoupling(4)(x)
    with pytest.raises(ValueError, match="non-finite input"):
        AffineCoupling(4).inv(x)
    c = torch.full((3,), bad)
    with pytest.raises(ValueError, match="non-finite context"):
        pf.flows.MAF(4, context=3)(c)


def test_wrong_dtype_names_expected_and_got():
    with pytest.raises(TypeError, match="dtype torch.float32 .* got torch.float64"):
        pf.flows.MAF(3)().log_prob(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point input, got dtype torch.int64"):
        AffineCoupling(4).call_and_ladj(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor, got list"):
        AffineCoupling(4).call_and_ladj([1.0, 2.0, 3.0, 4.0])


@pytest.mark.parametrize(
    ("mask", "error", "message"),
    [
        ("checkerboard", ValueError, r"'half', 'alternating' or a boolean tensor for event shape \(4,\), got 'checkerboard'"),
        (torch.tensor([True, True, True, True]), ValueError, r"at least one False \(transformed\) entry"),
        (torch.tensor([True, False, True]), ValueError, r"mask must have shape \(4,\), got \(3,\)"),
        (torch.tensor([1, 0, 1, 0]), TypeError, "boolean tensor, got dtype torch.int64"),
    ],
)
def test_invalid_mask(mask, error, message):
    with pytest.raises(error, match=message):
        AffineCoupling(4, mask=mask)


def test_image_mask_must_pass_some_entries_through():
    with pytest.raises(ValueError, match="at least one True .* and one False"):
        AffineCoupling((2, 4, 4), mask=torch.zeros(2, 4, 4, dtype=torch.bool), hidden=8)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: AffineCoupling(0), "int >= 1, got 0"),
        (lambda: SplineCoupling(4, bins=0), "bins must be an int >= 1, got 0"),
        (lambda: RationalQuadraticSpline(bound=-1.0), "bound must be a finite number > 0, got -1.0"),
        (lambda: RationalQuadraticSpline(min_derivative=0.0), r"min_derivative must be in \(0, 1\)"),
        (lambda: Affine(bound=0.0), "bound must be a finite number > 0, got 0.0"),
        (lambda: MADE(True, 2), r"MADE: features must be an int >= 1, got True"),
        (lambda: pf.flows.IAF(2, transforms=True), r"transforms \(the number of layers\) must be an int >= 1, got True"),
        (lambda: MADE(3, 2, hidden=(0,)), r"positive ints \(hidden sizes\), not empty, got \(0,\)"),
        (lambda: MADE(3, 2, order=[0, 0, 1]), r"permutation of range\(3\), got \[0, 0, 1\]"),
        (lambda: MaskedAffineAutoregressive(4, context=-1), "non-negative int .* got -1"),
        (lambda: pf.flows.MAF(4, transforms=0), "transforms .*must be an int >= 1, got 0"),
        (lambda: pf.flows.NSF(4, hidden=(32, -1)), r"positive ints \(hidden sizes\), got \(32, -1\)"),
        (lambda: ActNorm((3, 0)), "int >= 1, got 0"),
        (lambda: Compose(Reverse(3), Reverse(4)), r"Reverse expects event shape \(4,\), but the part before it gives \(3,\)"),
        (lambda: Compose(AffineCoupling(3, context=2), AffineCoupling(3, context=1)), r"disagree on the context shape: \[\(1,\), \(2,\)\]"),
        (lambda: pf.Flow([Reverse(3)], torch.distributions.Normal(torch.zeros(4), 1.0)),
         r"base distribution has shape \(4,\) but the first layer expects event shape \(3,\)"),
    ],
)
def test_invalid_option(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_invalid_types():
    with pytest.raises(TypeError, match="Inverse expects a FlowTransform layer, got Linear"):
        Inverse(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="base must be a torch Distribution, got str"):
        pf.Flow([Reverse(3)], "normal")
    with pytest.raises(TypeError, match="Transform parts, got Linear"):
        Compose(torch.nn.Linear(2, 2), event_shape=2)


@pytest.mark.parametrize("setting", [True, False])
def test_import_leaves_distribution_validation_as_it_was(setting):
    code = (
        "import torch\n"
        f"torch.distributions.Distribution.set_default_validate_args({setting})\n"
        "import pyro_flowpack, pyro_flowpack.flows, pyro_flowpack.transforms\n"
        f"assert torch.distributions.Distribution._validate_args is {setting}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_context_of_another_dtype_names_expected_and_got():
    with pytest.raises(TypeError, match="context of dtype torch.float32 .* got torch.float64"):
        pf.flows.MAF(4, context=2)(torch.randn(3, 2, dtype=torch.float64))
