"""Dense prediction with attention: camouflaged object detection (COD).

* :mod:`~flowattn.segmentation.camouflage`: a camouflage dataset made here, no download.
* :mod:`~flowattn.segmentation.folders`: the real COD sets (``Imgs/`` and ``GT/``).
* :mod:`~flowattn.segmentation.scores`: the COD metrics, by ``pysodmetrics``.
* :mod:`~flowattn.segmentation.network`: an encoder-decoder with an attention slot.
* :mod:`~flowattn.segmentation.loss`: weighted BCE + weighted IoU.
* :mod:`~flowattn.segmentation.fit`: training, prediction, checkpoints.

The experiment is ``experiments/dense.py``; the command is ``flowattn segment``.
"""

from .camouflage import camouflage, camouflage_split
from .fit import evaluate, load_segmenter, predict, save_segmenter, train
from .folders import load_cod_folder, segmentation_set
from .loss import structure_loss
from .network import AttentionSlot, SegmentationNet, slot_names
from .scores import CODScores, cod_scores

__all__ = [
    "AttentionSlot",
    "CODScores",
    "SegmentationNet",
    "camouflage",
    "camouflage_split",
    "cod_scores",
    "evaluate",
    "load_cod_folder",
    "load_segmenter",
    "predict",
    "save_segmenter",
    "segmentation_set",
    "slot_names",
    "structure_loss",
    "train",
]
