r"""The metrics of camouflaged object detection, computed by ``pysodmetrics``.

S-measure (structure similarity, object- and region-aware), E-measure (enhanced
alignment: its mean and maximum over the 256 thresholds and at the adaptive threshold,
twice the map's mean), weighted F-measure and mean absolute error, as the COD field
reports them (Fan et al. 2020's protocol). ``pysodmetrics`` is the implementation COD
papers evaluate with; its conventions hold here: a predicted map is min-max normalised
per image, a ground-truth mask is binarised at 128 of 255.

References:
    | Camouflaged Object Detection (Fan et al., 2020)
    | https://arxiv.org/abs/2102.10274

    | Structure-measure (Fan et al., 2017), https://arxiv.org/abs/1708.00786
    | Enhanced-alignment Measure (Fan et al., 2018), https://arxiv.org/abs/1805.10421
"""

from __future__ import annotations

__all__ = ["CODScores", "cod_scores"]

from dataclasses import dataclass

import numpy as np
import py_sod_metrics as sod
import torch
from torch import Tensor


@dataclass(frozen=True)
class CODScores:
    """The field's metrics over a set of images (higher is better except ``mae``).

    Attributes:
        s_measure: Mean S-measure.
        mean_e, max_e, adaptive_e: E-measure: the mean curve's mean and maximum over
            thresholds, and at the adaptive threshold.
        weighted_f: Mean weighted F-measure.
        mae: Mean absolute error.
        per_image_s: S-measure of each image (for paired differences).
    """

    s_measure: float
    mean_e: float
    max_e: float
    adaptive_e: float
    weighted_f: float
    mae: float
    per_image_s: tuple[float, ...]

    def as_dict(self) -> dict[str, float]:
        """The six summary metrics by their usual short names."""
        return {
            "S": self.s_measure, "meanE": self.mean_e, "maxE": self.max_e,
            "adpE": self.adaptive_e, "wF": self.weighted_f, "MAE": self.mae,
        }  # fmt: skip


def _as_uint8(x: Tensor) -> np.ndarray:
    return (x.detach().double().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def cod_scores(predictions: Tensor, masks: Tensor) -> CODScores:
    """Scores predicted maps against ground-truth masks.

    Arguments:
        predictions: Maps in [0, 1] (probabilities), (N, 1, H, W) or (N, H, W).
        masks: Ground truth, bool or {0, 1}, the same shape.

    Examples:
        >>> masks = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
        >>> masks[:, :, 4:10, 4:12] = True
        >>> scores = cod_scores(masks.float(), masks)
        >>> round(scores.s_measure, 6), scores.mae
        (1.0, 0.0)
    """
    if predictions.shape != masks.shape:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and masks {tuple(masks.shape)} differ in shape"
        )
    if predictions.dim() == 4:
        if predictions.shape[1] != 1:
            raise ValueError(f"expected one channel (N, 1, H, W), got {tuple(predictions.shape)}")
        predictions, masks = predictions[:, 0], masks[:, 0]
    if predictions.dim() != 3 or len(predictions) == 0:
        raise ValueError(f"expected maps (N, H, W) or (N, 1, H, W), got {tuple(predictions.shape)}")
    if not torch.isfinite(predictions).all():
        raise ValueError("predictions hold non-finite values")
    s, e, f, mae = sod.Smeasure(), sod.Emeasure(), sod.WeightedFmeasure(), sod.MAE()
    for pred, gt in zip(_as_uint8(predictions), _as_uint8(masks.double()), strict=True):
        for metric in (s, e, f, mae):
            metric.step(pred=pred, gt=gt)
    curve = e.get_results()["em"]
    return CODScores(
        s_measure=float(s.get_results()["sm"]),
        mean_e=float(np.mean(curve["curve"])),
        max_e=float(np.max(curve["curve"])),
        adaptive_e=float(curve["adp"]),
        weighted_f=float(f.get_results()["wfm"]),
        mae=float(mae.get_results()["mae"]),
        per_image_s=tuple(float(v) for v in s.sms),
    )
