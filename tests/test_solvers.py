import math

import pytest
import torch

from flowattn import solvers
from flowattn.solvers import STALL_PATIENCE, solve_fixed_point


class _Noisy:
    """A contraction evaluated with rounding-like noise of relative size 1e-6."""

    def __call__(self, x):
        return 0.5 * x * (1 + 1e-6 * torch.randn_like(x))


@pytest.mark.parametrize("solver", ["banach", "anderson"])
def test_stalls_at_the_rounding_floor_count_as_converged(solver):
    y = torch.randn(4, 50)
    result = solve_fixed_point(_Noisy(), y, solver=solver, atol=1e-12, rtol=1e-12)
    assert result.converged and result.iterations < 100
    floor = 64 * torch.finfo(torch.float32).eps * (1 + float(y.abs().max()))
    assert result.tolerance == pytest.approx(floor) and result.residual <= floor
    assert (result.solution - y / 1.5).abs().max() < 1e-5


def test_a_diverging_iteration_never_counts_as_converged():
    y = torch.randn(2, 10)
    result = solve_fixed_point(lambda x: 1.5 * x, y, solver="banach", max_iter=4 * STALL_PATIENCE)
    assert not result.converged and result.residual > result.tolerance


@pytest.mark.parametrize("solver", ["banach", "anderson"])
def test_a_solve_out_of_iterations_at_rounding_level_counts_as_converged(solver, monkeypatch):
    """g with rounding-like noise (1e-14, alternating) on an element whose own tolerance
    is 4e-16: the residual reaches the rounding floor 64 eps (1 + max|y|) = 1.4e-11 but
    cannot meet the per-element tolerance. Spending max_iter there is converged, with
    the floor as tolerance; stopping far above it is not. (The stall rule, which would
    end the solve earlier, is switched off.)"""
    monkeypatch.setattr(solvers, "STALL_PATIENCE", 10**6)
    calls = []

    def noisy(x):
        calls.append(None)
        out = 0.5 * x
        out[..., 1] += 1e-14 * (-1) ** len(calls)
        return out

    y = torch.tensor([[1000.0, 1e-3]], dtype=torch.float64)
    floor = 64 * torch.finfo(torch.float64).eps * 1001
    done = solve_fixed_point(noisy, y, solver=solver, max_iter=70)
    assert done.converged and done.residual <= floor and done.tolerance == pytest.approx(floor)
    torch.testing.assert_close(done.solution, y / 1.5, rtol=0, atol=1e-12)
    early = solve_fixed_point(noisy, y, solver="banach", max_iter=10)
    assert not early.converged and early.residual > floor


class _Cancelling:
    """g(x) = (x - 18) / 2 with rounding-like noise of relative size 5e-8 (float32): for
    y = 0 the solution is x = 6, where g nearly cancels x; the float32 spacing there
    (4.8e-7) is twice the tolerance atol + rtol |y| = 2.4e-7 measured against y alone, so
    only a gap of exactly 0 in every element would meet that."""

    def __call__(self, x):
        return 0.5 * (x - 18) * (1 + 5e-8 * torch.randn_like(x))


@pytest.mark.parametrize("solver", ["banach", "anderson"])
def test_the_relative_tolerance_counts_the_solution_itself(solver):
    torch.manual_seed(0)
    y = torch.zeros(3, 4)
    eps = 2 * torch.finfo(torch.float32).eps
    result = solve_fixed_point(_Cancelling(), y, solver=solver)
    assert result.converged
    # converged on its own tolerance, atol + rtol * |x| at x = 6, not by stalling at the
    # rounding floor 64 eps (1 + max|y|)
    assert result.tolerance == pytest.approx(eps + eps * 6, rel=1e-3)
    assert result.residual <= result.tolerance
    assert (result.solution - 6).abs().max() <= 4 * eps * 6


@pytest.mark.parametrize("solver", ["banach", "anderson"])
def test_a_converged_solution_is_within_its_tolerance(solver):
    """On a contraction in float64: the reported residual is |T(x) - x| at the returned
    iterate, within its reported tolerance, and the error is at most residual / (1 - L)."""
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    a *= 0.8 / torch.linalg.matrix_norm(a, 2)  # Lip(g) = 0.8 in l2

    def g(x):
        return torch.tanh(x @ a.T)

    y = torch.randn(5, 6, dtype=torch.float64)
    result = solve_fixed_point(g, y, solver=solver)
    x = result.solution
    gap = (y - g(x) - x).abs()
    assert result.converged and result.residual == pytest.approx(float(gap.max()))
    eps = 2 * torch.finfo(torch.float64).eps
    assert (gap <= eps + eps * torch.maximum(x.abs(), y.abs())).all()
    # the exact fixed point, by many plain steps
    exact = y.clone()
    for _ in range(400):
        exact = y - g(exact)
    error = torch.linalg.vector_norm(x - exact, dim=1).max()
    assert error <= torch.linalg.vector_norm(y - g(x) - x, dim=1).max() / (1 - 0.8) + 1e-14


class _CountingRows:
    """g(x) = 0.5 x, recording how many rows each call evaluates."""

    def __init__(self):
        self.rows: list[int] = []

    def __call__(self, x):
        self.rows.append(x.shape[0])
        return 0.5 * x


@pytest.mark.parametrize("solver", ["banach", "anderson"])
def test_rows_leave_the_solve_as_they_converge(solver):
    """Rows that meet their tolerance are not evaluated again once at least half the
    rows have, and every row's returned iterate is its first within its own tolerance:
    the same solutions as solving each row alone."""
    y = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, -2.0], [1e-3, 2e-3]], dtype=torch.float64)
    g = _CountingRows()
    result = solve_fixed_point(g, y, solver=solver)
    assert result.converged
    assert g.rows[0] == 4 and g.rows[1] == 2  # the zero rows converged at once
    assert sum(g.rows) < 4 * result.iterations
    gap = (y - 0.5 * result.solution - result.solution).abs()
    eps = 2 * torch.finfo(torch.float64).eps
    assert (gap <= eps + eps * torch.maximum(result.solution.abs(), y.abs())).all()
    # Banach's steps are elementwise, correctly rounded IEEE operations (0.5 x, y - g):
    # the same bits on every kernel and batch shape. Anderson's mixing goes through
    # batched products and solves whose kernels depend on the number of rows, so there
    # the two solutions agree within what their tolerances allow: each is within
    # |gap| / (1 - 1/2) of the fixed point.
    atol = 0.0 if solver == "banach" else float(4 * (eps + eps * y.abs().max()))
    for i in range(4):
        alone = solve_fixed_point(_CountingRows(), y[i : i + 1], solver=solver)
        torch.testing.assert_close(result.solution[i], alone.solution[0], rtol=0, atol=atol)


class _Symmetric:
    """g(x) = A x for a symmetric A with eigenvalues spread over [-0.95, 0.95]: plain
    steps need hundreds of iterations, Anderson far fewer."""

    def __init__(self, d: int = 50):
        generator = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
        self.matrix = q @ torch.diag(torch.linspace(-0.95, 0.95, d, dtype=torch.float64)) @ q.T

    def __call__(self, x):
        return x @ self.matrix.T


@pytest.mark.parametrize("solver", ["banach", "anderson"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_row_that_cannot_converge_does_not_hold_the_others(solver, bad):
    """A row whose gap is not finite is given up at once: the solve reports failure with
    that gap, the row is returned as it was, and the other rows are solved to their
    tolerance in about as many iterations as without it (Anderson mixes each row on its
    own: one row's degenerate history does not turn the others to plain steps).

    The clean solve runs on 4 rows, the other on 5 for its first evaluation: the matrix
    products take other kernels there and round differently, and the iteration counts
    then differ by a few (627 against 623 for Banach, 258 against 262 for Anderson, seen
    on an AMD EPYC). So the counts are compared within 5%: a row that held the others
    would cost Banach max_iter (1000) and turn Anderson into plain steps (about 620
    here, 2.4x), far outside it."""
    g = _Symmetric()
    y = torch.randn(5, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    clean = solve_fixed_point(g, y[1:], solver=solver, max_iter=1000)
    y[0, 0] = bad  # the first element: the reported tolerance is finite even there
    result = solve_fixed_point(g, y, solver=solver, max_iter=1000)
    assert clean.converged and not result.converged
    assert abs(result.iterations - clean.iterations) <= 0.05 * clean.iterations
    assert not math.isfinite(result.residual) and math.isfinite(result.tolerance)
    # both within tolerance of the fixed point of a map with Lip 0.95 in l2: each is
    # within |gap| / (1 - 0.95) = 20 |gap| of it, far below 1e-12 at these tolerances
    gap = (y[1:] - g(result.solution[1:]) - result.solution[1:]).abs()
    floor = 64 * torch.finfo(torch.float64).eps * (1 + float(y[1:].abs().max()))
    assert float(gap.max()) <= floor
    torch.testing.assert_close(result.solution[1:], clean.solution, rtol=0, atol=1e-12)
    # given up at the first iterate, x0 = y
    torch.testing.assert_close(result.solution[0], y[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("solver", ["banach", "anderson"])
def test_a_row_done_early_keeps_its_first_converged_iterate(solver):
    """A row within tolerance at once (|gap| = y / 3 < atol) while most rows are not
    rides along in later iterations but keeps the iterate that converged, as alone."""
    y = torch.tensor([[1e-20, 1e-20], [1.0, -2.0], [3.0, 1.0], [-2.0, 5.0]], dtype=torch.float64)
    result = solve_fixed_point(_CountingRows(), y, solver=solver)
    assert result.converged and result.iterations > 1
    assert torch.equal(result.solution[0], y[0])  # x0 = y, not y / 1.5
    alone = solve_fixed_point(_CountingRows(), y[:1], solver=solver)
    assert alone.iterations == 1 and torch.equal(alone.solution[0], y[0])


@pytest.mark.parametrize("memory", [3, 5])
def test_the_anderson_gram_matrix_is_the_gaps_inner_products(memory):
    """The Gram matrix the history updates one row per iteration is that of its stored
    gaps, before the history is full, after it wraps around, and after rows are
    dropped."""
    torch.manual_seed(0)
    x = torch.randn(6, 40, dtype=torch.float64)
    history = solvers._AndersonHistory(x, memory, beta=1.0, lam=1e-10)
    matrix = torch.randn(40, 40, dtype=torch.float64) / 40
    for it in range(1, 2 * memory + 2):
        fx = 1.0 - torch.tanh(x @ matrix)
        history.gap(fx, x, it)
        if it == memory + 1:
            history.keep(torch.tensor([True, False, True, True, False, True]))
            x, fx = x[[0, 2, 3, 5]], fx[[0, 2, 3, 5]]
        x = history.next(x, fx, it)
        n = min(it, memory)
        gaps = history.gaps[:, :n]
        expected = gaps @ gaps.transpose(1, 2)
        torch.testing.assert_close(history.gram[:, :n, :n], expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_degenerate_anderson_row_takes_a_plain_step_alone(bad):
    """A row whose least-squares weights or mix are not finite takes the plain step
    ``fx``; the other rows get the same mix as in a history without that row."""
    torch.manual_seed(0)
    matrix = torch.randn(30, 30, dtype=torch.float64) / 30
    x0 = torch.randn(4, 30, dtype=torch.float64)

    def last_step(x: torch.Tensor, bad_last_value: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The 4th Anderson iterate from x and the map's value before it; with
        ``bad_last_value``, one element of row 0's last value is ``bad``."""
        history = solvers._AndersonHistory(x, 5, beta=1.0, lam=1e-10)
        for it in range(1, 5):
            fx = 1.0 - torch.tanh(x @ matrix)
            if bad_last_value and it == 4:
                fx[0, 7] = bad
            history.gap(fx, x, it)
            x = history.next(x, fx, it)
        return x, fx

    mixed, fx = last_step(x0, bad_last_value=True)
    others, _ = last_step(x0[1:], bad_last_value=False)
    torch.testing.assert_close(mixed[0], fx[0], rtol=0, atol=0, equal_nan=True)
    # 4 rows against 3: the products take other kernels, so the mixes differ by rounding
    # (amplified by the least-squares solve), not bit for bit
    torch.testing.assert_close(mixed[1:], others, rtol=0, atol=1e-12)
