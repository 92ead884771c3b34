import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flowattn.lipschitz import (
    ConstrainedLinear,
    ConvBoundMemory,
    RowL1Rescale,
    SpectralRescale,
    _largest_gram_eigenvalue,
    _tap_phases,
    conv_power_iteration,
    conv_spectral_upper_bound,
    inf_norm,
    jacobian_norm,
    jacobian_spectral_norm,
    selection_matrix,
    spectral_norm,
)


def _conv_matrix(weight, size):
    """Dense matrix of a zero-padded 'same' convolution on (C, size, size) inputs."""
    c = weight.shape[1]

    def conv(x):
        return F.conv2d(x.reshape(1, c, size, size), weight, padding=weight.shape[-1] // 2)

    d = c * size * size
    return torch.func.jacrev(conv)(torch.zeros(d, dtype=weight.dtype)).reshape(-1, d)


@pytest.mark.parametrize("coeff", [0.5, 0.9, 3.0])
def test_rescalings_enforce_their_norms(coeff):
    w = torch.randn(6, 5, dtype=torch.float64) * 4
    assert float(inf_norm(RowL1Rescale(coeff)(w))) == pytest.approx(coeff)
    assert float(spectral_norm(SpectralRescale(coeff)(w))) == pytest.approx(coeff)
    small = w * 1e-3
    torch.testing.assert_close(RowL1Rescale(coeff)(small), small)
    torch.testing.assert_close(SpectralRescale(coeff)(small), small)


def test_norms_match_numpy_definitions():
    w = torch.randn(4, 7, dtype=torch.float64)
    assert float(inf_norm(w)) == pytest.approx(float(w.abs().sum(1).max()))
    assert float(spectral_norm(w)) == pytest.approx(float(torch.linalg.svdvals(w)[0]))
    with pytest.raises(ValueError, match="1x1"):
        spectral_norm(torch.randn(3, 3, 3, 3))


@pytest.mark.parametrize("kernel, channels, size", [(3, 2, 5), (3, 4, 6), (1, 3, 4), (5, 2, 7)])
def test_conv_bounds_bracket_the_exact_operator_norm(kernel, channels, size):
    weight = torch.randn(channels, channels, kernel, kernel, dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(_conv_matrix(weight, size), ord=2))
    upper = float(conv_spectral_upper_bound(weight, (size, size)))
    lower = float(conv_power_iteration(weight, (channels, size, size), n_iter=200))
    assert lower <= exact * (1 + 1e-9)
    assert lower == pytest.approx(exact, rel=1e-3)
    assert exact <= upper * (1 + 1e-9)


def test_jacobian_spectral_norm_matches_dense():
    w = torch.randn(5, 5, dtype=torch.float64)

    def fn(x):
        return torch.tanh(x @ w.T)

    x = torch.randn(3, 5, dtype=torch.float64)
    est = jacobian_spectral_norm(fn, x, n_iter=300)
    dense = torch.stack([torch.func.jacrev(lambda xi: fn(xi[None])[0])(xi) for xi in x])
    torch.testing.assert_close(est, jacobian_norm(dense, 2), rtol=1e-4, atol=1e-10)


def test_constrained_linear_pickles_and_applies_the_rescaling():
    layer = ConstrainedLinear(4, 3, SpectralRescale(0.5))
    with torch.no_grad():
        layer.weight.mul_(10)
    clone = pickle.loads(pickle.dumps(layer))
    x = torch.randn(2, 4)
    torch.testing.assert_close(clone(x), layer(x))
    norm = spectral_norm(layer.constrained_weight().detach())
    assert float(norm) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("shape, spatial", [((16, 4, 3, 3), (8, 8)), ((4, 16, 3, 3), (8, 6)),
                                            ((6, 6, 5, 5), (7, 9))])  # fmt: skip
def test_conv_bound_value_and_gradient_match_every_frequency_in_float64(shape, spatial, device):
    """The bound takes the worst frequency from float64 Gram eigenvalues and
    differentiates through that frequency only: same value and gradient as the norm of
    every per-frequency block (the full computation, float64)."""
    weight = torch.randn(shape, device=device, requires_grad=True)
    bound = conv_spectral_upper_bound(weight, spatial)
    (grad,) = torch.autograd.grad(bound, weight)
    w64 = weight.detach().double().requires_grad_(True)
    k = shape[-1]
    spectrum = torch.fft.fft2(w64, s=(spatial[0] + k - 1, spatial[1] + k - 1))
    reference = torch.linalg.matrix_norm(spectrum.permute(2, 3, 0, 1), ord=2).max()
    (grad_ref,) = torch.autograd.grad(reference, w64)
    assert float(bound.detach()) >= float(reference.detach()) * (1 - 1e-6)  # an upper bound
    torch.testing.assert_close(bound.double(), reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5, 1, 1)])
def test_spectral_norm_value_and_gradient_match_the_svd(shape):
    """The norm comes from a float64 Gram eigensolve and its gradient from the fixed top
    singular vector: the same value and gradient as differentiating the SVD."""
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(spectral_norm(weight), weight)
    reference = torch.linalg.svdvals(weight.reshape(shape[0], -1))[0]
    (grad_ref,) = torch.autograd.grad(reference, weight)
    torch.testing.assert_close(spectral_norm(weight), reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-8, atol=1e-10)


def test_bounds_are_the_same_after_set_num_threads():
    """torch.set_num_threads breaks MKL's batched LU in torch 2.15 (docs/guide.md, Known
    problems); the certificates use Hermitian eigensolves and must not change beyond
    rounding. Each run is
    a fresh process, since the call changes the whole process."""
    code = (
        "import sys, torch\n"
        "if sys.argv[1] == 'set': torch.set_num_threads(2)\n"
        "from flowattn.lipschitz import conv_spectral_upper_bound, spectral_norm\n"
        "torch.manual_seed(0)\n"
        "for shape, size in [((64, 12, 3, 3), 16), ((12, 64, 3, 3), 16), ((96, 48, 3, 3), 4)]:\n"
        "    w = torch.randn(shape, dtype=torch.float64)\n"
        "    print(float(conv_spectral_upper_bound(w, (size, size))).hex())\n"
        "print(float(spectral_norm(torch.randn(256, 256, dtype=torch.float64))).hex())\n"
    )
    outputs = []
    for mode in ("unset", "set"):
        done = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append([float.fromhex(v) for v in done.stdout.split()])
    # the thread count may change a product's summation order: the last bit, no more
    assert len(outputs[0]) == 4 and outputs[0] == pytest.approx(outputs[1], rel=1e-12)


GRIDS = [((5, 3, 3, 3), (7, 9)), ((4, 6, 3, 3), (6, 6)), ((3, 3, 5, 5), (9, 8)),
         ((4, 4, 3, 3), (10, 10))]  # fmt: skip


@pytest.mark.parametrize("shape, grid", GRIDS)
def test_the_certificate_keeps_one_block_per_conjugate_pair(shape, grid):
    """The frequencies the certificate visits hold every block of the kernel's full 2-D
    DFT up to conjugation (the same singular values), and no conjugate pair twice:
    h (w // 2 + 1) blocks less the mirrored rows of the self-mirrored columns."""
    weight = torch.randn(shape, dtype=torch.float64)
    phases = _tap_phases(shape[-1], grid, weight.device)
    blocks = (weight.flatten(2).to(torch.complex128) @ phases.conj().T).permute(2, 0, 1)
    kept = torch.linalg.svdvals(blocks)
    spectrum = torch.fft.fft2(weight, s=grid).permute(2, 3, 0, 1).reshape(-1, *shape[:2])
    full = torch.linalg.svdvals(spectrum)
    distance = torch.cdist(full, kept, compute_mode="donot_use_mm_for_euclid_dist")
    assert float(distance.min(dim=1).values.max()) < 1e-12
    h, w = grid
    mirrored_columns = 1 + (w % 2 == 0)
    assert phases.shape[0] == h * (w // 2 + 1) - mirrored_columns * ((h - 1) // 2)


def _random_grams(n_blocks: int, n: int, seed: int = 0) -> torch.Tensor:
    """(n_blocks, n, n) complex128 Gram matrices B^H B of random (n + 2, n) blocks."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randn(n_blocks, n + 2, n, dtype=torch.complex128, generator=generator)
    return blocks.mH @ blocks


VECTOR_CASES = ["exact", "random", "orthogonal", "nan", "none", "tie", "near-tie", "zero"]


@pytest.mark.parametrize("case", VECTOR_CASES)
def test_the_largest_gram_eigenvalue_is_eigvalsh_s_whatever_the_start(case):
    """With any starting vectors (exact top eigenvectors, random ones, ones orthogonal to
    the top eigenvector, NaN, none) and blocks tied with the worst or within rounding of
    it, the value is the largest of eigvalsh's values bit for bit, the index holds it,
    and the vector is its eigenvector."""
    grams = _random_grams(24, 6)
    if case == "tie":
        worst = int(torch.linalg.eigvalsh(grams)[:, -1].argmax())
        grams[(worst + 5) % 24] = grams[worst]
    if case == "near-tie":  # 1e-14 below the worst: inside the Cholesky test's slack
        worst = int(torch.linalg.eigvalsh(grams)[:, -1].argmax())
        grams[(worst + 5) % 24] = grams[worst] * (1 - 1e-14)
    if case == "zero":
        grams = torch.zeros_like(grams)
    eigenvectors = torch.linalg.eigh(grams)[1]
    vectors = {
        "exact": eigenvectors[..., -1],
        "random": torch.randn(24, 6, dtype=torch.complex128),
        "orthogonal": eigenvectors[..., 0],  # quotients are the smallest eigenvalues
        "nan": torch.full((24, 6), float("nan"), dtype=torch.complex128),
        "none": None,
    }.get(case, eigenvectors[..., -1])
    top, index, vector, estimates = _largest_gram_eigenvalue(grams, vectors)
    values = torch.linalg.eigvalsh(grams)[:, -1]
    assert top.item() == values.max().item()
    assert torch.linalg.eigvalsh(grams[index])[-1].item() == top.item()
    if case != "zero":
        residual = grams[index] @ vector - top * vector
        assert float(residual.abs().max()) < 1e-12 * float(top)
        assert float(torch.linalg.vector_norm(vector)) == pytest.approx(1.0)
    assert (estimates is None) == (vectors is None)


@pytest.mark.parametrize("shape, spatial", [((16, 4, 3, 3), (8, 8)), ((4, 16, 3, 3), (8, 6)),
                                            ((6, 6, 5, 5), (7, 9))])  # fmt: skip
def test_a_warm_started_bound_is_the_cold_one_along_a_training_path(
    shape, spatial, device, monkeypatch
):
    """Along 30 small steps of the weight (as in training), the bound kept in a
    ConvBoundMemory equals the bound without one, value and gradient bit for bit, and
    from the third call on eigensolves at most a few of the frequencies."""
    solved = []

    def eigvalsh(matrices):
        solved.append(matrices.shape[0] if matrices.dim() == 3 else 1)
        return original(matrices)

    original = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", eigvalsh)
    torch.manual_seed(0)
    weight = torch.randn(shape, device=device, requires_grad=True)
    memory = ConvBoundMemory()
    n_frequencies = _tap_phases(shape[-1], (spatial[0] + 2, spatial[1] + 2), "cpu").shape[0]
    for step in range(30):
        solved.clear()
        warm = conv_spectral_upper_bound(weight, spatial, memory)
        (grad_warm,) = torch.autograd.grad(warm, weight)
        warm_solves = sum(solved)
        cold = conv_spectral_upper_bound(weight, spatial)
        (grad_cold,) = torch.autograd.grad(cold, weight)
        assert warm.item() == cold.item()
        torch.testing.assert_close(grad_warm, grad_cold, rtol=0, atol=0)
        if step >= 2:
            assert warm_solves <= max(3, n_frequencies // 10), (step, warm_solves)
        with torch.no_grad():  # an Adam-sized step: 1e-3 of the weights' scale
            weight.add_(1e-3 * weight.abs().mean() * torch.randn(shape, device=device))


def test_a_bound_memory_is_not_pickled_and_can_be_turned_off():
    memory = ConvBoundMemory()
    w = torch.randn(8, 4, 3, 3)
    conv_spectral_upper_bound(w, (6, 6), memory)
    conv_spectral_upper_bound(w, (6, 6), memory)
    assert memory.vectors(3, (8, 8), w.device) is not None
    clone = pickle.loads(pickle.dumps(memory))
    assert clone.vectors(3, (8, 8), w.device) is None
    assert (
        conv_spectral_upper_bound(w, (6, 6), clone).item()
        == conv_spectral_upper_bound(w, (6, 6)).item()
    )
    off = ConvBoundMemory(warm_start=False)
    conv_spectral_upper_bound(w, (6, 6), off)
    assert off.vectors(3, (8, 8), w.device) is None
    assert not pickle.loads(pickle.dumps(off)).warm_start
    older = ConvBoundMemory()
    older.warm_start = None  # as pickled when None meant "on the CPU only": now on
    assert pickle.loads(pickle.dumps(older)).warm_start is True


@pytest.mark.parametrize("rows, cols", [(1, 4), (3, 12), (4, 4), (32, 4), (5, 3)])
def test_selection_matrix_selects_one_coordinate_per_row(rows, cols):
    weight = selection_matrix(rows, cols)
    assert weight.shape == (rows, cols)
    assert ((weight != 0).sum(1) == 1).all() and set(weight.abs().unique().tolist()) == {0.0, 1.0}
    assert float(inf_norm(weight)) == 1.0
    used = (weight != 0).any(0)
    assert int(used.sum()) == min(rows, cols)  # distinct columns, all of them once rows >= cols
    if rows > cols:  # a column's second selection has the other sign
        assert torch.equal(weight[cols], -weight[0])


def test_selection_matrix_refuses_empty_shapes():
    with pytest.raises(ValueError, match="must be positive"):
        selection_matrix(0, 3)
