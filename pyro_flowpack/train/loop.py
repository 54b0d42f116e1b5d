r"""The maximum-likelihood training loop.

:func:`fit` minimises the exact negative log-likelihood of a flow,

.. math:: \mathcal{L}(\theta) = -\frac{1}{B} \sum_{i=1}^{B} \log p_\theta(x_i) ,

over mini-batches of a training tensor (for a flow that ends in a dequantization layer,
:math:`\log p_\theta(x)` is the one-sample dequantization bound, so the loss is the
negative bound). It uses Adam, an optional linear warm-up followed by a cosine decay,
gradient-norm clipping, a validation NLL after each epoch, early stopping, and
best/last checkpoints from which an interrupted run continues exactly. Losses are
reported in nats per example or, for images, in bits per dimension,
:math:`\mathcal{L} / (D \ln 2)`.

The same code runs one process or many under ``torchrun`` (see
:mod:`pyro_flowpack.train.distributed`).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from ..flow import Flow
from ..transforms.normalization import ActNorm
from .checkpoint import rng_state, set_rng_state
from .distributed import Distributed, all_reduce, setup, shard
from .folder import FILES, RunFolder, changed_settings

__all__ = ["TrainConfig", "TrainResult", "StepInfo", "NonFiniteLossError", "NoFiniteValidationError", "fit",
           "evaluate_nll", "evaluate_iw_nll", "read_metrics", "RUN_FILES"]

#: The files :func:`fit` keeps in a run folder (see :data:`~pyro_flowpack.train.folder.FILES`).
RUN_FILES = {name: FILES[name] for name in ("last", "best", "metrics")}


class NonFiniteLossError(RuntimeError):
    r"""Raised when too many steps in a row had a non-finite loss or gradient, or when a
    run ends with a streak of such steps."""


class NoFiniteValidationError(RuntimeError):
    r"""Raised when a run with validation data ends without one finite validation loss:
    there is no best model (``best.pt`` is not written; ``last.pt`` is kept)."""


@dataclass
class TrainConfig:
    r"""The settings of a training run.

    Attributes:
        epochs: Passes over the training set.
        batch_size: Examples per optimiser step, in all processes together (each of
            ``N`` processes takes ``batch_size / N`` of them).
        lr: Adam's learning rate (the peak one with a schedule).
        weight_decay: Adam's L2 penalty.
        schedule: ``"constant"`` or ``"cosine"`` (decay to zero at the last step).
        warmup: Steps of linear warm-up from 0 to ``lr``.
        clip: The maximum gradient norm (``None``: no clipping).
        patience: Stop after this many epochs without a better validation loss
            (``None``: never stop early).
        max_steps: Stop after this many optimiser steps in all (``None``: ``epochs``).
        seed: The seed of the initialisation, the data order and the noise.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:K"`` or ``"auto"``.
        threads: ``torch.set_num_threads`` (``None``: leave torch's setting).
        max_nonfinite: Stop after this many steps in a row with a non-finite loss or
            gradient (each is skipped, leaving the parameters untouched).
        eval_batch_size: Examples per call when computing the validation loss.
        log_every: Steps between records of the running training loss.
        checkpoint_every: Steps between checkpoints inside an epoch (``None``: at the end
            of each epoch only).
        progress: Whether to show a progress bar (with one line per epoch above it).
        epoch_lines: Without a progress bar, whether to print one line per epoch to
            standard error (``epoch N: train X, valid Y unit``, from the first process
            only); the ``flowpack`` command sets it with ``--no-progress``. Off by
            default, so that library calls stay quiet.
        unit: ``"nats"`` (per example) or ``"bits/dim"``, for reports; the optimised loss
            is the same.
    """

    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: int = 0
    clip: float | None = 1.0
    patience: int | None = None
    max_steps: int | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    max_nonfinite: int = 5
    eval_batch_size: int = 1024
    log_every: int = 10
    checkpoint_every: int | None = None
    progress: bool = True
    epoch_lines: bool = False
    unit: str = "nats"

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "max_nonfinite": self.max_nonfinite,
                    "eval_batch_size": self.eval_batch_size, "log_every": self.log_every}
        optional = {"patience": self.patience, "max_steps": self.max_steps, "threads": self.threads,
                    "checkpoint_every": self.checkpoint_every}
        for name, value in list(positive.items()) + [(k, v) for k, v in optional.items() if v is not None]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive integer, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"TrainConfig: warmup must be a non-negative integer, got {self.warmup!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig: lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig: weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.clip is not None and not (isinstance(self.clip, (int, float)) and self.clip > 0):
            raise ValueError(f"TrainConfig: clip must be a positive number or None, got {self.clip!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"TrainConfig: schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.unit not in ("nats", "bits/dim"):
            raise ValueError(f"TrainConfig: unit must be 'nats' or 'bits/dim', got {self.unit!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """The config saved by :meth:`to_dict` (unknown keys are an error)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown settings {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass
class StepInfo:
    r"""What a ``callback`` of :func:`fit` sees after each optimiser step.

    Attributes:
        step: Steps done so far (this one included).
        epoch: The current epoch, counting from 1.
        loss: This process's mini-batch loss, in nats per example.
        indices: The training examples this process used, as indices into ``train``.
        skipped: Whether the step was skipped for a non-finite loss or gradient.
        rank: This process's rank.
    """

    step: int
    epoch: int
    loss: float
    indices: Tensor
    skipped: bool
    rank: int


@dataclass
class TrainResult:
    r"""The outcome of :func:`fit`.

    Attributes:
        steps: Optimiser steps done in all (skipped ones included).
        epochs: Epochs with a validation record.
        history: One record per epoch: ``step``, ``epoch``, ``train_loss``,
            ``valid_loss``, ``lr``, ``time`` (losses in the run's unit; ``time``: seconds
            of training so far, over all resumed parts).
        best_valid: The best validation loss (``inf`` without validation data).
        best_epoch: The epoch where it was reached.
        stopped: ``"finished"`` or ``"early_stopping"``.
        nonfinite_steps: Steps skipped for a non-finite loss or gradient.
        nonfinite_valid: Epochs whose validation loss was not finite (never counted as
            the best).
        train_time: Seconds spent in this call.
    """

    steps: int
    epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best_valid: float = math.inf
    best_epoch: int | None = None
    stopped: str = "finished"
    nonfinite_steps: int = 0
    nonfinite_valid: int = 0
    train_time: float = 0.0


class _Objective(nn.Module):
    """The per-example NLL as a module, so that DistributedDataParallel wraps its call."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return -self.flow(context).log_prob(x)


def _check_context(name: str, context: Tensor | None, data: Tensor | None, flow: Flow) -> None:
    """Context rows for a conditional flow, one per example of ``data``; none otherwise."""
    if data is None:
        return
    features = flow.context_features
    if not features:
        if context is not None:
            raise ValueError(f"fit: the flow is unconditional (context=0) but {name} was given")
        return
    if context is None:
        raise ValueError(f"fit: the flow is conditional on {features} context features; give {name}")
    if not isinstance(context, Tensor) or context.shape != (len(data), features):
        got = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
        raise ValueError(f"fit: {name} must have shape ({len(data)}, {features}), one row per example, got {got}")
    if not torch.isfinite(context).all():
        raise ValueError(f"fit: {name} holds non-finite values")


def _check_data(name: str, data: Tensor, flow: Flow) -> None:
    if not isinstance(data, Tensor):
        raise TypeError(f"fit: {name} must be a tensor of examples, got {type(data).__name__}")
    shape = tuple(flow.event_shape)
    if data.dim() != len(shape) + 1 or tuple(data.shape[1:]) != shape:
        raise ValueError(
            f"fit: {name} must have shape (N, {', '.join(map(str, shape))}) for a flow with event shape "
            f"{shape}, got {tuple(data.shape)}"
        )
    if len(data) == 0:
        raise ValueError(f"fit: {name} is empty")
    if data.is_floating_point() and not torch.isfinite(data).all():
        bad = int((~torch.isfinite(data)).flatten(1).any(1).sum())
        raise ValueError(f"fit: {name} holds non-finite values in {bad} of its {len(data)} examples")


def _unit_scale(unit: str, flow: Flow) -> float:
    return 1.0 if unit == "nats" else 1.0 / (flow.event_shape.numel() * math.log(2))


@torch.no_grad()
def evaluate_nll(flow: Flow, data: Tensor, batch_size: int = 1024, distributed: Distributed | None = None,
                 context: Tensor | None = None) -> float:
    r"""The mean negative log-likelihood of ``data`` under ``flow``, in nats per example
    (the negative one-sample bound for a dequantized flow), in eval mode; for a
    conditional flow, :math:`-\log p(x_i \mid c_i)` with ``context`` holding one row
    :math:`c_i` per example.

    Under several processes each takes every ``world_size``-th example and the sums are
    combined, so every process gets the same value.

    Example:
        >>> flow = pf.flows.NSF(features=2)
        >>> round(evaluate_nll(flow, torch.zeros(4, 2)), 4)  # identity at start: -log N(0; 0, I)
        1.8379
    """
    distributed = distributed or Distributed(device=next(iter(flow.buffers()), torch.zeros(())).device)
    was_training = flow.training
    flow.eval()
    try:
        mine = data[distributed.rank::distributed.world_size]
        contexts = (context[distributed.rank::distributed.world_size].split(batch_size) if context is not None
                    else [None] * len(mine.split(batch_size)))
        total = torch.zeros((), dtype=torch.float64, device=distributed.device)
        for batch, c in zip(mine.split(batch_size), contexts):
            c = None if c is None else c.to(distributed.device)
            total += -flow(c).log_prob(batch.to(distributed.device)).double().sum()
        count = torch.tensor(float(len(mine)), dtype=torch.float64, device=distributed.device)
        total, count = all_reduce(total, distributed), all_reduce(count, distributed)
    finally:
        flow.train(was_training)
    return (total / count).item()


@torch.no_grad()
def evaluate_iw_nll(flow: Flow, data: Tensor, k: int, draws_per_call: int = 4096) -> float:
    r"""The mean negative importance-weighted log-likelihood of ``data`` with ``k`` draws
    (:func:`~pyro_flowpack.infer.iw_log_prob`), in nats per example, in eval mode: for a
    dequantized flow a tighter estimate of :math:`-\log P(x)` than :func:`evaluate_nll`.
    Each call of ``log_prob`` sees at most about ``draws_per_call`` examples times draws.

    Example:
        >>> flow = pf.flows.NSF(features=2)
        >>> round(evaluate_iw_nll(flow, torch.zeros(4, 2), k=8), 4)  # deterministic: the NLL
        1.8379
    """
    from ..infer.metrics import iw_log_prob

    was_training = flow.training
    flow.eval()
    try:
        device = next(iter(flow.buffers()), torch.zeros(())).device
        d = flow()
        batch = max(1, draws_per_call // k)
        total = sum(-iw_log_prob(d, x.to(device), k=k, chunk=max(1, draws_per_call // len(x))).double().sum()
                    for x in data.split(batch))
    finally:
        flow.train(was_training)
    return (total / len(data)).item()


def _lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        if config.schedule == "constant":
            return 1.0
        span = max(total_steps - config.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - config.warmup, span) / span))

    return factor


def _needs_data_init(flow: nn.Module) -> bool:
    return any(isinstance(m, ActNorm) and not bool(m.initialized) for m in flow.modules())


def read_metrics(run: str | os.PathLike[str]) -> list[dict[str, Any]]:
    r"""The records of a run folder's ``metrics.jsonl``, in order (none if it does not
    exist); lines that are not JSON objects, such as a last line cut short by a kill, are
    skipped (see :meth:`~pyro_flowpack.train.folder.RunFolder.read_metrics`).

    Example:
        >>> read_metrics("/no/such/run")
        []
    """
    return RunFolder(run).read_metrics()


def fit(
    flow: Flow,
    train: Tensor,
    valid: Tensor | None = None,
    config: TrainConfig | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    metadata: dict[str, Any] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    context: Tensor | None = None,
    valid_context: Tensor | None = None,
) -> TrainResult:
    r"""Trains ``flow`` by maximum likelihood on the examples ``train`` (for a conditional
    flow, :math:`p(x \mid c)` on the pairs of ``train`` and ``context``).

    Each epoch visits the training examples in an order drawn from ``config.seed`` and
    the epoch number, in global batches of ``config.batch_size``; a step whose loss or
    gradient norm is not finite is skipped (the parameters stay as they were) and
    counted, and after ``config.max_nonfinite`` in a row (the count survives a resume) the
    run stops with :class:`NonFiniteLossError`, its last checkpoint intact; so it does if
    the run ends inside a shorter streak. After each epoch the validation loss is
    computed and recorded; a non-finite one is recorded as ``null`` (with
    ``"valid_nonfinite"``), counted, and never the best, and a run that ends without one
    finite validation loss raises :class:`NoFiniteValidationError` (``last.pt`` kept).

    With ``out``, the run folder receives ``checkpoints/last.pt`` (after each epoch and
    every ``config.checkpoint_every`` steps), ``checkpoints/best.pt`` (the best
    validation loss so far) and ``metrics.jsonl`` (one JSON record per line: running
    training losses, epoch records, skipped steps), under the rules of
    :class:`~pyro_flowpack.train.folder.RunFolder`: one writer at a time (a lock), best and
    last checkpoints that agree after a kill at any instant, and a metrics log cut back to
    the checkpoint on every start. Checkpoints hold the model, optimiser, scheduler, step,
    random states, early-stopping state, ``config`` and ``metadata``, and are written
    atomically. ``resume=True`` continues from ``last.pt`` (only the settings in
    :data:`~pyro_flowpack.train.folder.RESUMABLE` may change); the resumed run ends with
    the same parameters as an uninterrupted one (on CPU, where torch is deterministic).
    Without ``resume``, a folder that already holds a run is an error, so nothing is
    overwritten by mistake.

    Under ``torchrun`` each process trains a
    :class:`~torch.nn.parallel.DistributedDataParallel` copy on its share of every
    global batch; only rank 0 writes files and shows progress.

    Arguments:
        flow: The flow to train, moved to ``config.device``.
        train: The training examples, of shape ``(N, *flow.event_shape)``.
        valid: Validation examples of the same shape (``None``: no validation and no
            early stopping).
        config: The settings (:class:`TrainConfig` defaults if ``None``).
        out: The run folder, a path or a :class:`~pyro_flowpack.train.folder.RunFolder`
            (``None``: nothing is written); a folder the caller has locked is used as is.
        resume: Whether to continue the run in ``out``.
        metadata: Anything JSON- or torch-serialisable to keep in the checkpoints, such
            as what is needed to rebuild the flow.
        callback: Called with a :class:`StepInfo` after each step.
        context: For a conditional flow, the context of each training example, of shape
            ``(N, flow.context_features)``.
        valid_context: For a conditional flow, the context of each validation example.

    Returns:
        A :class:`TrainResult`.

    Example:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> x = torch.randn(512, 2) * torch.tensor([2.0, 0.5]) + 1
        >>> flow = pf.flows.MAF(features=2, transforms=2, hidden=(16,))
        >>> config = TrainConfig(epochs=3, batch_size=64, lr=1e-2, progress=False)
        >>> result = fit(flow, x[:448], x[448:], config)
        >>> result.steps, result.history[-1]["valid_loss"] < result.history[0]["valid_loss"]
        (21, True)
    """
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"fit: config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(flow, Flow):
        raise TypeError(f"fit: flow must be a pyro_flowpack.Flow, got {type(flow).__name__}")
    _check_data("train", train, flow)
    if valid is not None:
        _check_data("valid", valid, flow)
    _check_context("context", context, train, flow)
    _check_context("valid_context", valid_context, valid, flow)

    folder = out if isinstance(out, RunFolder) or out is None else RunFolder(out)
    if folder is None and resume:
        raise ValueError("fit: resume=True needs the run folder `out`")
    distributed = setup(config.device)
    owns_lock = folder is not None and distributed.main and not folder.locked
    if owns_lock:
        folder.lock()
    try:
        return _fit(flow, (train, context), (valid, valid_context), config, folder, resume, metadata, callback,
                    distributed)
    finally:
        if owns_lock:
            folder.unlock()


def _fit(flow: Flow, train_pair: tuple, valid_pair: tuple, config: TrainConfig, folder: RunFolder | None,
         resume: bool, metadata: dict[str, Any] | None, callback: Callable[[StepInfo], None] | None,
         context: Distributed) -> TrainResult:
    (train, train_c), (valid, valid_c) = train_pair, valid_pair
    checkpoint = None
    if folder is not None:
        if resume:
            if not folder.holds_run():
                raise FileNotFoundError(f"fit: nothing to resume: {folder.file('last')} does not exist")
            checkpoint = folder.load("last")
            changed = changed_settings(checkpoint["config"], config.to_dict())
            if changed:
                raise ValueError(
                    "fit: a resumed run must keep the settings that shape its trajectory; changed: "
                    + ", ".join(f"{k} ({checkpoint['config'].get(k)!r} -> {getattr(config, k)!r})" for k in changed)
                )
        elif folder.holds_run():
            raise FileExistsError(f"fit: {folder.path} already holds a run; resume it or choose another folder")

    if config.threads:
        torch.set_num_threads(config.threads)
    device = context.device
    flow.to(device)
    train = train.to(device)
    valid = valid.to(device) if valid is not None else None
    train_c = train_c.to(device) if train_c is not None else None
    valid_c = valid_c.to(device) if valid_c is not None else None

    size = len(train)
    batch = min(config.batch_size, size)
    if batch < context.world_size:
        raise ValueError(f"fit: a batch of {batch} examples cannot be split between {context.world_size} processes")
    steps_per_epoch = size // batch
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scale = _unit_scale(config.unit, flow)

    optimizer = torch.optim.Adam(flow.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total_steps))
    state: dict[str, Any] = {"step": 0, "epoch": 0, "best_valid": math.inf, "best_epoch": None, "best_step": None,
                             "bad_epochs": 0, "nonfinite_steps": 0, "in_a_row": 0, "nonfinite_valid": 0,
                             "history": [], "stopped": None, "epoch_sum": 0.0, "epoch_count": 0, "time": 0.0}

    def order(epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        return torch.randperm(size, generator=generator)

    writes = folder is not None and context.main

    def log(record: dict[str, Any]) -> None:
        if writes:
            folder.append_metrics(record)

    if checkpoint is not None:
        flow.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state.update(checkpoint["state"])
        if state["stopped"] == "finished":  # a longer run (more epochs or steps) continues it
            state["stopped"] = None
        states = checkpoint["rng"]
        if len(states) == context.world_size:
            set_rng_state(states[context.rank])
        else:
            torch.manual_seed(config.seed + context.rank + 7919 * state["step"])
        if writes:
            folder.truncate_metrics(state["step"])
    else:
        torch.manual_seed(config.seed + context.rank)
        random.seed(config.seed + context.rank)
        if _needs_data_init(flow):  # same first batch in every process: identical initialisation
            with torch.no_grad():
                flow.train()
                first_batch = order(0)[:batch]
                flow(None if train_c is None else train_c[first_batch]).log_prob(train[first_batch])
        if writes:
            folder.check_writable()
            folder.truncate_metrics(0)  # records of a run killed before its first checkpoint

    objective: nn.Module = _Objective(flow)
    if context.enabled:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(
            objective, device_ids=[device] if device.type == "cuda" else None
        )

    def save(best: bool) -> None:
        states = [None] * context.world_size
        if context.enabled:
            torch.distributed.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if not writes:
            return
        content = {
            "model": flow.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": state,
            "rng": states,
            "config": config.to_dict(),
            "metadata": metadata or {},
            "world_size": context.world_size,
        }
        folder.save(content, best)

    bar = None
    if config.progress and context.main and state["step"] < total_steps and state["stopped"] is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], unit="step", dynamic_ncols=True, file=sys.stderr)

    start = began = time.perf_counter()
    running, running_count = 0.0, 0
    try:
        while state["step"] < total_steps and state["stopped"] is None:
            epoch = state["epoch"]
            permutation = order(epoch)
            first = state["step"] - epoch * steps_per_epoch
            flow.train()
            for position in range(first, steps_per_epoch):
                if state["step"] >= total_steps:
                    break
                indices = shard(permutation[position * batch:(position + 1) * batch], context.rank, context.world_size)
                rows = indices.to(device)
                loss = (objective(train[rows]) if train_c is None else objective(train[rows], train_c[rows])).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(flow.parameters(), config.clip or math.inf)
                bad = (~(torch.isfinite(loss.detach()) & torch.isfinite(norm))).float()
                skipped = bool(all_reduce(bad, context, "max") > 0)
                value = loss.item()
                if skipped:
                    optimizer.zero_grad(set_to_none=True)
                    state["in_a_row"] += 1
                    state["nonfinite_steps"] += 1
                    log({"step": state["step"] + 1, "skipped": "non-finite loss or gradient",
                         "loss": value if math.isfinite(value) else str(value)})
                    if state["in_a_row"] >= config.max_nonfinite:
                        raise NonFiniteLossError(
                            f"training stopped at step {state['step'] + 1}: {state['in_a_row']} steps in a row had a "
                            f"non-finite loss or gradient (each was skipped, the parameters are unchanged)"
                            f"{_last_good(folder)}; try a lower learning rate or stronger gradient clipping"
                        )
                else:
                    optimizer.step()
                    state["in_a_row"] = 0
                    running += value
                    running_count += 1
                    state["epoch_sum"] += value
                    state["epoch_count"] += 1
                scheduler.step()
                state["step"] += 1
                if callback is not None:
                    callback(StepInfo(state["step"], epoch + 1, value, indices, skipped, context.rank))
                if state["step"] % config.log_every == 0 and running_count:
                    log({"step": state["step"], "epoch": epoch + 1, "train_loss": running / running_count * scale,
                               "lr": scheduler.get_last_lr()[0]})
                    if bar is not None:
                        bar.set_postfix_str(f"loss {running / running_count * scale:.4f} {config.unit}")
                    running, running_count = 0.0, 0
                if bar is not None:
                    bar.update(1)
                if (config.checkpoint_every and state["step"] % config.checkpoint_every == 0
                        and position + 1 < steps_per_epoch and state["step"] < total_steps):
                    state["time"] += time.perf_counter() - start
                    start = time.perf_counter()
                    save(best=False)

            completed = state["step"] == (epoch + 1) * steps_per_epoch
            state["time"] += time.perf_counter() - start
            start = time.perf_counter()
            count = state["epoch_count"]
            record: dict[str, Any] = {"step": state["step"], "epoch": epoch + 1,
                                      "train_loss": state["epoch_sum"] / count * scale if count else math.nan,
                                      "lr": scheduler.get_last_lr()[0], "time": round(state["time"], 3)}
            state["epoch_sum"], state["epoch_count"] = 0.0, 0
            improved = False
            if valid is not None:
                loss_valid = evaluate_nll(flow, valid, config.eval_batch_size, context, valid_c) * scale
                if math.isfinite(loss_valid):
                    record["valid_loss"] = loss_valid
                else:  # never the best; JSON has no inf or NaN
                    record["valid_loss"], record["valid_nonfinite"] = None, str(loss_valid)
                    state["nonfinite_valid"] += 1
                improved = math.isfinite(loss_valid) and loss_valid < state["best_valid"]
                if improved:
                    state["best_valid"], state["best_epoch"], state["bad_epochs"] = loss_valid, epoch + 1, 0
                else:
                    state["bad_epochs"] += 1
            else:
                improved = True  # without validation data the best model is the last one
            if improved:
                state["best_step"] = state["step"]
            state["history"].append(record)
            if completed:
                state["epoch"] += 1
            if config.patience is not None and state["bad_epochs"] >= config.patience:
                state["stopped"] = "early_stopping"
            elif state["step"] >= total_steps:
                state["stopped"] = "finished"
            log(record)
            if bar is not None or (config.epoch_lines and context.main):
                valid_text = "" if valid is None else (
                    f", valid {record['valid_loss']:.4f}" if record["valid_loss"] is not None
                    else f", valid {record['valid_nonfinite']}")
                line = f"epoch {epoch + 1}: train {record['train_loss']:.4f}{valid_text} {config.unit}"
                if bar is not None:
                    bar.write(line)
                else:
                    print(line, file=sys.stderr, flush=True)
            save(best=improved)
    finally:
        if bar is not None:
            bar.close()
    if state["in_a_row"]:
        raise NonFiniteLossError(
            f"training ended at step {state['step']} inside a streak of {state['in_a_row']} steps with a non-finite "
            f"loss or gradient (each was skipped){_last_good(folder)}; the model is not trustworthy: try a lower "
            "learning rate or stronger gradient clipping"
        )
    if valid is not None and state["best_step"] is None and state["history"]:
        raise NoFiniteValidationError(
            f"no epoch of {len(state['history'])} had a finite validation loss (the last was "
            f"{state['history'][-1].get('valid_nonfinite')}), so there is no best model{_last_good(folder)}; "
            "look for outliers in the validation data or lower the learning rate"
        )
    return TrainResult(
        steps=state["step"],
        epochs=len(state["history"]),
        history=list(state["history"]),
        best_valid=state["best_valid"],
        best_epoch=state["best_epoch"],
        stopped=state["stopped"] or "finished",
        nonfinite_steps=state["nonfinite_steps"],
        nonfinite_valid=state["nonfinite_valid"],
        train_time=time.perf_counter() - began,
    )


def _last_good(folder: RunFolder | None) -> str:
    if folder is None or not folder.holds_run():
        return ""
    return f"; the last good checkpoint is {folder.file('last')}"
