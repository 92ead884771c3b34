"""What the experiment scripts share: configs from TOML files and flags, and image loading.

An experiment's settings are a dataclass, parsed by flowattn's config layer
(:mod:`flowattn.configs`, on jsonargparse) as ``flowattn train``'s are. A config file
holds its fields as top-level TOML keys (list fields as TOML arrays, a ``[model]`` table
for dict fields); every field is also a flag (``--batch-size 64``, ``--models '[a, b]'``,
``--model.hidden 16``), and flags after ``--config`` override the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from jsonargparse import ArgumentError
from torch import Tensor

from flowattn.configs import config_parser, dashed_flags, one_line, parse_values, read_file
from flowattn.data import load_dataset, stack_images
from flowattn.errors import ConfigError
from flowattn.precision import use_ieee_float32

T = TypeVar("T")


def parse_config(
    cls: type[T], argv: list[str] | None, description: str, **extra: str
) -> tuple[T, Any]:
    """The settings of the dataclass ``cls`` from a command line: ``--config FILE.toml``
    and one flag per field (flowattn's config layer, :mod:`flowattn.configs`), and the
    parsed namespace, which also holds ``extra``: on/off flags that are not settings
    (name: help). Errors exit with one line. Silences :func:`quiet_known_warnings`."""
    import sys

    use_ieee_float32()  # as the flowattn command does (flowattn.precision says why)
    parser = config_parser(cls, description=description)
    for name, help_text in extra.items():
        parser.add_argument(f"--{name}", action="store_true", help=help_text)
    quiet_known_warnings()
    argv = dashed_flags(sys.argv[1:] if argv is None else list(argv), cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    try:
        args = parser.parse_args(argv)
        config = parse_values(cls, {name: args[name] for name in fields}, parser)
    except (ArgumentError, ConfigError) as error:
        raise SystemExit(f"error: {one_line(error, fields)}") from None
    return config, args


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turns the errors of bad settings or missing data (``FileNotFoundError``,
    ``ValueError``) into a one-line exit, as every experiment's ``main`` does."""
    try:
        yield
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


def read_config(cls: type[T], path: str | Path) -> T:
    """The settings of the dataclass ``cls`` in a TOML file."""
    return parse_values(cls, read_file(path))


@dataclasses.dataclass
class DataConfig:
    """The data settings every experiment has (the first fields of its config).

    Attributes:
        dataset: Dataset name, ``.npz`` path or image folder.
        root: Where torchvision-layout datasets are ("": $FLOWATTN_DATA or ./data).
        image_size: Resize to this side (celeba, folder); 0: the dataset's own size.
        train_images: Training images used (0: all).
        test_images: Test images used (0: all).
    """

    dataset: str = "../shared/data/cifar10/cifar10_subset.npz"
    root: str = ""
    image_size: int = 0
    train_images: int = 0
    test_images: int = 0

    def images(self, split: str) -> Tensor:
        """uint8 images (N, C, H, W) of ``train`` or ``test``, as many as the config says."""
        options = {"image_size": self.image_size} if self.image_size else {}
        data = load_dataset(self.dataset, split, root=self.root or None, **options)
        limit = self.train_images if split == "train" else self.test_images
        return stack_images(data, limit if limit > 0 else None)


def quiet_known_warnings() -> None:
    """Silences two warnings from dependencies that say nothing about the results."""
    # nflows' LU 1x1 convolution calls torch.triangular_solve (deprecated, still correct)
    warnings.filterwarnings("ignore", message="torch.triangular_solve is deprecated")
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")


def set_threads(threads: int) -> None:
    """Sets torch's CPU threads, only when that changes them: with torch 2.15's MKL, any
    call to torch.set_num_threads breaks batched LU factorisations for the rest of the
    process (flowattn itself avoids batched LU)."""
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def resume_state(path: Path, header: str) -> dict:
    """The state of a resumable experiment: ``{"header": header, "runs": {...}}`` read from
    the JSON file at ``path`` if there is one (its runs are kept), else a new one. A file
    written with another setting (another header) is an error: it would mix settings."""
    if not path.is_file():
        return {"header": header, "runs": {}}
    state = json.loads(path.read_text())
    if state.get("header") != header:
        raise SystemExit(f"error: {path} holds another setting:\n  {state.get('header')}")
    return state


def describe_size(image_size: int) -> str:
    return f"{image_size}x{image_size}" if image_size else "native size"


def ensure_dir(path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
