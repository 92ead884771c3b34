r"""Glow flow step: ActNorm, invertible 1x1 convolution, affine coupling.

The three pieces are nflows' ``ActNorm``, ``OneByOneConvolution`` (LU-parametrised)
and ``AffineCouplingTransform``; this module supplies the coupling's conditioner
network, which may contain ordinary (non-invertible) self-attention: invertibility
of a coupling layer does not depend on its conditioner, so this is where
non-invertible attention takes part in density models (``glow-attn``).

References:
    | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
    | https://arxiv.org/abs/1807.03039

    | Invertible Attention (Zha et al., 2021)
    | https://arxiv.org/abs/2106.09003
"""

from __future__ import annotations

__all__ = ["CouplingConditioner", "ConditionerFactory", "glow_step"]

import torch
from nflows.transforms import (
    ActNorm,
    AffineCouplingTransform,
    CompositeTransform,
    OneByOneConvolution,
)
from torch import Tensor, nn

from ..attention import SelfAttention2d


class CouplingConditioner(nn.Module):
    r"""Glow's conditioner: conv3x3 -> ReLU -> conv1x1 -> ReLU -> [attention] -> conv3x3.

    The last convolution starts at zero, so the coupling starts near the identity.

    Arguments:
        in_channels: Channels of the untouched half.
        out_channels: Parameters produced (2x the transformed half for affine coupling).
        hidden: Hidden channels.
        attention: Insert SAGAN self-attention after the hidden layers.

    Examples:
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


def glow_step(
    channels: int, hidden: int, *, attention: bool = False, flip: bool = False
) -> CompositeTransform:
    r"""One Glow step on (B, C, H, W): ActNorm, 1x1 convolution, affine coupling.

    Arguments:
        channels: Channels C (at least 2).
        hidden: Hidden channels of the coupling's conditioner.
        attention: Put ordinary self-attention in the conditioner (``glow-attn``).
        flip: Transform the first half of the channels instead of the second.

    Returns:
        An nflows ``CompositeTransform``.

    Examples:
        >>> step = glow_step(4, hidden=8)
        >>> x = torch.randn(2, 4, 4, 4)
        >>> y, logabsdet = step(x)
        >>> x_back, _ = step.inverse(y)
        >>> bool((x_back - x).abs().max() < 1e-5), logabsdet.shape
        (True, torch.Size([2]))
    """
    if channels < 2:
        raise ValueError(f"a coupling layer needs at least 2 channels, got {channels}")
    mask = torch.zeros(channels)
    if flip:
        mask[: channels // 2] = 1
    else:
        mask[channels // 2 :] = 1
    return CompositeTransform(
        [
            ActNorm(channels),
            OneByOneConvolution(channels),
            AffineCouplingTransform(mask, ConditionerFactory(hidden, attention)),
        ]
    )
