"""Dense prediction with attention: camouflaged object detection data (work in progress,
issue 32: the loader for the real sets, the network and the experiment
are not here yet).

* :mod:`~flowattn.segmentation.camouflage`: a camouflage dataset made here, no download.
* :mod:`~flowattn.segmentation.metrics`: the COD metrics, by ``pysodmetrics``.
"""

from .camouflage import camouflage, camouflage_split
from .metrics import CODScores, cod_scores

__all__ = ["CODScores", "camouflage", "camouflage_split", "cod_scores"]
