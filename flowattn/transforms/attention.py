"""Deprecated alias of :mod:`flowattn.nn.lipschitz_attention` (warns; removed in flowattn 0.3)."""

from flowattn._moved import moved_names

__getattr__ = moved_names(
    "flowattn.transforms.attention",
    "flowattn.nn.lipschitz_attention",
    "flowattn.transforms.attention_step",
    "flowattn.nn.certified_paper_attention",
)
