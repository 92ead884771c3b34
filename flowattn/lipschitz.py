r"""Operator norms, Lipschitz bounds and weight rescalings.

Every residual branch :math:`g` used in an invertible flow step must be a
contraction, :math:`\mathrm{Lip}(g) < 1`, in *some* induced norm. This module
collects the norms used to certify that:

* induced :math:`\ell_\infty` norm of a matrix: its largest absolute row sum,
  enforced exactly by :class:`RowL1Rescale`;
* spectral norm (induced :math:`\ell_2`) of a small matrix, computed exactly and
  enforced by :class:`SpectralRescale`;
* the spectral norm of a convolution operator, estimated by power iteration
  (:func:`conv_power_iteration`, a *lower* estimate) and bounded from above by
  :func:`conv_spectral_upper_bound` (a proven bound from the FFT of the kernel).

The rescalings are parametrizations for :mod:`torch.nn.utils.parametrize`: the
stored parameter is unconstrained and the weight seen by the layer is rescaled
so that its norm is at most ``coeff``.

References:
    | Invertible Residual Networks (Behrmann et al., 2019)
    | https://arxiv.org/abs/1811.00995

    | The Singular Values of Convolutional Layers (Sedghi et al., 2019)
    | https://arxiv.org/abs/1805.10408
"""

from __future__ import annotations

__all__ = [
    "ConstrainedLinear",
    "RowL1Rescale",
    "SpectralRescale",
    "conv_power_iteration",
    "conv_spectral_upper_bound",
    "inf_norm",
    "jacobian_norm",
    "jacobian_spectral_norm",
    "spectral_norm",
]

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def _as_matrix(weight: Tensor) -> Tensor:
    """Views a linear or 1x1 convolution weight (out, in[, 1, 1]) as a matrix."""
    if weight.dim() == 4 and weight.shape[-2:] != (1, 1):
        raise ValueError(
            f"expected a matrix or a 1x1 convolution weight, got shape {tuple(weight.shape)};"
            " use conv_spectral_upper_bound for larger kernels"
        )
    return weight.reshape(weight.shape[0], -1)


def inf_norm(weight: Tensor) -> Tensor:
    r"""Induced :math:`\ell_\infty` norm: the largest absolute row sum.

    Arguments:
        weight: A matrix (out, in) or a 1x1 convolution weight (out, in, 1, 1).

    Returns:
        A scalar tensor.

    Examples:
        >>> inf_norm(torch.tensor([[1.0, -2.0], [0.5, 0.5]]))
        tensor(3.)
    """
    return _as_matrix(weight).abs().sum(dim=1).max()


def spectral_norm(weight: Tensor) -> Tensor:
    r"""Exact spectral norm (largest singular value) of a small matrix.

    Arguments:
        weight: A matrix (out, in) or a 1x1 convolution weight (out, in, 1, 1).

    Returns:
        A scalar tensor, differentiable.

    Examples:
        >>> spectral_norm(torch.diag(torch.tensor([3.0, -4.0])))
        tensor(4.)
    """
    return torch.linalg.matrix_norm(_as_matrix(weight), ord=2)


class RowL1Rescale(nn.Module):
    r"""Rescales each row of a weight to :math:`\ell_1` norm at most ``coeff``.

    The induced :math:`\ell_\infty` norm of the result is then at most ``coeff``,
    exactly, with no iteration. Rows already inside the ball are left unchanged.

    Arguments:
        coeff: The bound on every row's :math:`\ell_1` norm.

    Examples:
        >>> layer = nn.Linear(3, 2)
        >>> _ = nn.utils.parametrize.register_parametrization(layer, "weight", RowL1Rescale(0.9))
        >>> bool(inf_norm(layer.weight) <= 0.9 + 1e-6)
        True
    """

    def __init__(self, coeff: float = 1.0):
        super().__init__()
        if coeff <= 0:
            raise ValueError(f"coeff must be positive, got {coeff}")
        self.coeff = coeff

    def forward(self, weight: Tensor) -> Tensor:
        rows = weight.reshape(weight.shape[0], -1).abs().sum(dim=1)
        scale = torch.clamp(self.coeff / rows.clamp_min(1e-12), max=1.0)
        return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))


class SpectralRescale(nn.Module):
    r"""Rescales a small matrix so that its exact spectral norm is at most ``coeff``.

    Uses an exact SVD-based norm (cheap for matrices up to a few hundred rows),
    not power iteration, so the constraint is never under-estimated.

    Arguments:
        coeff: The bound on the spectral norm.

    Examples:
        >>> conv = nn.Conv2d(4, 4, 1)
        >>> _ = nn.utils.parametrize.register_parametrization(conv, "weight", SpectralRescale(0.5))
        >>> bool(spectral_norm(conv.weight) <= 0.5 + 1e-6)
        True
    """

    def __init__(self, coeff: float = 1.0):
        super().__init__()
        if coeff <= 0:
            raise ValueError(f"coeff must be positive, got {coeff}")
        self.coeff = coeff

    def forward(self, weight: Tensor) -> Tensor:
        sigma = spectral_norm(weight)
        return weight * torch.clamp(self.coeff / sigma.clamp_min(1e-12), max=1.0)


class ConstrainedLinear(nn.Linear):
    r"""A linear map whose weight is passed through a rescaling before use.

    Equivalent to registering ``rescale`` with :mod:`torch.nn.utils.parametrize`, but
    picklable (parametrized modules refuse :mod:`pickle`, and models here must pickle).
    The stored ``weight`` is unconstrained; :meth:`constrained_weight` is what acts.

    Arguments:
        n_in: Input features.
        n_out: Output features.
        rescale: A module mapping the raw weight to the constrained one, e.g.
            :class:`SpectralRescale` or :class:`RowL1Rescale`.
        bias: Whether to add a bias (it does not affect Lipschitz constants).

    Examples:
        >>> layer = ConstrainedLinear(4, 3, SpectralRescale(0.9))
        >>> bool(spectral_norm(layer.constrained_weight()) <= 0.9 + 1e-6)
        True
    """

    def __init__(self, n_in: int, n_out: int, rescale: nn.Module, *, bias: bool = True):
        super().__init__(n_in, n_out, bias=bias)
        self.rescale = rescale

    def constrained_weight(self) -> Tensor:
        return self.rescale(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.constrained_weight(), self.bias)


def conv_power_iteration(
    weight: Tensor,
    input_shape: tuple[int, int, int],
    *,
    padding: int | None = None,
    n_iter: int = 50,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Power-iteration estimate of the spectral norm of a stride-1 convolution.

    This is a *lower* estimate of the operator norm: it converges from below, so
    it must never be used as a certificate on its own. A caller that relies on it
    must divide its coefficient by a safety margin (1.05 or more: after 50
    iterations on the test kernels the estimate is within 1e-3 of the exact norm,
    but the gap depends on the spectrum); :func:`conv_spectral_upper_bound` gives a
    proven upper bound instead and is what certified steps should use.

    Arguments:
        weight: Convolution weight (out, in, k, k).
        input_shape: The (C, H, W) shape the convolution is applied to.
        padding: Zero padding; defaults to ``k // 2`` ("same").
        n_iter: Number of power iterations.
        generator: Random generator for the starting vector.

    Returns:
        A scalar tensor (no gradient).
    """
    padding = weight.shape[-1] // 2 if padding is None else padding
    with torch.no_grad():
        u = torch.randn(
            (1, *input_shape), generator=generator, dtype=weight.dtype, device="cpu"
        ).to(weight.device)
        u = u / u.norm()
        sigma = torch.zeros((), dtype=weight.dtype, device=weight.device)
        for _ in range(n_iter):
            v = F.conv2d(u, weight, padding=padding)
            sigma = v.norm()
            u = F.conv_transpose2d(v, weight, padding=padding)
            u = u / u.norm().clamp_min(1e-30)
    return sigma


def conv_spectral_upper_bound(weight: Tensor, spatial: tuple[int, int]) -> Tensor:
    r"""Proven upper bound on the spectral norm of a zero-padded, stride-1 convolution.

    A "same" convolution with zero padding on an :math:`H \times W` image is the
    restriction of a circular convolution on an :math:`(H + k - 1) \times (W + k - 1)`
    grid (embed with zeros, convolve circularly, crop), and cropping and zero
    embedding do not increase norms. The circular convolution is block-diagonalised
    by the 2-D DFT, so its norm is the largest spectral norm of the per-frequency
    (out x in) matrices of the kernel's DFT (Sedghi et al., 2019).

    Arguments:
        weight: Convolution weight (out, in, k, k) with odd k.
        spatial: The (H, W) size of the images it is applied to.

    Returns:
        A scalar tensor, differentiable with respect to ``weight``.

    Examples:
        >>> w = torch.zeros(1, 1, 3, 3)
        >>> w[0, 0, 1, 1] = 2.0
        >>> conv_spectral_upper_bound(w, (8, 8))
        tensor(2.)
    """
    k = weight.shape[-1]
    h, w = spatial[0] + k - 1, spatial[1] + k - 1
    with torch.no_grad():
        # A real kernel's spectrum is conjugate-symmetric and conjugate matrices share
        # singular values, so the half spectrum of rfft2 holds every distinct block.
        spectrum = torch.fft.rfft2(weight.detach().double(), s=(h, w))  # (out, in, h, w')
        blocks = spectrum.permute(2, 3, 0, 1).flatten(0, 1)  # (h w', out, in)
        # Squared singular values are the eigenvalues of the smaller Gram matrix: one
        # Hermitian eigensolve per frequency (direct, in float64) instead of an SVD.
        gram = blocks.mH @ blocks if blocks.shape[-1] <= blocks.shape[-2] else blocks @ blocks.mH
        top = torch.linalg.eigvalsh(gram)[:, -1]
        worst = int(top.argmax())
        certified = top[worst].clamp_min(0).sqrt()
    # Only the worst frequency carries a gradient (the max's subgradient): its block is
    # the kernel's DFT at that frequency, computed directly from the k x k taps.
    f1, f2 = divmod(worst, w // 2 + 1)
    taps = torch.arange(k, device=weight.device, dtype=torch.float64)
    phase = torch.exp(-2j * math.pi * (f1 * taps[:, None] / h + f2 * taps[None, :] / w))
    block = torch.einsum("oiab,ab->oi", weight.to(phase.dtype), phase)
    norm = torch.linalg.matrix_norm(block, ord=2).to(weight.dtype)
    # the float64 eigenvalue is the certified value; the differentiable norm supplies
    # the gradient (they agree to rounding)
    return norm * (certified.to(weight.dtype) / norm.detach().clamp_min(1e-30)).clamp(min=1.0)


def jacobian_norm(jacobian: Tensor, ord: float | str = math.inf) -> Tensor:
    r"""Induced norm of a dense square Jacobian (D, D): ``inf`` (max row sum) or ``2``."""
    if ord == math.inf or ord == "inf":
        return jacobian.abs().sum(dim=-1).max(dim=-1).values
    if ord == 2:
        return torch.linalg.matrix_norm(jacobian, ord=2)
    raise ValueError(f"ord must be inf or 2, got {ord!r}")


def jacobian_spectral_norm(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    n_iter: int = 20,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Per-sample spectral norm of the Jacobian of ``fn`` at ``x``, by power iteration.

    ``fn`` must act on each sample of the batch independently. The estimate
    is a lower bound on the local Lipschitz constant at ``x`` (it converges from
    below); it is how uncertified branches show how far from contractive they are.

    Arguments:
        fn: A map from (B, ...) to (B, ...) of the same shape.
        x: The point (B, ...).
        n_iter: Number of power iterations on :math:`J^\top J`.
        generator: Random generator for the starting vector.

    Returns:
        A tensor (B,) of estimated norms.
    """
    x = x.detach()
    u = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    shape = (-1,) + (1,) * (x.dim() - 1)

    def norms(t: Tensor) -> Tensor:
        return t.flatten(1).norm(dim=1)

    u = u / norms(u).reshape(shape)
    sigma = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    # The fused CPU/CUDA attention kernels have no forward-mode derivative; the math
    # kernel computes the same function from differentiable primitives.
    with sdpa_kernel(SDPBackend.MATH):
        _, vjp_fn = torch.func.vjp(fn, x)
        for _ in range(n_iter):
            _, jvp = torch.func.jvp(fn, (x,), (u,))
            sigma = norms(jvp)
            (u,) = vjp_fn(jvp)
            u = u / norms(u).clamp_min(1e-30).reshape(shape)
    return sigma.detach()
