"""Dense prediction with attention: camouflaged object detection data (work in progress,
issue 32: the experiment and the command line are not here yet).

* :mod:`~flowattn.segmentation.camouflage`: a camouflage dataset made here, no download.
* :mod:`~flowattn.segmentation.folders`: the real COD sets (``Imgs/`` and ``GT/``).
* :mod:`~flowattn.segmentation.metrics`: the COD metrics, by ``pysodmetrics``.
* :mod:`~flowattn.segmentation.network`: an encoder-decoder with an attention slot.
* :mod:`~flowattn.segmentation.loss`: weighted BCE + weighted IoU.
"""

from .camouflage import camouflage, camouflage_split
from .folders import load_cod_folder
from .loss import structure_loss
from .metrics import CODScores, cod_scores
from .network import AttentionSlot, SegmentationNet, slot_names

__all__ = [
    "AttentionSlot",
    "CODScores",
    "SegmentationNet",
    "camouflage",
    "camouflage_split",
    "cod_scores",
    "load_cod_folder",
    "slot_names",
    "structure_loss",
]
