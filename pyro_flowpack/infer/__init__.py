r"""Inference and evaluation with flows: bits per dimension and importance-weighted
log-likelihoods."""

from .amortized import AmortizedFlow
from .guides import AutoFlowGuide, StickingTheLanding, guide_flow
from .metrics import bits_per_dim, iw_log_prob

__all__ = [
    "AmortizedFlow",
    "AutoFlowGuide",
    "StickingTheLanding",
    "guide_flow",
    "bits_per_dim",
    "iw_log_prob",
]
