"""IEEE float32 arithmetic on CUDA for computations that a flow must invert.

On Ampere and later NVIDIA GPUs, PyTorch runs float32 convolutions in TF32 by default
(``torch.backends.cudnn.allow_tf32``; matrix products too where a user turns on
``torch.backends.cuda.matmul.allow_tf32`` or ``torch.set_float32_matmul_precision``).
TF32 keeps 10 bits of mantissa, so a residual branch g is computed with a relative error
of about 1e-3. The fixed-point inverse of ``y = x + g(x)`` then stalls at that error,
far above its float32 tolerance, and log-dets and reconstructions carry it.

The setting is PyTorch's and process-wide, so the library does not change it: an
application does, once, with :func:`use_ieee_float32` (the ``flowattn`` command and the
experiments call it at start-up). A residual step run on float32 CUDA tensors while
TF32 is allowed warns (:class:`TF32Warning`, :func:`warn_if_tf32`) and says so.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["TF32Warning", "tf32_allowed", "use_ieee_float32", "warn_if_tf32"]


class TF32Warning(UserWarning):
    """A residual step ran in float32 on CUDA while TF32 was allowed."""


def tf32_allowed() -> bool:
    """Whether PyTorch may run float32 convolutions or matrix products in TF32 on CUDA."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    return bool(torch.backends.cudnn.allow_tf32 or matmul)


def use_ieee_float32() -> None:
    """Turns TF32 off for cuDNN convolutions and CUDA matrix products, process-wide: for
    applications (the ``flowattn`` command calls it at start-up), not library code.
    Nothing changes on the CPU, whose float32 arithmetic is always IEEE.

    Example:
        >>> before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        >>> use_ieee_float32()
        >>> tf32_allowed()
        False
        >>> torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def warn_if_tf32(device: torch.device, dtype: torch.dtype) -> None:
    """Warns (:class:`TF32Warning`, once per calling line) when float32 work on
    ``device`` may run in TF32: a CUDA device, float32, and TF32 allowed."""
    if device.type == "cuda" and dtype == torch.float32 and tf32_allowed():
        warnings.warn(
            "a residual step runs in float32 on CUDA with TF32 allowed (PyTorch's default "
            "for convolutions): its inverse may stall near 1e-3 and its log-det carries "
            "the error; call flowattn.precision.use_ieee_float32() once at start-up",
            TF32Warning,
            stacklevel=3,
        )
