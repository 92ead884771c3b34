r"""Convolutional residual branch of i-ResNet and Residual Flows, with LipSwish.

The branch is :math:`g = W_3 \circ \sigma \circ W_2 \circ \sigma \circ W_1 \circ \sigma`
with 3x3, 1x1 and 3x3 convolutions and a 1-Lipschitz activation :math:`\sigma`
(ELU, or LipSwish as in Residual Flows). Each convolution is rescaled so that a
*proven* upper bound on its spectral norm is at most :math:`c^{1/3}`; the branch is
then certified :math:`\mathrm{Lip}_2(g) \le c`. The bound of a 3x3 convolution comes
from the DFT of its kernel on the zero-padded grid
(:func:`~flowattn.lipschitz.conv_spectral_upper_bound`), exact for the 1x1 map;
i-ResNet's power iteration under-estimates the norm and is not used. The bound depends
on the image size, so the rescaling is computed for the size of each input.

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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lipschitz import ConvBoundMemory, conv_spectral_upper_bound, spectral_norm


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
        return self.undivided(x).div_(self.divisor)

    def undivided(self, x: Tensor) -> Tensor:
        r""":math:`x \sigma(\beta x)`, LipSwish before its division by
        :attr:`divisor`: for a caller that folds the division into the linear map that
        follows (as :class:`ConvResidualBranch` does, saving a pass over the
        activations)."""
        gate = self.gate(x)
        if torch.is_grad_enabled():
            return x * gate
        return gate.mul_(x)  # without autograd the gate, a temporary, takes the product

    def gate(self, x: Tensor) -> Tensor:
        r"""The gate :math:`\sigma(\beta x)`, a new tensor shaped like x (B, C, ...)."""
        beta = F.softplus(self.rho).reshape(1, -1, *([1] * (x.dim() - 2)))
        # in place on the temporary beta * x, as Residual Flows does: its backward
        # needs x and beta, not the product
        return torch.sigmoid_(beta * x)


ACTIVATIONS = ("elu", "lipswish")


def _activation(name: str, channels: int) -> nn.Module:
    if name == "elu":
        return nn.ELU()
    if name == "lipswish":
        return LipSwish(channels)
    raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")


class _ProductSavedAsFactors(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks under which ``product = a * b`` is saved for backward as its
    two factors, and recomputed when the backward reads it.

    Used around a convolution that follows a LipSwish (see
    :meth:`ConvResidualBranch.products_saved_as_factors`). Other tensors saved inside
    are kept as they are; outer saved-tensor hooks do not see them.
    """

    def __init__(self, product: Tensor, a: Tensor, b: Tensor):
        super().__init__(self._pack, self._unpack)
        self._product, self._factors = product, (a, b)

    def _pack(self, tensor: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self._factors if tensor is self._product else tensor

    @staticmethod
    def _unpack(packed: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        if isinstance(packed, tuple):
            with torch.no_grad():
                return packed[0] * packed[1]
        return packed

    def __enter__(self) -> None:
        try:
            super().__enter__()
            self._entered = True
        except RuntimeError:  # inside torch.func transforms, which allow no such hooks
            self._entered = False  # the product is saved as itself

    def __exit__(self, *args) -> None:
        self._product = self._factors = None  # the graph keeps what it saved, not these
        if self._entered:
            super().__exit__(*args)


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
        self._cache: tuple[tuple, list[Tensor]] | None = None
        self._fixed: tuple[tuple[int, int], list[Tensor]] | None = None  # (size, scales)
        self._products_as_factors = False

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
        return [torch.clamp(target / n.clamp_min(1e-12), max=1.0) for n in norms]

    def _rescaled(
        self, spatial: tuple[int, int], scales: list[Tensor] | None = None
    ) -> list[Tensor]:
        scales = self._scales(self._norms(spatial)) if scales is None else scales
        if self.activation == "lipswish":
            # every LipSwish is followed by a convolution, which takes its division
            scales = [s / LipSwish.divisor for s in scales]
        return [c.weight * s for c, s in zip(self.convs, scales, strict=True)]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"expected images (B, {self.channels}, H, W), got shape {tuple(x.shape)}"
            )
        spatial = (x.shape[-2], x.shape[-1])
        h = x
        weights = self._weights(spatial)
        for i, (act, conv, weight) in enumerate(zip(self.acts, self.convs, weights, strict=True)):
            saving = contextlib.nullcontext()
            if isinstance(act, LipSwish):
                # the weight took LipSwish's division (_rescaled)
                if self._products_as_factors and torch.is_grad_enabled():
                    gate = act.gate(h)
                    h, x_in = h * gate, h
                    saving = _ProductSavedAsFactors(h, x_in, gate)
                else:
                    h = act.undivided(h)
            elif i > 0:
                # in place on a convolution's output (not needed by its backward); ELU's
                # backward reads its own result, so autograd allows it
                h = F.elu(h, inplace=True)
            else:
                h = act(h)
            with saving:
                h = F.conv2d(h, weight, conv.bias, padding=conv.padding)
        return h

    @contextlib.contextmanager
    def products_saved_as_factors(self) -> Iterator[None]:
        """Within the block, a call with autograd keeps one activation-sized tensor
        fewer per LipSwish in its graph: the product ``x * gate``, which the next
        convolution saves for its weight gradient, is saved as its two factors (which
        LipSwish's own backward keeps anyway) and recomputed each time a backward pass
        goes through that convolution. Values and gradients are the same to the bit.

        It pays where a graph is kept between backward passes, as the memory-efficient
        log-det estimator keeps each branch's until the step's backward (which enters
        this around it); where a double backward saves the recomputed product again,
        it costs the multiplications and saves nothing. No effect with ELU, without
        autograd, or inside ``torch.func`` transforms.
        """
        previous, self._products_as_factors = self._products_as_factors, True
        try:
            yield
        finally:
            self._products_as_factors = previous

    @contextlib.contextmanager
    def certified_once(self, spatial: tuple[int, int]) -> Iterator[None]:
        """Within the block, calls on (H, W) = ``spatial`` images use the certificate
        computed once, on entry (with autograd if it is enabled there): the weights'
        scale factors, which are applied to the weights at each call.

        A training step that enters this for every branch before its forward pass
        computes the certificates while no activation is held, so their float64
        temporaries do not add to the step's peak memory (only the scale factors and
        their small gradient path are kept). Leave the block before the weights change
        (an optimiser step).
        """
        spatial = tuple(spatial)
        self._fixed = (spatial, self._scales(self._norms(spatial)))
        try:
            yield
        finally:
            self._fixed = None

    def _weights(self, spatial: tuple[int, int]) -> list[Tensor]:
        if self._fixed is not None and self._fixed[0] == spatial:
            return self._rescaled(spatial, self._fixed[1])
        # Without autograd (fixed-point inverse, evaluation) the rescaled weights are
        # reused until a weight changes in place (an optimiser step bumps _version).
        if torch.is_grad_enabled():
            self._cache = None
            return self._rescaled(spatial)
        key = (spatial, *((c.weight._version, c.weight.data_ptr()) for c in self.convs))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._rescaled(spatial))
        return self._cache[1]

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_cache"] = None
        state["_fixed"] = None
        state["_products_as_factors"] = False
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_bound_memory" not in state:  # pickled before the certificates kept state
            self._bound_memory = [ConvBoundMemory() for _ in self.convs]
        self.__dict__.setdefault("_products_as_factors", False)  # pickled before it

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
