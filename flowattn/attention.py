"""Deprecated alias of :mod:`flowattn.nn.baselines` (warns; removed in flowattn 0.3)."""

from flowattn._moved import moved_names

__getattr__ = moved_names(
    "flowattn.attention",
    "flowattn.nn.baselines",
)
