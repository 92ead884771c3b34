"""IEEE float32 arithmetic on CUDA for computations that a flow must invert.

On Ampere and later NVIDIA GPUs, PyTorch runs float32 convolutions in TF32 by default
(``torch.backends.cudnn.allow_tf32``; matrix products too where a user turns on
``torch.backends.cuda.matmul.allow_tf32`` or ``torch.set_float32_matmul_precision``).
TF32 keeps 10 bits of mantissa, so a residual branch g is computed with a relative error
of about 1e-3. The fixed-point inverse of ``y = x + g(x)`` then stalls at that error,
far above its float32 tolerance, and log-dets and reconstructions carry it.
:func:`ieee_float32` turns TF32 off for the block it guards and restores the settings
after. The backward pass that autograd runs later is not guarded: gradients may use
TF32 where the user allows it, as in any mixed-precision training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["ieee_float32"]


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Runs the block with TF32 off for cuDNN convolutions and CUDA matrix products,
    then restores both settings (whatever happens in the block). Nothing changes on
    the CPU, whose float32 arithmetic is always IEEE. The settings are PyTorch's,
    process-wide: CUDA work that another thread runs meanwhile runs without TF32 too.

    Example:
        >>> conv = torch.nn.Conv2d(3, 3, 3)
        >>> with ieee_float32():
        ...     y = conv(torch.randn(1, 3, 8, 8))
        >>> torch.backends.cudnn.allow_tf32  # restored: PyTorch's default
        True
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before
