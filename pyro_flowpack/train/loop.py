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

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from ..checks import check_int
from ..flow import Flow
from ..transforms.normalization import ActNorm
from .checkpoint import rng_state, set_rng_state
from .distributed import Distributed, all_reduce, setup, shard
from .folder import FILES, RunFolder, changed_settings

__all__ = ["TrainConfig", "TrainResult", "StepInfo", "LoopState", "NonFiniteLossError", "NoFiniteValidationError", "fit",
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
            check_int(value, f"TrainConfig: {name}")
        check_int(self.warmup, "TrainConfig: warmup", minimum=0)
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


@dataclass
class LoopState:
    r"""Where a training run stands: everything of the loop's own that a checkpoint keeps
    (as a dictionary, ``checkpoint["state"]``) so that a resumed run continues exactly.

    Attributes:
        step: Optimiser steps done (skipped ones included).
        epoch: Epochs completed.
        best_valid: The best finite validation loss (``inf`` before one).
        best_epoch: The epoch of the best validation loss.
        best_step: The step of the best model (the step of ``best.pt``).
        bad_epochs: Epochs in a row without a better validation loss (early stopping).
        nonfinite_steps: Steps skipped for a non-finite loss or gradient.
        in_a_row: The current streak of such steps.
        nonfinite_valid: Epochs whose validation loss was not finite.
        history: One record per epoch.
        stopped: ``None`` while running, else ``"finished"`` or ``"early_stopping"``.
        epoch_sum: The sum of the current epoch's step losses (nats).
        epoch_count: The number of steps in that sum.
        time: Seconds of training so far, over all resumed parts.
    """

    step: int = 0
    epoch: int = 0
    best_valid: float = math.inf
    best_epoch: int | None = None
    best_step: int | None = None
    bad_epochs: int = 0
    nonfinite_steps: int = 0
    in_a_row: int = 0
    nonfinite_valid: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    epoch_sum: float = 0.0
    epoch_count: int = 0
    time: float = 0.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LoopState":
        """The state saved by ``asdict`` (keys of older checkpoints keep their defaults)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class _Trainer:
    """One training run: the data, the optimiser, the loop's state and its small steps."""

    def __init__(self, flow: Flow, train: tuple, valid: tuple, config: TrainConfig, folder: RunFolder | None,
                 metadata: dict[str, Any] | None, callback: Callable[[StepInfo], None] | None,
                 distributed: Distributed) -> None:
        self.flow, self.config, self.folder, self.metadata = flow, config, folder, metadata or {}
        self.callback, self.distributed = callback, distributed
        device = distributed.device
        flow.to(device)
        self.train, self.train_c = (None if t is None else t.to(device) for t in train)
        self.valid, self.valid_c = (None if t is None else t.to(device) for t in valid)
        size = len(self.train)
        self.batch = min(config.batch_size, size)
        if self.batch < distributed.world_size:
            raise ValueError(f"fit: a batch of {self.batch} examples cannot be split between "
                             f"{distributed.world_size} processes")
        self.steps_per_epoch = size // self.batch
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.scale = _unit_scale(config.unit, flow)
        self.optimizer = torch.optim.Adam(flow.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config, self.total_steps))
        self.state = LoopState()
        self.writes = folder is not None and distributed.main
        self.objective: nn.Module = _Objective(flow)
        self.bar: Any = None
        self.running, self.running_count = 0.0, 0

    # Starting -----------------------------------------------------------------------
    def order(self, epoch: int) -> Tensor:
        """The order of the training examples in ``epoch``: a function of the seed and epoch."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train), generator=generator)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continues from a checkpoint: parameters, optimiser, schedule, state, generators."""
        self.flow.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.state = LoopState.from_dict(checkpoint["state"])
        if self.state.stopped == "finished":  # a longer run (more epochs or steps) continues it
            self.state.stopped = None
        states, d = checkpoint["rng"], self.distributed
        if len(states) == d.world_size:
            set_rng_state(states[d.rank])
        else:
            torch.manual_seed(self.config.seed + d.rank + 7919 * self.state.step)
        if self.writes:
            self.folder.truncate_metrics(self.state.step)

    def initialise(self) -> None:
        """A fresh run: seeds, data-dependent initialisation, an emptied metrics log."""
        rank = self.distributed.rank
        torch.manual_seed(self.config.seed + rank)
        random.seed(self.config.seed + rank)
        if _needs_data_init(self.flow):  # same first batch in every process: identical initialisation
            with torch.no_grad():
                self.flow.train()
                first = self.order(0)[:self.batch]
                self.flow(None if self.train_c is None else self.train_c[first]).log_prob(self.train[first])
        if self.writes:
            self.folder.check_writable()
            self.folder.truncate_metrics(0)  # records of a run killed before its first checkpoint

    # Small steps ----------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        if self.writes:
            self.folder.append_metrics(record)

    def save(self, best: bool) -> None:
        """Writes last.pt (and best.pt); every process hands over its generators' states."""
        d = self.distributed
        states: list[Any] = [None] * d.world_size
        if d.enabled:
            torch.distributed.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if not self.writes:
            return
        self.folder.save({
            "model": self.flow.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": asdict(self.state),
            "rng": states,
            "config": self.config.to_dict(),
            "metadata": self.metadata,
            "world_size": d.world_size,
        }, best)

    def step(self, indices: Tensor, epoch: int) -> None:
        """One optimiser step on ``indices``, or a skipped one if its loss or gradient is
        not finite in any process."""
        state, config = self.state, self.config
        rows = indices.to(self.distributed.device)
        x = self.train[rows]
        loss = (self.objective(x) if self.train_c is None else self.objective(x, self.train_c[rows])).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.flow.parameters(), config.clip or math.inf)
        bad = (~(torch.isfinite(loss.detach()) & torch.isfinite(norm))).float()
        skipped = bool(all_reduce(bad, self.distributed, "max") > 0)
        value = loss.item()
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            state.in_a_row += 1
            state.nonfinite_steps += 1
            self.log({"step": state.step + 1, "skipped": "non-finite loss or gradient",
                      "loss": value if math.isfinite(value) else str(value)})
            if state.in_a_row >= config.max_nonfinite:
                raise NonFiniteLossError(
                    f"training stopped at step {state.step + 1}: {state.in_a_row} steps in a row had a non-finite "
                    f"loss or gradient (each was skipped, the parameters are unchanged){_last_good(self.folder)}; "
                    "try a lower learning rate or stronger gradient clipping"
                )
        else:
            self.optimizer.step()
            state.in_a_row = 0
            self.running += value
            self.running_count += 1
            state.epoch_sum += value
            state.epoch_count += 1
        self.scheduler.step()
        state.step += 1
        if self.callback is not None:
            self.callback(StepInfo(state.step, epoch + 1, value, indices, skipped, self.distributed.rank))
        if state.step % config.log_every == 0 and self.running_count:
            mean = self.running / self.running_count * self.scale
            self.log({"step": state.step, "epoch": epoch + 1, "train_loss": mean, "lr": self.scheduler.get_last_lr()[0]})
            if self.bar is not None:
                self.bar.set_postfix_str(f"loss {mean:.4f} {config.unit}")
            self.running, self.running_count = 0.0, 0
        if self.bar is not None:
            self.bar.update(1)

    def validate(self, record: dict[str, Any], epoch: int) -> bool:
        """Adds the validation loss to ``record``; whether the model is the best so far."""
        state = self.state
        if self.valid is None:
            return True  # without validation data the best model is the last one
        loss = evaluate_nll(self.flow, self.valid, self.config.eval_batch_size, self.distributed,
                            self.valid_c) * self.scale
        if math.isfinite(loss):
            record["valid_loss"] = loss
        else:  # never the best; JSON has no inf or NaN
            record["valid_loss"], record["valid_nonfinite"] = None, str(loss)
            state.nonfinite_valid += 1
        improved = math.isfinite(loss) and loss < state.best_valid
        if improved:
            state.best_valid, state.best_epoch, state.bad_epochs = loss, epoch + 1, 0
        else:
            state.bad_epochs += 1
        return improved

    def end_epoch(self, epoch: int) -> None:
        """Records the epoch, validates, decides whether to stop, and saves."""
        state, config = self.state, self.config
        completed = state.step == (epoch + 1) * self.steps_per_epoch
        self.tick()
        count = state.epoch_count
        record: dict[str, Any] = {"step": state.step, "epoch": epoch + 1,
                                  "train_loss": state.epoch_sum / count * self.scale if count else math.nan,
                                  "lr": self.scheduler.get_last_lr()[0], "time": round(state.time, 3)}
        state.epoch_sum, state.epoch_count = 0.0, 0
        improved = self.validate(record, epoch)
        if improved:
            state.best_step = state.step
        state.history.append(record)
        if completed:
            state.epoch += 1
        if config.patience is not None and state.bad_epochs >= config.patience:
            state.stopped = "early_stopping"
        elif state.step >= self.total_steps:
            state.stopped = "finished"
        self.log(record)
        self.report(record, epoch)
        self.save(best=improved)

    def report(self, record: dict[str, Any], epoch: int) -> None:
        """The epoch's line, above the progress bar or (``epoch_lines``) on stderr."""
        if self.bar is None and not (self.config.epoch_lines and self.distributed.main):
            return
        valid_text = "" if self.valid is None else (
            f", valid {record['valid_loss']:.4f}" if record["valid_loss"] is not None
            else f", valid {record['valid_nonfinite']}")
        line = f"epoch {epoch + 1}: train {record['train_loss']:.4f}{valid_text} {self.config.unit}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def tick(self) -> None:
        """Adds the time since the last tick to the run's training time."""
        now = time.perf_counter()
        self.state.time += now - self._clock
        self._clock = now

    # The loop -------------------------------------------------------------------------
    def run(self) -> TrainResult:
        state, config, d = self.state, self.config, self.distributed
        if d.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device = d.device
            self.objective = DistributedDataParallel(self.objective,
                                                     device_ids=[device] if device.type == "cuda" else None)
        if config.progress and d.main and state.step < self.total_steps and state.stopped is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total_steps, initial=state.step, unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        self._clock = began = time.perf_counter()
        try:
            while state.step < self.total_steps and state.stopped is None:
                epoch = state.epoch
                permutation = self.order(epoch)
                self.flow.train()
                for position in range(state.step - epoch * self.steps_per_epoch, self.steps_per_epoch):
                    if state.step >= self.total_steps:
                        break
                    batch = permutation[position * self.batch:(position + 1) * self.batch]
                    self.step(shard(batch, d.rank, d.world_size), epoch)
                    if (config.checkpoint_every and state.step % config.checkpoint_every == 0
                            and position + 1 < self.steps_per_epoch and state.step < self.total_steps):
                        self.tick()
                        self.save(best=False)
                self.end_epoch(epoch)
        finally:
            if self.bar is not None:
                self.bar.close()
        self.check_outcome()
        return TrainResult(steps=state.step, epochs=len(state.history), history=list(state.history),
                           best_valid=state.best_valid, best_epoch=state.best_epoch,
                           stopped=state.stopped or "finished", nonfinite_steps=state.nonfinite_steps,
                           nonfinite_valid=state.nonfinite_valid, train_time=time.perf_counter() - began)

    def check_outcome(self) -> None:
        """Fails a run that ended inside a streak of skipped steps, or without one finite
        validation loss."""
        state = self.state
        if state.in_a_row:
            raise NonFiniteLossError(
                f"training ended at step {state.step} inside a streak of {state.in_a_row} steps with a non-finite "
                f"loss or gradient (each was skipped){_last_good(self.folder)}; the model is not trustworthy: try a "
                "lower learning rate or stronger gradient clipping"
            )
        if self.valid is not None and state.best_step is None and state.history:
            raise NoFiniteValidationError(
                f"no epoch of {len(state.history)} had a finite validation loss (the last was "
                f"{state.history[-1].get('valid_nonfinite')}), so there is no best model{_last_good(self.folder)}; "
                "look for outliers in the validation data or lower the learning rate"
            )


def _fit(flow: Flow, train_pair: tuple, valid_pair: tuple, config: TrainConfig, folder: RunFolder | None,
         resume: bool, metadata: dict[str, Any] | None, callback: Callable[[StepInfo], None] | None,
         distributed: Distributed) -> TrainResult:
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
    trainer = _Trainer(flow, train_pair, valid_pair, config, folder, metadata, callback, distributed)
    if checkpoint is not None:
        trainer.restore(checkpoint)
    else:
        trainer.initialise()
    return trainer.run()


def _last_good(folder: RunFolder | None) -> str:
    if folder is None or not folder.holds_run():
        return ""
    return f"; the last good checkpoint is {folder.file('last')}"
