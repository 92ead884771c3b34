"""Dense prediction with attention: camouflaged object detection data (work in progress,
issue 32: the loader for the real sets, the network, the metrics and the experiment
are not here yet).

* :mod:`~flowattn.segmentation.camouflage`: a camouflage dataset made here, no download.
"""

from .camouflage import camouflage, camouflage_split

__all__ = ["camouflage", "camouflage_split"]
