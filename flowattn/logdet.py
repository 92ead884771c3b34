r"""Estimators of :math:`\log |\det (I + J_g(x))|` for residual flow steps.

For a contractive residual branch :math:`g` (spectral radius of :math:`J_g` below 1),

.. math:: \log \det (I + J_g) = \sum_{k \geq 1} \frac{(-1)^{k+1}}{k} \operatorname{tr}(J_g^k),

and each trace is estimated with Hutchinson probes :math:`v^\top J_g^k v`, built from
:math:`k` vector-Jacobian products. The estimators here differ in which terms they
keep and in how they differentiate:

* :class:`ExactLogDet`: the dense Jacobian and ``slogdet`` (small inputs, tests);
* :class:`PowerSeriesLogDet`: the first ``n_terms`` terms (biased, as in the paper and
  i-ResNet);
* :class:`RussianRouletteLogDet`: a random number of terms reweighted so that the
  estimate is unbiased (Residual Flows).

Series estimators take ``gradient="neumann"`` (the default: the Neumann-series gradient
:math:`\sum_{k<n} (-1)^k v^\top J^k \partial J\, v`, one Jacobian-vector product with a
graph, memory independent of the number of terms) or ``gradient="backprop"``
(differentiate through the series, as i-ResNet and the paper do; every term keeps a
graph). For the n-term series both are unbiased for the gradient of the same expected
estimate, :math:`\partial \sum_{k \leq n} (-1)^{k+1} \operatorname{tr}(J^k) / k =
\sum_{k < n} (-1)^k \operatorname{tr}(J^k \partial J)`, and equal with exact traces;
the Neumann form differentiates one product instead of n. ``memory_efficient=True``
computes the gradient during the forward pass and frees the log-det graph at once.

Every estimator is called as ``estimator(branch, x) -> (g(x), logdet)`` with
``x`` of shape (B, ...) and ``logdet`` of shape (B,).

References:
    | Invertible Residual Networks (Behrmann et al., 2019)
    | https://arxiv.org/abs/1811.00995

    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | Invertible Attention (Zha et al., 2021)
    | https://arxiv.org/abs/2106.09003
"""

from __future__ import annotations

__all__ = [
    "ExactLogDet",
    "ESTIMATORS",
    "LogDetEstimator",
    "PowerSeriesLogDet",
    "RussianRouletteLogDet",
    "estimator_defaults",
    "estimator_options",
    "make_estimator",
    "roulette_probability",
    "sample_probes",
    "series_truncation_bound",
]

import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

PROBES = ("rademacher", "gaussian", "basis")
GRADIENTS = ("backprop", "neumann")

Branch = Callable[[Tensor], Tensor]


def sample_probes(
    x: Tensor, n_probes: int, kind: str = "rademacher", generator: torch.Generator | None = None
) -> Tensor:
    r"""Probe vectors for Hutchinson trace estimation.

    Arguments:
        x: A tensor (B, ...) giving shape, dtype and device.
        n_probes: Number of probes per sample (ignored for ``"basis"``).
        kind: ``"rademacher"`` (entries :math:`\pm 1`, the default: lower variance),
            ``"gaussian"``, or ``"basis"`` (all D standard basis vectors: the exact
            trace, deterministic, for tests and small inputs).
        generator: Random generator (CPU).

    Returns:
        A tensor (P, B, ...) where P is ``n_probes`` or D for ``"basis"``.

    Examples:
        >>> sample_probes(torch.zeros(2, 3), 4).shape
        torch.Size([4, 2, 3])
    """
    if kind not in PROBES:
        raise ValueError(f"unknown probe kind {kind!r}; valid kinds: {', '.join(PROBES)}")
    if kind == "basis":
        d = x[0].numel()
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        return eye[:, None, :].expand(d, x.shape[0], d).reshape(d, *x.shape)
    if n_probes < 1:
        raise ValueError(f"n_probes must be at least 1, got {n_probes}")
    shape = (n_probes, *x.shape)
    if kind == "gaussian":
        v = torch.randn(shape, generator=generator, dtype=x.dtype)
    else:
        v = torch.randint(0, 2, shape, generator=generator).to(x.dtype) * 2 - 1
    return v.to(x.device)


def series_truncation_bound(lipschitz: float, n_terms: int, dim: int) -> float:
    r"""Bound on the error of the log-det power series truncated after ``n_terms`` terms.

    With :math:`L \geq \|J\|` in any induced norm, :math:`|\operatorname{tr}(J^k)| \leq D L^k`, so
    the tail is at most :math:`D \sum_{k > n} L^k / k = -D(\ln(1 - L) + \sum_{k \leq n} L^k / k)`.

    Examples:
        >>> round(series_truncation_bound(0.5, 2, 1), 6)
        0.068147
    """
    if not 0 <= lipschitz < 1:
        raise ValueError(f"the series converges only for lipschitz < 1, got {lipschitz}")
    head = sum(lipschitz**k / k for k in range(1, n_terms + 1))
    return -dim * (math.log1p(-lipschitz) + head)


def _needs_graph(x: Tensor, branch: Branch) -> bool:
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad:
        return True
    params = branch.parameters() if isinstance(branch, nn.Module) else ()
    return any(p.requires_grad for p in params)


class LogDetEstimator(nn.Module):
    r"""Base class: ``estimator(branch, x)`` returns ``(branch(x), logdet)``.

    Attributes:
        stochastic: Whether repeated calls give different values (probes, roulette).
        unbiased: Whether the expected value is the exact log-det.
    """

    stochastic: bool = True
    unbiased: bool = False
    #: The CPU generator of the estimator's draws (probes, numbers of terms); None: torch's
    #: default generator, as torch's own random functions use.
    generator: torch.Generator | None = None

    def forward(self, branch: Branch, x: Tensor) -> tuple[Tensor, Tensor]:
        graph = _needs_graph(x, branch)
        with torch.enable_grad():
            x_in = x if x.requires_grad else x.detach().requires_grad_(True)
            gx = branch(x_in)
            logdet = self.estimate(gx, x_in, create_graph=graph)
        if not graph:
            return gx.detach(), logdet.detach()
        return gx, logdet

    def estimate(self, gx: Tensor, x: Tensor, *, create_graph: bool) -> Tensor:
        """The log-det (B,) of ``x -> x + g(x)`` given ``gx = g(x)`` with its graph."""
        raise NotImplementedError

    def describe(self) -> str:
        """A one-line description for reports, saying whether the estimate is biased."""
        raise NotImplementedError

    def bias_bound(self, lipschitz: float | None, dims: int) -> float:
        """A certified bound, in nats, on the bias :math:`|E[\\hat{L}] - \\log\\det|` of
        this estimator on one step whose input has ``dims`` values and whose branch has
        the certified Lipschitz bound ``lipschitz`` (None: uncertified). 0 here: the
        estimate is exact or unbiased."""
        return 0.0

    @property
    def error_bar_certified(self) -> bool:
        """Whether a standard error over images of this estimator's values is a valid one
        (the values of different images are independent and have finite variance)."""
        return True


class ExactLogDet(LogDetEstimator):
    r"""Exact log-det from the dense per-sample Jacobian (cost :math:`O(D)` backward passes).

    Meant for small inputs, tests and exact evaluation. Differentiable.

    Examples:
        >>> est = ExactLogDet()
        >>> _, logdet = est(lambda x: 0.5 * x, torch.zeros(2, 3))
        >>> logdet  # 3 * log(1.5)
        tensor([1.2164, 1.2164])
    """

    stochastic = False
    unbiased = True

    def estimate(self, gx: Tensor, x: Tensor, *, create_graph: bool) -> Tensor:
        jac = dense_jacobian(gx, x, create_graph=create_graph)
        eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
        # One matrix at a time: with torch 2.15's MKL, the batched LU behind a batched
        # slogdet returns wrong values on CPU (D >= 192) once torch.set_num_threads has
        # been called, while the single-matrix LU stays right (tests/test_logdet.py).
        return torch.stack([torch.linalg.slogdet(eye + j).logabsdet for j in jac])

    def describe(self) -> str:
        return "exact (dense Jacobian)"


def dense_jacobian(gx: Tensor, x: Tensor, *, create_graph: bool = False) -> Tensor:
    """Per-sample Jacobians (B, D, D) of ``gx`` (B, ...) with respect to ``x`` (B, ...)."""
    d = x[0].numel()
    basis = sample_probes(x, 0, "basis")  # (D, B, ...)
    rows = torch.autograd.grad(
        gx, x, basis, retain_graph=True, create_graph=create_graph, is_grads_batched=True
    )[0]  # rows[d, b] = e_d^T J_b
    return rows.reshape(d, x.shape[0], d).transpose(0, 1)


class _SeriesLogDet(LogDetEstimator):
    """Shared machinery of the power-series estimators."""

    def __init__(
        self,
        n_probes: int = 1,
        probe: str = "rademacher",
        gradient: str = "neumann",
        memory_efficient: bool = False,
    ):
        super().__init__()
        if probe not in PROBES:
            raise ValueError(f"unknown probe {probe!r}; valid probes: {', '.join(PROBES)}")
        if gradient not in GRADIENTS:
            raise ValueError(f"unknown gradient {gradient!r}; valid: {', '.join(GRADIENTS)}")
        if n_probes < 1:
            raise ValueError(f"n_probes must be at least 1, got {n_probes}")
        self.n_probes = n_probes
        self.probe = probe
        self.gradient = gradient
        self.memory_efficient = memory_efficient
        self.stochastic = probe != "basis" or type(self) is RussianRouletteLogDet

    def term_weights(self, batch: int) -> Tensor:
        """Weights (n, B) of terms 1..n for one call, per sample (n may be random; a
        sample's weights past its own number of terms are zero)."""
        raise NotImplementedError

    def forward(self, branch: Branch, x: Tensor) -> tuple[Tensor, Tensor]:
        if _needs_graph(x, branch):
            if self.memory_efficient:
                params = [p for p in branch.parameters() if p.requires_grad]
                weights = self.term_weights(x.shape[0])
                return _MemoryEfficientLogDet.apply(self, weights, branch, x, *params)
            return super().forward(branch, x)
        return self._evaluate(branch, x, self.term_weights(x.shape[0]))

    def _evaluate(self, branch: Branch, x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """The estimate without a graph (evaluation). Samples whose own number of terms
        is reached drop out: once they are at most half of the rows the branch is re-run
        on the others alone, so a call with per-sample numbers of terms costs about the
        mean number of terms per sample rather than the batch's maximum. This needs a
        branch that treats samples independently (every branch here does, in eval mode)."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            gx = branch(x_in)
        weights = weights.to(dtype=x.dtype, device=x.device)
        counts = (weights != 0).sum(0)  # terms per sample (kept terms have weight > 0)
        probes = sample_probes(x, self.n_probes, self.probe, self.generator)
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for v in probes:
            rows = torch.arange(x.shape[0], device=x.device)  # samples of the graph's rows
            rows_x, rows_gx, w = x_in, gx, v
            for k in range(1, weights.shape[0] + 1):
                alive = counts[rows] >= k
                if 2 * int(alive.sum()) <= len(rows):
                    rows, w = rows[alive], w[alive]
                    with torch.enable_grad():
                        rows_x = x[rows].detach().requires_grad_(True)
                        rows_gx = branch(rows_x)
                (w,) = torch.autograd.grad(rows_gx, rows_x, w, retain_graph=True)
                sign = 1.0 if k % 2 == 1 else -1.0
                term = (w * v[rows]).flatten(1).sum(1)
                total[rows] += sign * weights[k - 1, rows] / k * term
        total = total if self.probe == "basis" else total / len(probes)
        return gx.detach(), total.detach()

    def estimate(
        self,
        gx: Tensor,
        x: Tensor,
        *,
        create_graph: bool,
        weights: Tensor | None = None,
    ) -> Tensor:
        weights = self.term_weights(x.shape[0]) if weights is None else weights
        weights = weights.to(dtype=x.dtype, device=x.device)
        expand = (-1,) + (1,) * (x.dim() - 1)  # a (B,) weight against (B, ...) vectors
        probes = sample_probes(x, self.n_probes, self.probe, self.generator)
        neumann = create_graph and self.gradient == "neumann"
        through_series = create_graph and self.gradient == "backprop"
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for v in probes:
            w = v
            value = torch.zeros_like(total)
            neumann_vec = torch.zeros_like(v) if neumann else None
            for k, weight in enumerate(weights, start=1):
                sign = 1.0 if k % 2 == 1 else -1.0
                if neumann:
                    neumann_vec = neumann_vec + sign * weight.reshape(expand) * w
                (w,) = torch.autograd.grad(gx, x, w, retain_graph=True, create_graph=through_series)
                if not through_series:
                    w = w.detach()
                value = value + sign * weight / k * (w * v).flatten(1).sum(1)
            if neumann:
                (jv,) = torch.autograd.grad(
                    gx, x, neumann_vec, retain_graph=True, create_graph=True
                )
                surrogate = (jv * v).flatten(1).sum(1)
                value = value.detach() + surrogate - surrogate.detach()
            total = total + value
        return total if self.probe == "basis" else total / len(probes)


class PowerSeriesLogDet(_SeriesLogDet):
    r"""Truncated power series with Hutchinson probes (biased; the paper's estimator).

    .. math:: \log\det(I + J) \approx \sum_{k=1}^{n} \frac{(-1)^{k+1}}{k} v^\top J^k v

    Arguments:
        n_terms: Number of series terms n.
        n_probes: Number of Hutchinson probes m per sample.
        probe: ``"rademacher"``, ``"gaussian"`` or ``"basis"`` (exact traces).
        gradient: ``"neumann"``, the Neumann-series gradient (default), or
            ``"backprop"`` through the series (the paper's and i-ResNet's: the same
            expected gradient at a higher cost; see the module docstring).
        memory_efficient: Compute the gradient in the forward pass, free the graph.

    Examples:
        >>> est = PowerSeriesLogDet(n_terms=10, probe="basis")
        >>> _, logdet = est(lambda x: 0.5 * x, torch.zeros(1, 3))
        >>> logdet  # 3 * log(1.5) = 1.2164 up to the alternating tail
        tensor([1.2163])
    """

    def __init__(
        self,
        n_terms: int = 5,
        n_probes: int = 1,
        probe: str = "rademacher",
        gradient: str = "neumann",
        memory_efficient: bool = False,
    ):
        super().__init__(n_probes, probe, gradient, memory_efficient)
        if n_terms < 1:
            raise ValueError(f"n_terms must be at least 1, got {n_terms}")
        self.n_terms = n_terms

    def term_weights(self, batch: int) -> Tensor:
        return torch.ones(self.n_terms, batch, dtype=torch.float64)

    def bias_bound(self, lipschitz: float | None, dims: int) -> float:
        """The truncation error's bound :func:`series_truncation_bound` (infinite for an
        uncertified branch, whose series need not even converge)."""
        if lipschitz is None:
            return math.inf
        return series_truncation_bound(lipschitz, self.n_terms, dims)

    def describe(self) -> str:
        probes = "exact traces" if self.probe == "basis" else f"{self.n_probes} {self.probe} probe"
        return f"power series, {self.n_terms} terms, {probes} (biased: truncated)"

    def extra_repr(self) -> str:
        return (
            f"n_terms={self.n_terms}, n_probes={self.n_probes}, probe={self.probe!r}, "
            f"gradient={self.gradient!r}, memory_efficient={self.memory_efficient}"
        )


def roulette_probability(lipschitz: float) -> float:
    r"""The geometric stopping probability p the roulette uses for a branch with
    certified Lipschitz bound L (in any induced norm): :math:`p = \min(1/2, 1 - L^{4/3})`.

    Term k of the log-det series is at most :math:`D L^k / k` in size, and the roulette
    divides it by :math:`P(N \geq k) = (1 - p)^{k-1}`. The estimator's second moment is
    then finite when :math:`(1 - p) \geq L^2` and its fourth moment (which decides how
    well a sample variance estimates the variance, so whether an error bar is honest)
    when :math:`(1 - p)^3 \geq L^4`; this p is the largest (fewest terms) with both.
    At L = 0.9 it is 0.131: 7.6 extra terms on average.

    Examples:
        >>> round(roulette_probability(0.9), 3)
        0.131
        >>> roulette_probability(0.3)
        0.5
    """
    if not 0 <= lipschitz < 1:
        raise ValueError(f"the log-det series converges only for lipschitz < 1, got {lipschitz}")
    return min(0.5, 1.0 - lipschitz ** (4 / 3))


def _checked_roulette_p(
    n_exact: int,
    distribution: str,
    p: float | None,
    lam: float,
    lipschitz: float | None,
    max_terms: int,
) -> float:
    """The roulette's geometric p (given, or chosen from ``lipschitz``) after checking
    every option of :class:`RussianRouletteLogDet`; a p whose variance would be infinite
    for the branch's bound is refused."""
    if distribution not in ("geometric", "poisson"):
        raise ValueError(f"unknown distribution {distribution!r}; valid: geometric, poisson")
    if n_exact < 0:
        raise ValueError(f"n_exact must be non-negative, got {n_exact}")
    if lipschitz is not None and not 0 <= lipschitz < 1:
        raise ValueError(f"lipschitz must be in [0, 1) for the series to converge, got {lipschitz}")
    if p is None:
        p = 0.5 if lipschitz is None else roulette_probability(lipschitz)
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if lam <= 0:
        raise ValueError(f"lam must be positive, got {lam}")
    if distribution == "geometric" and lipschitz is not None and 1 - p < lipschitz**2:
        raise ValueError(
            f"p={p} makes the roulette's variance infinite for a branch with Lipschitz "
            f"bound {lipschitz}: it needs p <= 1 - lipschitz^2 = {1 - lipschitz**2:.4g} "
            f"(leave p out to choose {roulette_probability(lipschitz):.4g})"
        )
    if max_terms <= n_exact:
        raise ValueError(f"max_terms ({max_terms}) must exceed n_exact ({n_exact})")
    return p


class RussianRouletteLogDet(_SeriesLogDet):
    r"""Unbiased Russian-roulette estimator of the log-det series (Residual Flows).

    The first ``n_exact`` terms are always kept; a random N is drawn, the terms
    :math:`n_{exact} < k \leq n_{exact} + N` are kept and term k is divided by
    :math:`P(N \geq k - n_{exact})`, so the expectation is the full series.

    Honest error bars need two things, both defaults here. The draws of N are
    independent per sample (``per_sample=True``), so that per-image estimates are
    independent and a standard error over images is valid (training may share one draw
    per batch, which keeps the batch mean unbiased and costs fewer terms). And the
    variance must be finite: with a geometric N it is when :math:`1 - p \geq L^2` for the
    branch's certified Lipschitz bound L; give ``lipschitz`` and p is chosen by
    :func:`roulette_probability` (a p that would make the variance infinite is refused).
    Without ``lipschitz``, or with the Poisson distribution (whose tail falls faster
    than any geometric series of terms), the estimate stays unbiased but its variance is
    not certified finite (:attr:`variance_certified` is False).

    Arguments:
        n_exact: Number of leading terms always computed.
        distribution: ``"geometric"`` (N >= 1, :math:`P(N \geq k) = (1-p)^{k-1}`) or
            ``"poisson"`` (N >= 0, rate ``lam``).
        p: Success probability of the geometric distribution (default: from
            ``lipschitz``, or 0.5 without it).
        lam: Rate of the Poisson distribution.
        lipschitz: A certified bound on the branch's Lipschitz constant (any induced
            norm), which chooses and checks p.
        per_sample: Draw N independently for every sample (else one N per call).
        max_terms: Hard cap on the number of terms (cost guard; the estimate is
            unbiased only while the cap is not reached: probability
            :math:`(1-p)^{max\_terms - n_{exact} - 1}`, 1e-12 at p = 0.131).
        n_probes: As in :class:`PowerSeriesLogDet`.
        probe: As in :class:`PowerSeriesLogDet`.
        gradient: As in :class:`PowerSeriesLogDet`.
        memory_efficient: As in :class:`PowerSeriesLogDet`.

    Examples:
        >>> est = RussianRouletteLogDet(lipschitz=0.9)
        >>> round(est.p, 3), est.variance_certified
        (0.131, True)
        >>> _, logdet = est(lambda x: 0.5 * x, torch.zeros(4, 3))
        >>> logdet.shape
        torch.Size([4])
    """

    unbiased = True

    def __init__(
        self,
        n_exact: int = 2,
        distribution: str = "geometric",
        p: float | None = None,
        lam: float = 2.0,
        lipschitz: float | None = None,
        per_sample: bool = True,
        max_terms: int = 200,
        n_probes: int = 1,
        probe: str = "rademacher",
        gradient: str = "neumann",
        memory_efficient: bool = False,
    ):
        super().__init__(n_probes, probe, gradient, memory_efficient)
        self.n_exact = n_exact
        self.distribution = distribution
        self.p = _checked_roulette_p(n_exact, distribution, p, lam, lipschitz, max_terms)
        self.lam = lam
        self.lipschitz = lipschitz
        self.per_sample = per_sample
        self.max_terms = max_terms

    @property
    def variance_certified(self) -> bool:
        """Whether the estimator's variance is proven finite (geometric N and a certified
        Lipschitz bound L with :math:`1 - p \\geq L^2`)."""
        return (
            self.distribution == "geometric"
            and self.lipschitz is not None
            and 1 - self.p >= self.lipschitz**2
        )

    def bias_bound(self, lipschitz: float | None, dims: int) -> float:
        """0 (unbiased) where the branch is certified contractive; infinite where it is not,
        as the series the roulette estimates need not converge."""
        return 0.0 if lipschitz is not None and lipschitz < 1 else math.inf

    @property
    def error_bar_certified(self) -> bool:
        """Per-sample draws with a certified finite variance."""
        return self.per_sample and self.variance_certified

    def survival(self, k: int) -> float:
        """:math:`P(N \\geq k)` of the number of extra terms."""
        if k <= 0:
            return 1.0
        if self.distribution == "geometric":
            return (1 - self.p) ** (k - 1)
        cdf = sum(math.exp(-self.lam) * self.lam**i / math.factorial(i) for i in range(k))
        return max(1.0 - cdf, 1e-300)

    def sample_extra_terms(self, batch: int = 1) -> Tensor:
        """Numbers of extra terms (batch,), int64, drawn from :attr:`generator`."""
        g = self.generator
        if self.distribution == "geometric":
            draws = torch.empty(batch, dtype=torch.float64).geometric_(self.p, generator=g)
        else:
            rates = torch.full((batch,), float(self.lam), dtype=torch.float64)
            draws = torch.poisson(rates, generator=g)
        return draws.long()

    def describe(self) -> str:
        return self.describe_steps([self])

    @staticmethod
    def describe_steps(estimators: list[RussianRouletteLogDet]) -> str:
        """One line for the roulettes of several steps, which differ only in p (chosen
        from each step's bound) and share every other setting."""
        first = estimators[0]
        ps = sorted({e.p for e in estimators})
        p = f"p={ps[0]:.3g}" if len(ps) == 1 else f"p={ps[0]:.3g}..{ps[-1]:.3g}"
        extra = f"geometric {p}" if first.distribution == "geometric" else f"poisson {first.lam:g}"
        if all(e.variance_certified for e in estimators):
            bounds = max(e.lipschitz for e in estimators)
            variance = f"variance finite: p from certified Lip <= {bounds:.3g}"
        else:
            variance = "variance not certified finite"
        draws = "per-sample draws" if first.per_sample else "one draw per batch"
        return (
            f"Russian roulette, {first.n_exact} exact terms + {extra}, {draws}, "
            f"{first.n_probes} {first.probe} probe (unbiased; {variance})"
        )

    def term_weights(self, batch: int) -> Tensor:
        extra = self.sample_extra_terms(batch if self.per_sample else 1).expand(batch)
        counts = (self.n_exact + extra).clamp(max=self.max_terms)
        n = int(counts.max())
        k = torch.arange(1, n + 1)
        inverse_survival = torch.tensor(
            [1.0 / self.survival(j - self.n_exact) for j in k.tolist()], dtype=torch.float64
        )
        keep = k[:, None] <= counts[None, :]
        return torch.where(keep, inverse_survival[:, None], 0.0)

    def extra_repr(self) -> str:
        return (
            f"n_exact={self.n_exact}, distribution={self.distribution!r}, p={self.p:.4g}, "
            f"lam={self.lam}, lipschitz={self.lipschitz}, per_sample={self.per_sample}, "
            f"n_probes={self.n_probes}, probe={self.probe!r}, gradient={self.gradient!r}, "
            f"memory_efficient={self.memory_efficient}"
        )


class _MemoryEfficientLogDet(torch.autograd.Function):
    """Computes the log-det's gradients in the forward pass and frees its graph.

    Only the branch's own graph is kept for the backward of ``g(x)``; the graph
    of the log-det estimate (which grows with the number of terms under
    ``gradient="backprop"``) is freed before the forward pass returns.
    """

    @staticmethod
    def forward(ctx, estimator, weights, branch, x, *params):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            gx = branch(x_in)
            logdet = estimator.estimate(gx, x_in, create_graph=True, weights=weights)
            grads = torch.autograd.grad(
                logdet.sum(), (x_in, *params), retain_graph=True, allow_unused=True
            )
        grads = [
            torch.zeros_like(t) if g is None else g
            for g, t in zip(grads, (x_in, *params), strict=True)
        ]
        ctx.gx, ctx.x, ctx.params = gx, x_in, params
        ctx.save_for_backward(*grads)
        return gx.detach(), logdet.detach()

    @staticmethod
    def backward(ctx, grad_gx, grad_logdet):
        grad_x, *grad_params = ctx.saved_tensors
        scale = grad_logdet
        if grad_params and not torch.allclose(scale, scale[:1].expand_as(scale)):
            raise RuntimeError(
                "the memory-efficient log-det backward needs the same weight on every sample's "
                "log-det (a mean or sum over the batch); use memory_efficient=False otherwise"
            )
        shape = (-1,) + (1,) * (grad_x.dim() - 1)
        grad_x = grad_x * scale.reshape(shape)
        grad_params = [g * scale[0] for g in grad_params]
        if grad_gx is not None:
            with torch.enable_grad():
                inputs = (ctx.x, *ctx.params)
                dg = torch.autograd.grad(ctx.gx, inputs, grad_gx, allow_unused=True)
            grad_x = grad_x + dg[0] if dg[0] is not None else grad_x
            grad_params = [
                g + d if d is not None else g for g, d in zip(grad_params, dg[1:], strict=True)
            ]
        ctx.gx = ctx.x = ctx.params = None
        return (None, None, None, grad_x, *grad_params)


ESTIMATORS = {"series": PowerSeriesLogDet, "roulette": RussianRouletteLogDet, "exact": ExactLogDet}


def _constructor_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The named keyword parameters of estimator ``name``'s constructor."""
    if name not in ESTIMATORS:
        raise ValueError(
            f"unknown estimator {name!r}; valid estimators: {', '.join(ESTIMATORS)}"
            " or a LogDetEstimator instance"
        )
    params = inspect.signature(ESTIMATORS[name].__init__).parameters.items()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {k: p for k, p in params if k != "self" and p.kind not in variadic}


def estimator_defaults(name: str) -> dict[str, object]:
    """The default value of each option of estimator ``name`` that has one.

    Examples:
        >>> estimator_defaults("series")["gradient"]
        'neumann'
    """
    params = _constructor_parameters(name).items()
    return {k: p.default for k, p in params if p.default is not inspect.Parameter.empty}


def estimator_options(name: str) -> set[str]:
    """Keyword options :func:`make_estimator` accepts for estimator ``name``."""
    names = set(_constructor_parameters(name)) - {"n_exact"}
    # n_terms, n_probes and lipschitz are accepted by every estimator (those that do not
    # use them ignore them), so that one configuration can switch estimators.
    return names | {"n_terms", "n_probes", "lipschitz"}


def make_estimator(name: str | LogDetEstimator, **options) -> LogDetEstimator:
    r"""Builds an estimator by name: ``"series"``, ``"roulette"`` or ``"exact"``.

    ``n_terms`` is the number of series terms (``series``) or of exact leading terms
    (``roulette``); the other options are the estimator's constructor arguments. An
    estimator instance is returned as is (no options allowed).

    Examples:
        >>> est = make_estimator("roulette", n_terms=3, lipschitz=0.9)
        >>> est.n_exact, round(est.p, 3), est.variance_certified
        (3, 0.131, True)
    """
    if isinstance(name, LogDetEstimator):
        if options:
            raise ValueError(f"options {sorted(options)} given with an estimator instance")
        return name
    valid = estimator_options(name)
    unknown = set(options) - valid
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(sorted(unknown))} for estimator {name!r}; "
            f"valid options: {', '.join(sorted(valid))}"
        )
    if name == "roulette" and "n_terms" in options:
        options["n_exact"] = options.pop("n_terms")
    if name != "roulette":
        options.pop("lipschitz", None)
    if name == "exact":
        options.pop("n_terms", None)
        options.pop("n_probes", None)
    return ESTIMATORS[name](**options)
