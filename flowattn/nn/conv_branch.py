r"""Convolutional residual branch of i-ResNet and Residual Flows, with LipSwish.

The branch is :math:`g = W_3 \circ \sigma \circ W_2 \circ \sigma \circ W_1 \circ \sigma`
with 3x3, 1x1 and 3x3 convolutions and a 1-Lipschitz activation :math:`\sigma`
(ELU, or LipSwish as in Residual Flows). Each convolution is rescaled so that a
*proven* upper bound on its spectral norm is at most :math:`c^{1/3}`; the branch is
then certified :math:`\mathrm{Lip}_2(g) \le c`. The bound of a 3x3 convolution comes
from the DFT of its kernel on the zero-padded grid
(:func:`~flowattn.lipschitz.conv_spectral_upper_bound`), exact for the 1x1 map;
i-ResNet's power iteration under-estimates the norm and is not used. The bound depends
on the image size, so the rescaling is computed for the size of each input. With
LipSwish the branch evaluates :math:`\mathrm{silu}(\beta x) / (1.1 \beta)`, the same
function, with the slopes folded into the convolutions. The 1x1 convolution runs as a
batched matrix product, several times cheaper on a CPU than ``F.conv2d`` at a branch's
channel counts.

Note:
    ``coeff`` is the bound on the whole branch. i-ResNet's "coefficient 0.9 per layer"
    is ``coeff=0.9**3``.

References:
    | Invertible Residual Networks (Behrmann et al., 2019)
    | https://arxiv.org/abs/1811.00995

    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | The Singular Values of Convolutional Layers (Sedghi et al., 2019)
    | https://arxiv.org/abs/1805.10408
"""

from __future__ import annotations

__all__ = ["ACTIVATIONS", "ConvResidualBranch", "LipSwish"]

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..images import check_images
from ..lipschitz import ConvBoundMemory, contraction_scale, conv_spectral_upper_bound, spectral_norm


class LipSwish(nn.Module):
    r"""LipSwish :math:`x \sigma(\beta x) / 1.1`, 1-Lipschitz for every :math:`\beta \ge 0`.

    :math:`\beta = \mathrm{softplus}(\rho)` is learned per channel.

    References:
        | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
        | https://arxiv.org/abs/1906.02735

    Examples:
        >>> act = LipSwish(3)
        >>> act(torch.zeros(1, 3, 2, 2)).abs().max().item()
        0.0
    """

    divisor = 1.1  # sup over x and beta >= 0 of |d/dx x sigmoid(beta x)| is about 1.0998

    def __init__(self, channels: int):
        super().__init__()
        self.rho = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x: Tensor) -> Tensor:
        beta = self.slope().reshape(1, -1, *([1] * (x.dim() - 2)))
        # In place on temporaries, as Residual Flows does: the product beta * x is not
        # needed by its backward, nor is x * sigmoid; without autograd the gate takes
        # the product too. The same operations in the same order either way.
        gate = torch.sigmoid_(beta * x)
        product = x * gate if torch.is_grad_enabled() else gate.mul_(x)
        return product.div_(self.divisor)

    min_slope = 1e-12  # below it LipSwish is x / 2.2 to float precision anyway

    def slope(self) -> Tensor:
        r"""The slopes :math:`\beta = \mathrm{softplus}(\rho)`, shape (C,), at least
        :attr:`min_slope` (:class:`ConvResidualBranch` divides by them; a softplus that
        underflowed to 0 would make that infinite)."""
        return F.softplus(self.rho).clamp_min(self.min_slope)


ACTIVATIONS = ("elu", "lipswish")


def _activation(name: str, channels: int) -> nn.Module:
    if name == "elu":
        return nn.ELU()
    if name == "lipswish":
        return LipSwish(channels)
    raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")


def _pointwise(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The 1x1 convolution of h (B, C, H, W) by weight (C', C) and bias (C',) or None,
    as one matrix product per image: (C', C) @ (C, H W) gives (B, C', H W).

    The same map as ``F.conv2d`` to float rounding, and faster on a CPU at a residual
    branch's channel counts, with autograd too. The result is a tensor of its own, so
    the activation after it runs in place; a view of it as (B, C', H, W) would not
    allow that under autograd.
    """
    flat = h.flatten(2)
    weight = weight.expand(h.shape[0], -1, -1)
    if bias is None:
        return torch.bmm(weight, flat)
    return torch.baddbmm(bias[:, None].expand(h.shape[0], -1, flat.shape[2]), weight, flat)


class _Applied(NamedTuple):
    """What a branch call applies: each convolution's (weight, bias), and the slope
    (1, C, 1, 1) that scales the input (LipSwish) or None."""

    layers: list[tuple[Tensor, Tensor | None]]
    input_slope: Tensor | None


class _Certificate(NamedTuple):
    """A certificate fixed by :meth:`ConvResidualBranch.certified_once`: the image size,
    the convolutions' scale factors and, for a block entered without autograd, what the
    calls apply (the rescaled weights)."""

    spatial: tuple[int, int]
    scales: list[Tensor]
    applied: _Applied | None


def _lipswish_folded(
    weights: list[Tensor], biases: list[Tensor | None], slopes: list[Tensor]
) -> tuple[list[Tensor], list[Tensor | None]]:
    r"""The weights and biases under which LipSwish is SiLU, given each LipSwish's
    slopes :math:`\beta` (C,) in ``slopes``, in order.

    LipSwish's :math:`x \sigma(\beta x) / 1.1` is
    :math:`\mathrm{silu}(\beta x) / (1.1 \beta)`: each convolution takes the
    division by :math:`1.1 \beta` of the LipSwish before it on its input channels,
    and the slope :math:`\beta` of the LipSwish after it on its output channels and
    bias. (The first LipSwish, on the branch's input, has no convolution before it:
    :meth:`ConvResidualBranch.forward` multiplies the input by its slope.) The same
    function, with one tensor fewer saved for backward and a single fused pass per
    activation.
    """
    slopes = [*slopes, None]
    folded_weights, folded_biases = [], []
    for i, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        weight = weight / (LipSwish.divisor * slopes[i]).reshape(1, -1, 1, 1)
        after = slopes[i + 1]
        if after is not None:
            weight = weight * after.reshape(-1, 1, 1, 1)
            bias = None if bias is None else bias * after
        folded_weights.append(weight)
        folded_biases.append(bias)
    return folded_weights, folded_biases


def _apply(x: Tensor, acts: nn.ModuleList, convs: nn.ModuleList, applied: _Applied) -> Tensor:
    """The branch on x (B, C, H, W) with the weights of ``applied``: activation and
    convolution, three times (activations in place where autograd allows it)."""
    spatial = (x.shape[-2], x.shape[-1])
    grad = torch.is_grad_enabled()
    h = x
    if applied.input_slope is not None:
        # LipSwish as SiLU: the first slope applied here, the others folded into the
        # convolutions before them (_lipswish_folded)
        h = x * applied.input_slope
    layers = zip(acts, convs, applied.layers, strict=True)
    for i, (act, conv, (weight, bias)) in enumerate(layers):
        if isinstance(act, LipSwish):
            # SiLU's backward reads its input; without autograd, in place
            h = F.silu(h, inplace=not grad)
        elif i > 0:
            # in place on a convolution's output (not needed by its backward); ELU's
            # backward reads its own result, so autograd allows it
            h = F.elu(h, inplace=True)
        else:
            h = act(h)
        if h.dim() == 3:  # the 1x1 convolution's (B, C', H W), as an image
            h = h.view(x.shape[0], -1, *spatial)
        if conv.kernel_size == (1, 1):
            h = _pointwise(h, weight[:, :, 0, 0], bias)  # (B, C', H W), not a view
        else:
            h = F.conv2d(h, weight, bias, padding=conv.padding)
    return h if h.dim() == 4 else h.view(x.shape)  # 1x1 outer convolutions


class ConvResidualBranch(nn.Module):
    r"""i-ResNet / Residual Flows branch g: (B, C, H, W) -> (B, C, H, W), certified in l2.

    ``act -> conv3x3 (C -> hidden) -> act -> conv1x1 (hidden -> hidden) -> act ->
    conv3x3 (hidden -> C)``, each convolution rescaled at every call to a proven
    spectral norm of at most :math:`c^{1/3}` for the input's size, so
    :math:`\mathrm{Lip}_2(g) \le c`.

    Arguments:
        channels: Channels C of the inputs.
        hidden: Hidden channels.
        coeff: Bound c < 1 on the branch's Lipschitz constant.
        activation: ``"elu"`` (i-ResNet) or ``"lipswish"`` (Residual Flows).
        kernel_size: Size of the outer convolutions (odd).

    Examples:
        >>> g = ConvResidualBranch(4, hidden=8, coeff=0.9)
        >>> g(torch.randn(2, 4, 6, 6)).shape
        torch.Size([2, 4, 6, 6])
        >>> g.lipschitz_bound((6, 6)) <= 0.9 + 1e-6
        True
    """

    certified_norm = "2"

    def __init__(
        self,
        channels: int,
        hidden: int,
        coeff: float = 0.9,
        activation: str = "elu",
        kernel_size: int = 3,
    ):
        super().__init__()
        if not 0 < coeff < 1:
            raise ValueError(f"coeff must be in (0, 1), got {coeff}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.channels = channels
        self.hidden = hidden
        self.coeff = coeff
        self.activation = activation
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(channels, hidden, kernel_size, padding=kernel_size // 2),
                nn.Conv2d(hidden, hidden, 1),
                nn.Conv2d(hidden, channels, kernel_size, padding=kernel_size // 2),
            ]
        )
        self.acts = nn.ModuleList([_activation(activation, c) for c in (channels, hidden, hidden)])
        # the 3x3 certificates' state between calls (it makes them cheaper, not different)
        self._bound_memory = [ConvBoundMemory() for _ in self.convs]
        self._fixed: _Certificate | None = None  # within certified_once

    def _norms(self, spatial: tuple[int, int]) -> list[Tensor]:
        norms = []
        for conv, memory in zip(self.convs, self._bound_memory, strict=True):
            if conv.kernel_size == (1, 1):
                norms.append(spectral_norm(conv.weight))
            else:
                norms.append(conv_spectral_upper_bound(conv.weight, spatial, memory))
        return norms

    def _scales(self, norms: list[Tensor]) -> list[Tensor]:
        # A relative margin of 1e-5 absorbs float32 rounding in the norms and products.
        target = self.coeff ** (1 / 3) * (1 - 1e-5)
        return [contraction_scale(target, n) for n in norms]

    def _rescaled(self, spatial: tuple[int, int], scales: list[Tensor] | None = None) -> _Applied:
        """What a call applies: each convolution's (weight, bias), the weight times its
        certified scale factor, and with LipSwish the activations' slopes folded in
        (below) and the first one's slope, which scales the input."""
        scales = self._scales(self._norms(spatial)) if scales is None else scales
        weights = [c.weight * s for c, s in zip(self.convs, scales, strict=True)]
        biases = [c.bias for c in self.convs]
        input_slope = None
        if self.activation == "lipswish":
            slopes = [act.slope() for act in self.acts]
            weights, biases = _lipswish_folded(weights, biases, slopes)
            input_slope = slopes[0].reshape(1, -1, 1, 1)
        return _Applied(list(zip(weights, biases, strict=True)), input_slope)

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, channels=self.channels, owner=type(self).__name__)
        spatial = (x.shape[-2], x.shape[-1])
        applied = self._weights(spatial)
        return _apply(x, self.acts, self.convs, applied)

    @contextlib.contextmanager
    def certified_once(self, spatial: tuple[int, int]) -> Iterator[None]:
        """Within the block, calls on (H, W) = ``spatial`` images use the certificate
        computed once, on entry (with autograd if it is enabled there): the weights'
        scale factors, which are applied to the weights at each call; entered without
        autograd (a fixed-point inverse, an evaluation), the rescaled weights themselves.
        Blocks nest (the inner one's certificate holds inside it).

        A training step that enters this for every branch before its forward pass
        computes the certificates while no activation is held, so their float64
        temporaries do not add to the step's peak memory (only the scale factors and
        their small gradient path are kept). Leave the block before the weights change
        (an optimiser step).
        """
        spatial = tuple(spatial)
        scales = self._scales(self._norms(spatial))
        applied = None if torch.is_grad_enabled() else self._rescaled(spatial, scales)
        previous, self._fixed = self._fixed, _Certificate(spatial, scales, applied)
        try:
            yield
        finally:
            self._fixed = previous

    def _weights(self, spatial: tuple[int, int]) -> _Applied:
        fixed = self._fixed
        if fixed is None or fixed.spatial != spatial:
            return self._rescaled(spatial)
        if fixed.applied is not None and not torch.is_grad_enabled():
            return fixed.applied  # a block without autograd: the weights themselves once
        return self._rescaled(spatial, fixed.scales)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_fixed"] = None
        return state

    @torch.no_grad()
    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        r"""Certified bound on :math:`\mathrm{Lip}_2(g)` for inputs of shape
        ``input_shape`` (C, H, W), or (H, W): the bound depends on the image size, so the
        shape is required."""
        if input_shape is None or len(input_shape) < 2:
            raise ValueError(f"pass the input shape (C, H, W), got {input_shape!r}")
        spatial = (int(input_shape[-2]), int(input_shape[-1]))
        norms = self._norms(spatial)
        bound = 1.0
        for n, s in zip(norms, self._scales(norms), strict=True):
            bound *= float(n * s)
        return bound

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}, activation={self.activation!r}"
