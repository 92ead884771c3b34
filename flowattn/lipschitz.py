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
  :func:`conv_spectral_upper_bound` (a proven bound from the DFT of the kernel), which
  a :class:`ConvBoundMemory` makes cheaper over repeated calls on a changing weight.

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
    "ConvBoundMemory",
    "RowL1Rescale",
    "SpectralRescale",
    "contraction_scale",
    "conv_power_iteration",
    "conv_spectral_upper_bound",
    "inf_norm",
    "jacobian_norm",
    "jacobian_spectral_norm",
    "selection_matrix",
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


def selection_matrix(rows: int, cols: int) -> Tensor:
    r"""A (rows, cols) matrix whose every row selects one column, with weight 1 or -1.

    Rows pick columns spread evenly (row k takes column :math:`\lfloor k \cdot cols /
    rows \rfloor`) when ``rows <= cols``, and cycle through the columns otherwise, the
    sign flipping on each new cycle. Every row has one nonzero entry, so the map's
    induced :math:`\ell_\infty` norm (1) is what it does to a sign pattern and to a
    single coordinate alike. At random weights the largest absolute row sum, on which
    an :math:`\ell_\infty` certificate rests, grows with the row's length while what
    data reach grows with its :math:`\ell_2` norm; the attention branches start their
    similarity maps here so that their certified bound is not spent on that gap.

    Examples:
        >>> selection_matrix(2, 4)
        tensor([[1., 0., 0., 0.],
                [0., 0., 1., 0.]])
        >>> selection_matrix(3, 2)
        tensor([[ 1.,  0.],
                [ 0.,  1.],
                [-1.,  0.]])
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be positive, got {rows}, {cols}")
    weight = torch.zeros(rows, cols)
    for k in range(rows):
        if rows <= cols:
            weight[k, k * cols // rows] = 1.0
        else:
            weight[k, k % cols] = 1.0 if (k // cols) % 2 == 0 else -1.0
    return weight


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

    The value is the square root of the largest eigenvalue of the smaller Gram matrix,
    solved in float64 without autograd; the gradient is that of :math:`\|W v\|` with
    the top singular vector :math:`v` held fixed, which is the derivative of the
    largest singular value wherever it is simple. This costs one small Hermitian
    eigensolve instead of an SVD and its backward.

    Arguments:
        weight: A matrix (out, in) or a 1x1 convolution weight (out, in, 1, 1).

    Returns:
        A scalar tensor, differentiable.

    Examples:
        >>> spectral_norm(torch.diag(torch.tensor([3.0, -4.0])))
        tensor(4.)
    """
    return _largest_singular_value(_as_matrix(weight))


def _largest_singular_value(matrix: Tensor) -> Tensor:
    r"""Largest singular value of a real (m, n) matrix, certified in float64.

    The value is the square root of the top eigenvalue of the smaller Gram matrix,
    computed in float64 (rounded to the matrix's dtype); its gradient flows through
    :math:`\|M v\|` for the fixed top right singular vector :math:`v`.
    """
    if matrix.shape[-2] < matrix.shape[-1]:
        matrix = matrix.mT  # the same singular values, from the smaller Gram matrix
    with torch.no_grad():
        precise = matrix.detach().double()
        values, vectors = torch.linalg.eigh(precise.mT @ precise)
        direction = vectors[:, -1].to(matrix.dtype)
    return _certified(torch.linalg.vector_norm(matrix @ direction), values[-1])


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
        scale = contraction_scale(self.coeff, rows)
        return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))


def contraction_scale(coeff: float | Tensor, bound: Tensor) -> Tensor:
    """The factor :math:`\\min(1, c / L)` that brings a map with Lipschitz bound L down to
    c (the one rescale-to-coefficient of every certified layer and branch); a bound of 0
    gives 1.

    Examples:
        >>> contraction_scale(0.9, torch.tensor([0.5, 3.0]))
        tensor([1.0000, 0.3000])
    """
    return torch.clamp(coeff / bound.clamp_min(1e-12), max=1.0)


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
        return weight * contraction_scale(self.coeff, sigma)


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


class ConvBoundMemory:
    r"""What :func:`conv_spectral_upper_bound` keeps between calls on one convolution.

    For each grid it holds the DFT phases of the kernel's taps and, with warm starts,
    an estimate of every frequency's top singular vector (the last call's, advanced by
    one power step). With them a call eigensolves only the few frequencies it cannot
    prove to be below the worst one, instead of all of them (see
    :func:`_largest_gram_eigenvalue`). The bound's value does not depend on what is
    kept: only its cost does. Not pickled (a copy starts empty).

    Arguments:
        warm_start: Whether calls reuse the previous call's vectors (default). Choosing
            which frequencies to eigensolve reads a few values back to the host, which
            waits for the GPU's queue there; it still pays on CUDA, where eigensolving
            every frequency is the slow part: on an H100, a training step of 36
            convolutions took 0.83-0.94 of the time and a quarter of the peak memory.

    Examples:
        >>> memory = ConvBoundMemory()
        >>> w = torch.randn(8, 4, 3, 3)
        >>> first = conv_spectral_upper_bound(w, (6, 6), memory)
        >>> bool(conv_spectral_upper_bound(w, (6, 6), memory) == first)
        True
    """

    def __init__(self, warm_start: bool = True):
        self.warm_start = warm_start
        self._grids: dict[tuple, tuple[Tensor, Tensor | None]] = {}

    def phases(self, k: int, grid: tuple[int, int], device: torch.device) -> Tensor:
        key = (k, grid, device)
        if key not in self._grids:
            self._grids[key] = (_tap_phases(k, grid, device), None)
        return self._grids[key][0]

    def vectors(self, k: int, grid: tuple[int, int], device: torch.device) -> Tensor | None:
        return self._grids.get((k, grid, device), (None, None))[1]

    def remember(self, k: int, grid: tuple[int, int], device: torch.device, vectors: Tensor):
        self._grids[(k, grid, device)] = (self.phases(k, grid, device), vectors)

    def __getstate__(self) -> dict:
        return {"warm_start": self.warm_start, "_grids": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.warm_start is None:  # pickled when None meant "on the CPU only"
            self.warm_start = True


def conv_spectral_upper_bound(
    weight: Tensor, spatial: tuple[int, int], memory: ConvBoundMemory | None = None
) -> Tensor:
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
        memory: State kept between calls on the same convolution (one
            :class:`ConvBoundMemory` per convolution): it makes repeated calls on a
            slowly changing weight (training) cheaper, and does not change the value.

    Returns:
        A scalar tensor, differentiable with respect to ``weight``.

    Examples:
        >>> w = torch.zeros(1, 1, 3, 3)
        >>> w[0, 0, 1, 1] = 2.0
        >>> conv_spectral_upper_bound(w, (8, 8))
        tensor(2.)
    """
    k = weight.shape[-1]
    grid = (spatial[0] + k - 1, spatial[1] + k - 1)
    if memory is None:
        phases = _tap_phases(k, grid, weight.device)  # (F, k k), F <= h (w // 2 + 1)
    else:
        phases = memory.phases(k, grid, weight.device)
    with torch.no_grad():
        # Squared singular values are the eigenvalues of the smaller Gram matrix
        # (Hermitian, float64): its largest over the frequencies is the certificate.
        grams = _frequency_grams(weight.detach().double(), phases)
        warm = memory is not None and memory.warm_start
        known = memory.vectors(k, grid, weight.device) if warm else None
        top, worst, vector, vectors = _largest_gram_eigenvalue(grams, known, keep=warm)
        if warm:
            memory.remember(k, grid, weight.device, vectors)
        if weight.shape[1] > weight.shape[0]:
            # the Grams were of the transposed kernel: B^T at each frequency, whose
            # Gram is conj(B B^H); B^H's right singular vector is the conjugate
            vector = vector.conj()
    # Only the worst frequency carries a gradient (the max's subgradient), through the
    # norm of its block (the kernel's DFT there) along the fixed singular vector.
    phase = phases.index_select(0, worst.reshape(1))[0]
    return _certified(_block_norm_along(weight, phase, vector), top)


def _block_norm_along(weight: Tensor, phase: Tensor, vector: Tensor) -> Tensor:
    r""":math:`\|B v\|` for the kernel's DFT block :math:`B = \sum_a w_a e^{-i\theta_a}`
    at one frequency (``phase`` holds its (k k,) factors :math:`e^{i\theta_a}`), or
    :math:`\|B^H v\|` when the kernel has more inputs than outputs; differentiable with
    respect to ``weight`` (out, in, k, k) for the fixed complex ``vector``.

    The weight is contracted, as a real view, with the real and imaginary parts of the
    constant :math:`v_j e^{\mp i\theta_a}`, so that autograd keeps the weight itself and
    two small vectors rather than a complex copy of the kernel (which every
    certified convolution would otherwise hold from its certificate to the backward).
    """
    out, inputs = weight.shape[:2]
    with torch.no_grad():
        # B v = sum_a w_a (e^{-i theta_a} v); B^H v = sum_a w_a^T (e^{i theta_a} v)
        factors = phase.conj() if out >= inputs else phase
        z = vector[:, None] * factors[None, :]  # (in or out, k k)
        parts = [z.real.to(weight.dtype), z.imag.to(weight.dtype)]
    if out >= inputs:
        flat = weight.reshape(out, -1)  # (out, in k k), index i k k + a
        images = [flat @ part.reshape(-1) for part in parts]
    else:
        taps = weight.reshape(out, inputs, -1)  # (out, in, k k)
        images = [torch.bmm(taps, part[:, :, None]).sum(0) for part in parts]
    return torch.sqrt(images[0].square().sum() + images[1].square().sum())


def _certified(norm: Tensor, top: Tensor) -> Tensor:
    r"""The certified value :math:`\sqrt{\mathrm{top}}` (``top``: the float64 top Gram
    eigenvalue) with the gradient of ``norm`` (a differentiable norm along the fixed top
    singular vector, equal to it up to rounding)."""
    certified = top.clamp_min(0).sqrt().to(norm.dtype)
    return norm * (certified / norm.detach().clamp_min(1e-30)).clamp(min=1.0)


def _largest_gram_eigenvalue(
    grams: Tensor, vectors: Tensor | None = None, keep: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    r"""The largest eigenvalue over a batch of Hermitian PSD matrices (F, n, n).

    Returns ``(top, index, vector, vectors)``: the largest of the matrices' float64
    eigenvalues (``eigvalsh``'s, as if every matrix were eigensolved), the index of its
    matrix and its eigenvector, and (with ``vectors`` or ``keep``, else None) an
    estimate of every matrix's top eigenvector, (F, n), for the next call.

    Without ``vectors`` every matrix is eigensolved. With estimates :math:`u_f` of their
    top eigenvectors (a previous call's), the largest Rayleigh quotient
    :math:`t = \max_f u_f^H G_f u_f / u_f^H u_f` is at most the top eigenvalue
    :math:`\lambda^*`. A matrix for which :math:`(t - s) I - G_f` has a Cholesky factor
    has every eigenvalue below :math:`t`: the slack :math:`s = 8 n (n + 2)\,
    \varepsilon\, t` exceeds the factorisation's backward error and the quotient's
    rounding (Higham, *Accuracy and Stability of Numerical Algorithms*, Thm 10.3), so
    the matrix holding :math:`\lambda^*` never passes. Only the matrices that fail are
    eigensolved, and the largest of their eigenvalues is :math:`\lambda^*`. Every
    estimate then takes one power step, and the worst matrix's is replaced by its
    eigenvector.
    """
    n = grams.shape[-1]
    tiny = torch.finfo(grams.dtype).tiny
    if vectors is not None and vectors.shape == grams.shape[:-1]:
        products = (grams @ vectors.unsqueeze(-1)).squeeze(-1)  # G_f u_f
        squared_lengths = vectors.abs().square().sum(-1).clamp_min(tiny)
        t = ((vectors.conj() * products).sum(-1).real / squared_lengths).max()
        slack = 8 * n * (n + 2) * torch.finfo(grams.dtype).eps * t
        eye = torch.eye(n, dtype=grams.dtype, device=grams.device)
        _, failed = torch.linalg.cholesky_ex((t - slack) * eye - grams)
        unproven = failed.nonzero().squeeze(1)
        if bool(torch.isfinite(t)) and float(t) > 0 and unproven.numel() > 0:
            top, i = torch.linalg.eigvalsh(grams.index_select(0, unproven))[:, -1].max(dim=0)
            worst = unproven[i]
            vector = torch.linalg.eigh(grams[worst])[1][:, -1]
            product_norms = torch.linalg.vector_norm(products, dim=-1, keepdim=True)
            advanced = products / product_norms.clamp_min(tiny)  # one power step each
            advanced.index_copy_(0, worst.reshape(1), vector[None])
            return top, worst, vector, advanced
    top, worst = torch.linalg.eigvalsh(grams)[:, -1].max(dim=0)  # tensors: no host sync
    if keep or vectors is not None:
        # a copy: a view would keep every matrix's eigenvectors (F, n, n) alive
        vectors = torch.linalg.eigh(grams)[1][..., -1].contiguous()
        return top, worst, vectors.index_select(0, worst.reshape(1))[0], vectors
    worst_gram = grams.index_select(0, worst.reshape(1))[0]
    return top, worst, torch.linalg.eigh(worst_gram)[1][:, -1], None


def _tap_phases(k: int, grid: tuple[int, int], device: torch.device) -> Tensor:
    r"""(F, k k) complex128 factors :math:`e^{i\theta_{f,a}}`, with
    :math:`\theta_{f,a} = 2\pi (f_1 a_1 / h + f_2 a_2 / w)`, of every tap a of a k x k
    kernel and every frequency f whose block is distinct up to conjugation.

    A real kernel's spectrum is conjugate-symmetric, :math:`B_{-f} = \bar B_f`, and
    conjugate matrices share singular values, so the half spectrum
    :math:`f_2 \le w / 2` holds every distinct block; within it, the columns
    :math:`f_2 = 0` and (w even) :math:`f_2 = w / 2` are their own mirror images
    (:math:`-f_2 \equiv f_2 \bmod w`), so their rows :math:`f_1 > h / 2` repeat rows
    :math:`h - f_1` and are left out too (8 to 17% of the blocks on the grids used here).
    Frequencies are in row-major order over :math:`(f_1, f_2)`.
    """
    h, w = grid
    mirrored = (0, w // 2) if w % 2 == 0 else (0,)  # the columns f2 with -f2 = f2 mod w
    columns = range(w // 2 + 1)
    kept = [(a, b) for a in range(h) for b in columns if not (b in mirrored and 2 * a > h)]
    f1, f2 = torch.tensor(kept, dtype=torch.float64, device=device).unbind(1)  # (F,) each
    taps = torch.arange(k, device=device, dtype=torch.float64)
    angle = (f1[:, None, None] * taps[:, None] / h) + (f2[:, None, None] * taps / w)
    return torch.polar(torch.ones_like(angle), 2 * math.pi * angle).reshape(-1, k * k)


def _frequency_grams(weight: Tensor, phases: Tensor) -> Tensor:
    r"""The Gram matrices of a kernel's per-frequency blocks, (F, n, n) with n the
    smaller of its channel counts, from products of its taps.

    The block at frequency f is :math:`B_f = \sum_a w_a e^{-i\theta_{f,a}}` (the
    kernel's DFT, :math:`w_a` the (out, in) tap a), so
    :math:`B_f^H B_f = \sum_{a,b} e^{i(\theta_{f,a} - \theta_{f,b})} w_a^\top w_b`:
    one product of all taps and a small sum per frequency, with no FFT of a padded
    grid and no complex matrix products. A kernel with more inputs than outputs is
    transposed first (:math:`B B^H` has the same nonzero eigenvalues, up to conjugation).
    """
    if weight.shape[1] > weight.shape[0]:
        weight = weight.transpose(0, 1)
    m, n = weight.shape[:2]
    taps = weight.flatten(2)  # (m, n, k k)
    products = torch.einsum("mna,mpb->abnp", taps, taps).reshape(-1, n * n)  # w_a^T w_b
    # e^{i(theta_a - theta_b)} for every pair (a, b), as real matrices (F, kk kk)
    pair_phases = (phases[:, :, None] * phases[:, None, :].conj()).flatten(1)
    real = pair_phases.real @ products
    imag = pair_phases.imag @ products
    return torch.complex(real, imag).reshape(-1, n, n)


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
