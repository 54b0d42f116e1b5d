"""The training loop: it learns, it resumes exactly, it survives non-finite steps and it
refuses bad input before training."""

from __future__ import annotations

import json

import pytest
import torch

import pyro_flowpack as pf
from pyro_flowpack.train import NonFiniteLossError, TrainConfig, fit, load_checkpoint
from pyro_flowpack.train import loop as loop_module


def gaussian(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=generator) * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -1.0])


def small_flow(seed: int = 1) -> pf.Flow:
    torch.manual_seed(seed)
    return pf.flows.MAF(features=2, transforms=2, hidden=(16,))


def small_glow(seed: int = 1) -> pf.Flow:
    torch.manual_seed(seed)
    return pf.flows.Glow(shape=(1, 4, 4), levels=1, steps=1, hidden_channels=8, dequantization="variational",
                         num_bins=4, dequantization_channels=4)


def config(**changes) -> TrainConfig:
    values = dict(epochs=3, batch_size=32, lr=1e-2, progress=False, log_every=2)
    values.update(changes)
    return TrainConfig(**values)


def states_equal(a: pf.Flow, b: pf.Flow) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fit_learns_a_gaussian():
    """The validation NLL of a flow fitted to a Gaussian comes within 0.05 nats of the
    true Gaussian's NLL on the same validation points."""
    x = gaussian(2048)
    flow = small_flow()
    result = fit(flow, x[:1792], x[1792:], config(epochs=12, batch_size=128, lr=1e-2))
    truth = torch.distributions.Normal(torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.5]))
    exact = -truth.log_prob(x[1792:]).sum(-1).mean().item()
    assert result.stopped == "finished" and result.steps == 12 * 14 and result.epochs == 12
    assert abs(result.history[-1]["valid_loss"] - exact) < 0.05
    assert result.best_valid == min(h["valid_loss"] for h in result.history)


def interrupted_at(step: int):
    def callback(info):
        if info.step == step:
            raise KeyboardInterrupt

    return callback


# 6 steps per epoch, checkpoints at steps 5, 6, 10, 12, ...: resume from mid-epoch or from an epoch's end
@pytest.mark.parametrize("stop", [7, 11, 13])
def test_resume_ends_with_the_same_parameters(tmp_path, stop):
    x = gaussian(224)
    settings = config(checkpoint_every=5)
    a = small_flow()
    fit(a, x[:192], x[192:], settings, out=tmp_path / "a")
    b = small_flow()
    with pytest.raises(KeyboardInterrupt):
        fit(b, x[:192], x[192:], settings, out=tmp_path / "b", callback=interrupted_at(stop))
    assert not states_equal(a, b)
    b = small_flow(seed=2)  # a fresh process would build the flow anew: resume must restore everything
    result = fit(b, x[:192], x[192:], settings, out=tmp_path / "b", resume=True)
    assert result.steps == 18 and states_equal(a, b)
    history_a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    history_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    epochs_a = [h for h in history_a if "valid_loss" in h]
    epochs_b = [h for h in history_b if "valid_loss" in h]
    assert [h["valid_loss"] for h in epochs_a] == [h["valid_loss"] for h in epochs_b]
    steps_b = [h["step"] for h in history_b if "valid_loss" not in h]
    assert steps_b == sorted(set(steps_b)), "records written after the checkpoint must be dropped on resume"


def test_resume_with_dequantization_noise_and_actnorm(tmp_path):
    """Random dequantization noise and ActNorm's data-dependent initialisation replay exactly."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (96, 1, 4, 4), dtype=torch.uint8, generator=generator)
    settings = config(epochs=2, batch_size=16, lr=1e-3, checkpoint_every=4, unit="bits/dim")
    a = small_glow()
    fit(a, x[:64], x[64:], settings, out=tmp_path / "a")
    b = small_glow()
    with pytest.raises(KeyboardInterrupt):
        fit(b, x[:64], x[64:], settings, out=tmp_path / "b", callback=interrupted_at(6))
    b = small_glow(seed=5)
    fit(b, x[:64], x[64:], settings, out=tmp_path / "b", resume=True)
    assert states_equal(a, b)


def test_checkpoint_contents(tmp_path):
    x = gaussian(160)
    flow = small_flow()
    fit(flow, x[:128], x[128:], config(epochs=2), out=tmp_path, metadata={"note": "kept"})
    for name in ("last", "best"):
        checkpoint = load_checkpoint(tmp_path / "checkpoints" / f"{name}.pt")
        assert {"model", "optimizer", "scheduler", "state", "rng", "config", "metadata"} <= set(checkpoint)
        assert checkpoint["metadata"] == {"note": "kept"}
        assert TrainConfig.from_dict(checkpoint["config"]) == config(epochs=2)
        assert checkpoint["state"]["step"] == 8
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert all(torch.equal(v, flow.state_dict()[k]) for k, v in last["model"].items())
    assert not list((tmp_path / "checkpoints").glob(".*")), "no temporary files are left behind"


def test_resuming_a_finished_run_with_more_epochs_continues(tmp_path):
    x = gaussian(160)
    flow = small_flow()
    fit(flow, x[:128], x[128:], config(epochs=1), out=tmp_path)
    result = fit(flow, x[:128], x[128:], config(epochs=2), out=tmp_path, resume=True)
    assert result.steps == 8 and [h["epoch"] for h in result.history] == [1, 2]


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    x = gaussian(160)
    flow = small_flow()
    original = loop_module._Objective.forward
    calls = {"n": 0}
    snapshots = {}

    def forward(self, batch):
        calls["n"] += 1
        loss = original(self, batch)
        if calls["n"] == 3:  # one bad step: skipped, training goes on
            snapshots["before"] = {k: v.clone() for k, v in self.flow.state_dict().items()}
            return loss * float("nan")
        if calls["n"] >= 6:  # from here on every step is bad
            return loss * float("inf")
        return loss

    monkeypatch.setattr(loop_module._Objective, "forward", forward)
    seen = []
    with pytest.raises(NonFiniteLossError, match="3 steps in a row.*last good checkpoint"):
        fit(flow, x[:128], x[128:], config(epochs=4, max_nonfinite=3), out=tmp_path,
            callback=lambda info: seen.append(info))
    assert [info.skipped for info in seen] == [False, False, True, False, False, True, True]  # the 8th raised
    after_skip = seen[2]
    assert after_skip.step == 3
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.pt")  # written at the end of epoch 1 (step 4)
    assert checkpoint["state"]["step"] == 4 and checkpoint["state"]["nonfinite_steps"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in flow.parameters()), "skipped steps leave the parameters finite"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("skipped" in r for r in records) == 4


def test_a_skipped_step_leaves_the_parameters_unchanged(monkeypatch):
    x = gaussian(64)
    flow = small_flow()
    original = loop_module._Objective.forward
    states = []

    def forward(self, batch):
        states.append({k: v.clone() for k, v in self.flow.state_dict().items()})
        loss = original(self, batch)
        return loss * float("nan") if len(states) == 2 else loss

    monkeypatch.setattr(loop_module._Objective, "forward", forward)
    fit(flow, x, None, config(epochs=1, batch_size=16))
    assert all(torch.equal(states[1][k], states[2][k]) for k in states[1])
    assert not all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_early_stopping(tmp_path, monkeypatch):
    values = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    monkeypatch.setattr(loop_module, "evaluate_nll", lambda *args: next(values))
    x = gaussian(160)
    result = fit(small_flow(), x[:128], x[128:], config(epochs=6, patience=2), out=tmp_path)
    assert result.stopped == "early_stopping" and result.epochs == 4
    assert result.best_valid == 2.0 and result.best_epoch == 2
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["state"]["step"] == 8
    again = fit(small_flow(), x[:128], x[128:], config(epochs=6, patience=2), out=tmp_path, resume=True)
    assert again.steps == 16 and again.stopped == "early_stopping", "an early-stopped run stays stopped"


def test_gradient_clipping(monkeypatch):
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        norms.append((total.item(), after.item(), max_norm))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    x = gaussian(64) * 50  # large gradients at the start
    fit(small_flow(), x, None, config(epochs=1, batch_size=16, clip=0.5))
    assert any(before > 0.5 for before, _, _ in norms)
    assert all(after <= 0.5 * (1 + 1e-4) for _, after, _ in norms)


def test_learning_rate_schedule():
    settings = config(warmup=4, lr=1.0)
    factor = loop_module._lr_lambda(settings, total_steps=20)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0 and abs(factor(12) - 0.5) < 1e-12 and abs(factor(20)) < 1e-12
    constant = loop_module._lr_lambda(config(schedule="constant"), total_steps=20)
    assert all(constant(s) == 1.0 for s in range(25))


def test_threads_setting_is_respected():
    before = torch.get_num_threads()
    try:
        fit(small_flow(), gaussian(32), None, config(epochs=1, threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epochs": 0}, "epochs must be an int >= 1"),
        ({"batch_size": 2.5}, "batch_size must be an int >= 1"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"clip": 0}, "clip must be a positive number"),
        ({"schedule": "step"}, "schedule must be 'constant' or 'cosine'"),
        ({"unit": "bits"}, "unit must be 'nats' or 'bits/dim'"),
        ({"warmup": -1}, "warmup must be an int >= 0"),
    ],
)
def test_bad_config(changes, message):
    with pytest.raises(ValueError, match=message):
        config(**changes)


def test_bad_input(tmp_path):
    flow = small_flow()
    with pytest.raises(ValueError, match=r"train must have shape \(N, 2\).*got \(10, 3\)"):
        fit(flow, torch.zeros(10, 3), None, config())
    with pytest.raises(ValueError, match="valid holds non-finite values in 1 of its 4"):
        fit(flow, torch.zeros(10, 2), torch.tensor([[0.0, float("nan")]] + [[0.0, 0.0]] * 3), config())
    with pytest.raises(ValueError, match="train is empty"):
        fit(flow, torch.zeros(0, 2), None, config())
    with pytest.raises(TypeError, match="train must be a tensor"):
        fit(flow, [[0.0, 0.0]], None, config())
    with pytest.raises(ValueError, match="conditional on 3 context features; give context"):
        fit(pf.flows.MAF(features=2, context=3), torch.zeros(10, 2), None, config())
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        fit(flow, torch.zeros(10, 2), None, config(), out=tmp_path / "none", resume=True)
    with pytest.raises(ValueError, match="resume=True needs the run folder"):
        fit(flow, torch.zeros(10, 2), None, config(), resume=True)
    fit(flow, gaussian(32), None, config(epochs=1), out=tmp_path / "run")
    with pytest.raises(FileExistsError, match="already holds a run"):
        fit(flow, gaussian(32), None, config(epochs=1), out=tmp_path / "run")
    with pytest.raises(ValueError, match=r"changed: lr \(0.01 -> 0.1\)"):
        fit(flow, gaussian(32), None, config(epochs=2, lr=0.1), out=tmp_path / "run", resume=True)


def test_fit_trains_a_conditional_flow_on_pairs_and_checks_the_context():
    """p(x | c) for x = A c + 0.1 eps: the validation NLL comes within 0.1 nats of the
    true conditional NLL (-1.77 for two features), far below the marginal one (3.65)."""
    generator = torch.Generator().manual_seed(0)
    c = torch.randn(2304, 2, generator=generator)
    x = c @ torch.tensor([[1.0, 0.5], [-0.5, 2.0]]) + 0.1 * torch.randn(2304, 2, generator=generator)
    torch.manual_seed(0)
    flow = pf.flows.MAF(2, context=2, transforms=2, hidden=(32, 32))
    result = fit(flow, x[:2048], x[2048:], config(epochs=40, batch_size=128, lr=1e-2), context=c[:2048],
                 valid_context=c[2048:])
    true = 2 * 0.5 * torch.log(2 * torch.pi * torch.e * torch.tensor(0.01)).item()
    assert abs(result.best_valid - true) < 0.1, (result.best_valid, true)
    with pytest.raises(ValueError, match=r"context must have shape \(10, 2\), one row per example, got \(9, 2\)"):
        fit(flow, torch.zeros(10, 2), None, config(), context=torch.zeros(9, 2))
    with pytest.raises(ValueError, match="give valid_context"):
        fit(flow, torch.zeros(10, 2), torch.zeros(4, 2), config(), context=torch.zeros(10, 2))
    with pytest.raises(ValueError, match="unconditional .* but context was given"):
        fit(small_flow(), torch.zeros(10, 2), None, config(), context=torch.zeros(10, 2))
