r"""Conditioner networks of Glow's affine coupling layers, optionally with attention.

A coupling layer is invertible whatever its conditioner computes, so ordinary
(non-invertible) self-attention can sit here: this is how non-invertible attention takes
part in density models (``glow-attn``). :class:`ConditionerFactory` is the picklable
``transform_net_create_fn`` that nflows' ``AffineCouplingTransform`` takes.

References:
    | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
    | https://arxiv.org/abs/1807.03039

    | Invertible Attention (Zha et al., 2021)
    | https://arxiv.org/abs/2106.09003
"""

from __future__ import annotations

__all__ = ["ConditionerFactory", "CouplingConditioner"]

from torch import Tensor, nn

from .baselines import SelfAttention2d


class CouplingConditioner(nn.Module):
    r"""Glow's conditioner: conv3x3 -> ReLU -> conv1x1 -> ReLU -> [attention] -> conv3x3.

    The last convolution starts at zero, so the coupling starts near the identity.

    Arguments:
        in_channels: Channels of the untouched half.
        out_channels: Parameters produced (2x the transformed half for affine coupling).
        hidden: Hidden channels.
        attention: Insert SAGAN self-attention after the hidden layers.

    Examples:
        >>> import torch
        >>> net = CouplingConditioner(2, 4, hidden=8, attention=True)
        >>> net(torch.randn(3, 2, 4, 4)).shape
        torch.Size([3, 4, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, attention: bool = False):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
        ]
        if attention:
            layers.append(SelfAttention2d(hidden))
        last = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.net(x)


class ConditionerFactory:
    """Picklable ``transform_net_create_fn`` for nflows coupling layers."""

    def __init__(self, hidden: int, attention: bool = False):
        self.hidden = hidden
        self.attention = attention

    def __call__(self, in_channels: int, out_channels: int) -> CouplingConditioner:
        return CouplingConditioner(in_channels, out_channels, self.hidden, self.attention)
