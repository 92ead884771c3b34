"""flowattn: invertible attention as normalizing-flow transforms.

References:
    | Invertible Attention (Zha et al., 2021)
    | https://arxiv.org/abs/2106.09003
"""

from . import data, evaluation, lipschitz, logdet, metrics, nn, solvers
from .models import DensityModel, ModelConfig, build_model
from .transforms import ResidualTransform, invertible_attention

__version__ = "0.5.0"

__all__ = [
    "DensityModel",
    "ModelConfig",
    "ResidualTransform",
    "build_model",
    "data",
    "evaluation",
    "invertible_attention",
    "lipschitz",
    "logdet",
    "metrics",
    "nn",
    "solvers",
]
