r"""Checkpoint files: one file per run state, written atomically.

A checkpoint is a ``torch.save`` dictionary with the model's config and weights, the
optimiser, the EMA weights, the step, the training config and every random state. It
is written to a temporary file in the same directory and renamed over the old one
(``os.replace`` is atomic on POSIX and Windows), so a process killed mid-write leaves
the previous checkpoint intact.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "find_checkpoint", "load_checkpoint", "save_checkpoint"]

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
_FORMAT = "flowattn-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not a flowattn checkpoint."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Writes ``state`` to ``path`` atomically (temporary file, then rename).

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = save_checkpoint({"step": 3}, Path(d) / "ckpt.pt")
        ...     load_checkpoint(path)["step"]
        3
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": _FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def find_checkpoint(run_or_checkpoint: str | Path) -> Path:
    """A checkpoint file, or a run directory holding ``checkpoint.pt``."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def load_checkpoint(run_or_checkpoint: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Reads a checkpoint (file or run directory); CheckpointError if it is not one."""
    path = find_checkpoint(run_or_checkpoint)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # truncated zip, pickle garbage, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a flowattn checkpoint")
    return state
