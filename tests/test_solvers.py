import pytest
import torch

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
