"""What the experiment scripts share: configs from TOML files and flags, and image loading.

An experiment's settings are a dataclass. A config file holds its fields as top-level
TOML keys (list fields as TOML arrays, a ``[model]`` table for dict fields); every field
is also a flag (``--batch-size 64``; lists comma-separated), and flags override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import warnings
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from flowattn.data import load_dataset, stack_images
from flowattn.names import check_names

T = TypeVar("T")


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds ``--config`` and one flag per field of the dataclass ``cls``."""
    parser.add_argument("--config", help="a TOML file of the settings below")
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, dict):
            continue  # tables live in config files
        if isinstance(value, list):
            parser.add_argument(flag, help=f"comma-separated (default {','.join(value)})")
        elif isinstance(value, bool):
            parser.add_argument(flag, type=_boolean, help=f"true/false (default {value})")
        else:
            parser.add_argument(flag, type=type(value), help=f"default {value!r}")


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The settings of a config file (if any) with the flags given applied on top."""
    values: dict[str, Any] = {}
    if args.config:
        with open(args.config, "rb") as f:
            values = tomllib.load(f)
        try:
            check_names(values, [f.name for f in dataclasses.fields(cls)], "key")
        except ValueError as error:
            raise SystemExit(f"error: {args.config}: {error}") from None
    defaults = cls()
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = (
                given.split(",") if isinstance(getattr(defaults, f.name), list) else given
            )
    return cls(**values)


@dataclasses.dataclass
class DataConfig:
    """The data settings every experiment has (the first fields of its config)."""

    dataset: str = "../shared/data/cifar10/cifar10_subset.npz"
    root: str = ""  # torchvision root; "": $FLOWATTN_DATA or ./data
    image_size: int = 0  # resize to this (celeba, folder); 0: the dataset's own size
    train_images: int = 0  # 0: all
    test_images: int = 0  # 0: all

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


def describe_size(image_size: int) -> str:
    return f"{image_size}x{image_size}" if image_size else "native size"


def ensure_dir(path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
