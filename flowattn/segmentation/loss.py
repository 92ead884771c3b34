r"""The training loss of camouflaged object detection: weighted BCE + weighted IoU.

Pixels near the object's boundary weigh more: the weight is
:math:`1 + 5 |\bar m - m|`, with :math:`\bar m` the mask averaged over a window (31 pixels
at the field's 352-pixel inputs, scaled here to the image side, odd, at least 3).

References:
    | F3Net: Fusion, Feedback and Focus for Salient Object Detection (Wei et al., 2020)
    | https://arxiv.org/abs/1911.11445

    | Concealed Object Detection (SINet-V2, Fan et al., 2021)
    | https://arxiv.org/abs/2102.10274
"""

from __future__ import annotations

__all__ = ["structure_loss"]

import torch.nn.functional as F
from torch import Tensor


def structure_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """Mean over images of weighted BCE + weighted IoU loss.

    Arguments:
        logits: Predicted logits (B, 1, H, W).
        masks: Ground truth (B, 1, H, W), bool or {0, 1}.

    Examples:
        >>> import torch
        >>> masks = torch.zeros(1, 1, 32, 32); masks[..., 8:20, 8:20] = 1
        >>> float(structure_loss(20 * (2 * masks - 1), masks)) < 1e-6
        True
    """
    if logits.shape != masks.shape or logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(
            f"expected logits and masks (B, 1, H, W) of one shape, got {tuple(logits.shape)} "
            f"and {tuple(masks.shape)}"
        )
    m = masks.to(logits.dtype)
    k = max(3, 2 * round(15 * logits.shape[-1] / 352) + 1)
    weight = (
        1 + 5 * (F.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=False) - m).abs()
    )
    bce = F.binary_cross_entropy_with_logits(logits, m, reduction="none")
    wbce = (weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    p = logits.sigmoid()
    inter = (p * m * weight).sum(dim=(2, 3))
    union = ((p + m) * weight).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()
