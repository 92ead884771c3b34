"""Flow steps (nflows ``Transform`` subclasses): the residual step, the invertible
attention step built on it, the Glow step, and the preprocessing transforms.

The networks inside the steps are in :mod:`flowattn.nn`; the attention branches and
the registry's names are re-exported here beside the step that builds them.
"""

from ..nn.attention_kinds import KINDS, PAPER_KINDS, VARIANTS
from ..nn.certified_paper_attention import CertifiedPaperAttention
from ..nn.lipschitz_attention import (
    AttentionBranch,
    ExternalAttention,
    L2SelfAttention,
    PaperAttention,
)
from .attention_step import invertible_attention
from .glow import glow_step
from .preprocess import LogitTransform, UniformDequantization
from .residual import ConvergenceError, ConvergenceWarning, ResidualTransform

__all__ = [
    "AttentionBranch",
    "CertifiedPaperAttention",
    "ConvergenceError",
    "ConvergenceWarning",
    "ExternalAttention",
    "KINDS",
    "L2SelfAttention",
    "LogitTransform",
    "PAPER_KINDS",
    "PaperAttention",
    "ResidualTransform",
    "UniformDequantization",
    "VARIANTS",
    "glow_step",
    "invertible_attention",
]
