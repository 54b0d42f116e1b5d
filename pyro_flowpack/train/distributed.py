r"""Data-parallel training with PyTorch's own :mod:`torch.distributed`.

A run started by ``torchrun --nproc_per_node=N`` (one process per GPU, or per group of CPU
cores) finds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR`` in its
environment. :func:`setup` joins the process group (NCCL on GPUs, gloo on CPUs), each
process trains a :class:`~torch.nn.parallel.DistributedDataParallel` copy of the model on
its share of every global batch (:func:`shard`), gradients are averaged across processes
in the backward pass, and so every process holds the same parameters after each step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Distributed", "setup", "shard", "all_reduce"]


@dataclass(frozen=True)
class Distributed:
    r"""Where this process stands in a (possibly one-process) run.

    Attributes:
        rank: This process's index, in ``[0, world_size)``.
        world_size: The number of processes.
        local_rank: This process's index on its machine (its GPU under NCCL).
        device: The device this process computes on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """Whether there are several processes."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def setup(device: str | torch.device = "cpu") -> Distributed:
    r"""Joins the process group that ``torchrun`` describes in the environment, if any.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) this is a one-process run and
    nothing is initialised. Otherwise the backend is NCCL when ``device`` is CUDA (each
    process then uses GPU ``LOCAL_RANK``) and gloo on CPU.

    Arguments:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:K"`` or ``"auto"`` (CUDA when available).

    Returns:
        This process's :class:`Distributed`.

    Example:
        >>> setup("cpu")
        Distributed(rank=0, world_size=1, local_rank=0, device=device(type='cpu'))
    """
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for, but CUDA is not available here")
    world_size = _environment_int("WORLD_SIZE", 1)
    rank = _environment_int("RANK", 0)
    local_rank = _environment_int("LOCAL_RANK", 0)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, device)


def shard(indices: Tensor, rank: int, world_size: int) -> Tensor:
    r"""This process's share of a global batch of example indices: every
    ``world_size``-th one, starting at ``rank``, so the shares are disjoint, cover the
    batch and differ in size by at most one.

    Example:
        >>> shard(torch.arange(6), rank=1, world_size=2)
        tensor([1, 3, 5])
    """
    return indices[rank::world_size]


def all_reduce(value: Tensor, context: Distributed, op: str = "sum") -> Tensor:
    r"""The ``"sum"`` or ``"max"`` of ``value`` over processes (``value`` itself in a
    one-process run).

    Example:
        >>> all_reduce(torch.tensor(2.0), Distributed(), "max")
        tensor(2.)
    """
    if op not in ("sum", "max"):
        raise ValueError(f"all_reduce: op must be 'sum' or 'max', got {op!r}")
    if context.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return value
