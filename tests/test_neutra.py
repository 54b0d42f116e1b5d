r"""NeuTra HMC with AutoFlowGuide: Pyro's ``NeuTraReparam`` accepts the guide, the
reparametrised model has the NeuTra potential energy

.. math:: U_\mathrm{NeuTra}(z) = U(T(z)) - \log |\det J_T(z)|

(``U`` the model's potential on the unconstrained space, ``T`` the guide's bijection from
its base), NUTS runs on it and ``transform_sample`` maps its draws back to every site, and
``examples/neutra.py`` runs end to end."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution, TorchDistributionMixin
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.mcmc.util import initialize_model
from pyro.infer.reparam import NeuTraReparam
from pyro.poutine.util import prune_subsample_sites

from pyro_flowpack.infer import AutoFlowGuide

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "neutra.py"
Y = (0.5, -1.0, 2.0, 0.3)


@pytest.fixture
def float64():
    """The potential-energy comparisons run in double precision (the funnel's potential
    reaches 1e4 at the points drawn)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def funnel_event(y: torch.Tensor) -> None:
    """A funnel (``x`` one site with event shape (3,)), a positive and a unit-interval
    site, and observations under a plate: D = 1 + 3 + 1 + 1 unconstrained dimensions."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    x = pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)).expand([3]).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(p * x.sum(-1), s), obs=y)


def funnel_plate(y: torch.Tensor) -> None:
    """The same model with ``x`` a scalar site under a plate and a log-normal scale."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    with pyro.plate("D", 3):
        x = pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(p * x.sum(-1), s), obs=y)


def trained_guide(model, y: torch.Tensor, flow: str = "iaf", steps: int = 3, perturb: float = 0.3) -> AutoFlowGuide:
    """A guide after a few SVI steps, its parameters then moved by Gaussian noise of
    standard deviation ``perturb``, so that no layer is at its identity initialisation;
    frozen, as for NUTS."""
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(model, flow, transforms=2, hidden=(16, 16))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(steps):
        svi.step(y)
    with torch.no_grad():
        for parameter in guide.parameters():
            parameter.add_(perturb * torch.randn_like(parameter))
    return guide.requires_grad_(False)


def autograd_ladj(transform, z: torch.Tensor) -> torch.Tensor:
    r""":math:`\log |\det J_T(z)|` from the Jacobian that autograd builds, independent of
    the flow's own log-determinant."""
    return torch.linalg.slogdet(torch.autograd.functional.jacobian(transform, z))[1]


@pytest.mark.parametrize("flow", ["iaf", "nsf", "realnvp"])
def test_base_dist_is_a_pyro_distribution_with_the_flows_event_shape(flow):
    guide = AutoFlowGuide(funnel_event, flow, transforms=2, hidden=(16, 16))
    guide(torch.tensor(Y))
    base = guide.get_base_dist()
    assert isinstance(base, TorchDistributionMixin)
    assert base.batch_shape == () and base.event_shape == guide.flow.event_shape == (guide.latent_dim,) == (6,)
    masked = base.mask(False)
    assert isinstance(masked, MaskedDistribution) and masked.event_shape == (6,)
    # a masked site contributes nothing to the log-joint, as NeuTraReparam requires
    trace = poutine.trace(lambda: pyro.sample("z", masked)).get_trace()
    assert trace.nodes["z"]["value"].shape == (6,) and trace.log_prob_sum().item() == 0.0


def test_neutra_reparam_accepts_the_guide_and_names_one_shared_latent():
    guide = trained_guide(funnel_event, torch.tensor(Y))
    neutra = NeuTraReparam(guide)
    trace = poutine.trace(neutra.reparam(funnel_event)).get_trace(torch.tensor(Y))
    latent = prune_subsample_sites(trace).stochastic_nodes
    assert latent == ["v_shared_latent"] and trace.nodes["v_shared_latent"]["value"].shape == (6,)
    # the model's own latent sites become observed Deltas at the transported values
    assert all(trace.nodes[name]["is_observed"] for name in ("v", "x", "s", "p"))


@pytest.mark.parametrize("model", [funnel_event, funnel_plate], ids=["event", "plate"])
@pytest.mark.parametrize("flow", ["iaf", "nsf", "realnvp"])
def test_neutra_potential_is_the_model_potential_at_the_transported_point_minus_the_log_det(
        float64, flow, model):
    """At each of 8 random shared-latent points z, separately: U_NeuTra(z) = U(T(z)) -
    log|det J_T(z)| to 1e-5, with U and U_NeuTra the potential functions of
    ``initialize_model``; log|det J_T| from the flow equals autograd's, and T is the map of
    the guide's posterior (log q(T(z)) = log p_Z(z) - log|det J_T(z)|), both to 1e-8."""
    y = torch.tensor(Y)
    guide = trained_guide(model, y, flow)
    neutra = NeuTraReparam(guide)
    _, potential, to_unconstrained, _ = initialize_model(model, model_args=(y,))
    _, neutra_potential, _, _ = initialize_model(neutra.reparam(model), model_args=(y,))
    transform, base = guide.get_transform(), guide.get_base_dist()
    ladjs = []
    for z in 1.5 * torch.randn(8, guide.latent_dim):
        u = transform(z)
        ladj = transform.log_abs_det_jacobian(z, u)
        assert torch.allclose(ladj, autograd_ladj(transform, z), rtol=0, atol=1e-8)
        # T and the base are those of the trained posterior: log q(T(z)) = log p_Z(z) - log|det J_T(z)|
        log_q = guide.get_posterior().log_prob(u.clone())  # a new tensor: scored through the inverse
        assert torch.allclose(log_q, base.log_prob(z) - ladj, rtol=0, atol=1e-8)
        sites = neutra.transform_sample(z)
        assert sorted(sites) == ["p", "s", "v", "x"]
        expected = potential({name: to_unconstrained[name](value) for name, value in sites.items()}) - ladj
        actual = neutra_potential({"v_shared_latent": z})
        assert torch.isfinite(actual)
        assert torch.allclose(actual, expected, rtol=0, atol=1e-5), (actual.item(), expected.item())
        # the unconstrained point is the guide's packed vector T(z), site by site
        for site, value in guide._unpack_latent(u):
            assert torch.allclose(to_unconstrained[site["name"]](sites[site["name"]]), value, atol=1e-10)
        ladjs.append(ladj.item())
    # the guide is far from the identity (and from any affine map): log|det J_T| varies with z
    assert max(ladjs) - min(ladjs) > 0.1


def test_transform_sample_gives_the_values_the_reparametrised_model_gives_its_sites():
    y = torch.tensor(Y)
    guide = trained_guide(funnel_event, y)
    neutra = NeuTraReparam(guide)
    z = torch.randn(guide.latent_dim)
    conditioned = poutine.condition(neutra.reparam(funnel_event), data={"v_shared_latent": z})
    trace = poutine.trace(conditioned).get_trace(y)
    for name, value in neutra.transform_sample(z).items():
        assert torch.allclose(trace.nodes[name]["value"], value, rtol=0, atol=1e-6)


def test_nuts_on_the_reparametrised_funnel_gives_finite_draws_of_every_site():
    """A short NUTS run (20 warm-up steps, 20 draws) on a guide trained for 50 steps."""
    y = torch.tensor(Y)
    guide = trained_guide(funnel_event, y, steps=50, perturb=0.0)
    neutra = NeuTraReparam(guide)
    pyro.set_rng_seed(1)
    mcmc = MCMC(NUTS(neutra.reparam(funnel_event)), num_samples=20, warmup_steps=20, disable_progbar=True)
    mcmc.run(y)
    draws = mcmc.get_samples()
    assert list(draws) == ["v_shared_latent"]
    z = draws["v_shared_latent"]
    assert z.shape == (20, guide.latent_dim) and bool(torch.isfinite(z).all())
    assert z.std(0).min() > 0  # the chain moved in every direction
    sites = neutra.transform_sample(z)
    shapes = {name: tuple(value.shape) for name, value in sites.items()}
    assert shapes == {"v": (20,), "x": (20, 3), "s": (20,), "p": (20,)}
    assert all(bool(torch.isfinite(value).all()) for value in sites.values())
    assert bool((sites["s"] > 0).all()) and bool(((sites["p"] > 0) & (sites["p"] < 1)).all())


def test_transform_sample_of_a_plated_model_takes_the_draws_left_of_the_plates():
    """Pyro's rule for ``transform_sample``: batch dimensions of the draws must not collide
    with the model's plates, so draws of shape (S, D) go in as (S, 1, D) when a latent site
    sits in a plate (``dim=-1``); every site then has the batch shape (S, 1) or (S, plate)."""
    y = torch.tensor(Y)
    guide = trained_guide(funnel_plate, y)
    neutra = NeuTraReparam(guide)
    neutra.reparam(funnel_plate)(y)  # transform_sample needs the model to have run once, as under MCMC
    z = torch.randn(7, guide.latent_dim)
    sites = neutra.transform_sample(z.unsqueeze(-2))
    assert {name: tuple(value.shape) for name, value in sites.items()} == {
        "v": (7, 1), "x": (7, 3), "s": (7, 1), "p": (7, 1)}
    for i in range(7):  # row by row, the values of unbatched draws (float32 round-off apart)
        one = neutra.transform_sample(z[i])
        for name in one:
            assert torch.allclose(sites[name][i].reshape(one[name].shape), one[name], rtol=1e-5, atol=1e-6), name


def load_example():
    spec = importlib.util.spec_from_file_location("neutra", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_gives_finite_ess_and_r_hat_for_both_guides_and_plain_nuts(tmp_path):
    path = tmp_path / "neutra.json"
    result = load_example().main(["--dim", "3", "--steps", "20", "--chains", "2", "--warmup", "20",
                                  "--samples", "20", "--max-tree-depth", "3", "--json", str(path)])
    assert sorted(result["samplers"]) == ["NUTS", "NeuTra+AutoFlowGuide", "NeuTra+AutoIAFNormal"]
    for name, row in result["samplers"].items():
        assert sorted(row["sites"]) == ["v", "x"], name
        for site, stats in row["sites"].items():
            assert math.isfinite(stats["n_eff"]) and stats["n_eff"] > 0, (name, site, stats)
            assert math.isfinite(stats["r_hat"]) and stats["r_hat"] > 0, (name, site, stats)
        assert row["mcmc_s"] > 0 and (row["svi_s"] is None) == (name == "NUTS")
    assert json.loads(path.read_text()) == result


@pytest.mark.parametrize("arguments, message", [
    (["--dim", "1"], "--dim must be an int >= 2"),
    (["--chains", "0"], "must be positive"),
    (["--lr", "0"], "must be positive"),
    (["--max-tree-depth", "0"], "must be positive"),
])
def test_the_example_rejects_bad_arguments_with_exit_status_2(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit:
        load_example().main(arguments)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_a_potential_gradient_runs_each_flow_network_once():
    """NeuTra calls T(z) then T.log_abs_det_jacobian(z, T(z)): the composition reuses its
    own evaluation, so one potential gradient runs each of the 4 MADEs exactly once (it ran
    each twice before the composition cached)."""
    from pyro.ops.integrator import potential_grad

    from pyro_flowpack.nn import MADE

    def funnel():
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2).unsqueeze(-1).expand(v.shape + (3,))).to_event(1))

    guide = AutoFlowGuide(funnel, transforms=4, hidden=(16, 16))
    guide()
    guide.requires_grad_(False)
    init, potential, _, _ = initialize_model(NeuTraReparam(guide).reparam(funnel))
    calls = []
    for module in guide.modules():
        if isinstance(module, MADE):
            module.register_forward_hook(lambda *_: calls.append(1))
    potential_grad(potential, {k: v.clone() for k, v in init.items()})
    assert len(calls) == 4
