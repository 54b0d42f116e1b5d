"""Data-parallel training: two CPU processes under ``torchrun`` with gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import sys, pathlib, torch
    import torch.distributed as dist
    import pyro_flowpack as pf
    from pyro_flowpack.train import fit, TrainConfig

    out = pathlib.Path(sys.argv[1])
    x = torch.randn(224, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([2.0, 0.5])
    torch.manual_seed(3)
    flow = pf.flows.RealNVP(features=2, transforms=2, hidden=(16,))
    seen = []
    config = TrainConfig(epochs=2, batch_size=32, lr=1e-2, progress=False, log_every=1)
    fit(flow, x[:192], x[192:], config, out=out / "run",
        callback=lambda info: seen.append((info.epoch, info.step, info.indices.tolist())))
    rank = dist.get_rank() if dist.is_initialized() else "single"
    torch.save({"params": flow.state_dict(), "seen": seen}, out / f"rank-{rank}.pt")
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    script = folder / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(script), str(folder / "ddp")]
    (folder / "ddp").mkdir()
    (folder / "single").mkdir()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), str(folder / "single")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    load = lambda path: torch.load(path, weights_only=False)  # noqa: E731
    return {
        "rank0": load(folder / "ddp" / "rank-0.pt"),
        "rank1": load(folder / "ddp" / "rank-1.pt"),
        "single": load(folder / "single" / "rank-single.pt"),
        "folder": folder,
    }


def test_both_ranks_hold_identical_parameters(runs):
    a, b = runs["rank0"]["params"], runs["rank1"]["params"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_follow_the_one_process_run(runs):
    """The global batches are the same whatever the number of processes, so the averaged
    gradients (and the parameters) agree with a one-process run up to rounding."""
    a, c = runs["rank0"]["params"], runs["single"]["params"]
    for key in a:
        torch.testing.assert_close(a[key], c[key], rtol=1e-5, atol=1e-5)


def test_the_data_was_split_between_the_ranks(runs):
    first, second, single = runs["rank0"]["seen"], runs["rank1"]["seen"], runs["single"]["seen"]
    assert len(first) == len(second) == len(single) == 12  # 2 epochs of 192 / 32 steps
    for (e0, s0, i0), (e1, s1, i1), (e, s, i) in zip(first, second, single):
        assert (e0, s0) == (e1, s1) == (e, s)
        assert len(i0) == len(i1) == 16 and not set(i0) & set(i1), "each rank takes its own half of the batch"
        assert sorted(i0 + i1) == sorted(i), "together the ranks cover the global batch"
    for epoch in (1, 2):
        seen = [j for e, _, idx in first + second if e == epoch for j in idx]
        assert sorted(seen) == list(range(192)), "every training example is used once per epoch"


def test_only_rank_zero_writes(runs):
    run = runs["folder"] / "ddp" / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "valid_loss" not in r]
    assert steps == list(range(1, 13)), "one record per step: a second writer would duplicate them"
    assert [r["epoch"] for r in records if "valid_loss" in r] == [1, 2]
