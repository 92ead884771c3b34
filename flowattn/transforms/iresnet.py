"""Deprecated alias of :mod:`flowattn.nn.conv_branch` (warns; removed in flowattn 0.3)."""

from flowattn._moved import moved_names

__getattr__ = moved_names(
    "flowattn.transforms.iresnet",
    "flowattn.nn.conv_branch",
)
