r"""Maximum-likelihood training: the loop, checkpoints that never lose a run, and
data-parallel training under ``torchrun``."""

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, write_atomically
from .distributed import Distributed, setup, shard
from .folder import RESUMABLE, RunFolder, RunLockedError
from .loop import (
    RUN_FILES,
    NoFiniteValidationError,
    NonFiniteLossError,
    StepInfo,
    TrainConfig,
    TrainResult,
    evaluate_iw_nll,
    evaluate_nll,
    fit,
    read_metrics,
)
from .report import evaluate_split, run_pictures, summary_text
from .run import IMAGE_FLOWS, VECTOR_FLOWS, Run, build_flow, load_run

__all__ = [
    "fit",
    "evaluate_nll",
    "evaluate_iw_nll",
    "read_metrics",
    "TrainConfig",
    "TrainResult",
    "StepInfo",
    "NonFiniteLossError",
    "NoFiniteValidationError",
    "RUN_FILES",
    "RunFolder",
    "RunLockedError",
    "RESUMABLE",
    "build_flow",
    "load_run",
    "evaluate_split",
    "summary_text",
    "run_pictures",
    "Run",
    "VECTOR_FLOWS",
    "IMAGE_FLOWS",
    "write_atomically",
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "Distributed",
    "setup",
    "shard",
]
