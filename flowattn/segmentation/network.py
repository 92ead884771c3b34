r"""A small encoder-decoder for camouflaged object detection, with an attention slot at
its bottleneck.

The encoder (torchvision's ``Conv2dNormActivation`` blocks, three stride-2 stages) takes
an image to features at 1/8 of its side; the slot transforms those features; the decoder
upsamples them back with skip connections to a one-channel logit map. The slot holds:

* ``none``: nothing;
* ``invertible:<kind>``: the invertible residual step :math:`x + g(x)` of a certified
  attention kind (:data:`~flowattn.transforms.KINDS`), whose Lipschitz bound stays
  below ``coeff`` and which :meth:`AttentionSlot.invert` inverts;
* ``faithful:<kind>``: the paper's uncertified reproduction of one of its four kinds;
* an ordinary attention module of :mod:`flowattn.nn.baselines`: ``nonlocal``,
  ``sagan``, ``external`` or ``cbam``.

References:
    | Invertible Attention (Zha et al., 2021), section 5.3
    | https://arxiv.org/abs/2106.09003
"""

from __future__ import annotations

__all__ = ["ORDINARY_SLOTS", "AttentionSlot", "SegmentationNet", "slot_names"]

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from ..nn import baselines
from ..nn.attention_kinds import FAITHFUL_PREFIX, VARIANTS, parse_variant
from ..transforms import invertible_attention

ORDINARY_SLOTS = {
    "nonlocal": baselines.NonLocal2d,
    "sagan": baselines.SelfAttention2d,
    "external": baselines.ExternalAttention2d,
    "cbam": baselines.CBAM,
}
"""The ordinary (non-invertible) attention modules the slot takes, by name."""


def slot_names() -> list[str]:
    """Every value the slot takes."""
    return [
        "none",
        *(v if v.startswith(FAITHFUL_PREFIX) else f"invertible:{v}" for v in VARIANTS),
        *ORDINARY_SLOTS,
    ]


class AttentionSlot(nn.Module):
    """The bottleneck's attention: features (B, C, H, W) to features of the same shape.

    Arguments:
        name: One of :func:`slot_names`.
        channels: C.
        coeff: Lipschitz bound of an invertible step's branch.
    """

    def __init__(self, name: str, channels: int, coeff: float = 0.9):
        super().__init__()
        if name not in slot_names():
            raise ValueError(f"unknown attention slot {name!r}; valid: {', '.join(slot_names())}")
        self.name = name
        self.step = None
        self.module: nn.Module | None = None  # the ordinary module, or None for a step
        if name.startswith(("invertible:", FAITHFUL_PREFIX)):
            kind, certified = parse_variant(name.removeprefix("invertible:"))
            self.step = invertible_attention(kind.name, channels, certified=certified, coeff=coeff)
        elif name == "none":
            self.module = nn.Identity()
        else:
            self.module = ORDINARY_SLOTS[name](channels)

    @property
    def invertible(self) -> bool:
        return self.step is not None

    def forward(self, x: Tensor) -> Tensor:
        if self.step is not None:
            return x + self.step.branch(x)  # the residual step; no log-det is needed here
        return self.module(x)

    def invert(self, y: Tensor) -> Tensor:
        """The features x with ``self(x) = y``, by the step's fixed-point inverse."""
        if self.step is None:
            raise ValueError(f"the {self.name!r} slot is not an invertible step")
        return self.step.inverse(y)[0]

    def lipschitz_bound(self, input_shape: tuple[int, int, int]) -> float | None:
        """The certified bound of an invertible step's branch (None otherwise)."""
        return None if self.step is None else self.step.lipschitz_bound(input_shape)


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Module:
    return Conv2dNormActivation(c_in, c_out, 3, stride=stride, norm_layer=nn.BatchNorm2d)


class SegmentationNet(nn.Module):
    """Encoder-decoder from images (B, 3, S, S), S divisible by 8, to object logits
    (B, 1, S, S), with :class:`AttentionSlot` ``attention`` at the S/8 bottleneck.

    Examples:
        >>> net = SegmentationNet("invertible:dot", width=8)
        >>> net(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(self, attention: str = "none", width: int = 16, in_channels: int = 3):
        super().__init__()
        if (
            not isinstance(width, int)
            or width < 1
            or not isinstance(in_channels, int)
            or in_channels < 1
        ):
            raise ValueError(
                "width and in_channels must be positive integers, "
                f"got {width!r} and {in_channels!r}"
            )
        self.width, self.in_channels = width, in_channels
        w = width
        self.stem = _block(in_channels, w)
        self.down = nn.ModuleList([_block(w, 2 * w, 2), _block(2 * w, 4 * w, 2),
                                   _block(4 * w, 4 * w, 2)])  # fmt: skip
        self.attention = AttentionSlot(attention, 4 * w)
        self.up = nn.ModuleList([_block(8 * w, 4 * w), _block(6 * w, 2 * w), _block(3 * w, w)])
        self.head = nn.Conv2d(w, 1, 1)

    def settings(self) -> dict[str, str | int]:
        """The constructor's arguments: ``SegmentationNet(**net.settings())`` builds
        the same network (untrained)."""
        return {"attention": self.attention.name, "width": self.width,
                "in_channels": self.in_channels}  # fmt: skip

    def bottleneck(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The features the slot sees (B, 4 width, S/8, S/8), and the skips."""
        if x.dim() != 4 or x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(
                f"expected images (B, C, H, W) with H, W divisible by 8, got {tuple(x.shape)}"
            )
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        return skips.pop(), skips

    def forward(self, x: Tensor) -> Tensor:
        h, skips = self.bottleneck(x)
        h = self.attention(h)
        for up, skip in zip(self.up, reversed(skips), strict=True):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = up(torch.cat([h, skip], dim=1))
        return self.head(h)
