r"""Ordinary (non-invertible) attention modules on images (B, C, H, W).

These are baselines: they carry no Lipschitz constraint and are not flow steps by
themselves. In density models they sit inside the conditioner networks of coupling
layers (``glow-attn``), where invertibility does not depend on them.

References:
    | Self-Attention Generative Adversarial Networks (Zhang et al., 2019)
    | https://arxiv.org/abs/1805.08318
"""

from __future__ import annotations

__all__ = ["SelfAttention2d"]

import torch
from torch import Tensor, nn


class SelfAttention2d(nn.Module):
    r"""SAGAN self-attention :math:`x + \gamma\, W_o V \mathrm{softmax}(Q^\top K)`.

    Queries and keys are 1x1 maps to ``channels // reduction`` channels, values keep
    the channel count; the softmax runs over the N = H W key pixels for each query
    pixel. :math:`\gamma` starts at zero, so the block starts as the identity.

    Arguments:
        channels: Channels C of the inputs.
        reduction: Channel reduction of queries and keys.

    References:
        | Self-Attention Generative Adversarial Networks (Zhang et al., 2019)
        | https://arxiv.org/abs/1805.08318

    Example:
        >>> attn = SelfAttention2d(16)
        >>> x = torch.randn(2, 16, 8, 8)
        >>> bool(torch.equal(attn(x), x))  # gamma = 0 at initialisation
        True
    """

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        inner = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, inner, 1, bias=False)
        self.key = nn.Conv2d(channels, inner, 1, bias=False)
        self.value = nn.Conv2d(channels, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def attention_map(self, x: Tensor) -> Tensor:
        """Attention weights (B, N, N): row i is query pixel i's distribution over keys."""
        q = self.query(x).flatten(2)  # (B, C', N)
        k = self.key(x).flatten(2)
        return torch.softmax(q.transpose(1, 2) @ k, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        v = self.value(x).flatten(2)  # (B, C, N)
        out = v @ self.attention_map(x).transpose(1, 2)  # (B, C, N)
        return x + self.gamma * out.reshape(x.shape)
