r"""The real camouflaged-object-detection sets, read from their standard folder layout.

COD10K, CAMO, CHAMELEON and NC4K are distributed (for instance in the SINet-V2 release)
as a folder of images ``Imgs/<name>.jpg`` and a folder of masks ``GT/<name>.png``, with
the training and test sets in folders of their own (``TrainDataset``, ``TestDataset/
<set>``). :func:`load_cod_folder` reads such a folder, or the ``train``/``test`` folder
under it. Masks are binarised at 128 of 255, as the field's evaluation does.

References:
    | Camouflaged Object Detection (Fan et al., 2020)
    | https://arxiv.org/abs/2102.10274
"""

from __future__ import annotations

__all__ = ["MASK_SUFFIXES", "SPLIT_FOLDERS", "load_cod_folder", "segmentation_set"]

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..data import IMAGE_SUFFIXES, DataError, DatasetNotFoundError

MASK_SUFFIXES = (".png", ".bmp", ".jpg")
SPLIT_FOLDERS = {
    "train": ("train", "Train", "TrainDataset"),
    "test": ("test", "Test", "TestDataset"),
}
"""The names a split's folder goes by under a set's folder."""


def _set_folder(path: Path, split: str | None) -> Path:
    if (path / "Imgs").is_dir() and (path / "GT").is_dir():
        return path
    if split is not None:
        if split not in SPLIT_FOLDERS:
            raise ValueError(f"split must be one of {', '.join(SPLIT_FOLDERS)}, got {split!r}")
        for name in SPLIT_FOLDERS[split]:
            if (path / name / "Imgs").is_dir() and (path / name / "GT").is_dir():
                return path / name
    raise DatasetNotFoundError(
        f"{path} is not a COD set folder: expected {path}/Imgs and {path}/GT"
        + (f", or Imgs and GT under {path}/{{{','.join(SPLIT_FOLDERS[split])}}}" if split else "")
    )


def read_image(file: Path, mode: str) -> Image.Image:
    """The image file converted to PIL ``mode``; an unreadable file is a DataError."""
    try:
        with Image.open(file) as im:
            return im.convert(mode)
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read {file}: {error}") from error


def load_cod_folder(
    path: str | Path, split: str | None = None, *, size: int | None = None
) -> tuple[Tensor, Tensor, list[str]]:
    """Reads a COD set: images with their binary object masks.

    Arguments:
        path: A folder with ``Imgs/`` and ``GT/``, or one whose ``split`` folder has them.
        split: ``train`` or ``test``, for a folder that holds both.
        size: Resize images (bilinear) and masks (bilinear, then binarised at 128) to
            ``size`` x ``size``; None keeps the files' size, which must then be the same
            for all images.

    Returns:
        ``images`` uint8 (N, 3, H, W), ``masks`` bool (N, 1, H, W), and the image names.

    Raises:
        DatasetNotFoundError: The folders are missing or hold no images.
        DataError: An image has no mask, an image and its mask differ in size, a file
            cannot be read, or the images differ in size and ``size`` is None.
    """
    folder = _set_folder(Path(path), split)
    files = sorted(f for f in (folder / "Imgs").iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder / 'Imgs'}")
    images, masks = [], []
    for file in files:
        mask_files = [folder / "GT" / (file.stem + s) for s in MASK_SUFFIXES]
        mask_file = next((m for m in mask_files if m.is_file()), None)
        if mask_file is None:
            raise DataError(f"{file.name} has no mask: expected {mask_files[0]}")
        image, mask = read_image(file, "RGB"), read_image(mask_file, "L")
        if image.size != mask.size:
            raise DataError(
                f"{file.name} is {image.size[0]}x{image.size[1]} but its mask "
                f"{mask_file.name} is {mask.size[0]}x{mask.size[1]}"
            )
        if size is not None:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
            mask = mask.resize((size, size), Image.Resampling.BILINEAR)
        images.append(np.asarray(image))
        masks.append(np.asarray(mask) > 128)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(
            f"the images in {folder / 'Imgs'} differ in size ({len(shapes)} sizes): pass size="
        )
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    m = torch.from_numpy(np.stack(masks))[:, None]
    return x, m, [f.stem for f in files]


def segmentation_set(
    dataset: str | Path, split: str, size: int | None = 32
) -> tuple[Tensor, Tensor]:
    """Images and masks of a segmentation set: ``camouflage`` (the embedded set of
    :func:`~flowattn.segmentation.camouflage_split`, made at ``size``, default 32) or the
    path of a COD set folder (:func:`load_cod_folder`, resized to ``size`` unless None).

    Returns:
        ``images`` uint8 (N, 3, H, W) and ``masks`` bool (N, 1, H, W).
    """
    if str(dataset) == "camouflage":
        from .camouflage import camouflage_split

        return camouflage_split(split, 32 if size is None else size)
    if not Path(dataset).exists():
        raise DatasetNotFoundError(
            f"no dataset {str(dataset)!r}: give 'camouflage' or the folder of a COD set"
        )
    images, masks, _ = load_cod_folder(dataset, split, size=size)
    return images, masks
