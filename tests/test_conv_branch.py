import copy
import functools
import io
import pickle

import pytest
import torch
from conftest import count_host_reads, dense_jacobian_of, stress_weights

from flowattn.lipschitz import ConvBoundMemory
from flowattn.logdet import ExactLogDet
from flowattn.nn.conv_branch import ACTIVATIONS, ConvResidualBranch, LipSwish
from flowattn.transforms import ResidualTransform


def test_lipswish_is_1_lipschitz():
    act = LipSwish(3).double()
    with torch.no_grad():
        act.rho.copy_(torch.tensor([-5.0, 0.5, 8.0]))  # beta from ~0 to ~8
    x = torch.linspace(-20, 20, 20001, dtype=torch.float64).reshape(1, 1, -1).expand(1, 3, -1)
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(act(x[..., None]).sum(), x)
    assert grad.abs().max() <= 1.0


def test_lipswish_matches_its_formula_with_and_without_autograd():
    """The in-place evaluation is x sigmoid(beta x) / 1.1 bit for bit, with or without
    autograd, and its first and second derivatives (the series' double backward) are
    the formula's."""
    act = LipSwish(3).double()
    with torch.no_grad():
        act.rho.copy_(torch.tensor([-2.0, 0.5, 3.0]))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)

    def formula(x, rho):
        beta = torch.nn.functional.softplus(rho).reshape(1, -1, 1, 1)
        return x * torch.sigmoid(beta * x) / 1.1

    with torch.no_grad():
        assert torch.equal(act(x), formula(x, act.rho))
    assert torch.equal(act(x), formula(x, act.rho))
    rho = act.rho.detach().clone().requires_grad_(True)
    torch.autograd.gradcheck(_lipswish_with_rho, (x, rho))
    torch.autograd.gradgradcheck(_lipswish_with_rho, (x, rho))


def _lipswish_with_rho(x: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """LipSwish of x with the given rho (a tensor gradcheck can vary)."""
    act = LipSwish(rho.shape[0])
    del act.rho
    act.rho = rho
    return act(x)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("size", [4, 7])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_certified_bound_holds(activation, size, scale):
    """Exact Jacobian spectral norm (jacrev, float64) never exceeds the certificate."""
    g = ConvResidualBranch(2, hidden=6, coeff=0.9, activation=activation).double()
    stress_weights(g, 5.0)
    bound = g.lipschitz_bound((size, size))
    assert bound <= 0.9
    x = torch.randn(3, 2, size, size, dtype=torch.float64) * scale
    jac = dense_jacobian_of(g, x)
    norms = torch.linalg.matrix_norm(jac, ord=2)
    assert (norms <= bound + 1e-9).all()
    # the rescaling is active: the bound is reached up to the activations' slack
    assert bound > 0.899


def test_adversarial_ascent_stays_below_bound():
    g = ConvResidualBranch(2, hidden=6, coeff=0.9, activation="elu").double()
    stress_weights(g, 5.0)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.1)
    for _ in range(30):
        jac = torch.func.jacrev(lambda t: g(t[None])[0])(x[0]).reshape(50, 50)
        loss = -torch.linalg.matrix_norm(jac, ord=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert -loss.item() <= g.lipschitz_bound((5, 5)) + 1e-9


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_residual_step_logdet_and_inverse(activation):
    g = ConvResidualBranch(2, hidden=4, coeff=0.9, activation=activation).double()
    stress_weights(g, 5.0)
    step = ResidualTransform(g, ExactLogDet(), strict=True)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    y, logabsdet = step(x)
    jac = dense_jacobian_of(lambda t: t + g(t), x)
    assert torch.allclose(logabsdet, torch.linalg.slogdet(jac).logabsdet, atol=1e-9)
    x_back, _ = step.inverse(y)
    assert (x_back - x).abs().max() < 1e-10


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_calls_outside_a_certified_block_follow_in_place_updates(activation):
    """Outside ``certified_once`` every call certifies the current weights: an in-place
    change of a parameter (an optimiser step) shows in the next call, with or without
    autograd, and both paths agree."""
    g = ConvResidualBranch(2, hidden=4, activation=activation)
    x = torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        before = g(x)
        for parameter in (g.convs[0].weight, *g.acts[0].parameters()):
            parameter.add_(1.0)
            after = g(x)
            assert not torch.equal(before, after)
            before = after
    assert torch.allclose(g(x), after)


def test_a_block_without_autograd_computes_the_weights_once(monkeypatch):
    """Entered without autograd (a fixed-point inverse), the block's calls apply the
    weights computed on entry: no LipSwish slope is computed again (the first scales
    the input, the others are folded), and the outputs are the plain calls'."""
    g = ConvResidualBranch(2, hidden=4, activation="lipswish")
    x = torch.randn(1, 2, 4, 4)
    calls = []
    slope = LipSwish.slope
    monkeypatch.setattr(LipSwish, "slope", lambda act: calls.append(act) or slope(act))
    with torch.no_grad():
        plain = g(x)
        calls.clear()
        with g.certified_once((4, 4)):
            assert len(calls) == 3  # every activation's, once, on entry
            inside = [g(x) for _ in range(3)]
        assert len(calls) == 3
    for y in inside:
        torch.testing.assert_close(y, plain, rtol=1e-6, atol=1e-7)


def test_certified_blocks_nest():
    """An inner block (an inverse inside a model's evaluation) holds inside it and gives
    the outer one back when it ends."""
    g = ConvResidualBranch(2, hidden=4)
    with torch.no_grad(), g.certified_once((4, 4)):
        outer = g._fixed
        with g.certified_once((6, 6)):
            assert g._fixed.spatial == (6, 6)
        assert g._fixed is outer
    assert g._fixed is None


def test_pickle_and_errors():
    g = ConvResidualBranch(3, hidden=4)
    with torch.no_grad():
        g(torch.randn(1, 3, 4, 4))
    g2 = pickle.loads(pickle.dumps(g))
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(g(x), g2(x))
    buffer = io.BytesIO()
    torch.save(g.state_dict(), buffer)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        g(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="input shape"):
        g.lipschitz_bound()  # the bound depends on the size; no size is remembered
    with pytest.raises(ValueError, match="activation"):
        ConvResidualBranch(3, hidden=4, activation="relu")
    with pytest.raises(ValueError, match="coeff"):
        ConvResidualBranch(3, hidden=4, coeff=1.0)


def test_a_training_call_never_reads_a_value_back_to_the_host():
    """Forward and backward of a branch, certificate included, run without any scalar
    read (``.item()``, ``int()``, ``float()`` of a tensor), each of which would wait
    for an accelerator to finish before the next kernel could be queued. The
    certificates' warm starts read a few (they pick the frequencies to eigensolve): here
    they are switched off, which is how a user gets a training call with none."""
    g = ConvResidualBranch(4, hidden=8, coeff=0.9)
    for memory in g._bound_memory:
        memory.warm_start = False
    x = torch.randn(2, 4, 6, 6)
    assert count_host_reads(lambda: g(x).square().sum().backward()) == 0
    assert count_host_reads(lambda: g(x).square().sum().backward()) == 0


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_certified_once_gives_the_same_values_and_gradients(activation):
    """Inside ``certified_once`` the weights computed on entry serve every call on that
    size: outputs and parameter gradients equal those of a plain call (float64); other
    sizes still compute their own certificate; after the block nothing is kept."""
    torch.manual_seed(0)
    g = ConvResidualBranch(3, hidden=6, coeff=0.9, activation=activation).double()
    stress_weights(g, 5.0)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    other = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    plain = torch.autograd.grad(g(x).sin().sum(), list(g.parameters()))
    plain_other = g(other)
    with g.certified_once((5, 5)):
        once = torch.autograd.grad(g(x).sin().sum(), list(g.parameters()))
        torch.testing.assert_close(g(other), plain_other, rtol=0, atol=0)
    for a, b in zip(plain, once, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert g._fixed is None


def test_a_training_forward_certifies_before_the_flow_runs(monkeypatch):
    """``DensityModel.log_prob`` with autograd certifies every branch's 3x3 convolutions
    before the first branch runs (no activation is held yet), once each; the log-probs
    and gradients equal those of branches that certify at each call, whose
    certificates interleave with the flow."""
    from flowattn import lipschitz
    from flowattn.models import build_model
    from flowattn.nn import conv_branch

    torch.manual_seed(0)
    model = build_model("iresnet", image_shape=(3, 8, 8), size="tiny", estimator="series")
    branches = [m for m in model.modules() if isinstance(m, ConvResidualBranch)]
    x = torch.rand(2, 3, 8, 8)
    events = []

    def certificate(weight, spatial, memory=None):
        events.append("certificate")
        return lipschitz.conv_spectral_upper_bound(weight, spatial, memory)

    def forward(self, h):
        events.append("branch")
        return ConvResidualBranch.forward(self, h)

    monkeypatch.setattr(conv_branch, "conv_spectral_upper_bound", certificate)
    for branch in branches:
        monkeypatch.setattr(branch, "forward", forward.__get__(branch))

    def run():
        events.clear()
        torch.manual_seed(1)
        log_prob = model.log_prob(x)
        params = list(model.parameters())
        return log_prob, torch.autograd.grad(log_prob.sum(), params, allow_unused=True)

    log_prob, grads = run()
    first_branch = events.index("branch")
    assert events[:first_branch] == ["certificate"] * (2 * len(branches))
    assert "certificate" not in events[first_branch:]
    monkeypatch.setattr(ConvResidualBranch, "certified_once", None)  # certify per call
    log_prob_plain, grads_plain = run()
    assert "certificate" in events[events.index("branch") :]
    torch.testing.assert_close(log_prob, log_prob_plain, rtol=0, atol=0)
    for a, b in zip(grads, grads_plain, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _composed(g: ConvResidualBranch, x: torch.Tensor) -> torch.Tensor:
    """g's layers written out one by one: conv3 . act . conv2 . act . conv1 . act with
    the certified weights (LipSwish as the module computes it, with its division)."""
    scales = g._scales(g._norms(tuple(x.shape[-2:])))
    h = x
    for act, conv, scale in zip(g.acts, g.convs, scales, strict=True):
        h = torch.nn.functional.conv2d(act(h), conv.weight * scale, conv.bias, padding=conv.padding)
    return h


def _series_like_gradients(g, params, x: torch.Tensor) -> list[torch.Tensor]:
    """Gradients, with respect to x and ``params``, of u^T J v (one differentiated
    vector-Jacobian product, as the Neumann log-det gradient takes) plus a loss on g(x)."""
    x = x.clone().requires_grad_(True)
    gx = g(x)
    u = torch.ones_like(x)
    v = torch.linspace(-1, 1, x.numel(), dtype=x.dtype, device=x.device).reshape(x.shape)
    (vjp,) = torch.autograd.grad(gx, x, u, create_graph=True)
    loss = (vjp * v).sum() + gx.square().sum()
    return torch.autograd.grad(loss, [x, *params])


@pytest.mark.parametrize("kernel_size", [3, 1])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_the_branch_is_its_layers_composed(activation, kernel_size, device):
    """g is its layers composed as written with ``F.conv2d`` (with LipSwish, which the
    branch runs as SiLU with the slopes and the division folded into the convolutions,
    and with its 1x1 convolutions run as matrix products), with and without autograd;
    so are its first and second derivatives with respect to the input and every
    parameter (the slopes' included). Outer kernels of size 1 make all three 1x1."""
    g = ConvResidualBranch(
        3, hidden=5, coeff=0.9, activation=activation, kernel_size=kernel_size
    ).double()
    stress_weights(g, 3.0)
    with torch.no_grad():
        for act in g.acts:
            if isinstance(act, LipSwish):
                act.rho.normal_()
    g.to(device)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, device=device)
    h = _composed(g, x)
    torch.testing.assert_close(g(x), h, rtol=1e-12, atol=1e-12)
    strided = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
    torch.testing.assert_close(g(strided), h, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(g(x), h, rtol=1e-12, atol=1e-12)
    params = list(g.parameters())
    expected = _series_like_gradients(functools.partial(_composed, g), params, x)
    for a, b in zip(_series_like_gradients(g, params, x), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rho", [-90.0, -30.0, 0.0, 30.0])
def test_folded_lipswish_slopes_stay_accurate_at_extreme_slopes(rho):
    """The slopes folded into the float32 convolutions (divided by, for the weights
    after them) keep the branch within a few float32 epsilons of its float64 layers,
    from a slope that underflows (softplus(-90): floored at LipSwish.min_slope) to 30."""
    torch.manual_seed(0)
    g = ConvResidualBranch(3, hidden=8, coeff=0.9, activation="lipswish")
    with torch.no_grad():
        for act in g.acts:
            act.rho.fill_(rho)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        reference = _composed(copy.deepcopy(g).double(), x.double())
        error = (g(x).double() - reference).abs().max() / reference.abs().max()
    assert error < 1e-6


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_warm_started_certificates_match_cold_ones_while_training_at_the_bound(activation):
    """A branch trained with Adam (lr 1e-2) on a loss that pushes its Jacobian up, with its
    weights inflated so that every rescaling is active (the certified norms sit at their
    bound): at each step the certificates kept between calls give exactly the scales that
    certificates computed from nothing give."""
    torch.manual_seed(0)
    g = ConvResidualBranch(3, hidden=6, coeff=0.9, activation=activation)
    stress_weights(g, 5.0)
    optimizer = torch.optim.Adam(g.parameters(), lr=1e-2)
    x = torch.randn(4, 3, 6, 6)
    for _ in range(15):
        warm = [float(s.detach()) for s in g._scales(g._norms((6, 6)))]
        state = g.__getstate__()  # the same convolutions, fresh certificate state
        state["_bound_memory"] = [ConvBoundMemory() for _ in g.convs]
        cold = ConvResidualBranch.__new__(ConvResidualBranch)
        cold.__setstate__(state)
        assert [float(s.detach()) for s in cold._scales(cold._norms((6, 6)))] == warm
        assert g._bound_memory[0].vectors(3, (8, 8), x.device) is not None
        assert all(s < 1.0 for s in warm)  # every convolution at its bound
        optimizer.zero_grad()
        (-(g(x) - x.flip(0)).square().mean()).backward()
        optimizer.step()
