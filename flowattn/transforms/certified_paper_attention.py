"""Deprecated alias of :mod:`flowattn.nn.certified_paper_attention` (warns; gone in 0.3)."""

from flowattn._moved import moved_names

__getattr__ = moved_names(
    "flowattn.transforms.certified_paper_attention",
    "flowattn.nn.certified_paper_attention",
)
