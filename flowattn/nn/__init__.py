"""Networks used inside flow steps, and the ordinary attention baselines.

* :mod:`~flowattn.nn.conv_branch`: the convolutional residual branch of i-ResNet and
  Residual Flows, rescaled to a certified Lipschitz bound.
* :mod:`~flowattn.nn.lipschitz_attention`: attention branches for invertible residual
  steps (the paper's faithful kinds, external and l2 attention).
* :mod:`~flowattn.nn.certified_paper_attention`: the paper's four kinds, certified.
* :mod:`~flowattn.nn.attention_kinds`: the registry of invertible attention kinds.
* :mod:`~flowattn.nn.coupling_nets`: Glow's coupling conditioner (optionally with
  attention).
* :mod:`~flowattn.nn.baselines`: ordinary, non-invertible attention modules.

The flow steps that use these networks are in :mod:`flowattn.transforms`.
"""

from .attention_kinds import KINDS, PAPER_KINDS, VARIANTS, AttentionKind, attention_kind
from .certified_paper_attention import CertifiedPaperAttention
from .conv_branch import ACTIVATIONS, ConvResidualBranch, LipSwish
from .coupling_nets import ConditionerFactory, CouplingConditioner
from .lipschitz_attention import (
    SIMILARITIES,
    AttentionBranch,
    BoundedOutputBranch,
    ExternalAttention,
    L2SelfAttention,
    PaperAttention,
)

__all__ = [
    "ACTIVATIONS",
    "AttentionBranch",
    "AttentionKind",
    "BoundedOutputBranch",
    "CertifiedPaperAttention",
    "ConditionerFactory",
    "ConvResidualBranch",
    "CouplingConditioner",
    "ExternalAttention",
    "KINDS",
    "L2SelfAttention",
    "LipSwish",
    "PAPER_KINDS",
    "PaperAttention",
    "SIMILARITIES",
    "VARIANTS",
    "attention_kind",
]
