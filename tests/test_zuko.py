"""The zuko adapter (ZukoTransform, from_zuko) and the continuous flow CNF.

The shared battery (cases.py) runs a zuko layer, zuko NSF/NAF flows and CNF through every
generic property; here are the properties specific to the adapter: agreement with zuko
itself, the direction convention, shared parameters, the base, clear errors, torch's
validation state, and CNF densities against numerical references.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pyro
import pytest
import torch
from torch.distributions import Distribution

import pyro_flowpack as pf
from pyro_flowpack.transforms.zuko import import_zuko

zuko = import_zuko()

FEATURES = 3
CONTEXT = 2
HIDDEN = (16, 16)
# zuko flows with an exact inverse, and those inverted by bisection (to about 1e-6)
EXACT = ["NSF", "NCSF", "MAF", "RealNVP", "NICE"]
BISECTION = ["NAF", "UNAF", "SOSPF", "BPF", "GF"]


def _zuko_flow(name: str, context: int) -> "zuko.lazy.Flow":
    torch.manual_seed(0)
    options = {} if name == "GF" else {"hidden_features": HIDDEN}
    flow = getattr(zuko.flows, name)(FEATURES, context, transforms=2, **options).double()
    with torch.no_grad():  # away from the identity initialisation
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow.eval()


def _data(name: str, batch: int) -> torch.Tensor:
    x = torch.randn(batch, FEATURES, dtype=torch.float64)
    return torch.rand_like(x) * 4 - 2 if name == "NCSF" else x  # NCSF lives on [-pi, pi]


# Agreement with zuko ----------------------------------------------------------------------
@pytest.mark.parametrize("context", [0, CONTEXT], ids=["ctx0", "ctx2"])
@pytest.mark.parametrize("name", EXACT + BISECTION)
def test_from_zuko_log_prob_equals_zuko_float64_within_1e5(name, context):
    zf = _zuko_flow(name, context)
    flow = pf.flows.from_zuko(zf, context)
    x = _data(name, 16)
    c = torch.randn(16, context, dtype=torch.float64) if context else None
    ours, theirs = flow(c).log_prob(x), zf(c).log_prob(x)
    assert ours.shape == (16,)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", EXACT + BISECTION)
def test_from_zuko_samples_map_back_to_the_base_draw_under_zuko(name):
    # our forward is zuko's inverse: zuko's own data-to-base map returns the base draw,
    # and our log-determinant is minus zuko's at the sample
    zf = _zuko_flow(name, CONTEXT)
    layer = pf.flows.from_zuko(zf, CONTEXT).transform[0]
    c = torch.randn(32, CONTEXT, dtype=torch.float64)
    z = zf(c).base.sample() if name == "NCSF" else torch.randn(32, FEATURES, dtype=torch.float64).clamp(-3, 3)
    x, ladj = layer.call_and_ladj(z, c)
    z_back, zuko_ladj = zf.transform(c).call_and_ladj(x)
    tolerance = 1e-5 if name in BISECTION else 1e-10
    assert torch.allclose(z_back, z, rtol=0, atol=tolerance)
    assert torch.allclose(ladj, -zuko_ladj, rtol=0, atol=100 * tolerance)


def test_our_bound_transform_runs_base_to_data_and_zuko_s_data_to_base():
    """flow(c).transform is the sampling direction (Pyro's convention); zuko's
    flow(c).transform the normalising one: ours' inverse is zuko's, to 1e-10."""
    zf = _zuko_flow("MAF", CONTEXT)
    c = torch.randn(8, CONTEXT, dtype=torch.float64)
    x = torch.randn(8, FEATURES, dtype=torch.float64)
    ours = pf.flows.from_zuko(zf, CONTEXT)(c).transform
    assert torch.allclose(ours.inv(x), zf(c).transform(x), rtol=0, atol=1e-10)
    assert torch.allclose(ours(zf(c).transform(x)), x, rtol=0, atol=1e-10)


def test_from_zuko_keeps_a_non_standard_gaussian_base_in_its_dtype():
    torch.manual_seed(0)
    loc, scale = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 2.0, 1.0])
    base = zuko.lazy.UnconditionalDistribution(zuko.distributions.DiagNormal, loc, scale, buffer=True)
    zf = zuko.lazy.Flow(zuko.flows.MAF(FEATURES, hidden_features=HIDDEN).transform, base).double()
    flow = pf.flows.from_zuko(zf)
    assert flow.base_loc.dtype == torch.float64
    assert torch.equal(flow.base().mean, loc.double())
    x = torch.randn(8, FEATURES, dtype=torch.float64)
    assert torch.allclose(flow().log_prob(x), zf().log_prob(x), rtol=0, atol=1e-10)


def test_zuko_elementwise_transform_log_det_is_summed_over_the_event():
    # zuko's elementwise maps return one log-determinant per element
    torch.manual_seed(0)
    shift, scale = torch.randn(FEATURES, dtype=torch.float64), torch.randn(FEATURES, dtype=torch.float64)
    lazy = zuko.lazy.UnconditionalTransform(zuko.transforms.MonotonicAffineTransform, shift, scale)
    layer = pf.transforms.ZukoTransform(lazy, FEATURES)
    assert {id(p) for p in layer.parameters()} == {id(p) for p in lazy.parameters()}
    z = torch.randn(4, 5, FEATURES, dtype=torch.float64)
    x, ladj = layer.call_and_ladj(z)
    assert ladj.shape == (4, 5)
    jac = torch.autograd.functional.jacobian(lambda v: layer.call_and_ladj(v)[0], z[0, 0])
    assert torch.allclose(ladj[0, 0], torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-12)
    assert torch.allclose(layer.inverse_and_ladj(x.clone())[1], ladj, rtol=0, atol=1e-12)


# Parameters, saving, context ------------------------------------------------------------------
def test_from_zuko_shares_parameters_and_training_moves_zuko_too():
    zf = _zuko_flow("NSF", CONTEXT).train()
    flow = pf.flows.from_zuko(zf, CONTEXT)
    assert {id(p) for p in flow.parameters()} == {id(p) for p in zf.parameters()}
    x = torch.randn(32, FEATURES, dtype=torch.float64)
    c = torch.randn(32, CONTEXT, dtype=torch.float64)
    before = zf(c).log_prob(x).mean().item()
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(5):
        loss = -flow(c).log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = zf(c).log_prob(x).mean().item()
    assert after > before
    assert torch.allclose(flow(c).log_prob(x), zf(c).log_prob(x), rtol=0, atol=1e-10)


def test_from_zuko_state_dict_round_trip_reproduces_log_prob_exactly():
    flow = pf.flows.from_zuko(_zuko_flow("NAF", CONTEXT), CONTEXT)
    torch.manual_seed(1)
    other = zuko.flows.NAF(FEATURES, CONTEXT, transforms=2, hidden_features=HIDDEN).double()
    other = pf.flows.from_zuko(other, CONTEXT).eval()
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    x = torch.randn(8, FEATURES, dtype=torch.float64)
    c = torch.randn(8, CONTEXT, dtype=torch.float64)
    assert torch.equal(other(c).log_prob(x), flow(c).log_prob(x))


def test_from_zuko_context_broadcasts_over_the_sample_shape_as_in_zuko():
    zf = _zuko_flow("MAF", CONTEXT)
    flow = pf.flows.from_zuko(zf, CONTEXT)
    c = torch.randn(4, CONTEXT, dtype=torch.float64)
    x = flow(c).sample((6,))
    assert x.shape == (6, 4, FEATURES)
    assert torch.allclose(flow(c).log_prob(x), zf(c).log_prob(x), rtol=0, atol=1e-10)
    # a different context gives a different density
    assert not torch.allclose(flow(c).log_prob(x), flow(c + 1).log_prob(x))


# Errors ------------------------------------------------------------------------------------------
def test_clear_errors():
    with pytest.raises(TypeError, match="expects a zuko LazyTransform.*got Linear"):
        pf.transforms.ZukoTransform(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="must be an int >= 0, got \\(1, 2\\)"):
        pf.transforms.ZukoTransform(zuko.flows.MAF(2).transform, 2, context=(1, 2))
    with pytest.raises(TypeError, match="expects a zuko flow.*got MaskedAutoregressiveTransform"):
        pf.flows.from_zuko(zuko.flows.MaskedAutoregressiveTransform(2))
    learned = zuko.lazy.UnconditionalDistribution(zuko.distributions.DiagNormal, torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="learnable parameters"):
        pf.flows.from_zuko(zuko.lazy.Flow(zuko.flows.MAF(2).transform, learned))
    heavy = zuko.lazy.UnconditionalDistribution(torch.distributions.StudentT, torch.ones(2), buffer=True)
    with pytest.raises(ValueError, match="diagonal Gaussian or box-uniform base.*StudentT"):
        pf.flows.from_zuko(zuko.lazy.Flow(zuko.flows.MAF(2).transform, heavy))
    with pytest.raises(ValueError, match="UnconditionalDistribution.*got a GMM base"):
        pf.flows.from_zuko(zuko.lazy.Flow(zuko.flows.MAF(2).transform, zuko.flows.GMM(2)))
    conditional = pf.flows.from_zuko(zuko.flows.MAF(2, 3), context=3)
    with pytest.raises(ValueError, match="conditional on 3 context features but no context"):
        conditional().log_prob(torch.randn(2))
    with pytest.raises(ValueError, match="CNF: features must be an int >= 1, got 0"):
        pf.flows.CNF(0)
    with pytest.raises(ValueError, match="CNF expects a positive atol, got -1"):
        pf.flows.CNF(2, atol=-1)


# torch's validation state -----------------------------------------------------------------------
_SCRIPT = """
import sys
import torch
from torch.distributions import Distribution

Distribution.set_default_validate_args({flag})
import pyro_flowpack as pf

out = ["zuko" in sys.modules, Distribution._validate_args]
flow = pf.flows.CNF(2, hidden=(8,))
flow().log_prob(torch.randn(3, 2))
out.append(Distribution._validate_args)
zuko_flow = pf.transforms.zuko.import_zuko().flows.NSF(2, transforms=1)
pf.flows.from_zuko(zuko_flow)().sample((2,))
pf.transforms.ZukoTransform(zuko_flow.transform, 2)
out += ["zuko" in sys.modules, Distribution._validate_args]
print(out)
"""


def test_import_leaves_zuko_unloaded_and_use_keeps_the_validation_setting():
    # importing zuko sets Distribution._validate_args = False process-wide; a fresh
    # process per setting, both run at once
    runs = {
        flag: subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_SCRIPT.format(flag=flag))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for flag in (True, False)
    }
    for flag, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        assert out.strip() == str([False, flag, flag, True, flag]), (flag, out)


def test_validation_setting_survives_use_in_this_process():
    saved = Distribution._validate_args
    try:
        for flag in (False, True):
            Distribution.set_default_validate_args(flag)
            pf.flows.from_zuko(zuko.flows.NSF(2, transforms=1))().rsample_and_log_prob((2,))
            pf.flows.CNF(2, hidden=(8,))().log_prob(torch.randn(2))
            assert Distribution._validate_args is flag
    finally:
        Distribution.set_default_validate_args(saved)


# CNF ------------------------------------------------------------------------------------------------
def _cnf(features: int, seed: int = 0, **options) -> pf.flows.CNF:
    torch.manual_seed(seed)
    flow = pf.flows.CNF(features, hidden=(16, 16), **options).double()
    with torch.no_grad():  # a clearly non-Gaussian density
        for p in flow.parameters():
            p.mul_(2.0)
    return flow.eval()


def _rk4(velocity, x: torch.Tensor, steps: int) -> torch.Tensor:
    """The data-to-base ODE map by classical Runge-Kutta with fixed steps, from t = 0 to 1."""
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.tensor(i * dt, dtype=x.dtype)
        k1 = velocity(t, x)
        k2 = velocity(t + dt / 2, x + dt / 2 * k1)
        k3 = velocity(t + dt / 2, x + dt / 2 * k2)
        k4 = velocity(t + dt, x + dt * k3)
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_cnf_log_prob_equals_change_of_variables_through_an_independent_rk4_map_within_2e4():
    # reference: log N(z) + log|det dz/dx| with z and the Jacobian from a fixed-step RK4
    # solve (100 steps, accurate to about 1e-6) differentiated by autograd; the CNF
    # integrates the trace instead, adaptively, to atol = rtol = 1e-8
    flow = _cnf(2, atol=1e-8, rtol=1e-8)
    velocity = flow.transform[0].lazy_transform.f
    x = torch.randn(4, 2, dtype=torch.float64)
    log_p = flow().log_prob(x).detach()
    z = _rk4(velocity, x, 100).detach()
    jac = torch.autograd.functional.jacobian(lambda u: _rk4(velocity, u, 100).sum(0), x)  # (2, 4, 2)
    reference = flow.base().log_prob(z) + torch.linalg.slogdet(jac.movedim(1, 0))[1]
    assert (log_p - flow.base().log_prob(x)).abs().max() > 0.5  # far from the identity
    assert torch.allclose(log_p, reference, rtol=0, atol=2e-4)


def test_cnf_1d_density_integrates_to_one_within_1e3():
    flow = _cnf(1, atol=1e-6, rtol=1e-6)
    grid = torch.linspace(-10, 10, 1001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        density = flow().log_prob(grid).exp()
    assert density[[0, -1]].max() < 1e-6  # the tails are inside the grid
    mass = torch.trapezoid(density, grid[:, 0])
    assert abs(mass.item() - 1) < 1e-3


def test_cnf_hutchinson_log_prob_is_unbiased_within_4_standard_errors():
    exact = _cnf(2, atol=1e-7, rtol=1e-7)
    hutchinson = pf.flows.CNF(2, hidden=(16, 16), exact=False, atol=1e-7, rtol=1e-7).double().eval()
    hutchinson.load_state_dict(exact.state_dict())
    x = torch.tensor([0.3, -0.7], dtype=torch.float64)
    with torch.no_grad():
        expected = exact().log_prob(x)
        estimates = hutchinson().log_prob(x.expand(2000, 2).clone())  # one probe per row
    error = estimates.std() / 2000**0.5
    assert estimates.std() > 1e-3  # it is a random estimate
    assert abs(estimates.mean() - expected) < 4 * error


def test_cnf_rsample_and_log_prob_give_gradients_to_every_parameter():
    flow = _cnf(2, atol=1e-6, rtol=1e-6).train()
    x, log_p = flow().rsample_and_log_prob((16,))  # a guide's path: sample and score
    (x.square().sum() + log_p.sum()).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    flow.zero_grad()
    flow.eval()  # evaluation mode too: the layer hands zuko's solver the parameters
    (-flow().log_prob(torch.randn(8, 2, dtype=torch.float64)).mean()).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cnf_as_a_conditional_guide_in_svi_lowers_the_loss():
    # q(z | c) for the model z ~ N(c, 1): the ELBO's optimum is q = p
    torch.manual_seed(0)
    flow = pf.flows.CNF(1, context=1, hidden=(8,), atol=1e-4, rtol=1e-4)
    c = torch.linspace(-2, 2, 8)[:, None]

    def model():
        with pyro.plate("data", 8):
            pyro.sample("z", pyro.distributions.Normal(c, 1.0).to_event(1))

    def guide():
        pyro.module("cnf", flow)
        with pyro.plate("data", 8):
            pyro.sample("z", flow(c))

    pyro.clear_param_store()
    elbo = pyro.infer.Trace_ELBO(num_particles=8, vectorize_particles=True)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), elbo)
    losses = [svi.step() for _ in range(12)]
    # the loss is KL(q || p) summed over the 8 points: about 6 at the start, 0 at the optimum
    assert sum(losses[-4:]) / 4 < sum(losses[:2]) / 2 - 2.0
