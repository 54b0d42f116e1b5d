"""The property battery: every layer and every builder (see ``cases.py``), with and
without context, in float32 and float64, must satisfy each property below."""

from __future__ import annotations

import copy
import io
import pickle

import pyro
import pyro.distributions as pdist
import pytest
import torch
from torch.distributions import TransformedDistribution

from cases import layer_of, make_flow

DTYPES = [torch.float32, torch.float64]


def _single(c):
    return None if c is None else c[0]


# Inverse consistency ------------------------------------------------------------------
def test_round_trip_float64_within_1e8(case, context):
    flow = make_flow(case, context)
    layer = layer_of(flow)
    x = case.base_sample((64,))
    c = case.context_sample(context, (64,))
    y, ladj = layer.call_and_ladj(x, c)
    x2, ladj2 = layer.inverse_and_ladj(y.clone(), c)  # a clone: no cache, a real inverse
    assert torch.allclose(x2, x, rtol=0, atol=max(1e-8, case.tolerance))
    assert torch.allclose(ladj2, ladj, rtol=0, atol=max(1e-8, case.tolerance))
    y2, _ = layer.call_and_ladj(x2.clone(), c)
    assert torch.allclose(y2, y, rtol=0, atol=max(1e-8, case.tolerance))


def test_round_trip_float32_within_1e4_up_to_10(case, context):
    flow = make_flow(case, context, dtype=torch.float32)
    layer = layer_of(flow)
    size = torch.Size(case.base_shape).numel()
    bound = min(10.0, case.base_bound)
    x = torch.linspace(-bound, bound, 64 * size)[torch.randperm(64 * size)].reshape(64, *case.base_shape)
    c = case.context_sample(context, (64,), torch.float32)
    y, _ = layer.call_and_ladj(x, c)
    x2, _ = layer.inverse_and_ladj(y.clone(), c)
    assert torch.allclose(x2, x, rtol=0, atol=max(1e-4, case.tolerance))


# Log-determinants against autograd -----------------------------------------------------
def test_ladj_equals_autograd_jacobian_float64_within_1e6(case, context):
    flow = make_flow(case, context)
    layer = layer_of(flow)
    c = case.context_sample(context, (4,))
    for i in range(4):
        x = case.base_sample()
        ci = None if c is None else c[i]
        jac = torch.autograd.functional.jacobian(lambda v: layer.call_and_ladj(v, ci)[0].flatten(), x)
        expected = torch.linalg.slogdet(jac.reshape(x.numel(), x.numel()))[1]
        y, ladj = layer.call_and_ladj(x, ci)
        _, ladj_inverse = layer.inverse_and_ladj(y.clone(), ci)
        bound = layer.condition(ci) if ci is not None else layer
        ladj_torch = bound.log_abs_det_jacobian(x, y)
        for value in (ladj, ladj_inverse, ladj_torch):
            assert value.shape == ()
            assert torch.allclose(value, expected, rtol=0, atol=max(1e-6, case.tolerance))


# Shapes -----------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [(), (3,), (3, 4)], ids=str)
def test_batch_shapes(case, context, batch):
    flow = make_flow(case, context)
    layer = layer_of(flow)
    x = case.base_sample(batch)
    c = case.context_sample(context, batch)
    y, ladj = layer.call_and_ladj(x, c)
    assert y.shape == batch + case.shape and ladj.shape == batch
    x2, ladj2 = layer.inverse_and_ladj(y, c)
    assert x2.shape == x.shape and ladj2.shape == batch
    d = flow(c)
    assert d.batch_shape == (batch if context else ())
    assert d.event_shape == case.shape
    assert d.log_prob(case.data_sample(batch)).shape == batch
    for sample_shape in [(), (2,), (2, 3)]:
        expected = torch.Size(sample_shape) + d.batch_shape + case.shape
        assert d.sample(sample_shape).shape == expected
        s, log_p = d.rsample_and_log_prob(sample_shape)
        assert s.shape == expected and log_p.shape == expected[: len(expected) - len(case.shape)]


def test_context_broadcasts_over_sample_shape(case, context):
    if not context:
        pytest.skip("unconditional")
    flow = make_flow(case, context)
    c = case.context_sample(context, (4,))
    d = flow(c)
    samples = d.sample((6,))
    assert samples.shape == (6, 4, *case.shape)
    log_p = d.log_prob(samples)
    # each column of samples is scored under its own context
    for j in range(4):
        single = flow(c[j]).log_prob(samples[:, j])
        assert torch.allclose(log_p[:, j], single, rtol=0, atol=max(1e-10, case.tolerance))


# The context is used -----------------------------------------------------------------------
CHANGED_FRACTION = 0.9  # of the points, for each feature that depends on the context
CHANGE = 1e-6  # the smallest change counted (float64, parameters moved from the identity)


def _per_feature_change(a, b, points: int):
    return (a - b).abs().reshape(points, -1)


def test_each_output_feature_changes_with_the_context_in_both_directions(case, context):
    """Per feature and per point, not in aggregate: each output entry that depends on the
    context by design changes at >= 90% of 32 points when the context is redrawn (by more
    than 1e-6), in the sampling and the density direction; the pass-through entries of a
    coupling layer do not change at all; and so does log p(x | c) at every point."""
    if not context:
        pytest.skip("unconditional")
    flow = make_flow(case, context)
    layer = layer_of(flow)
    points = 32
    c1, c2 = case.context_sample(context, (points,)), case.context_sample(context, (points,))
    x, y = case.base_sample((points,)), case.data_sample((points,))
    forward = _per_feature_change(layer.call_and_ladj(x, c1)[0], layer.call_and_ladj(x, c2)[0], points)
    inverse = _per_feature_change(layer.inverse_and_ladj(y, c1)[0], layer.inverse_and_ladj(y, c2)[0], points)
    base_free = case.context_free if case.context_free_base is None else case.context_free_base
    for name, change, of, free in (("sampling", forward, "y", case.context_free), ("density", inverse, "x", base_free)):
        fraction = (change > CHANGE).double().mean(0)
        for i in range(change.shape[1]):
            if i in free:
                assert torch.all(change[:, i] == 0), f"{name} direction: pass-through {of}[{i}] changed"
            else:
                assert fraction[i] >= CHANGED_FRACTION, (
                    f"{name} direction: {of}[{i}] changed at only {fraction[i]:.0%} of the points")
    log_p = (flow(c1).log_prob(y) - flow(c2).log_prob(y)).abs()
    assert bool((log_p > CHANGE).all()), f"log p(x | c) unchanged at {int((log_p <= CHANGE).sum())} points"


# Gradients -----------------------------------------------------------------------------
def test_rsample_gradients_reach_every_parameter(case, context):
    flow = make_flow(case, context).train()
    if not list(flow.parameters()) and not context:
        pytest.skip("nothing to differentiate")
    c = case.context_sample(context, (8,))
    if c is not None:
        c.requires_grad_(True)
    y = flow(c).rsample((16,))
    y.square().sum().backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if c is not None:
        assert c.grad is not None and c.grad.abs().sum() > 0


def test_log_prob_equals_rsample_and_log_prob(case, context):
    flow = make_flow(case, context)
    c = case.context_sample(context, (8,))
    y, log_p = flow(c).rsample_and_log_prob()
    assert torch.allclose(flow(c).log_prob(y.clone()), log_p, rtol=0, atol=max(1e-8, case.tolerance))


# Saving and copying ---------------------------------------------------------------------
def test_state_dict_round_trip_reproduces_log_prob_exactly(case, context):
    flow = make_flow(case, context, seed=0)
    other = make_flow(case, context, seed=1)
    x = case.data_sample((32,))
    c = case.context_sample(context, (32,))
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    assert torch.equal(other(c).log_prob(x), flow(c).log_prob(x))


def test_deepcopy_and_pickle_after_backward(case, context):
    flow = make_flow(case, context).train()
    x = case.data_sample((32,))
    c = case.context_sample(context, (32,))
    loss = -flow(c).log_prob(x).mean()
    if loss.requires_grad:
        loss.backward()
    _ = flow(c).rsample_and_log_prob()  # leaves a sample-path evaluation cached too
    for clone in (copy.deepcopy(flow), pickle.loads(pickle.dumps(flow))):
        clone.eval()
        flow.eval()
        assert torch.equal(clone(c).log_prob(x), flow(c).log_prob(x))


def test_to_float64(case, context):
    flow = make_flow(case, context, dtype=torch.float32).to(torch.float64)
    x = case.data_sample((8,))
    c = case.context_sample(context, (8,))
    log_p = flow(c).log_prob(x)
    assert log_p.dtype == torch.float64 and torch.isfinite(log_p).all()
    assert flow(c).sample().dtype == torch.float64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_log_prob_finite_in_dtype(case, context, dtype):
    flow = make_flow(case, context, dtype=dtype)
    x = case.data_sample((16,), dtype)
    c = case.context_sample(context, (16,), dtype)
    log_p = flow(c).log_prob(x)
    assert log_p.dtype == dtype and torch.isfinite(log_p).all()


# Inside torch and Pyro ------------------------------------------------------------------
def test_layers_work_in_torch_and_pyro_transformed_distribution(case, context):
    flow = make_flow(case, context)
    x = case.data_sample((16,))
    c = case.context_sample(context, (16,))
    expected = flow(c).log_prob(x)
    base = flow.base().expand((16,) if c is not None else ())
    transforms = [t.condition(c) if c is not None else t for t in flow.transform.parts]
    for cls in (TransformedDistribution, pdist.TransformedDistribution):
        d = cls(base, transforms)
        assert torch.allclose(d.log_prob(x), expected, rtol=0, atol=max(1e-8, case.tolerance))
        assert d.sample((2,)).shape == (2, *d.batch_shape, *case.shape)


def test_flow_in_pyro_sample_obs_under_plate(case, context):
    flow = make_flow(case, context)
    x = case.data_sample((10,))
    c = case.context_sample(context, (10,))

    def model(x):
        pyro.module("flow", flow)
        with pyro.plate("data", len(x)):
            pyro.sample("x", flow(c), obs=x)

    pyro.clear_param_store()
    trace = pyro.poutine.trace(model).get_trace(x)
    trace.compute_log_prob()
    assert trace.nodes["x"]["fn"].batch_shape == (10,)
    assert torch.allclose(trace.nodes["x"]["log_prob"], flow(c).log_prob(x), rtol=0, atol=max(1e-10, case.tolerance))
    if not context:  # unconditional: the plate expands a batch-less distribution
        assert torch.allclose(trace.log_prob_sum(), flow().log_prob(x).sum(), rtol=0, atol=max(1e-8, case.tolerance))


# The cache is never stale ----------------------------------------------------------------
def test_log_prob_after_optimizer_step_is_fresh_and_differentiable(case, context):
    flow = make_flow(case, context).train()
    if not list(flow.parameters()):
        pytest.skip("no parameters")
    x = case.data_sample((32,))
    c = case.context_sample(context, (32,))
    d = flow(c)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    loss = -d.log_prob(x).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    loss2 = -d.log_prob(x).mean()  # the very same tensor object
    assert not torch.equal(loss2.detach(), loss.detach())
    loss2.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())
    # the same holds for a value the distribution sampled itself (reused until a step)
    y = d.rsample((8,))
    before = d.log_prob(y).detach().clone()
    optimizer.step()
    assert not torch.equal(d.log_prob(y).detach(), before)


def test_grad_enabled_after_no_grad_evaluation_recomputes(case, context):
    flow = make_flow(case, context)
    if not list(flow.parameters()):
        pytest.skip("no parameters")
    x = case.data_sample((8,))
    c = case.context_sample(context, (8,))
    d = flow(c)
    with torch.no_grad():
        y = d.rsample()
    log_p = d.log_prob(y)
    assert log_p.requires_grad
    log_p.sum().backward()


# Each network runs once ---------------------------------------------------------------------
def _count_conditioner_calls(flow):
    counts = {}
    for name, module in flow.named_modules():
        if name.endswith("conditioner"):
            counts[name] = 0
            module.register_forward_hook(lambda m, i, o, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


def test_each_network_runs_once_per_call(case, context):
    flow = make_flow(case, context)
    counts = _count_conditioner_calls(flow)
    if not counts:
        pytest.skip("no network")
    sequential = {
        name: module.sequential for name, module in flow.named_modules() if hasattr(module, "sequential")
    }
    x = case.data_sample((16,))
    c = case.context_sample(context, (16,))

    def calls(fn):
        for k in counts:
            counts[k] = 0
        fn()
        return dict(counts)

    def layer_of_network(name):
        # the outermost layer that declares a sequential direction decides (Inverse flips it)
        parts = name.split(".")
        for i in range(1, len(parts)):
            value = sequential.get(".".join(parts[:i]))
            if value is not None:
                return value
        return None

    density = calls(lambda: flow(c).log_prob(x))
    sampling = calls(lambda: flow(c).rsample_and_log_prob())
    for name in counts:
        if layer_of_network(name) == "inverse":  # IAF: sampling is one pass
            assert sampling[name] == 1, name
        else:
            assert density[name] == 1, name
        if layer_of_network(name) is None:
            assert sampling[name] == 1, name
    d = flow(c)
    y = d.rsample()
    again = calls(lambda: d.log_prob(y))  # a value just sampled reuses the evaluation
    assert all(v == 0 for v in again.values()), again


def test_context_changed_in_place_is_not_served_from_the_cache(case, context):
    if not context:
        pytest.skip("unconditional")
    flow = make_flow(case, context)
    c = case.context_sample(context, (4,))
    d = flow(c)
    y = d.rsample()
    c.copy_(case.context_sample(context, (4,)))  # a refilled context buffer
    assert torch.allclose(d.log_prob(y), d.log_prob(y.clone()), rtol=0, atol=max(1e-8, case.tolerance))
