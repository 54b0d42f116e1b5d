r"""Inference and evaluation with flows: bits per dimension and importance-weighted
log-likelihoods."""

from .metrics import bits_per_dim, iw_log_prob

__all__ = [
    "bits_per_dim",
    "iw_log_prob",
]
