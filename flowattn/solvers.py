r"""Fixed-point solvers for inverting residual steps :math:`y = x + g(x)`.

The inverse is the fixed point of :math:`T(x) = y - g(x)`, a contraction when
:math:`\mathrm{Lip}(g) < 1` (Banach). Two solvers:

* ``"banach"``: plain iteration :math:`x \leftarrow T(x)`; after t steps the error is
  at most :math:`L^t / (1 - L) \|x_1 - x_0\|`.
* ``"anderson"``: Anderson acceleration (type II), mixing the last ``m`` iterates;
  usually far fewer evaluations of ``g``.

Convergence is tested per element as
:math:`|T(x) - x| \leq atol + rtol \cdot \max(|x|, |y|)` (like :func:`torch.allclose`,
with the relative part measured against the larger of the output y and the iterate x,
so that no element is asked for more precision than x's own floating-point spacing).
Each sample (a row of the batch) is solved at the first iterate where all its elements
meet their tolerance; once at least half the rows are, they are dropped from the batch
and not evaluated again. A row whose gap :math:`T(x) - x` is not finite (a NaN or an
overflow in the map) is given up at once: it is returned as it is, the solve reports
failure, and the other rows go on as if it were not there. The map must therefore act
on each row independently, as a flow's residual branch does. The result records the
iterations used (by the slowest row) and the residual reached; callers decide whether
to warn or raise.

References:
    | Invertible Residual Networks (Behrmann et al., 2019)
    | https://arxiv.org/abs/1811.00995

    | Anderson Acceleration for Fixed-Point Iterations (Walker and Ni, 2011)
    | https://doi.org/10.1137/10078356X
"""

from __future__ import annotations

__all__ = ["FixedPointResult", "SOLVERS", "default_tolerance", "solve_fixed_point"]

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

SOLVERS = ("banach", "anderson")


@dataclass
class FixedPointResult:
    """How a fixed-point solve ended.

    Attributes:
        solution: Each row's returned iterate, shape of the input.
        iterations: Number of evaluations of the map on the slowest row.
        residual: :math:`|T(x) - x|` at the deciding element: the largest one when
            converged, else the one furthest over its tolerance (NaN or infinite when a
            row was given up because its gap was not finite).
        tolerance: The allowed residual ``atol + rtol * max(|x|, |y|)`` at that element.
        converged: Whether every element met its tolerance.
    """

    solution: Tensor = field(repr=False)
    iterations: int
    residual: float
    tolerance: float
    converged: bool


def default_tolerance(dtype: torch.dtype) -> float:
    """Default ``atol`` and ``rtol``: a few machine epsilons of ``dtype``."""
    return 2.0 * torch.finfo(dtype).eps


STALL_PATIENCE = 5  # iterations without a 0.1% gain, below the floor, that end a solve


def _noise_floor(y_max: float, dtype: torch.dtype) -> float:
    """Rounding-level residual: 64 machine epsilons relative to the largest |y|.

    Evaluating g in floating point has rounding error of a few units in the last
    place of its largest terms, so a residual below this floor that no longer shrinks
    is as converged as the dtype allows.
    """
    return 64.0 * torch.finfo(dtype).eps * (1.0 + y_max)


def _abs_max(t: Tensor) -> float:
    """max |t| in one pass without a temporary (NaN if t has one); ``aminmax`` is several
    times faster on CPU than ``abs().amax()`` or an infinity norm."""
    low, high = torch.aminmax(t)
    return float(torch.maximum(-low, high))


class _Tolerance:
    """Each element's tolerance ``atol + rtol * max(|x|, |y|)`` for the rows still being
    solved (samples, flattened to (rows, d)), and the tests against it. Maxima are taken
    first (one pass each, no temporaries); the element-wise test runs only when they
    allow some row to converge. y's part, ``atol + rtol |y|``, is computed once: rounding
    is monotonic, so the tolerance is the larger of x's part and y's exactly."""

    def __init__(self, allowed_y: Tensor, y_max: float, atol: float, rtol: float):
        self.allowed_y, self.y_max, self.atol, self.rtol = allowed_y, y_max, atol, rtol

    @classmethod
    def of(cls, y: Tensor, atol: float, rtol: float) -> _Tolerance:
        """The tolerance of outputs y (rows, d). Its largest |y| (which sets the rounding
        floor) is taken over the finite elements: rows with others are given up."""
        y_max = _abs_max(y)
        if not math.isfinite(y_max):
            y_max = _abs_max(torch.where(torch.isfinite(y), y, 0.0))
        return cls(y.abs().mul_(rtol).add_(atol), y_max, atol, rtol)

    def rows(self, keep: Tensor) -> _Tolerance:
        """The tolerance of the rows selected by the boolean mask ``keep``."""
        return _Tolerance(self.allowed_y[keep], self.y_max, self.atol, self.rtol)

    def allowed(self, x: Tensor) -> Tensor:
        allowed = x.abs().mul_(self.rtol).add_(self.atol)
        return torch.maximum(allowed, self.allowed_y, out=allowed)

    def check(self, x: Tensor, gap: Tensor) -> tuple[Tensor | None, Tensor]:
        """(which rows of iterate x converged, as a boolean mask, or None for none of
        them; each row's largest |gap|), where x + gap is the map's value at x. A row
        with a NaN never converges."""
        # amax and amin along rows: several times faster here than aminmax along rows
        residuals = torch.maximum(gap.amax(dim=1), gap.amin(dim=1).neg_())
        smallest = float(torch.nan_to_num(residuals, nan=math.inf).min())
        if smallest > self.atol + self.rtol * max(_abs_max(x), self.y_max):
            return None, residuals
        # |gap| - allowed <= 0 exactly when |gap| <= allowed (and never for a NaN); a
        # maximum along rows is several times faster here than all() of a comparison
        over = gap.abs().sub_(self.allowed(x))
        return over.amax(dim=1) <= 0, residuals

    def report(self, x: Tensor, gap: Tensor, converged: bool) -> tuple[float, float]:
        """(gap, tolerance) reported for an iterate: the largest gap when every element
        is within its tolerance, else the element furthest over its tolerance."""
        size = gap.abs().flatten()
        if not converged:
            allowed = self.allowed(x).flatten()
            worst = int(torch.argmax(size - allowed))
            if float(size[worst]) > float(allowed[worst]):
                return float(size[worst]), float(allowed[worst])
        worst = int(torch.argmax(size))
        from_x = self.atol + self.rtol * abs(float(x.flatten()[worst]))
        return float(size[worst]), max(from_x, float(self.allowed_y.flatten()[worst]))


class _Progress:
    """What a solve has reached so far. Rows (samples) that meet their tolerance, or whose
    gap is not finite (given up), are written to the solution, and are dropped from the
    solve once at least half the rows are done (until then they ride along: dropping
    copies every row's state, which costs more than a few evaluations of rows that are
    done); for the rows still going it keeps their best iterate and whether their largest
    residual has stopped shrinking at rounding level. :meth:`update` ends the solve (every
    row done, or the rest stalled), returns the rows to keep (and the iterate and value
    compacted to them) when some are dropped, or returns nothing new."""

    def __init__(self, tolerance: _Tolerance, max_iter: int, x: Tensor):
        self.tolerance, self.max_iter = tolerance, max_iter
        self.floor = _noise_floor(tolerance.y_max, x.dtype)
        self.solution = x.clone()  # (B, d); rows are written as they finish
        self.active = torch.arange(x.shape[0], device=x.device)  # batch index of each row
        self.done: Tensor | None = None  # rows written to the solution, not yet dropped
        self.finished: tuple[float, float] = (0.0, 0.0)  # the largest reported gap so far
        self.given_up: tuple[float, float] | None = None  # (gap, tolerance) of a lost row
        self.best: tuple[Tensor, Tensor, float] | None = None  # (iterate, its value, residual)
        self.least = math.inf  # the smallest residual that was a 0.1% gain
        self.since = 0  # iterations since that gain

    def update(
        self, x: Tensor, fx: Tensor, gap: Tensor, it: int
    ) -> FixedPointResult | tuple[Tensor, Tensor, Tensor] | None:
        """Takes the map's value ``fx`` at the iterate ``x`` (the ``it``-th evaluation;
        both (rows, d)) and ``gap = fx - x`` (not modified). Returns the result when the
        solve ends, else, when some rows are dropped, the mask of the rows to keep with
        ``x`` and ``fx`` restricted to them (the caller drops the others from the rest of
        its state), else None."""
        converged, residuals = self.tolerance.check(x, gap)
        if converged is not None:
            if self.done is not None:
                converged = converged & ~self.done
            if bool(converged.any()):
                self._finish(converged, x, gap, residuals)
                self._mark_done(converged)
        if self.done is not None:
            residuals = residuals.masked_fill(self.done, 0.0)
        residual = float(residuals.max())  # finite unless some row's gap is not
        lost = not math.isfinite(residual)
        if lost:  # those rows are given up, and dropped at once
            self._give_up(~torch.isfinite(residuals), x, gap)
            residual = float(residuals.masked_fill(self.done, 0.0).max())
        keep = None
        if self.done is not None:
            finished = int(self.done.sum())
            if finished == len(self.done):
                return self._result(it, self.finished, True)
            if lost or 2 * finished >= len(self.done):
                keep, self.done = ~self.done, None
                self.tolerance = self.tolerance.rows(keep)
                self.active = self.active[keep]
                x, fx = x[keep], fx[keep]
                if self.best is not None:
                    self.best = (self.best[0][keep], self.best[1][keep], self.best[2])
        if self.best is None or residual < self.best[2]:
            self.best = (x, fx, residual)
        if residual < self.least * (1 - 1e-3):
            self.least, self.since = residual, 0
        else:
            self.since += 1
        if self.since >= STALL_PATIENCE and self.least <= self.floor:
            rows, best_x, _ = self._going(*self.best[:2])
            self.solution[rows] = best_x
            return self._result(it, (self.best[2], self.floor), True)
        return None if keep is None else (keep, x, fx)

    def _going(self, x: Tensor, fx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(batch indices, x, fx) of the rows not yet written to the solution."""
        if self.done is None:
            return self.active, x, fx
        going = ~self.done
        return self.active[going], x[going], fx[going]

    def _finish(self, converged: Tensor, x: Tensor, gap: Tensor, residuals: Tensor) -> None:
        """Writes the converged rows to the solution and keeps the largest gap reported
        (``residuals``: each row's largest |gap|), with the tolerance at its element."""
        self.solution[self.active[converged]] = x[converged]
        # the worst converged row alone: its largest gap is the rows' largest
        worst = torch.zeros_like(converged)
        worst[torch.argmax(residuals.masked_fill(~converged, -math.inf))] = True
        report = self.tolerance.rows(worst).report(x[worst], gap[worst], True)
        if report[0] >= self.finished[0]:
            self.finished = report

    def _mark_done(self, rows: Tensor) -> None:
        self.done = rows if self.done is None else self.done | rows

    def _give_up(self, lost: Tensor, x: Tensor, gap: Tensor) -> None:
        """Writes the rows selected by ``lost`` (not done, with a gap that is not finite)
        to the solution as they are, and keeps the first such row's report."""
        self.solution[self.active[lost]] = x[lost]
        if self.given_up is None:
            row = int(torch.argmax(lost.to(torch.uint8)))
            element = int(torch.argmax((~torch.isfinite(gap[row])).to(torch.uint8)))
            allowed = float(self.tolerance.allowed_y[row, element])  # y's part of it
            if not math.isfinite(allowed):  # y is not finite there: the absolute part
                allowed = self.tolerance.atol
            self.given_up = (float(gap[row, element]), allowed)
        self._mark_done(lost)

    def _result(self, it: int, report: tuple[float, float], converged: bool) -> FixedPointResult:
        """The result, which reports failure if a row was given up."""
        if self.given_up is not None:
            report, converged = self.given_up, False
        return FixedPointResult(self.solution, it, *report, converged)

    def out_of_iterations(self) -> FixedPointResult:
        """The result when ``max_iter`` is spent: converged if the best residual of the
        rows left is at rounding level (below the floor), as a stall there would have
        concluded."""
        rows, x, fx = self._going(*self.best[:2])
        self.solution[rows] = x
        residual = self.best[2]
        if residual <= self.floor:
            return self._result(self.max_iter, (residual, self.floor), True)
        tolerance = self.tolerance if self.done is None else self.tolerance.rows(~self.done)
        return self._result(self.max_iter, tolerance.report(x, fx - x, False), False)


class _AndersonHistory:
    """The last m iterates of an Anderson solve, for rows (B, d): their map values f_i,
    their gaps f_i - x_i, and the Gram matrix of the gaps, updated one row per iteration
    (the products in x's dtype), stored, regularised and solved in float64."""

    def __init__(self, x: Tensor, m: int, beta: float, lam: float):
        b, d = x.shape
        self.m, self.beta, self.lam = m, beta, lam
        # uninitialised: iteration it writes slot (it - 1) % m before any read of it
        self.fs = x.new_empty(b, m, d)
        self.gaps = x.new_empty(b, m, d)
        self.xs = x.new_empty(b, m, d) if beta != 1.0 else None
        self.gram = torch.zeros(b, m, m, dtype=torch.float64, device=x.device)
        self.eye = torch.eye(m, dtype=torch.float64, device=x.device)

    def gap(self, fx: Tensor, x: Tensor, it: int) -> Tensor:
        """fx - x, stored as the ``it``-th iterate's gap."""
        return torch.sub(fx, x, out=self.gaps[:, (it - 1) % self.m])

    def keep(self, rows: Tensor) -> None:
        """Drops the rows not selected by the boolean mask ``rows``."""
        self.fs, self.gaps, self.gram = self.fs[rows], self.gaps[rows], self.gram[rows]
        if self.xs is not None:
            self.xs = self.xs[rows]

    def next(self, x: Tensor, fx: Tensor, it: int) -> Tensor:
        """The next iterate after the ``it``-th, whose gap :meth:`gap` has stored."""
        b = x.shape[0]
        slot, n = (it - 1) % self.m, min(it, self.m)
        self.fs[:, slot] = fx
        if self.xs is not None:
            self.xs[:, slot] = x
        gaps = self.gaps
        # (1, d) @ (d, n) per row: as a matrix product over the transposed history this
        # is about twice as fast on CPU as vecdot's (B, n, d) product and sum
        row = torch.matmul(gaps[:, slot, None], gaps[:, :n].transpose(1, 2))[:, 0].double()
        self.gram[:, slot, :n] = row
        self.gram[:, :n, slot] = row
        if n == 1:
            return fx
        # Minimise ||sum_i alpha_i (f_i - x_i)|| subject to sum_i alpha_i = 1.
        h = self.gram[:, :n, :n]
        scale = h.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-300)
        h = h + self.lam * scale[:, None, None] * self.eye[:n, :n]
        ones = torch.ones(b, n, 1, dtype=torch.float64, device=x.device)
        sol, info = torch.linalg.solve_ex(h, ones)
        alpha = sol / sol.sum(dim=1, keepdim=True)  # (B, n, 1)
        weights = alpha.to(x.dtype).transpose(1, 2)  # (B, 1, n)
        mixed = (weights @ self.fs[:, :n])[:, 0]
        if self.xs is not None:
            mixed = self.beta * mixed + (1 - self.beta) * (weights @ self.xs[:, :n])[:, 0]
        # A row whose least-squares problem failed or whose mix is not finite (a sum is
        # finite only if every term is; non-finite weights make it so) takes a plain
        # step; the other rows keep their mix.
        degenerate = (info != 0) | ~torch.isfinite(mixed.sum(dim=1))
        if bool(degenerate.any()):
            mixed[degenerate] = fx[degenerate]
        return mixed


@torch.no_grad()
def solve_fixed_point(
    fn: Callable[[Tensor], Tensor],
    y: Tensor,
    *,
    x0: Tensor | None = None,
    solver: str = "anderson",
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = 500,
    memory: int = 5,
    damping: float = 1.0,
    regularization: float = 1e-10,
) -> FixedPointResult:
    r"""Solves :math:`x = y - g(x)` where ``fn`` is :math:`g`.

    Arguments:
        fn: The residual branch g, (B, ...) to (B, ...), acting on each row on its own
            (it is called with fewer rows as rows converge).
        y: The output of the residual step (B, ...).
        x0: Starting point; defaults to ``y``.
        solver: ``"banach"`` or ``"anderson"``.
        atol: Absolute tolerance; default :func:`default_tolerance` of the dtype.
        rtol: Relative tolerance (times ``max(|x|, |y|)`` per element, x the iterate);
            default as ``atol``. When the residual stops shrinking for 5 iterations
            while below the rounding floor :math:`64 \epsilon (1 + \max |y|)`
            (evaluating g in floating point cannot do better), the solve stops there
            and counts as converged, reporting that floor as its ``tolerance``; so does
            a solve that spends ``max_iter`` with its best residual below that floor.
        max_iter: Largest number of evaluations of ``fn``.
        memory: Anderson history size m.
        damping: Anderson mixing :math:`\beta` (1 is undamped).
        regularization: Ridge term of the Anderson least-squares problem.

    Returns:
        A :class:`FixedPointResult`: each row's solution is its first iterate within
        tolerance (or, for rows that never got there, its best one; for a row given
        up, its iterate when its gap was not finite).

    Examples:
        >>> y = torch.ones(2, 3)
        >>> result = solve_fixed_point(lambda x: 0.5 * x, y, solver="banach")
        >>> result.converged, torch.allclose(result.solution, y / 1.5)
        (True, True)
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid solvers: {', '.join(SOLVERS)}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    atol = default_tolerance(y.dtype) if atol is None else atol
    rtol = default_tolerance(y.dtype) if rtol is None else rtol
    shape, b = y.shape, y.shape[0]
    y = y.reshape(b, -1)
    x = (y if x0 is None else x0.reshape(b, -1)).clone()
    tolerance = _Tolerance.of(y, atol, rtol)
    progress = _Progress(tolerance, max_iter, x)
    history = None if solver == "banach" else _AndersonHistory(x, memory, damping, regularization)
    for it in range(1, max_iter + 1):
        fx = y - fn(x.reshape(-1, *shape[1:])).reshape(x.shape)
        gap = fx - x if history is None else history.gap(fx, x, it)
        done = progress.update(x, fx, gap, it)
        if isinstance(done, FixedPointResult):
            done.solution = done.solution.view(shape)
            return done
        if done is not None:  # some rows converged: the rest go on without them
            keep, x, fx = done
            y = y[keep]
            if history is not None:
                history.keep(keep)
        x = fx if history is None else history.next(x, fx, it)
    done = progress.out_of_iterations()
    done.solution = done.solution.view(shape)
    return done
