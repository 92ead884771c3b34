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
The result records the iterations used and the residual reached; callers decide whether
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
        solution: The last iterate, shape of the input.
        iterations: Number of evaluations of the map.
        residual: :math:`|T(x) - x|` at the deciding element: the largest one when
            converged, else the one furthest over its tolerance.
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
    """Each element's tolerance ``atol + rtol * max(|x|, |y|)`` at an iterate x, and
    the tests against it. Maxima are taken first (one pass each, no temporaries); the
    element-wise test runs only when they allow convergence."""

    def __init__(self, y: Tensor, atol: float, rtol: float):
        self.atol, self.rtol = atol, rtol
        self.y_abs = y.abs()
        self.y_max = _abs_max(y)

    def allowed(self, x: Tensor) -> Tensor:
        return torch.maximum(x.abs(), self.y_abs).mul_(self.rtol).add_(self.atol)

    def check(self, x: Tensor, gap: Tensor) -> tuple[bool, float]:
        """(converged, the largest |gap|) of iterate x, whose map value is x + gap."""
        residual = _abs_max(gap)
        if residual <= self.atol:
            return True, residual
        if residual > self.atol + self.rtol * max(_abs_max(x), self.y_max):
            return False, residual
        return bool((gap.abs() <= self.allowed(x)).all()), residual

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
        bigger = max(abs(float(x.flatten()[worst])), float(self.y_abs.flatten()[worst]))
        return float(size[worst]), self.atol + self.rtol * bigger


class _Progress:
    """What a solve has reached so far: its best iterate, and whether its residual has
    stopped shrinking at rounding level. :meth:`update` ends the solve, converged or
    stalled, or returns None to go on."""

    def __init__(self, tolerance: _Tolerance, max_iter: int):
        self.tolerance, self.max_iter = tolerance, max_iter
        self.floor = _noise_floor(tolerance.y_max, tolerance.y_abs.dtype)
        self.best: tuple[Tensor, Tensor, float] | None = None  # (iterate, its value, residual)
        self.least = math.inf  # the smallest residual that was a 0.1% gain
        self.since = 0  # iterations since that gain

    def update(self, x: Tensor, fx: Tensor, gap: Tensor, it: int) -> FixedPointResult | None:
        """Takes the map's value ``fx`` at the iterate ``x`` (the ``it``-th evaluation)
        and ``gap = fx - x`` (which the caller may keep: it is not modified)."""
        converged, residual = self.tolerance.check(x, gap)
        if self.best is None or residual < self.best[2]:
            self.best = (x, fx, residual)
        if converged:
            return FixedPointResult(x, it, *self.tolerance.report(x, gap, True), True)
        if residual < self.least * (1 - 1e-3):
            self.least, self.since = residual, 0
        else:
            self.since += 1
        if self.since >= STALL_PATIENCE and self.least <= self.floor:
            return FixedPointResult(self.best[0], it, self.best[2], self.floor, True)
        return None

    def out_of_iterations(self) -> FixedPointResult:
        """The result when ``max_iter`` is spent: converged if the best residual is at
        rounding level (below the floor), as a stall there would have concluded."""
        x, fx, residual = self.best
        if residual <= self.floor:
            return FixedPointResult(x, self.max_iter, residual, self.floor, True)
        return FixedPointResult(x, self.max_iter, *self.tolerance.report(x, fx - x, False), False)


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
        fn: The residual branch g, (B, ...) to (B, ...).
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
        A :class:`FixedPointResult`.

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
    x = y.clone() if x0 is None else x0.clone()

    def step(z: Tensor) -> Tensor:
        return y - fn(z)

    tolerance = _Tolerance(y, atol, rtol)
    if solver == "banach":
        return _banach(step, x, tolerance, max_iter)
    return _anderson(step, x, tolerance, max_iter, memory, damping, regularization)


def _banach(step, x, tolerance, max_iter) -> FixedPointResult:
    progress = _Progress(tolerance, max_iter)
    for it in range(1, max_iter + 1):
        fx = step(x)
        if (done := progress.update(x, fx, fx - x, it)) is not None:
            return done
        x = fx
    return progress.out_of_iterations()


def _anderson(step, x, tolerance, max_iter, m, beta, lam) -> FixedPointResult:
    """Anderson acceleration with a history of m iterates. The Gram matrix of the
    residual history is updated one row per iteration (the products in x's dtype) and
    stored, regularised and solved in float64; the rest stays in x's dtype."""
    b = x.shape[0]
    d = x[0].numel()
    fs = torch.zeros(b, m, d, dtype=x.dtype, device=x.device)  # f(x_i)
    gaps = torch.zeros(b, m, d, dtype=x.dtype, device=x.device)  # f(x_i) - x_i
    xs = torch.zeros_like(fs) if beta != 1.0 else None
    gram = torch.zeros(b, m, m, dtype=torch.float64, device=x.device)
    eye = torch.eye(m, dtype=torch.float64, device=x.device)
    progress = _Progress(tolerance, max_iter)
    for it in range(1, max_iter + 1):
        fx = step(x)
        slot, n = (it - 1) % m, min(it, m)
        gap = torch.sub(fx.reshape(b, -1), x.reshape(b, -1), out=gaps[:, slot])
        if (done := progress.update(x, fx, gap.reshape(x.shape), it)) is not None:
            return done
        fs[:, slot] = fx.reshape(b, -1)
        if xs is not None:
            xs[:, slot] = x.reshape(b, -1)
        row = (gaps[:, :n] @ gaps[:, slot, :, None]).double()[..., 0]  # (B, n)
        gram[:, slot, :n] = row
        gram[:, :n, slot] = row
        if n == 1:
            x = fx
            continue
        # Minimise ||sum_i alpha_i (f_i - x_i)|| subject to sum_i alpha_i = 1.
        h = gram[:, :n, :n]
        scale = h.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-300)
        h = h + lam * scale[:, None, None] * eye[:n, :n]
        ones = torch.ones(b, n, 1, dtype=torch.float64, device=x.device)
        sol, info = torch.linalg.solve_ex(h, ones)
        alpha = sol / sol.sum(dim=1, keepdim=True)  # (B, n, 1)
        if bool((info != 0).any()) or not torch.isfinite(alpha.sum()):
            x = fx  # degenerate history: fall back to a plain step
            continue
        weights = alpha.to(x.dtype).transpose(1, 2)  # (B, 1, n)
        mixed = (weights @ fs[:, :n])[:, 0]
        if xs is not None:
            mixed = beta * mixed + (1 - beta) * (weights @ xs[:, :n])[:, 0]
        if not torch.isfinite(mixed.sum()):  # a sum is finite only if every term is
            mixed = fx.reshape(b, -1)
        x = mixed.reshape(x.shape)
    return progress.out_of_iterations()
