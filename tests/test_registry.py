"""The one registry of flows by name: a new family is one class plus one registry line, and
then the builders, ``build_flow`` (the trainer and ``load_run``), the ``flowpack`` command
and ``AutoFlowGuide`` all know it."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import Tensor

import pyro_flowpack as pf
from pyro_flowpack.flows import FLOWS, flow_entry, register_family
from pyro_flowpack.transforms.monotone import Inverted, MonotoneMap

from cli_support import flowpack


class Cubic(MonotoneMap):
    r"""A toy family for the test: :math:`\tau(x) = x + a\, \mathrm{softplus}(r) x^3 / 3 + t`
    with :math:`a` = ``strength``, written as nothing but its shapes and its forward map
    (the inverse is the generic root finder). Zero parameters: :math:`x + a \log 2\, x^3/3`,
    so the test perturbs away from it anyway."""

    def __init__(self, strength: float = 0.1) -> None:
        self.strength = strength
        self.shapes = {"shift": (), "curvature": ()}

    def forward(self, x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        p = self.split(theta)
        c = self.strength * torch.nn.functional.softplus(p["curvature"])
        return x + c * x**3 / 3 + p["shift"], torch.log1p(c * x**2)


@pytest.fixture
def cubic():
    entries = register_family("cubic", Cubic)
    yield entries
    for entry in entries:
        del FLOWS["vector"][entry.name]


def the_map(layer) -> MonotoneMap:
    """The family's map in a coupling or autoregressive layer (builders may invert it)."""
    layer = getattr(layer, "layer", layer)  # an IAF layer's MAF layer
    return layer.monotone.monotone if isinstance(layer.monotone, Inverted) else layer.monotone


def perturbed(flow: pf.Flow, scale: float = 0.3, seed: int = 0) -> pf.Flow:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return flow


def test_a_family_is_one_class_and_one_line_and_gives_coupling_and_autoregressive_flows(cubic):
    coupling, autoregressive = cubic
    assert (coupling.name, autoregressive.name) == ("cubic", "cubic-ar")
    assert set(coupling.options()) == {"transforms", "hidden", "mask", "closed_form", "strength"}
    assert set(autoregressive.options()) == {"transforms", "hidden", "form", "closed_form", "strength"}
    for name in ("cubic", "cubic-ar"):
        flow = perturbed(pf.train.build_flow(name, (3,), transforms=2, hidden=(8,), strength=0.2)).double()
        # the map's option reached the map, and the conditioner has its two parameters per feature
        assert the_map(flow.transform[0]).strength == 0.2
        x = torch.randn(64, 3, dtype=torch.float64)
        log_p = flow().log_prob(x)
        z = flow.transform.inv(x)
        # log p(x) = log N(z) - log|det J| with the determinant by autograd, per point (1e-8)
        for i in range(4):
            jac = torch.autograd.functional.jacobian(flow.transform, z[i])
            expected = torch.distributions.Normal(0.0, 1.0).log_prob(z[i]).sum() - torch.linalg.slogdet(jac)[1]
            assert torch.allclose(log_p[i], expected, rtol=0, atol=1e-8)
        assert torch.allclose(flow.transform(z), x, rtol=0, atol=1e-8)


def test_families_put_the_closed_form_on_the_density_side_and_guides_on_the_sampling_side():
    calls = {"forward": 0}

    class Counting(Cubic):
        def forward(self, x, theta):
            calls["forward"] += 1
            return super().forward(x, theta)

    def count(run) -> int:
        calls["forward"] = 0
        run()
        return calls["forward"]

    density = perturbed(pf.flows.CouplingFlow(2, Counting(), transforms=1, hidden=(8,)))
    guide = perturbed(pf.flows.CouplingFlow(2, Counting(), transforms=1, hidden=(8,), closed_form="sampling"))
    x = torch.randn(5, 2)
    # the closed-form direction evaluates the map at most twice (value, then log-derivative
    # at the solution); the other direction runs the root finder, many evaluations
    assert count(lambda: density().log_prob(x)) <= 2
    assert count(lambda: density().sample((5,))) > 4
    assert count(lambda: guide().rsample_and_log_prob((5,))) <= 2
    assert count(lambda: guide().log_prob(x)) > 4


def test_the_command_line_trains_a_registered_family_with_its_own_option(cubic, tmp_path, capsys):
    run = tmp_path / "run"
    status, out, err = flowpack(["train", "--data", "moons", "--size", "256", "--flow", "cubic", "--transforms", "2",
                                 "--hidden", "8", "--epochs", "1", "--option", "strength=0.3", "--no-progress",
                                 "--out", str(run)], capsys)
    assert status == 0, err
    reloaded = pf.train.load_run(run)
    assert reloaded.metadata["flow"] == {"name": "cubic", "options": {"transforms": 2, "hidden": [8],
                                                                      "strength": 0.3}}
    assert the_map(reloaded.model.transform[0]).strength == 0.3


def test_an_autoflowguide_fits_with_a_registered_family_by_name(cubic):
    def model():
        pyro.sample("x", dist.Normal(1.0, 0.5))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = pf.infer.AutoFlowGuide(model, flow="cubic", transforms=2, hidden=(8,))
    elbo = pyro.infer.Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), elbo)
    for _ in range(300):
        svi.step()
    draws = guide.get_posterior().sample((4000,))
    # N(1, 0.5) recovered to within 0.05 in mean and scale
    assert abs(float(draws.mean()) - 1.0) < 0.05 and abs(float(draws.std()) - 0.5) < 0.05


def test_flow_options_a_flow_does_not_take_are_errors_naming_its_options():
    with pytest.raises(TypeError, match=r"flow 'maf' takes no option\(s\) bins; its options are bound, hidden, "
                                        r"transforms"):
        pf.train.build_flow("maf", (2,), bins=8)
    with pytest.raises(ValueError, match=r"unknown flow 'nsff'; for vectors \(D,\) choose one of nsf, nsf-ar"):
        flow_entry("nsff")
    with pytest.raises(ValueError, match=r"flow 'glow' is for images"):
        flow_entry("glow", "vector")


def test_the_command_line_refuses_an_explicit_option_the_flow_does_not_take(tmp_path, capsys):
    status, _, err = flowpack(["train", "--data", "moons", "--flow", "maf", "--bins", "4", "--out",
                               str(tmp_path / "r")], capsys)
    assert status == 2 and "--bins does not apply to flow 'maf'; its options are bound, hidden, transforms" in err
    status, _, err = flowpack(["train", "--data", "moons", "--option", "nonsense", "--out", str(tmp_path / "r")],
                              capsys)
    assert status == 2 and "expected KEY=VALUE" in err


def test_guides_refuse_names_of_flows_that_sample_sequentially_and_read_the_registry_defaults():
    with pytest.raises(ValueError, match=r"flow 'maf' samples in 3 sequential passes per layer"):
        pf.infer.guide_flow("maf", 3)
    iaf = pf.infer.guide_flow("iaf", 3)
    # the guide defaults of the registry: 4 layers, log-scale bounds (-5, 3), hidden max(64, 4D)
    assert len(iaf.transform.parts) == 4
    # (the MAF layer that an IAF layer inverts has the negated bounds)
    assert iaf.transform[0].layer.monotone.low == -3.0 and iaf.transform[0].layer.monotone.high == 5.0


def test_every_registered_vector_flow_builds_at_one_and_three_features():
    for name, entry in FLOWS["vector"].items():
        for features in (1, 3):
            options = {"transforms": 1} if "transforms" in entry.options() else {}
            if "hidden" in entry.options():
                options["hidden"] = (8,)
            flow = entry.build(features, **options)
            x = torch.rand(4, features) * 2 - 1  # inside [-pi, pi) for the circular flow
            assert flow().log_prob(x).shape == (4,), name
