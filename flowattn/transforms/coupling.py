"""Deprecated alias of :mod:`flowattn.transforms.glow` (warns; removed in flowattn 0.3)."""

from flowattn._moved import moved_names

__getattr__ = moved_names(
    "flowattn.transforms.coupling",
    "flowattn.transforms.glow",
    "flowattn.nn.coupling_nets",
)
