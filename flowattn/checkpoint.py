r"""Checkpoint files: data, not code, written atomically.

A checkpoint is a ``torch.save`` dictionary of tensors, numbers, strings, lists and
dicts only (random states included, as tensors), so it is read with
``torch.load(weights_only=True)``: a file carrying any other Python object is refused
and nothing in it runs. Files of the first format (which pickled numpy random states as
objects) are read only when the caller says it trusts them (``trust=True``, the CLI's
``--trust-checkpoint``), and converted.

It is written to a temporary file in the same directory and renamed over the old one
(``os.replace`` is atomic on POSIX and Windows), so a process killed mid-write leaves
the previous checkpoint intact; the replaced checkpoint is kept beside it as
``checkpoint.prev.pt``, and temporary files left by killed writes are removed.
"""

from __future__ import annotations

__all__ = [
    "CHECKPOINT_NAME",
    "PREVIOUS_NAME",
    "CheckpointError",
    "find_checkpoint",
    "load_checkpoint",
    "remove_stale_temporaries",
    "save_checkpoint",
]

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import first_line

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
_FORMAT = "flowattn-checkpoint-2"
_OLD_FORMAT = "flowattn-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or not a flowattn checkpoint."""


def _file_mode() -> int:
    """The mode an ordinary new file gets under the process's umask (e.g. 0644)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def remove_stale_temporaries(directory: str | Path, name: str = CHECKPOINT_NAME) -> list[Path]:
    """Removes the temporary files ``.<name>.*.tmp`` that killed writes left in
    ``directory``; call it only while no other process writes there (under the run's
    lock). Returns the paths removed."""
    removed = []
    for path in Path(directory).glob(f".{name}.*.tmp"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def save_checkpoint(state: dict[str, Any], path: str | Path, *, keep_previous: bool = True) -> Path:
    """Writes ``state`` to ``path`` atomically (temporary file, then rename), keeping the
    file it replaces as ``checkpoint.prev.pt`` beside it (``keep_previous``).

    ``state`` must hold only what ``torch.load(weights_only=True)`` reads back: tensors,
    numbers, strings, None, and lists, tuples and dicts of them.

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
        os.chmod(tmp, _file_mode())
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": _FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            # a second name for the current file, then an atomic rename onto the old one
            link = Path(f"{tmp}.prev")
            os.link(path, link)
            os.replace(link, path.parent / PREVIOUS_NAME)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        Path(f"{tmp}.prev").unlink(missing_ok=True)
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


def load_checkpoint(
    run_or_checkpoint: str | Path, map_location: Any = "cpu", *, trust: bool = False
) -> dict[str, Any]:
    """Reads a checkpoint (file or run directory) as data only.

    Arguments:
        run_or_checkpoint: A checkpoint file or a run directory.
        map_location: Where tensors go (``torch.load``'s argument).
        trust: Also read files that hold other Python objects (the first checkpoint
            format). Loading such a file can run code: only for files you trust.

    Raises:
        CheckpointError: missing, unreadable, not a flowattn checkpoint, or holding
            objects other than data (without ``trust``).
    """
    path = find_checkpoint(run_or_checkpoint)
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(f"cannot read checkpoint {path}: not a checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise CheckpointError(f"cannot read checkpoint {path}: not a checkpoint file") from None
        if not trust:
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects, not only tensors and "
                "numbers, and loading it could run code; if it is an old flowattn "
                "checkpoint from a source you trust, pass --trust-checkpoint"
            ) from None
        state = _read_trusted(path, map_location)
    except Exception as error:  # truncated zip, garbage, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line(error)}") from None
    if not isinstance(state, dict) or state.get("format") not in (_FORMAT, _OLD_FORMAT):
        raise CheckpointError(f"{path} is not a flowattn checkpoint")
    if state["format"] == _OLD_FORMAT:
        if not trust:
            raise CheckpointError(f"{path} is an old-format checkpoint: pass --trust-checkpoint")
        state = _upgrade(state)
    return state


def _read_trusted(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line(error)}") from None


def _upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A first-format checkpoint (weights stored twice, numpy/python random states as
    objects) in the current layout."""
    from .training import random_states_to_data

    trainer = dict(state["trainer"])
    trainer["random"] = random_states_to_data(trainer["random"])
    return {
        "format": _FORMAT,
        "model_config": state["model_config"],
        "run_config": state.get("run_config", {}),
        "trainer": trainer,
    }
