r"""A camouflage dataset that needs no download: one object per image, textured like
its background.

Each image is a background texture; the object is a random smooth blob (a star-shaped
curve :math:`r(\theta) = r_0 (1 + \sum_{k=2}^{4} a_k \cos(k\theta + \phi_k))`, placed and
scaled at random) filled with the *same* texture flipped, rotated by 180 degrees or
shifted by half the image, and blended in with a soft boundary. Colour and brightness
statistics inside and outside the object are then the same, so only texture
discontinuities at the boundary give it away, as in camouflaged object detection.

Backgrounds are fractal colour noise made from the seed (the default), or images the
caller passes (for instance the CIFAR-10 subset in ``../shared/data``), resized.

References:
    | Invertible Attention (Zha et al., 2021), section 5.3 (camouflaged object detection)
    | https://arxiv.org/abs/2106.09003

    | Camouflaged Object Detection (Fan et al., 2020)
    | https://arxiv.org/abs/2102.10274
"""

from __future__ import annotations

__all__ = ["FILLS", "SPLITS", "camouflage", "camouflage_split"]

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FILLS = ("hflip", "vflip", "rot180", "shift")
"""How the object's texture is made from the background's."""
SPLITS = {"train": (0, 2000), "test": (1, 500)}
"""Split name: (stream of the seed, number of images)."""


def _fractal_noise(n: int, size: int, rng: np.random.Generator) -> Tensor:
    """(n, 3, size, size) float textures in [0, 1]: octaves of upsampled Gaussian noise,
    mixed into colours by a random matrix per image."""
    total = torch.zeros(n, 3, size, size, dtype=torch.float64)
    for octave in range(2, int(math.log2(size)) + 1):
        side = 2**octave
        grid = torch.from_numpy(rng.standard_normal((n, 3, side, side)))
        up = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
        total += up * (4 / side)  # finer octaves weigh less (amplitude ~ 1 / frequency)
    mix = torch.from_numpy(rng.uniform(-1, 1, (n, 3, 3)))
    total = torch.einsum("nij,njhw->nihw", mix, total)
    low = total.amin(dim=(1, 2, 3), keepdim=True)
    high = total.amax(dim=(1, 2, 3), keepdim=True)
    return (total - low) / (high - low)


def _blob_alpha(n: int, size: int, rng: np.random.Generator) -> Tensor:
    """(n, 1, size, size) soft object masks in [0, 1] (boundary about one pixel wide)."""
    r0 = rng.uniform(0.15, 0.3, n) * size
    margin = r0 * 1.45
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    a = rng.uniform(0, 0.15, (n, 3))
    phase = rng.uniform(0, 2 * math.pi, (n, 3))
    ys, xs = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]
    dist, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    k = np.arange(2, 5)[None, :, None, None]
    wobble = (a[:, :, None, None] * np.cos(k * theta[:, None] + phase[:, :, None, None])).sum(1)
    radius = r0[:, None, None] * (1 + wobble)
    return torch.from_numpy(1 / (1 + np.exp(-(radius - dist) / 0.5)))[:, None]


def _fill(background: Tensor, kinds: np.ndarray) -> Tensor:
    out = torch.empty_like(background)
    for i, kind in enumerate(kinds):
        b = background[i]
        if FILLS[kind] == "hflip":
            out[i] = b.flip(-1)
        elif FILLS[kind] == "vflip":
            out[i] = b.flip(-2)
        elif FILLS[kind] == "rot180":
            out[i] = b.flip(-1, -2)
        else:
            out[i] = b.roll((b.shape[-2] // 2, b.shape[-1] // 2), dims=(-2, -1))
    return out


def camouflage(
    n: int, size: int = 32, *, seed: int = 0, backgrounds: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Makes ``n`` camouflage images and their object masks, deterministically from ``seed``.

    Arguments:
        n: Number of images.
        size: Image side (at least 16).
        seed: Seed of everything random (textures, shapes, fills).
        backgrounds: Optional uint8 images (M, 3, H, W) to use as backgrounds instead of
            fractal noise; image i uses ``backgrounds[i % M]``, resized to ``size``.

    Returns:
        ``images``, uint8 (n, 3, size, size), and ``masks``, bool (n, 1, size, size): the
        pixels where the object covers more than half.

    Examples:
        >>> images, masks = camouflage(4, 32, seed=1)
        >>> images.shape, images.dtype, masks.shape, masks.dtype
        (torch.Size([4, 3, 32, 32]), torch.uint8, torch.Size([4, 1, 32, 32]), torch.bool)
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an integer of at least 16, got {size!r}")
    rng = np.random.default_rng(seed)
    if backgrounds is None:
        background = _fractal_noise(n, size, rng)
    else:
        if backgrounds.dim() != 4 or backgrounds.shape[1] != 3 or backgrounds.dtype != torch.uint8:
            raise ValueError(
                f"backgrounds must be uint8 images (M, 3, H, W), got {backgrounds.dtype} "
                f"{tuple(backgrounds.shape)}"
            )
        picked = backgrounds[torch.arange(n) % len(backgrounds)].double() / 255
        background = F.interpolate(picked, size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False).clamp(0, 1)  # fmt: skip
    alpha = _blob_alpha(n, size, rng)
    fill = _fill(background, rng.integers(0, len(FILLS), n))
    images = alpha * fill + (1 - alpha) * background
    return (images * 255).round().to(torch.uint8), alpha > 0.5


def camouflage_split(
    split: str = "train", size: int = 32, *, seed: int = 0, backgrounds: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The fixed ``train`` (2,000 images) or ``test`` (500) split: :func:`camouflage`
    with independent random streams per split (``numpy.random.SeedSequence``).

    Examples:
        >>> images, masks = camouflage_split("test", 32)
        >>> len(images), tuple(masks.shape[1:])
        (500, (1, 32, 32))
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    stream, n = SPLITS[split]
    split_seed = int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])
    return camouflage(n, size, seed=split_seed, backgrounds=backgrounds)
