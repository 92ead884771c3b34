r"""Ordinary (non-invertible) attention modules on images (B, C, H, W).

These are baselines: they carry no Lipschitz constraint and are not flow steps by
themselves. In density models they sit inside the conditioner networks of coupling
layers (``glow-attn``), where invertibility does not depend on them.

References:
    | Self-Attention Generative Adversarial Networks (Zhang et al., 2019)
    | https://arxiv.org/abs/1805.08318
"""

from __future__ import annotations

__all__ = [
    "CBAM",
    "CrissCrossAttention2d",
    "DisentangledNonLocal2d",
    "ExternalAttention2d",
    "MultiHeadSelfAttention2d",
    "NonLocal2d",
    "SelfAttention2d",
]

import torch
from torch import Tensor, nn

from ..images import check_images
from .lipschitz_attention import SIMILARITIES


def _mix(values: Tensor, attention: Tensor) -> Tensor:
    """Values (B, C, H, W) mixed by attention (B, N, N), row i = output pixel i."""
    mixed = values.flatten(2) @ attention.transpose(1, 2)  # (B, C, N)
    return mixed.reshape(values.shape)


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

    Examples:
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
        check_images(x)
        return x + self.gamma * _mix(self.value(x), self.attention_map(x))


class NonLocal2d(nn.Module):
    r"""Non-local block :math:`x + W_z \sum_j f(x_i, x_j) g(x_j) / C(x)` (Wang et al., 2018).

    ``kind`` picks the pairwise function f: ``gaussian`` (:math:`e^{x_i^\top x_j}`,
    softmax), ``embedded_gaussian`` (:math:`e^{\theta_i^\top \phi_j}`, softmax),
    ``dot`` (:math:`\theta_i^\top \phi_j / N`) or ``concat``
    (:math:`\mathrm{ReLU}(w^\top [\theta_i; \phi_j]) / N`, computed in the separable form
    :math:`\mathrm{ReLU}(a_i + b_j)` with :math:`a = w_\theta^\top \theta`,
    :math:`b = w_\phi^\top \phi`, never building the (N, N, 2C') tensor). :math:`W_z`
    starts at zero, so the block starts as the identity.

    References:
        | Non-local Neural Networks (Wang et al., 2018)
        | https://arxiv.org/abs/1711.07971

    Examples:
        >>> block = NonLocal2d(8, kind="concat")
        >>> block(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, channels: int, kind: str = "embedded_gaussian", reduction: int = 2):
        super().__init__()
        if kind not in SIMILARITIES:
            raise ValueError(f"unknown similarity {kind!r}; valid: {', '.join(SIMILARITIES)}")
        inner = max(1, channels // reduction)
        self.kind = kind
        self.g = nn.Conv2d(channels, inner, 1, bias=False)
        if kind != "gaussian":  # the plain Gaussian compares the inputs themselves
            self.theta = nn.Conv2d(channels, inner, 1, bias=False)
            self.phi = nn.Conv2d(channels, inner, 1, bias=False)
        if kind == "concat":
            self.w_theta = nn.Parameter(torch.randn(inner) / inner**0.5)
            self.w_phi = nn.Parameter(torch.randn(inner) / inner**0.5)
        self.out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def attention_map(self, x: Tensor) -> Tensor:
        """Weights (B, N, N): row i is how query pixel i mixes the pixels j."""
        n = x.shape[-2] * x.shape[-1]
        if self.kind == "gaussian":
            t = x.flatten(2)
            return torch.softmax(t.transpose(1, 2) @ t, dim=-1)
        theta, phi = self.theta(x).flatten(2), self.phi(x).flatten(2)  # (B, C', N)
        if self.kind == "embedded_gaussian":
            return torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)
        if self.kind == "dot":
            return theta.transpose(1, 2) @ phi / n
        a = torch.einsum("c,bcn->bn", self.w_theta, theta)
        b = torch.einsum("c,bcn->bn", self.w_phi, phi)
        return torch.relu(a[:, :, None] + b[:, None, :]) / n

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        return x + self.out(_mix(self.g(x), self.attention_map(x)))


class ExternalAttention2d(nn.Module):
    r"""External attention with two memory units and double normalisation (Guo et al., 2021).

    Each of ``heads`` heads maps its channel group to ``slots`` logits with
    :math:`M_k`, normalises them with a softmax over pixels then an l1 norm over slots,
    and reads out with :math:`M_v`; the output map starts at zero (identity block).

    References:
        | Beyond Self-attention: External Attention using Two Linear Layers (Guo et al., 2021)
        | https://arxiv.org/abs/2105.02358

    Examples:
        >>> ExternalAttention2d(8, heads=2)(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, channels: int, slots: int = 64, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.inp = nn.Conv2d(channels, channels, 1)
        self.keys = nn.Linear(channels // heads, slots, bias=False)
        self.values = nn.Linear(slots, channels // heads, bias=False)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def attention_map(self, x: Tensor) -> Tensor:
        """Weights (B * heads, N, slots) after double normalisation."""
        b, c, h, w = x.shape
        t = self.inp(x).reshape(b * self.heads, c // self.heads, h * w).transpose(1, 2)
        a = torch.softmax(self.keys(t), dim=1)
        return a / a.sum(dim=2, keepdim=True).clamp_min(1e-9)

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        b, c, h, w = x.shape
        y = self.values(self.attention_map(x))  # (B * heads, N, C / heads)
        y = y.transpose(1, 2).reshape(b, c, h, w)
        return x + self.out(y)


class MultiHeadSelfAttention2d(nn.Module):
    r"""Multi-head scaled dot-product self-attention over pixels (Vaswani et al., 2017).

    References:
        | Attention Is All You Need (Vaswani et al., 2017)
        | https://arxiv.org/abs/1706.03762

    Examples:
        >>> MultiHeadSelfAttention2d(8, heads=2)(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.gamma = nn.Parameter(torch.zeros(()))

    def attention_map(self, x: Tensor) -> Tensor:
        """Weights (B, N, N), averaged over heads."""
        t = x.flatten(2).transpose(1, 2)
        return self.attn(t, t, t, need_weights=True)[1]

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        t = x.flatten(2).transpose(1, 2)
        y = self.attn(t, t, t, need_weights=False)[0]
        return x + self.gamma * y.transpose(1, 2).reshape(x.shape)


class CBAM(nn.Module):
    r"""Convolutional block attention: channel then spatial gating (Woo et al., 2018).

    References:
        | CBAM: Convolutional Block Attention Module (Woo et al., 2018)
        | https://arxiv.org/abs/1807.06521

    Examples:
        >>> CBAM(8)(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, channels: int, reduction: int = 4, kernel_size: int = 7):
        super().__init__()
        inner = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, inner, 1), nn.ReLU(), nn.Conv2d(inner, channels, 1)
        )
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        x = x * torch.sigmoid(avg + mx)
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class DisentangledNonLocal2d(nn.Module):
    r"""Disentangled non-local block (DNL; Yin et al., 2020).

    The attention is the sum of a *whitened pairwise* term
    :math:`\mathrm{softmax}_j((q_i - \bar q)^\top (k_j - \bar k))` and a *unary* term
    :math:`\mathrm{softmax}_j(w^\top k_j)` shared by every query; the output map starts at
    zero (identity block).

    References:
        | Disentangled Non-Local Neural Networks (Yin et al., 2020)
        | https://arxiv.org/abs/2006.06668

    Examples:
        >>> DisentangledNonLocal2d(8)(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        inner = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, inner, 1, bias=False)
        self.key = nn.Conv2d(channels, inner, 1, bias=False)
        self.value = nn.Conv2d(channels, inner, 1, bias=False)
        self.unary = nn.Conv2d(channels, 1, 1)
        self.out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def attention_map(self, x: Tensor) -> Tensor:
        """Weights (B, N, N): pairwise plus unary; each row sums to 2."""
        q, k = self.query(x).flatten(2), self.key(x).flatten(2)  # (B, C', N)
        q = q - q.mean(dim=2, keepdim=True)
        k = k - k.mean(dim=2, keepdim=True)
        pairwise = torch.softmax(q.transpose(1, 2) @ k, dim=-1)
        unary = torch.softmax(self.unary(x).flatten(2), dim=-1)  # (B, 1, N)
        return pairwise + unary

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        return x + self.out(_mix(self.value(x), self.attention_map(x)))


class CrissCrossAttention2d(nn.Module):
    r"""Criss-cross attention (CCNet; Huang et al., 2019), in plain PyTorch (runs on CPU).

    Each pixel attends to the H + W - 1 pixels of its row and column: one softmax over
    the column energies (its own pixel masked, as in CCNet, so it is counted once) and
    the row energies together. :math:`\gamma` starts at zero (identity block).

    References:
        | CCNet: Criss-Cross Attention for Semantic Segmentation (Huang et al., 2019)
        | https://arxiv.org/abs/1811.11721

    Examples:
        >>> CrissCrossAttention2d(8)(torch.randn(2, 8, 5, 3)).shape
        torch.Size([2, 8, 5, 3])
    """

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        inner = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(()))

    def weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Column weights (B, H, W, H) and row weights (B, H, W, W) of each pixel."""
        q, k = self.query(x), self.key(x)  # (B, C', H, W)
        h = x.shape[-2]
        col = torch.einsum("bcij,bckj->bijk", q, k)  # pixel (i, j) with (k, j)
        eye = torch.eye(h, dtype=torch.bool, device=x.device)[None, :, None, :]
        col = col.masked_fill(eye, float("-inf"))
        row = torch.einsum("bcij,bcik->bijk", q, k)  # pixel (i, j) with (i, k)
        a = torch.softmax(torch.cat([col, row], dim=-1), dim=-1)
        return a[..., :h], a[..., h:]

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        col, row = self.weights(x)
        v = self.value(x)
        out = torch.einsum("bijk,bckj->bcij", col, v) + torch.einsum("bijk,bcik->bcij", row, v)
        return x + self.gamma * out
