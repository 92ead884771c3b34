r"""Glow flow step: ActNorm, invertible 1x1 convolution, affine coupling.

The three pieces are nflows' ``ActNorm``, ``OneByOneConvolution`` (LU-parametrised;
inverted here with :func:`torch.linalg.solve_triangular`) and
``AffineCouplingTransform``. The coupling's conditioner network
(:mod:`flowattn.nn.coupling_nets`) may contain ordinary (non-invertible)
self-attention: invertibility of a coupling layer does not depend on its conditioner,
so this is where non-invertible attention takes part in density models (``glow-attn``).

References:
    | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
    | https://arxiv.org/abs/1807.03039

    | Invertible Attention (Zha et al., 2021)
    | https://arxiv.org/abs/2106.09003
"""

from __future__ import annotations

__all__ = ["glow_step"]

import torch
from nflows.transforms import (
    ActNorm,
    AffineCouplingTransform,
    CompositeTransform,
    OneByOneConvolution,
)
from torch import Tensor

from ..nn.coupling_nets import ConditionerFactory


class _OneByOneConvolution(OneByOneConvolution):
    """nflows' LU-parametrised invertible 1x1 convolution, its inverse computed with
    :func:`torch.linalg.solve_triangular`. nflows calls the deprecated
    ``torch.triangular_solve`` (a warning at every sampling run) and builds the
    identity of ``weight_inverse`` on the CPU whatever the device. Same parameters,
    buffers and values."""

    def factors(self) -> tuple[Tensor, Tensor]:
        """The weight's LU factors (D, D): unit lower triangular L and upper U, W = L U.
        The layer keeps the entries below and above the diagonal in row-major order."""
        n, entries = self.features, self.lower_entries
        below = tuple(torch.tril_indices(n, n, -1, device=entries.device))
        above = tuple(torch.triu_indices(n, n, 1, device=entries.device))
        lower = torch.eye(n, dtype=entries.dtype, device=entries.device).index_put(below, entries)
        return lower, torch.diag(self.upper_diag).index_put(above, self.upper_entries)

    def inverse_no_cache(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = self.factors()
        outputs = (inputs - self.bias).t()  # (D, N)
        outputs = torch.linalg.solve_triangular(lower, outputs, upper=False, unitriangular=True)
        outputs = torch.linalg.solve_triangular(upper, outputs, upper=True)
        logabsdet = -self.logabsdet() * inputs.new_ones(inputs.shape[0])
        return outputs.t(), logabsdet

    def weight_inverse(self) -> Tensor:
        lower, upper = self.factors()
        identity = torch.eye(self.features, dtype=lower.dtype, device=lower.device)
        lower_inverse = torch.linalg.solve_triangular(
            lower, identity, upper=False, unitriangular=True
        )
        return torch.linalg.solve_triangular(upper, lower_inverse, upper=True)


def glow_step(
    channels: int, hidden: int, *, attention: bool = False, flip: bool = False
) -> CompositeTransform:
    r"""One Glow step on (B, C, H, W): ActNorm, 1x1 convolution, affine coupling.

    Arguments:
        channels: Channels C (at least 2).
        hidden: Hidden channels of the coupling's conditioner.
        attention: Put ordinary self-attention in the conditioner (``glow-attn``).
        flip: Transform the first half of the channels instead of the second.

    Returns:
        An nflows ``CompositeTransform``.

    Examples:
        >>> step = glow_step(4, hidden=8)
        >>> x = torch.randn(2, 4, 4, 4)
        >>> y, logabsdet = step(x)
        >>> x_back, _ = step.inverse(y)
        >>> bool((x_back - x).abs().max() < 1e-5), logabsdet.shape
        (True, torch.Size([2]))
    """
    if channels < 2:
        raise ValueError(f"a coupling layer needs at least 2 channels, got {channels}")
    mask = torch.zeros(channels)
    if flip:
        mask[: channels // 2] = 1
    else:
        mask[channels // 2 :] = 1
    return CompositeTransform(
        [
            ActNorm(channels),
            _OneByOneConvolution(channels),
            AffineCouplingTransform(mask, ConditionerFactory(hidden, attention)),
        ]
    )
