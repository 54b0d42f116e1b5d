r"""Inference and evaluation with flows: flow guides, mass-covering losses for mixture
guides, guide diagnostics, bits per dimension and importance-weighted log-likelihoods."""

from .amortized import AmortizedFlow
from .diagnostics import Diagnostics, diagnose
from .guides import AutoFlowGuide, StickingTheLanding, guide_flow
from .losses import SIWAE, StratifiedELBO, StratifiedMixture
from .metrics import bits_per_dim, iw_log_prob

__all__ = [
    "AmortizedFlow",
    "AutoFlowGuide",
    "StickingTheLanding",
    "guide_flow",
    "SIWAE",
    "StratifiedELBO",
    "StratifiedMixture",
    "Diagnostics",
    "diagnose",
    "bits_per_dim",
    "iw_log_prob",
]
