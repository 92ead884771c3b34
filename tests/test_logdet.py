import copy
import math
import subprocess
import sys

import pytest
import torch
from conftest import dense_jacobian_of

from flowattn import invertible_attention
from flowattn.logdet import (
    ESTIMATORS,
    ExactLogDet,
    PowerSeriesLogDet,
    RussianRouletteLogDet,
    estimator_defaults,
    estimator_options,
    make_estimator,
    sample_probes,
    series_truncation_bound,
)
from flowattn.nn.conv_branch import ConvResidualBranch
from flowattn.transforms import KINDS, PAPER_KINDS, ResidualTransform

# Paper kinds are not contractions in general; at this input scale their series converge
# (checked in each test from the dense Jacobian).
SCALE = {kind: (0.1 if kind in PAPER_KINDS else 1.0) for kind in KINDS}


def _branch_and_input(kind, dtype=torch.float64, shape=(2, 4, 4, 4)):
    step = invertible_attention(kind, shape[1]).to(dtype)
    x = torch.randn(shape, dtype=dtype) * SCALE[kind]
    return step.branch, x


@pytest.mark.parametrize("kind", KINDS)
def test_exact_matches_jacrev(kind):
    branch, x = _branch_and_input(kind)
    _, logdet = ExactLogDet()(branch, x)
    jac = dense_jacobian_of(branch, x)
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype)
    reference = torch.linalg.slogdet(eye + jac).logabsdet
    assert logdet.shape == (2,)
    torch.testing.assert_close(logdet, reference, rtol=0, atol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_terms", [1, 3, 8])
def test_truncated_series_within_bound(kind, n_terms):
    branch, x = _branch_and_input(kind)
    jac = dense_jacobian_of(branch, x)
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype)
    exact = torch.linalg.slogdet(eye + jac).logabsdet
    lips = torch.linalg.matrix_norm(jac, ord=2)
    assert (lips < 1).all(), "precondition: the series converges at this input"
    _, series = PowerSeriesLogDet(n_terms=n_terms, probe="basis")(branch, x)
    series = series.detach()
    for b in range(x.shape[0]):
        bound = series_truncation_bound(float(lips[b]), n_terms, jac.shape[-1])
        assert abs(float(series[b] - exact[b])) <= bound + 1e-12


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_series_is_unbiased_for_the_truncated_series(probe):
    branch, x = _branch_and_input("external")
    x = x[:1].expand(4000, *x.shape[1:]).contiguous()
    _, reference = PowerSeriesLogDet(n_terms=3, probe="basis")(branch, x[:1])
    _, draws = PowerSeriesLogDet(n_terms=3, probe=probe)(branch, x)
    reference, draws = reference.detach(), draws.detach()
    stderr = draws.std() / math.sqrt(draws.numel())
    assert abs(float(draws.mean() - reference[0])) <= 4 * float(stderr) + 1e-12


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("distribution", ["geometric", "poisson"])
def test_russian_roulette_is_unbiased(kind, distribution):
    branch, x = _branch_and_input(kind)
    x = x[:1]
    jac = dense_jacobian_of(branch, x)
    assert float(torch.linalg.matrix_norm(jac, ord=2).max()) < 1
    exact = float(ExactLogDet()(branch, x)[1][0].detach())
    estimator = RussianRouletteLogDet(n_exact=1, distribution=distribution, p=0.5, lam=1.0)
    batch = x.expand(16, *x.shape[1:])
    means = torch.stack([estimator(branch, batch)[1].mean() for _ in range(150)]).detach()
    stderr = means.std() / math.sqrt(means.numel())
    assert abs(float(means.mean()) - exact) <= 4 * float(stderr)


def test_roulette_weights_follow_survival_function():
    est = RussianRouletteLogDet(n_exact=2, distribution="geometric", p=0.25)
    assert est.survival(0) == 1.0
    assert est.survival(3) == pytest.approx(0.75**2)
    pois = RussianRouletteLogDet(n_exact=0, distribution="poisson", lam=2.0)
    assert pois.survival(1) == pytest.approx(1 - math.exp(-2.0))


def _grads(step, x, seed):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    y, logdet = step(x)
    loss = (y**2).mean() - logdet.mean()
    params = [p for p in step.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, [x, *params])


@pytest.mark.parametrize("kind", ["external", "l2", "embedded_gaussian"])
def test_neumann_gradient_equals_backprop_with_exact_traces(kind):
    plain = invertible_attention(kind, 4, n_terms=4, probe="basis", gradient="backprop").double()
    neumann = invertible_attention(kind, 4, n_terms=4, probe="basis", gradient="neumann").double()
    neumann.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64) * SCALE[kind]
    for a, b in zip(_grads(plain, x, 0), _grads(neumann, x, 0), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "estimator, options",
    [
        ("series", {"gradient": "backprop"}),
        ("series", {"gradient": "neumann"}),
        ("roulette", {"distribution": "geometric"}),
    ],
)
@pytest.mark.parametrize("kind", ["external", "l2", "dot"])
def test_memory_efficient_backward_matches_plain(kind, estimator, options, device):
    plain = invertible_attention(kind, 4, estimator=estimator, n_terms=3, **options)
    efficient = invertible_attention(
        kind, 4, estimator=estimator, n_terms=3, memory_efficient=True, **options
    )
    efficient.load_state_dict(plain.state_dict())
    plain, efficient = (s.to(device=device, dtype=torch.float64) for s in (plain, efficient))
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64, device=device) * SCALE[kind]
    for a, b in zip(_grads(plain, x, 7), _grads(efficient, x, 7), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("estimator", ["series", "roulette"])
def test_memory_efficient_backward_matches_plain_with_lipswish_convolutions(estimator, device):
    """The memory-efficient estimator's gradients through a LipSwish convolution
    branch (LipSwish evaluated as SiLU with its slopes folded into the convolutions)
    are the plain backward's."""
    branch = ConvResidualBranch(3, hidden=6, coeff=0.9, activation="lipswish")
    options = {"gradient": "neumann"} if estimator == "series" else {}
    plain, efficient = (
        ResidualTransform(
            copy.deepcopy(branch),
            make_estimator(estimator, n_terms=3, memory_efficient=flag, **options),
        ).to(device=device, dtype=torch.float64)
        for flag in (False, True)
    )
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64, device=device)
    for a, b in zip(_grads(plain, x, 7), _grads(efficient, x, 7), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_memory_efficient_rejects_per_sample_weights():
    step = invertible_attention("external", 4, memory_efficient=True).double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    _, logdet = step(x)
    with pytest.raises(RuntimeError, match="same weight"):
        (logdet * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum().backward()


def test_eval_mode_builds_no_graph():
    step = invertible_attention("l2", 4)
    with torch.no_grad():
        y, logdet = step(torch.randn(2, 4, 4, 4))
    assert not y.requires_grad and not logdet.requires_grad


def test_probes_and_bad_arguments():
    x = torch.zeros(3, 2, 2)
    v = sample_probes(x, 5, "rademacher")
    assert v.shape == (5, 3, 2, 2) and set(v.unique().tolist()) == {-1.0, 1.0}
    assert sample_probes(x, 1, "basis").shape == (4, 3, 2, 2)
    with pytest.raises(ValueError, match="rademacher"):
        sample_probes(x, 1, "uniform")
    with pytest.raises(ValueError, match="n_terms"):
        PowerSeriesLogDet(n_terms=0)
    with pytest.raises(ValueError, match="geometric"):
        RussianRouletteLogDet(distribution="binomial")
    with pytest.raises(ValueError, match="converges"):
        series_truncation_bound(1.0, 3, 4)


def test_exact_logdet_is_right_after_set_num_threads():
    # torch 2.15's MKL returns wrong batched LU factorisations (D >= 192) once
    # torch.set_num_threads has been called; the exact estimator must not depend on them.
    # In a subprocess: the call changes the whole process.
    code = (
        "import torch\n"
        "from flowattn.logdet import ExactLogDet\n"
        "torch.set_num_threads(2)\n"
        "torch.manual_seed(0)\n"
        "w = 0.05 * torch.randn(192, 192, dtype=torch.float64)\n"
        "x = torch.randn(3, 192, dtype=torch.float64)\n"
        "_, logdet = ExactLogDet()(lambda v: v @ w.T, x)\n"
        "reference = torch.linalg.slogdet(torch.eye(192, dtype=torch.float64) + w).logabsdet\n"
        "print(float((logdet - reference).abs().max()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-9


class _NegativeScaling(torch.nn.Module):
    """g(x) = -c x: every eigenvalue of J_g at -c, where the truncated series is most
    optimistic and the roulette's tail heaviest."""

    def __init__(self, c: float = 0.9):
        super().__init__()
        self.c = c

    def forward(self, x):
        return -self.c * x

    def lipschitz_bound(self) -> float:
        return self.c


def _conv_branch_near_its_bound(channels: int = 4, seed: int = 0):
    """A convolutional branch at its certified bound 0.9 whose Jacobian has eigenvalues
    near -0.9 (like the trained branches that exploited the series' bias): g(x) ~ -0.9 x
    plus small random taps, inputs kept where ELU is linear."""
    generator = torch.Generator().manual_seed(seed)
    branch = ConvResidualBranch(channels, channels, coeff=0.9).double()
    eye = torch.eye(channels, dtype=torch.float64)
    with torch.no_grad():
        for conv, sign in zip(branch.convs, (1.0, 1.0, -1.0), strict=True):
            noise = torch.randn(conv.weight.shape, generator=generator, dtype=torch.float64)
            conv.weight.copy_(0.004 * noise)
            k = conv.weight.shape[-1] // 2
            conv.weight[:, :, k, k] += sign * eye
            conv.bias.zero_()
    x = 3.0 + 0.3 * torch.randn(48, channels, 4, 4, generator=generator, dtype=torch.float64)
    return branch, x


def _coverage(estimator, branch, x, exact, calls):
    """Fraction of calls whose mean ± 2 SE (over the batch's images) holds the exact mean,
    and the z-score of the grand mean's error."""
    hits, means = 0, []
    for _ in range(calls):
        _, logdet = estimator(branch, x)
        diff = (logdet - exact).detach().double()
        mean, se = float(diff.mean()), float(diff.std() / math.sqrt(diff.numel()))
        hits += abs(mean) <= 2 * se
        means.append(mean)
    means = torch.tensor(means)
    z = float(means.mean() / (means.std() / math.sqrt(calls)))
    return hits / calls, z


def test_conv_branch_near_bound_precondition():
    branch, x = _conv_branch_near_its_bound()
    eig = torch.linalg.eigvals(dense_jacobian_of(branch, x[:4]))
    assert branch.lipschitz_bound((4, 4)) <= 0.9
    assert eig.abs().max() >= 0.85 and eig.real.min() <= -0.85


@pytest.mark.parametrize("case", ["negative_scaling", "conv_near_bound"])
def test_roulette_error_bars_cover_the_exact_value(case):
    """With per-sample draws and p from the certified bound, ±2 SE intervals over a
    batch's images hold the exact value about 95% of the time and the mean is unbiased,
    on branches at spectral radius ~0.9 with negative eigenvalues."""
    if case == "negative_scaling":
        branch, x = _NegativeScaling(0.9), torch.randn(64, 16, dtype=torch.float64)
        exact = torch.full((64,), 16 * math.log(0.1), dtype=torch.float64)
    else:
        branch, x = _conv_branch_near_its_bound()
        exact = ExactLogDet()(branch, x)[1]
    estimator = RussianRouletteLogDet(lipschitz=0.9)
    assert estimator.per_sample and estimator.variance_certified
    coverage, z = _coverage(estimator, branch, x, exact, calls=300)
    assert 0.88 <= coverage <= 0.99, coverage
    assert abs(z) < 4, z


def test_shared_roulette_draws_give_invalid_error_bars():
    """The test above has power: one draw shared by the batch (the old behaviour) makes
    images dependent and the ±2 SE intervals miss far more often than 5%."""
    branch, x = _NegativeScaling(0.9), torch.randn(64, 16, dtype=torch.float64)
    exact = torch.full((64,), 16 * math.log(0.1), dtype=torch.float64)
    shared = RussianRouletteLogDet(lipschitz=0.9, per_sample=False)
    coverage, _ = _coverage(shared, branch, x, exact, calls=100)
    assert coverage < 0.5


def test_roulette_draws_are_independent_per_sample():
    est = RussianRouletteLogDet(n_exact=2, lipschitz=0.9)
    weights = est.term_weights(500)
    counts = (weights > 0).sum(0)
    assert weights.shape == (int(counts.max()), 500)
    assert (counts >= 3).all() and len(counts.unique()) > 5  # 2 exact + N >= 1, varying
    # E[number of extra terms] = 1 / p for a geometric N >= 1
    assert abs(float((counts - 2).double().mean()) - 1 / est.p) < 5 * (1 / est.p) / math.sqrt(500)
    # a kept term k carries 1 / P(N >= k - n_exact)
    col = weights[:, 0][weights[:, 0] > 0]
    expected = torch.tensor([1.0 / est.survival(k - 2) for k in range(1, len(col) + 1)])
    torch.testing.assert_close(col, expected.double())
    shared = RussianRouletteLogDet(lipschitz=0.9, per_sample=False).term_weights(7)
    assert (shared == shared[:, :1]).all()


def test_roulette_distribution_is_chosen_from_the_bound():
    from flowattn.logdet import roulette_probability

    for lip in (0.5, 0.9, 0.97, 0.99):
        p = roulette_probability(lip)
        assert 1 - p >= lip**2 and (1 - p) ** 3 >= lip**4 - 1e-12  # finite 2nd and 4th moments
        assert RussianRouletteLogDet(lipschitz=lip).p == p
    with pytest.raises(ValueError, match="variance infinite"):
        RussianRouletteLogDet(lipschitz=0.9, p=0.5)
    assert not RussianRouletteLogDet(p=0.5).variance_certified  # no bound: not certified
    assert not RussianRouletteLogDet(lipschitz=0.9, distribution="poisson").variance_certified
    assert "variance not certified" in RussianRouletteLogDet().describe()
    with pytest.raises(ValueError, match="lipschitz"):
        RussianRouletteLogDet(lipschitz=1.0)


def test_truncated_series_is_optimistic_at_negative_eigenvalues_within_its_bound():
    branch, x = _NegativeScaling(0.9), torch.randn(4, 16, dtype=torch.float64)
    exact = 16 * math.log(0.1)
    _, series = PowerSeriesLogDet(n_terms=5)(branch, x)
    error = float(series[0]) - exact
    assert error > 0  # over-estimates log|det|: an optimistic likelihood
    assert error <= series_truncation_bound(0.9, 5, 16) + 1e-9
    # the bound is tight here: every eigenvalue sits at -L
    assert error == pytest.approx(series_truncation_bound(0.9, 5, 16), rel=1e-6)


@pytest.mark.parametrize("kind", ["external", "l2", "conv"])
def test_evaluation_that_drops_finished_samples_matches_the_full_batch(kind):
    """Without a graph, samples whose own number of terms is reached leave the batch;
    the estimate equals the full-batch one with the same draws and probes."""
    if kind == "conv":
        branch, x = _conv_branch_near_its_bound()
    else:
        branch, x = _branch_and_input(kind, shape=(40, 4, 4, 4))
    estimator = RussianRouletteLogDet(lipschitz=0.9, n_probes=2)
    torch.manual_seed(1)
    weights = estimator.term_weights(x.shape[0])
    assert len((weights != 0).sum(0).unique()) > 3
    torch.manual_seed(2)
    gx, fast = estimator._evaluate(branch, x, weights)
    torch.manual_seed(2)
    with torch.enable_grad():
        x_in = x.clone().requires_grad_(True)
        full = estimator.estimate(branch(x_in), x_in, create_graph=False, weights=weights)
    torch.testing.assert_close(fast, full.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, branch(x).detach())


def test_the_series_gradient_defaults_to_neumann():
    assert PowerSeriesLogDet().gradient == "neumann"
    assert invertible_attention("external", 4).estimator.gradient == "neumann"


@pytest.mark.parametrize("gradient", ["neumann", "backprop"])
def test_series_gradients_are_unbiased_near_the_bound(gradient):
    """With random probes, both gradients of the 4-term series are unbiased for its
    exact-trace gradient, on the branch near its bound (Jacobian norm about 0.86 at this
    input, eigenvalues near -0.86; the input is moved to where ELU bends, so that the
    log-det depends on it). Each copy of the input draws its own probe, so the input
    gradients of one call are independent draws; projected on a fixed direction, their
    mean is within 4 standard errors of the exact value, which the 3-term series' is not."""
    branch, _ = _conv_branch_near_its_bound()
    generator = torch.Generator().manual_seed(1)
    x0 = 0.5 + torch.randn(1, 4, 4, 4, generator=generator, dtype=torch.float64)
    assert 0.85 < float(torch.linalg.matrix_norm(dense_jacobian_of(branch, x0), ord=2)[0]) <= 0.9
    direction = torch.randn(x0.shape, generator=generator, dtype=torch.float64)

    def projected_gradients(n_terms, n, probe="rademacher"):
        estimator = PowerSeriesLogDet(n_terms=n_terms, probe=probe, gradient=gradient)
        step = ResidualTransform(branch, estimator)
        x = x0.expand(n, *x0.shape[1:]).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(step(x)[1].sum(), x)
        return (grad * direction).flatten(1).sum(1)

    exact, shorter = (float(projected_gradients(n, 1, "basis")[0]) for n in (4, 3))
    draws = projected_gradients(4, 4000)
    stderr = float(draws.std()) / math.sqrt(draws.numel())
    assert abs(float(draws.mean()) - exact) <= 4 * stderr
    assert abs(shorter - exact) > 20 * stderr


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimator_defaults_are_what_a_default_estimator_holds(name):
    """``estimator_defaults`` reads the constructors' defaults: an estimator built without
    options holds them (None ones are resolved at construction), and every option with a
    default is one make_estimator accepts."""
    defaults = estimator_defaults(name)
    built = ESTIMATORS[name]()
    for option, value in defaults.items():
        if value is not None and hasattr(built, option):
            assert getattr(built, option) == value, option
    assert set(defaults) - {"n_exact"} <= estimator_options(name)
    if name != "exact":
        assert defaults["gradient"] == "neumann"


@pytest.mark.parametrize(
    "estimator, lipschitz, bias, certified",
    [
        (ExactLogDet(), None, 0.0, True),
        (PowerSeriesLogDet(n_terms=3), 0.5, series_truncation_bound(0.5, 3, 10), True),
        (PowerSeriesLogDet(n_terms=3), None, math.inf, True),
        (RussianRouletteLogDet(lipschitz=0.9), 0.9, 0.0, True),
        (RussianRouletteLogDet(lipschitz=0.9, per_sample=False), 0.9, 0.0, False),
        (RussianRouletteLogDet(), None, math.inf, False),
        (RussianRouletteLogDet(distribution="poisson"), 0.5, 0.0, False),
    ],
)
def test_each_estimator_states_its_guarantees(estimator, lipschitz, bias, certified):
    """The bias bound (nats, one step of 10 values) and whether a standard error over
    images of its values is valid: independent per-image draws with finite variance."""
    assert estimator.bias_bound(lipschitz, 10) == bias
    assert estimator.error_bar_certified is certified


def test_series_bias_bound_holds_against_the_exact_log_det():
    """A linear branch g(x) = -L x at L = 0.9 (eigenvalues at the bound, where the
    truncated series errs most): |series - exact| <= bias_bound, and is near it."""
    lipschitz, dims = 0.9, 6
    x = torch.zeros(1, dims, dtype=torch.float64)
    est = PowerSeriesLogDet(n_terms=4, probe="basis")
    _, series = est(lambda v: -lipschitz * v, x)
    exact = dims * math.log1p(-lipschitz)
    error = abs(float(series) - exact)
    assert error <= est.bias_bound(lipschitz, dims) * (1 + 1e-12)
    assert error >= 0.99 * est.bias_bound(lipschitz, dims)
