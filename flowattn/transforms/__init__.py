"""Flow steps (nflows ``Transform`` subclasses)."""

from .attention import (
    CERTIFIED_KINDS,
    KINDS,
    PAPER_KINDS,
    AttentionBranch,
    ExternalAttention,
    L2SelfAttention,
    PaperAttention,
    invertible_attention,
)
from .certified_paper_attention import CertifiedPaperAttention
from .residual import ConvergenceError, ConvergenceWarning, ResidualTransform

__all__ = [
    "AttentionBranch",
    "CERTIFIED_KINDS",
    "CertifiedPaperAttention",
    "ConvergenceError",
    "ConvergenceWarning",
    "ExternalAttention",
    "KINDS",
    "L2SelfAttention",
    "PAPER_KINDS",
    "PaperAttention",
    "ResidualTransform",
    "invertible_attention",
]
