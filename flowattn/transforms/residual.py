r"""Residual flow step :math:`f(x) = x + g(x)` with a contractive branch g.

References:
    | Invertible Residual Networks (Behrmann et al., 2019)
    | https://arxiv.org/abs/1811.00995

    | Invertible Attention (Zha et al., 2021)
    | https://arxiv.org/abs/2106.09003
"""

from __future__ import annotations

__all__ = ["ConvergenceError", "ConvergenceWarning", "ResidualTransform"]

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
from nflows.transforms import Transform
from torch import Tensor, nn

from ..errors import ConvergenceError
from ..logdet import LogDetEstimator, PowerSeriesLogDet
from ..precision import warn_if_tf32
from ..solvers import SOLVERS, FixedPointResult, solve_fixed_point


class ConvergenceWarning(RuntimeWarning):
    """The fixed-point inverse stopped before reaching its tolerance."""


def _not_converged(result: FixedPointResult, solver: str) -> str:
    """What a fixed-point inverse that did not converge says."""
    message = (
        f"fixed-point inverse ({solver}) did not converge in {result.iterations} "
        f"iterations: residual {result.residual:.3g} > tolerance {result.tolerance:.3g}"
    )
    if not math.isfinite(result.residual):
        message += (
            " (a sample's residual was not finite: it was given up and is returned "
            "as it was; the other samples were solved without it)"
        )
    return message


class ResidualTransform(Transform):
    r"""Invertible residual step :math:`y = x + g(x)`, an nflows ``Transform``.

    ``forward`` maps data to noise and returns ``(y, logabsdet)`` with ``logabsdet``
    of shape (B,) from the chosen log-det estimator. ``inverse`` solves the fixed
    point :math:`x = y - g(x)` (Banach or Anderson) to ``atol + rtol max(|x|, |y|)`` per element,
    records how it converged in :attr:`last_inverse`, and warns
    (:class:`ConvergenceWarning`, with the residual reached) or, with ``strict=True``,
    raises :class:`ConvergenceError` when it does not converge. The last forward's
    log-dets (B,) are kept in :attr:`last_logabsdet` (detached). Its log-det is minus
    the estimator's log-det at the solution. The inverse is not differentiable. On CUDA in
    float32 with TF32 allowed, both directions warn (:class:`~flowattn.precision.TF32Warning`;
    :mod:`flowattn.precision` says why and how to turn TF32 off).

    Arguments:
        branch: The residual branch g, a module from (B, ...) to (B, ...); ideally with
            a ``lipschitz_bound()`` method.
        estimator: A :class:`~flowattn.logdet.LogDetEstimator` (default: 5-term power
            series, one Rademacher probe).
        solver: ``"anderson"`` (default) or ``"banach"``.
        atol: Absolute inverse tolerance; default a few machine epsilons of the dtype.
        rtol: Relative inverse tolerance (times ``max(|x|, |y|)``); default as ``atol``.
        max_iter: Largest number of fixed-point iterations.
        strict: Raise instead of warning when the inverse does not converge.
        input_shape: Shape of one input (e.g. (C, H, W)), for the certificate of branches
            whose bound depends on the input size (convolutional and ``l2`` attention
            branches); :meth:`lipschitz_bound` uses it when given no shape.

    Examples:
        >>> from flowattn.lipschitz import ConstrainedLinear, RowL1Rescale
        >>> branch = nn.Sequential(ConstrainedLinear(3, 3, RowL1Rescale(0.5)), nn.Tanh())
        >>> step = ResidualTransform(branch)
        >>> x = torch.randn(4, 3)
        >>> y, logabsdet = step(x)
        >>> x_back, _ = step.inverse(y)
        >>> logabsdet.shape, bool((x_back - x).abs().max() < 1e-5)
        (torch.Size([4]), True)
    """

    def __init__(
        self,
        branch: nn.Module,
        estimator: LogDetEstimator | None = None,
        *,
        solver: str = "anderson",
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int = 500,
        strict: bool = False,
        input_shape: tuple[int, ...] | None = None,
    ):
        super().__init__()
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; valid solvers: {', '.join(SOLVERS)}")
        self.branch = branch
        self.estimator = PowerSeriesLogDet() if estimator is None else estimator
        self.solver = solver
        self.atol = atol
        self.rtol = rtol
        self.max_iter = max_iter
        self.strict = strict
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.last_inverse: FixedPointResult | None = None
        self.last_logabsdet: Tensor | None = None
        self.skip_log_dets = False

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float | None:
        """The branch's certified Lipschitz bound for inputs of shape ``input_shape``
        (default: the step's own ``input_shape``), or None if it has none."""
        bound = getattr(self.branch, "lipschitz_bound", None)
        if bound is None:
            return None
        shape = self.input_shape if input_shape is None else tuple(input_shape)
        return bound() if shape is None else bound(shape)

    @contextlib.contextmanager
    def log_dets_skipped(self) -> Iterator[None]:
        """Within the block, ``forward`` and ``inverse`` skip the log-det estimate (the
        costly part of an inverse) and return NaN log-dets, which cannot pass unnoticed:
        for encoding, decoding and sampling, where the log-det is discarded."""
        previous, self.skip_log_dets = self.skip_log_dets, True
        try:
            yield
        finally:
            self.skip_log_dets = previous

    @contextlib.contextmanager
    def certified_once(self) -> Iterator[None]:
        """Within the block, the branch's certificate for this step's ``input_shape`` is
        the one computed on entry (for branches with a ``certified_once(spatial)``
        method, such as :class:`~flowattn.nn.conv_branch.ConvResidualBranch`; others
        are unaffected). :meth:`inverse` enters it, so its fixed-point iterations share
        one certificate; :class:`~flowattn.models.DensityModel` enters it for every step
        before a forward pass, so that the certificates' temporaries do not add to a
        training step's peak memory."""
        once = getattr(self.branch, "certified_once", None)
        if once is None or self.input_shape is None:
            yield
            return
        with once(self.input_shape[-2:]):
            yield

    def _nan_log_dets(self, like: Tensor) -> Tensor:
        return torch.full((like.shape[0],), math.nan, dtype=like.dtype, device=like.device)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        warn_if_tf32(inputs.device, inputs.dtype)
        if self.skip_log_dets:
            return inputs + self.branch(inputs), self._nan_log_dets(inputs)
        gx, logabsdet = self.estimator(self.branch, inputs)
        self.last_logabsdet = logabsdet.detach()
        return inputs + gx, logabsdet

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        warn_if_tf32(inputs.device, inputs.dtype)
        return self._inverse(inputs)

    def _inverse(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        # one certificate for every fixed-point iteration and the log-det at the solution
        with self.certified_once(), torch.no_grad():
            result = solve_fixed_point(
                self.branch,
                inputs.detach(),
                solver=self.solver,
                atol=self.atol,
                rtol=self.rtol,
                max_iter=self.max_iter,
            )
            self.last_inverse = result
            if not result.converged:
                message = _not_converged(result, self.solver)
                if self.strict:
                    raise ConvergenceError(message)
                warnings.warn(message, ConvergenceWarning, stacklevel=3)  # inverse's caller
            if self.skip_log_dets:
                return result.solution, self._nan_log_dets(result.solution)
            _, logabsdet = self.estimator(self.branch, result.solution)
        return result.solution, -logabsdet

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state = dict(state)
        state["last_inverse"] = None
        state["last_logabsdet"] = None
        return state
