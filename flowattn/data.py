r"""Image datasets as uint8 tensors (C, H, W), with clear errors for missing or bad data.

Every dataset yields ``(image, label)`` with ``image`` a uint8 tensor (C, H, W) of
levels 0..255 and ``label`` an int (-1 when there is none). Datasets by name:

* ``digits`` (default, no download): scikit-learn's 1,797 handwritten digits, 8x8
  grey levels 0..16 rescaled to 0..255, shipped inside the scikit-learn wheel. It is
  real image data with a fixed split (first 1,500 train, last 297 test) and small
  enough that a CPU trains a flow on it in minutes; 17 grey levels make its
  bits-per-dim low and not comparable with natural-image figures.
* ``camouflage`` (no download): :func:`flowattn.segmentation.camouflage_split`'s
  images (2,000 train / 500 test, one object textured like its background), side
  ``image_size`` (default 32); their object masks come from ``flowattn.segmentation``.
* ``cifar10``, ``svhn``, ``celeba``: from ``root`` (default ``$FLOWATTN_DATA`` or
  ``./data``) in torchvision's layouts (CIFAR-10's python batches, SVHN's ``.mat``
  files, CelebA through torchvision). Checksums are not enforced (subsets and re-packed
  copies load), shapes and dtypes are. CIFAR-10's pickles are read by an unpickler that
  accepts only numpy arrays and plain containers, so a crafted file cannot run code. CelebA is
  centre-cropped to 178x178 then resized to ``image_size`` (32 or 64) as in the paper.
* ``npz``: uint8 arrays ``x_<split>`` (and labels ``y_<split>``) in an ``.npz`` file,
  HWC or CHW, e.g. ``../shared/data/cifar10/cifar10_subset.npz``. A path ending in
  ``.npz`` works as a dataset name.
* ``folder``: every PNG/JPEG/BMP/WebP image under a directory (recursively); a
  directory path works as a dataset name.

References:
    | Invertible Attention (Zha et al., 2021), section 4 (datasets and preprocessing)
    | https://arxiv.org/abs/2106.09003
"""

from __future__ import annotations

__all__ = [
    "DATASETS",
    "SOURCES",
    "DataError",
    "DatasetNotFoundError",
    "ImageTensorDataset",
    "Source",
    "load_dataset",
    "stack_images",
]

import os
import pickle
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import ConfigError, DataError, DatasetNotFoundError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_DIGITS_TRAIN = 1500


class ImageTensorDataset(Dataset):
    r"""In-memory images (N, C, H, W) uint8 with optional labels (N,).

    Examples:
        >>> ds = ImageTensorDataset(torch.zeros(5, 1, 8, 8, dtype=torch.uint8))
        >>> len(ds), ds[0][0].shape, ds[0][1]
        (5, torch.Size([1, 8, 8]), -1)
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None, name: str = "images"):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(
                f"{name}: expected uint8 images (N, C, H, W), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if labels is not None and len(labels) != len(images):
            raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.name = name

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label = -1 if self.labels is None else int(self.labels[index])
        return self.images[index], label


def _default_root() -> Path:
    return Path(os.environ.get("FLOWATTN_DATA", "data"))


def _as_nchw(array: np.ndarray, source: str) -> np.ndarray:
    """uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) -> (N, C, H, W)."""
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        dtype = getattr(array, "dtype", type(array).__name__)
        raise DataError(
            f"{source}: expected uint8 pixel levels 0..255, got dtype {dtype} "
            "(convert with (x * 255).round().astype(numpy.uint8) if it holds [0, 1] floats)"
        )
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise DataError(
            f"{source}: expected images (N, H, W, C) or (N, C, H, W), got {array.shape}"
        )
    if array.shape[-1] in (1, 3, 4) and array.shape[1] not in (1, 3, 4):
        array = array.transpose(0, 3, 1, 2)
    elif array.shape[1] not in (1, 3, 4):
        raise DataError(f"{source}: cannot tell the channel axis of shape {array.shape}")
    if array.shape[0] == 0:
        raise DataError(f"{source}: no images")
    return np.ascontiguousarray(array)


def _digits(split: str) -> ImageTensorDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    labels = bunch.target
    part = slice(None, _DIGITS_TRAIN) if split == "train" else slice(_DIGITS_TRAIN, None)
    return ImageTensorDataset(
        torch.from_numpy(images[part].copy()),
        torch.from_numpy(labels[part].copy()),
        name=f"digits/{split}",
    )


def _npz(path: Path, split: str, key: str | None) -> ImageTensorDataset:
    if not path.is_file():
        raise DatasetNotFoundError(
            f"no .npz file at {path.resolve()}; pass the path of a file holding uint8 arrays "
            f"'x_{split}' (and optionally 'y_{split}')"
        )
    key = key or f"x_{split}"
    try:
        with np.load(path, allow_pickle=False) as data:
            if key not in data.files:
                raise DataError(f"{path} has no array {key!r}; it has {', '.join(data.files)}")
            images = data[key]
            label_key = "y" + key[1:] if key.startswith("x") else None
            labels = data[label_key] if label_key in data.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        if isinstance(error, DataError):
            raise
        if not zipfile.is_zipfile(path):
            raise DataError(f"cannot read {path}: not an .npz archive (not a zip file)") from None
        raise DataError(f"cannot read {path} as an .npz archive: {error}") from None
    images = _as_nchw(images, f"{path}[{key!r}]")
    label_tensor = None
    if labels is not None:
        if labels.shape != (images.shape[0],):
            raise DataError(f"{path}: labels {labels.shape} do not match {images.shape[0]} images")
        label_tensor = torch.from_numpy(labels.astype(np.int64))
    return ImageTensorDataset(torch.from_numpy(images), label_tensor, name=f"{path.name}/{key}")


def _missing(name: str, path: Path, expected: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name} not found at {path.resolve()} (expected {expected}). Download it with "
        f"torchvision (e.g. torchvision.datasets.{name}(root, download=True)), pass root= "
        f"(or set FLOWATTN_DATA) to where it is, or use an .npz copy"
    )


# CIFAR-10's python batches: pickled dicts of bytes keys, a uint8 array and a list
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays, so a crafted file cannot run code
    (the CIFAR-10 batches need nothing else)."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar10_batch(file: Path) -> tuple[np.ndarray, list[int]]:
    """(images (N, 3, 32, 32) uint8, labels) of one CIFAR-10 python batch."""
    try:
        with file.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
        data, labels = batch["data"], list(batch["labels"])
    except Exception as error:  # unpickling garbage can raise almost anything
        raise DataError(f"{file} is corrupted or not a CIFAR-10 python batch: {error!r}") from None
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{file}: expected uint8 data (N, 3072), got {data.dtype} {data.shape}")
    # rows are channel-major: 1024 red, 1024 green, 1024 blue values
    return data.reshape(-1, 3, 32, 32), labels


def _cifar10(root: Path, split: str) -> ImageTensorDataset:
    folder = root / CIFAR10_FOLDER
    files = CIFAR10_FILES[split]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise _missing("CIFAR10", folder, f"the python pickles {', '.join(files)}")
    batches = [_cifar10_batch(folder / f) for f in files]
    data = np.concatenate([images for images, _ in batches])
    labels = [label for _, batch_labels in batches for label in batch_labels]
    images = torch.from_numpy(_as_nchw(data, str(folder)))
    return ImageTensorDataset(images, torch.as_tensor(labels), name=f"cifar10/{split}")


def _svhn(root: Path, split: str) -> ImageTensorDataset:
    from scipy.io import loadmat

    file = root / SVHN_FILES[split]
    if not file.is_file():
        raise _missing("SVHN", root, f"the MATLAB file {file.name}")
    try:
        mat = loadmat(str(file))
        data, labels = np.asarray(mat["X"]), np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    except Exception as error:  # scipy.io.loadmat on garbage raises many kinds
        raise DataError(f"{file} is corrupted or not an SVHN .mat file: {error!r}") from None
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[:3] != (32, 32, 3):
        raise DataError(f"{file}: expected uint8 X of shape (32, 32, 3, N), got {data.shape}")
    labels[labels == 10] = 0  # SVHN stores the digit 0 as label 10
    images = np.ascontiguousarray(data.transpose(3, 2, 0, 1))  # (N, 3, 32, 32)
    return ImageTensorDataset(torch.from_numpy(images), torch.as_tensor(labels), f"svhn/{split}")


class _LazyImages(Dataset):
    """Images read from files on access, converted to uint8 (C, H, W) tensors."""

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int] | None,
        transform: Callable,
        mode: str,
        name: str,
    ):
        self.files = list(files)
        self.labels = labels
        self.transform = transform
        self.mode = mode
        self.name = name

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.functional import pil_to_tensor

        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = self.transform(image.convert(self.mode))
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise DataError(f"cannot read image {path}: {error}") from None
        label = -1 if self.labels is None else int(self.labels[index])
        return pil_to_tensor(image), label

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self[0][0].shape)


def _crop_resize(crop: int | None, size: int | None) -> Callable:
    from torchvision import transforms

    steps = []
    if crop is not None:
        steps.append(transforms.CenterCrop(crop))
    if size is not None:
        steps.append(transforms.Resize(size, antialias=True))
        steps.append(transforms.CenterCrop(size))
    return transforms.Compose(steps)


CELEBA_FOLDER = "celeba"
CELEBA_SPLITS = {"train": {0}, "valid": {1}, "test": {2}, "all": {0, 1, 2}}


def _celeba(root: Path, split: str, image_size: int | None) -> _LazyImages:
    """CelebA in torchvision's layout: ``img_align_celeba/`` and the split file
    ``list_eval_partition.txt`` (one ``<file> <0|1|2>`` line per image; train, valid,
    test); the other annotation files are not needed."""
    folder = root / CELEBA_FOLDER
    partition = folder / "list_eval_partition.txt"
    missing = [] if partition.is_file() else [partition.name]
    if not (folder / "img_align_celeba").is_dir():
        missing.insert(0, "img_align_celeba/")
    if missing:
        raise _missing("CelebA", folder, f"{', '.join(missing)}")
    wanted, names = CELEBA_SPLITS[split], []
    for number, line in enumerate(partition.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(f"{partition}, line {number}: expected '<file> <0|1|2>', got {line!r}")
        if int(fields[1]) in wanted:
            names.append(fields[0])
    files = [folder / "img_align_celeba" / name for name in names]
    if not files:
        raise DataError(f"CelebA in {folder}: no images in split {split!r}")
    size = 64 if image_size is None else image_size
    return _LazyImages(files, None, _crop_resize(178, size), "RGB", f"celeba/{split}")


def _folder(path: Path, image_size: int | None, channels: int) -> _LazyImages:
    if not path.is_dir():
        raise DatasetNotFoundError(f"no image folder at {path.resolve()}")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetNotFoundError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path.resolve()}"
        )
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    transform = _crop_resize(None, image_size)
    ds = _LazyImages(files, None, transform, mode, path.name)
    if image_size is None:
        from PIL import Image

        sizes = set()
        for f in files[:64]:
            try:
                with Image.open(f) as image:
                    sizes.add(image.size)
            except OSError as error:
                raise DataError(f"cannot read image {f}: {error}") from None
        if len(sizes) > 1:
            raise DataError(
                f"images under {path} have different sizes {sorted(sizes)[:4]}; "
                "pass image_size to crop and resize them"
            )
    return ds


class _Request(NamedTuple):
    """What :func:`load_dataset` was asked for, as every loader of :data:`SOURCES` gets it."""

    root: Path
    split: str
    image_size: int | None
    channels: int
    key: str | None


def _load_digits(r: _Request) -> Dataset:
    return _digits(r.split)


def _load_camouflage(r: _Request) -> Dataset:
    from .segmentation.folders import segmentation_set

    images, _ = segmentation_set("camouflage", r.split, r.image_size)
    return ImageTensorDataset(images, name="camouflage")


def _load_npz(r: _Request) -> Dataset:
    return _npz(r.root, r.split, r.key)


def _load_cifar10(r: _Request) -> Dataset:
    return _cifar10(r.root, r.split)


def _load_svhn(r: _Request) -> Dataset:
    return _svhn(r.root, r.split)


def _load_celeba(r: _Request) -> Dataset:
    return _celeba(r.root, r.split, r.image_size)


def _load_folder(r: _Request) -> Dataset:
    return _folder(r.root, r.image_size, r.channels)


class Source(NamedTuple):
    """A dataset :func:`load_dataset` knows by name.

    Attributes:
        load: The loader, from the request (root, split, image_size, channels, key).
        splits: Its splits (None: any, e.g. a folder, which has one).
        sized: Whether it takes ``image_size`` (else its images have a fixed size).
        needs_root: Whether ``root`` must be given (the file or directory itself).
    """

    load: Callable[[_Request], Dataset]
    splits: tuple[str, ...] | None = ("train", "test")
    sized: bool = False
    needs_root: bool = False


#: Every dataset by name: adding one is a loader and one line here.
SOURCES: dict[str, Source] = {
    "digits": Source(_load_digits),
    "camouflage": Source(_load_camouflage, sized=True),
    "cifar10": Source(_load_cifar10),
    "svhn": Source(_load_svhn, ("train", "test", "extra")),
    "celeba": Source(_load_celeba, ("train", "valid", "test", "all"), sized=True),
    "npz": Source(_load_npz, needs_root=True),
    "folder": Source(_load_folder, None, sized=True, needs_root=True),
}
DATASETS = tuple(SOURCES)


def load_dataset(
    name: str | Path = "digits",
    split: str = "train",
    *,
    root: str | Path | None = None,
    image_size: int | None = None,
    channels: int = 3,
    key: str | None = None,
) -> Dataset:
    r"""Loads a dataset of uint8 images (C, H, W) by name or path.

    Arguments:
        name: One of :data:`DATASETS`, a path to an ``.npz`` file, or a directory of images.
        split: ``train`` or ``test`` (SVHN also ``extra``; CelebA also ``valid``, ``all``).
        root: Where the torchvision datasets are (default ``$FLOWATTN_DATA`` or
            ``./data``); the file for ``npz``, the directory for ``folder``.
        image_size: Side of the square output for ``celeba`` (default 64), ``camouflage``
            (default 32) and ``folder``.
        channels: 1 or 3, for ``folder``.
        key: Array name in an ``.npz`` file (default ``x_<split>``).

    Returns:
        A ``torch.utils.data.Dataset`` of ``(image, label)``.

    Raises:
        DatasetNotFoundError: The files are missing (the message names the path tried).
        DataError: The files are corrupted or hold the wrong shape or dtype.

    Examples:
        >>> ds = load_dataset("digits", "test")
        >>> len(ds), ds[0][0].dtype, ds[0][0].shape
        (297, torch.uint8, torch.Size([1, 8, 8]))
    """
    path = Path(name)
    if str(name).endswith(".npz"):
        name, root = "npz", path
    elif name not in SOURCES and path.is_dir():
        name, root = "folder", path
    if name not in SOURCES:
        raise ConfigError(
            f"unknown dataset {str(name)!r}; valid: {', '.join(SOURCES)}, an .npz path or "
            "an image directory"
        )
    source = SOURCES[name]
    if source.needs_root and root is None:
        raise ConfigError(f"dataset {name!r} needs root= (the {name} path)")
    if image_size is not None and not source.sized:
        sized = ", ".join(n for n, src in SOURCES.items() if src.sized)
        raise ConfigError(f"{name} has a fixed image size; image_size is for {sized}")
    if source.splits is not None and split not in source.splits:
        raise ConfigError(
            f"unknown split {split!r} for {name}; valid splits: {', '.join(source.splits)}"
        )
    root = _default_root() if root is None else Path(root)
    return source.load(_Request(root, split, image_size, channels, key))


def stack_images(dataset: Dataset, limit: int | None = None) -> Tensor:
    """The first ``limit`` images of a dataset as one uint8 tensor (N, C, H, W).

    Examples:
        >>> stack_images(load_dataset("digits", "test"), limit=4).shape
        torch.Size([4, 1, 8, 8])
    """
    if isinstance(dataset, ImageTensorDataset):
        return dataset.images[:limit]
    n = len(dataset) if limit is None else min(limit, len(dataset))
    images = [dataset[i][0] for i in range(n)]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise DataError(f"images of different shapes {sorted(shapes)[:4]}")
    return torch.stack(images)
