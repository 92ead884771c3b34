r"""Bits-per-dim and reconstruction error.

Bits-per-dim convention: data are 8-bit images :math:`x \in \{0..255\}^D`; uniform
dequantisation :math:`y = (x + u) / 256`, :math:`u \sim U[0, 1)^D` gives the
variational bound :math:`\ln P(x) \ge \mathbb{E}_u[\ln p(y)] - D \ln 256`, and

.. math:: \mathrm{bpd}(x) = -\ln P(x) / (D \ln 2).

A model uniform on :math:`[0, 1)^D` gets exactly 8 bits per dim.

References:
    | A note on the evaluation of generative models (Theis et al., 2016)
    | https://arxiv.org/abs/1511.01844
"""

from __future__ import annotations

__all__ = [
    "BitsPerDim",
    "NonFiniteDensityError",
    "PairedDifference",
    "ReconstructionError",
    "bits_per_dim",
    "paired_difference",
    "paired_values_difference",
    "reconstruction_error",
    "summarize_bits_per_dim",
]

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import NonFiniteDensityError


def bits_per_dim(log_prob: Tensor, num_dims: int) -> Tensor:
    r"""Bits per dimension :math:`-\ln P(x) / (D \ln 2)` from log-probabilities in nats.

    Arguments:
        log_prob: :math:`\ln P(x)` of the discrete images (already including the
            :math:`-D \ln 256` of dequantisation), any shape.
        num_dims: D, the number of values per image (C H W).

    Examples:
        >>> bits_per_dim(torch.tensor(-3072 * math.log(256)), 3072)
        tensor(8.)
    """
    if num_dims < 1:
        raise ValueError(f"num_dims must be positive, got {num_dims}")
    return -log_prob / (num_dims * math.log(2))


@dataclass(frozen=True)
class BitsPerDim:
    """A bits-per-dim figure with its standard error and how it was estimated.

    Attributes:
        mean: Mean bits-per-dim over images (and repeats).
        stderr: Standard error of the mean over images (each image's value first averaged
            over its repeats), so it includes the dequantisation and log-det estimator
            noise. It is a valid standard error when the per-image values are independent
            and of finite variance: exact log-dets, or a Russian roulette with per-sample
            draws and a certified variance (see :attr:`error_bar_certified`). NaN for a
            single image and repeat.
        estimator: The log-det estimator(s) used, saying whether biased.
        images: Number of images.
        repeats: Dequantisation / probe draws per image.
        bias_bound: A certified bound on the absolute bias of :attr:`mean` in bits/dim
            coming from the log-det estimator: 0 for exact or unbiased estimators, the
            truncation bound of a power series (from the steps' certified Lipschitz
            bounds), or ``inf`` when no bound is known (an uncertified step).
        error_bar_certified: Whether :attr:`stderr` is backed by the estimator's
            guarantees (False for a roulette whose variance is not certified finite).
        values: The per-image values (images,), each averaged over its repeats, for
            paired comparisons (:func:`paired_difference`).
        seconds: Wall-clock seconds the evaluation took (NaN if not timed).
    """

    mean: float
    stderr: float
    estimator: str
    images: int
    repeats: int
    bias_bound: float = 0.0
    error_bar_certified: bool = True
    values: Tensor | None = field(default=None, repr=False, compare=False)
    seconds: float = field(default=math.nan, compare=False)

    @property
    def unbiased(self) -> bool:
        """Whether the figure is exact or unbiased (no estimator bias)."""
        return self.bias_bound == 0.0

    def __str__(self) -> str:
        draws = "draw" if self.repeats == 1 else "draws"
        text = (
            f"{self.mean:.4f} ± {self.stderr:.4f} bits/dim ({self.images} images x "
            f"{self.repeats} {draws}; log-det: {self.estimator})"
        )
        if math.isinf(self.bias_bound):
            text += "; BIASED by an unknown amount (a step has no certified Lipschitz bound)"
        elif self.bias_bound > 0:
            text += (
                f"; BIASED: the truncated series may be off by up to {self.bias_bound:.4g} "
                "bits/dim (certified bound), beyond the error bar"
            )
        if not self.error_bar_certified:
            text += "; error bar not certified (estimator variance not proven finite)"
        return text


@dataclass(frozen=True)
class PairedDifference:
    """The difference of two models' bits-per-dim over the same images and dequantisation
    draws, ``a - b``, with the standard error of the per-image differences.

    Attributes:
        mean: Mean per-image difference, bits/dim (negative: ``a`` is better).
        stderr: Standard error of the mean difference.
        images: Number of paired images.
    """

    mean: float
    stderr: float
    images: int

    @property
    def z(self) -> float:
        """mean / stderr."""
        return self.mean / self.stderr if self.stderr > 0 else math.copysign(math.inf, self.mean)

    def significant(self, z: float = 2.0) -> bool:
        """Whether the difference is more than ``z`` standard errors from zero."""
        return abs(self.z) > z

    def __str__(self) -> str:
        return f"{self.mean:+.4f} ± {self.stderr:.4f} bits/dim ({self.images} paired images)"


def paired_difference(a: BitsPerDim, b: BitsPerDim) -> PairedDifference:
    """``a - b`` over the same images: the two figures must come from the same images in
    the same order and the same dequantisation seed (``bits_per_dim(..., seed=s)``), so the
    image-to-image spread cancels and only the models' difference (and estimator noise)
    is left in the standard error.

    Examples:
        >>> a = summarize_bits_per_dim(torch.tensor([[3.0], [5.0], [4.0]]), "exact")
        >>> b = summarize_bits_per_dim(torch.tensor([[3.5], [5.4], [4.6]]), "exact")
        >>> d = paired_difference(a, b)
        >>> round(d.mean, 4), d.significant()
        (-0.5, True)
    """
    if a.values is None or b.values is None:
        raise ValueError("paired_difference needs figures that keep their per-image values")
    return paired_values_difference(a.values, b.values)


def paired_values_difference(a: Tensor, b: Tensor) -> PairedDifference:
    """:func:`paired_difference` of per-image values (images,) given directly."""
    if a.shape != b.shape:
        raise ValueError(
            f"paired_difference needs the same images: got {a.numel()} and {b.numel()} images"
        )
    diff = (a - b).double()
    n = diff.numel()
    stderr = float(diff.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return PairedDifference(float(diff.mean()), stderr, n)


def summarize_bits_per_dim(
    values: Tensor,
    estimator: str,
    *,
    bias_bound: float = 0.0,
    error_bar_certified: bool = True,
) -> BitsPerDim:
    """Mean and standard error of per-image values (images, repeats) -> :class:`BitsPerDim`.

    Examples:
        >>> summarize_bits_per_dim(torch.tensor([[3.0], [5.0]]), "exact").mean
        4.0
    """
    if values.dim() != 2 or values.numel() == 0:
        raise ValueError(f"expected values of shape (images, repeats), got {tuple(values.shape)}")
    values = values.double()
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).any(dim=1).sum())
        raise NonFiniteDensityError(
            f"non-finite bits-per-dim for {bad} of {values.shape[0]} images: the model's "
            "log-density is not finite there"
        )
    per_image = values.mean(dim=1)
    n, r = values.shape
    if n > 1:
        stderr = float(per_image.std(unbiased=True) / math.sqrt(n))
    elif r > 1:
        stderr = float(values[0].std(unbiased=True) / math.sqrt(r))
    else:
        stderr = math.nan
    return BitsPerDim(
        float(per_image.mean()),
        stderr,
        estimator,
        n,
        r,
        bias_bound=bias_bound,
        error_bar_certified=error_bar_certified,
        values=per_image,
    )


@dataclass(frozen=True)
class ReconstructionError:
    """Reconstruction error on the 0..255 pixel scale.

    Attributes:
        max_abs: Largest absolute difference, in pixel levels.
        mse: Mean squared difference, in squared levels.
        psnr: Peak signal-to-noise ratio in dB (peak 255; infinite when exact).
    """

    max_abs: float
    mse: float
    psnr: float

    def __str__(self) -> str:
        return f"max |error| {self.max_abs:.3g} levels, MSE {self.mse:.3g}, PSNR {self.psnr:.2f} dB"


def reconstruction_error(x: Tensor, x_hat: Tensor, *, peak: float = 255.0) -> ReconstructionError:
    r"""Reconstruction error between images on the same scale, reported in pixel levels.

    Arguments:
        x: Images: uint8 (levels), or floats whose largest possible value is ``peak``
            (use ``peak=1.0`` for images in [0, 1]).
        x_hat: Their reconstructions, of the same shape and scale.
        peak: The value of a full-scale pixel on the inputs' scale.

    Examples:
        >>> x = torch.tensor([0, 100, 255], dtype=torch.uint8)
        >>> err = reconstruction_error(x, torch.tensor([0, 101, 255], dtype=torch.uint8))
        >>> err.max_abs, round(err.psnr, 2)
        (1.0, 52.9)
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if (x.dtype == torch.uint8) != (x_hat.dtype == torch.uint8):
        raise ValueError(f"compare images of one scale: got {x.dtype} and {x_hat.dtype}")
    to_levels = 255.0 / (255.0 if x.dtype == torch.uint8 else peak)
    diff = (x.double() - x_hat.double()) * to_levels
    max_abs = float(diff.abs().max())
    mse = float(diff.square().mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return ReconstructionError(max_abs, mse, psnr)
