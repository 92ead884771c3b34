"""The one check of image tensors: (B, C, H, W), of the channels or shape a module
expects, 8-bit levels or floats in [0, 1], with an error that names what was expected."""

from __future__ import annotations

__all__ = ["check_images", "outside_range"]

import torch
from torch import Tensor


def outside_range(x: Tensor, low: float, high: float) -> bool:
    """Whether a non-empty tensor has an element below ``low`` or above ``high`` (NaNs
    are not), in one pass and one read back to the host (each read makes the host wait
    for an accelerator's queued kernels)."""
    smallest, largest = torch.aminmax(x)
    return bool((smallest < low) | (largest > high))


def check_images(
    x: Tensor,
    *,
    shape: tuple[int, ...] | None = None,
    channels: int | None = None,
    uint8: bool | None = None,
    owner: str = "",
) -> Tensor:
    """Returns ``x`` after checking that it is a batch of images.

    Arguments:
        x: The tensor, which must be 4-D (B, C, H, W).
        shape: The (C, H, W) it must have, or None.
        channels: The C it must have, or None.
        uint8: True: 8-bit levels (uint8); False: floating point in [0, 1]; None: any.
        owner: Who expects them, for the message (``"model"``, a class name).

    Raises:
        TypeError: Not a tensor, or the wrong dtype.
        ValueError: The wrong shape, or floats outside [0, 1].

    Examples:
        >>> check_images(torch.zeros(2, 3, 4, 4), channels=3).shape
        torch.Size([2, 3, 4, 4])
        >>> check_images(torch.zeros(2, 1, 4, 4), channels=3, owner="Net")
        Traceback (most recent call last):
        ...
        ValueError: Net expects images (B, 3, H, W), got shape (2, 1, 4, 4)
    """
    who = f"{owner} expects" if owner else "expected"
    if not isinstance(x, Tensor):
        raise TypeError(f"{who} a torch.Tensor of images, got {type(x).__name__}")
    if shape is not None:
        wanted = f"(B, {', '.join(map(str, shape))})"
        fits = x.dim() == 4 and tuple(x.shape[1:]) == tuple(shape)
    else:
        wanted = "(B, C, H, W)" if channels is None else f"(B, {channels}, H, W)"
        fits = x.dim() == 4 and (channels is None or x.shape[1] == channels)
    if not fits:
        raise ValueError(f"{who} images {wanted}, got shape {tuple(x.shape)}")
    if uint8 is True and x.dtype != torch.uint8:
        raise TypeError(f"{who} uint8 images (0..255), got {x.dtype}")
    if uint8 is False:
        if not x.is_floating_point():
            raise TypeError(
                f"{who} float images in [0, 1], got {x.dtype} (bits_per_dim takes 8-bit images)"
            )
        if x.numel() and outside_range(x, 0, 1):
            raise ValueError(f"{who} float images in [0, 1]")
    return x
