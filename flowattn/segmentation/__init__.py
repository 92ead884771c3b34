"""Dense prediction with attention: camouflaged object detection data (work in progress,
issue 32: the segmentation network and the experiment are not here yet).

* :mod:`~flowattn.segmentation.camouflage`: a camouflage dataset made here, no download.
* :mod:`~flowattn.segmentation.folders`: the real COD sets (``Imgs/`` and ``GT/``).
* :mod:`~flowattn.segmentation.metrics`: the COD metrics, by ``pysodmetrics``.
"""

from .camouflage import camouflage, camouflage_split
from .folders import load_cod_folder
from .metrics import CODScores, cod_scores

__all__ = ["CODScores", "camouflage", "camouflage_split", "cod_scores", "load_cod_folder"]
