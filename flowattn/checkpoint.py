r"""Checkpoint files: data, not code, written atomically.

A checkpoint is a ``torch.save`` dictionary of tensors, numbers, strings, lists and
dicts only (random states included, as tensors), so it is read with
``torch.load(weights_only=True)``: a file carrying any other Python object is refused
and nothing in it runs. Files of earlier formats (flowattn 0.1 to 0.4) are refused
with an error that names the version that wrote them.

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
    "load_run_checkpoint",
    "RUN_SCHEMA",
    "run_checkpoint",
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

from .errors import CheckpointError, first_line

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
_FORMAT = "flowattn-checkpoint-4"
# format 3's certified paper kinds (gaussian, embedded_gaussian, dot, concat) scaled their
# output by a looser bound: their weights would load into another function in 0.5
_OLD_FORMATS = {
    "flowattn-checkpoint-1": "flowattn 0.1",
    "flowattn-checkpoint-2": "flowattn 0.2",
    "flowattn-checkpoint-3": "flowattn 0.3 or 0.4",
}


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


def load_checkpoint(run_or_checkpoint: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Reads a checkpoint (file or run directory) as data only.

    Arguments:
        run_or_checkpoint: A checkpoint file or a run directory.
        map_location: Where tensors go (``torch.load``'s argument).

    Raises:
        CheckpointError: missing, unreadable, not a flowattn checkpoint, of an older
            format (the message names the version that wrote it), or holding objects
            other than data.
    """
    path = find_checkpoint(run_or_checkpoint)
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(f"cannot read checkpoint {path}: not a checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise CheckpointError(f"cannot read checkpoint {path}: not a checkpoint file") from None
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects, not only tensors and "
            "numbers, and loading it could run code (flowattn 0.1 checkpoints did; this "
            f"flowattn reads format {_FORMAT!r} only)"
        ) from None
    except Exception as error:  # truncated zip, garbage, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line(error)}") from None
    written = state.get("format") if isinstance(state, dict) else None
    if written in _OLD_FORMATS:
        raise CheckpointError(
            f"{path} was written by {_OLD_FORMATS[written]} (format {written!r}); this "
            f"flowattn reads format {_FORMAT!r} only: retrain, or use that version"
        )
    if written != _FORMAT:
        raise CheckpointError(f"{path} is not a flowattn checkpoint")
    return state


#: A training run's checkpoint (format 4): each key and what it holds. Changing what a
#: run checkpoints is this table, :func:`run_checkpoint` and ``_FORMAT``.
RUN_SCHEMA = {
    "model_config": "ModelConfig.to_dict(): the architecture, to rebuild the model",
    "run_config": "the run's settings (RunConfig as a dict), to resume and to name its data",
    "trainer": "Trainer.state_dict(): model, optimizer, ema, step, batches, random, result",
}


def run_checkpoint(
    model_config: dict[str, Any], run_config: dict[str, Any], trainer: dict[str, Any]
) -> dict[str, Any]:
    """The contents of a training run's checkpoint, in :data:`RUN_SCHEMA`."""
    return {"model_config": model_config, "run_config": run_config, "trainer": trainer}


def load_run_checkpoint(run_or_checkpoint: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """:func:`load_checkpoint`, then a check that it holds a training run (every key of
    :data:`RUN_SCHEMA`); a CheckpointError names what it lacks."""
    state = load_checkpoint(run_or_checkpoint, map_location)
    missing = [key for key in RUN_SCHEMA if key not in state]
    if missing:
        path = find_checkpoint(run_or_checkpoint)
        raise CheckpointError(
            f"{path} is not a training run's checkpoint: it has no {', '.join(missing)}"
        )
    return state
