import math

import pytest
import torch
import torch.nn.functional as F
from conftest import dense_jacobian_of, stress_weights

from flowattn import invertible_attention
from flowattn.errors import ConfigError
from flowattn.lipschitz import spectral_norm
from flowattn.transforms import (
    KINDS,
    PAPER_KINDS,
    CertifiedPaperAttention,
    ExternalAttention,
    L2SelfAttention,
    PaperAttention,
)

SIZES = {16: (4, 4), 64: (8, 8), 256: (16, 16)}


def _certified_branch(kind, channels=4):
    branch = invertible_attention(kind, channels).branch.double()
    stress_weights(branch)  # every rescaling active: the bound is exactly coeff
    return branch


def _row_l1_of_jacobian(branch, x, row):
    """l1 norm of row `row` of the Jacobian of the flattened branch, per sample."""
    x = x.clone().requires_grad_(True)
    out = branch(x).flatten(1)[:, row].sum()
    (grad,) = torch.autograd.grad(out, x, create_graph=True)
    return grad.flatten(1).abs().sum(1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 12, 8, 8), (2, 1, 4, 4)])
def test_shapes_any_size(kind, shape):
    step = invertible_attention(kind, shape[1])
    y, logdet = step(torch.randn(shape))
    assert y.shape == shape and logdet.shape == (shape[0],)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()


@pytest.mark.parametrize("kind", KINDS)  # the paper kinds certified, the default
@pytest.mark.parametrize("n", sorted(SIZES))
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_certificate_holds_at_random_and_large_inputs(kind, n, scale):
    branch = _certified_branch(kind)
    bound = branch.lipschitz_bound((4, *SIZES[n]))
    assert bound < 1 and bound <= branch.coeff * (1 + 1e-6)
    x = torch.randn(2, 4, *SIZES[n], dtype=torch.float64) * scale
    jac = dense_jacobian_of(branch, x)
    assert float(jac.abs().sum(-1).max()) <= bound


@pytest.mark.parametrize("kind", KINDS)  # the paper kinds certified, the default
@pytest.mark.parametrize("n", sorted(SIZES))
def test_certificate_holds_when_one_pixel_dominates(kind, n):
    branch = _certified_branch(kind)
    x = torch.randn(2, 4, *SIZES[n], dtype=torch.float64) * 0.01
    x[:, :, 0, 0] = torch.tensor([50.0, -50.0, 50.0, 50.0], dtype=torch.float64)
    attn = branch.attention_map(x)
    jac = dense_jacobian_of(branch, x)
    assert float(jac.abs().sum(-1).max()) <= branch.lipschitz_bound((4, *SIZES[n]))
    assert attn.shape[:2] == (2, n)


@pytest.mark.parametrize("kind", KINDS)  # the paper kinds certified, the default
@pytest.mark.parametrize("n", sorted(SIZES))
def test_certificate_holds_where_slope_plus_size_peaks(kind, n):
    """|tanh(x)| = 1/2, where tanh' + |tanh| reaches the 5/4 the paper kinds' bounds use,
    at one pixel, the others saturated with random signs or at the same point."""
    branch = _certified_branch(kind)
    signs = torch.randint(0, 2, (3, 4, *SIZES[n]), dtype=torch.float64) * 2 - 1
    x = 50.0 * signs
    x[0, :, 0, 0] = signs[0, :, 0, 0] * math.atanh(0.5)
    x[1] = signs[1] * math.atanh(0.5)
    jac = dense_jacobian_of(branch, x)
    assert float(jac.abs().sum(-1).max()) <= branch.lipschitz_bound((4, *SIZES[n]))


@pytest.mark.parametrize("kind", KINDS)  # the paper kinds certified, the default
@pytest.mark.parametrize("n", sorted(SIZES))
def test_certificate_holds_at_inputs_maximising_the_jacobian_norm(kind, n):
    """Gradient ascent on the l1 norm of Jacobian rows (each row is one l-inf candidate)."""
    branch = _certified_branch(kind)
    bound = branch.lipschitz_bound((4, *SIZES[n]))
    best = 0.0
    for start_scale in (0.3, 3.0):
        x = (torch.randn(1, 4, *SIZES[n], dtype=torch.float64) * start_scale).requires_grad_(True)
        row = int(torch.randint(0, x.numel(), ()))
        opt = torch.optim.Adam([x], lr=0.1)
        for _ in range(40):
            value = _row_l1_of_jacobian(branch, x, row).sum()
            best = max(best, float(value.detach()))
            opt.zero_grad()
            (-value).backward()
            opt.step()
        jac = dense_jacobian_of(branch, x.detach())
        best = max(best, float(jac.abs().sum(-1).max()))
    assert best <= bound


def test_l2_bound_grows_with_n_and_scale_keeps_it_below_coeff():
    branch = L2SelfAttention(4, coeff=0.9)
    raw = [float(branch._raw_bound(n).detach()) for n in (16, 64, 256, 4096)]
    assert raw == sorted(raw)
    for side in (4, 8, 16, 64):
        assert branch.lipschitz_bound((4, side, side)) <= 0.9 * (1 + 1e-6)


def test_l2_bound_needs_the_input_shape_and_remembers_no_input():
    branch = L2SelfAttention(4)
    with pytest.raises(ValueError, match="input shape"):
        branch.lipschitz_bound()
    branch(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="input shape"):
        branch.lipschitz_bound()  # a forward pass leaves no state behind
    assert branch.lipschitz_bound((4, 4, 4)) <= 0.9 * (1 + 1e-6)
    step = invertible_attention("l2", 4, input_shape=(4, 4, 4))
    assert step.lipschitz_bound() == step.branch.lipschitz_bound((4, 4, 4))
    assert step.lipschitz_bound((4, 8, 8)) == step.branch.lipschitz_bound((4, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        invertible_attention("l2", 4, input_shape=(3, 4, 4))


def test_external_bound_holds_at_many_tokens_with_the_small_images_value():
    """External attention's certificate does not grow with the number of tokens: the
    bound taken at 4x4 images also holds for the Jacobian at 8x8 (64 tokens) and 12x12
    (144), with the weights inflated so that the output scale is clipped."""
    torch.manual_seed(0)
    branch = ExternalAttention(4).double()
    stress_weights(branch, 5.0)
    bound = branch.lipschitz_bound((4, 4, 4))
    for side in (8, 12):
        x = 3 * torch.randn(2, 4, side, side, dtype=torch.float64)
        jac = dense_jacobian_of(branch, x)
        assert float(jac.abs().sum(-1).max()) <= bound * (1 + 1e-9)


@pytest.mark.parametrize("kind", PAPER_KINDS)
def test_faithful_paper_kinds_are_uncertified_and_report_their_jacobian_norm(kind):
    step = invertible_attention(kind, 4, certified=False).double()
    assert step.lipschitz_bound() is None
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    estimate = step.branch.estimate_lipschitz(x, n_iter=100)
    exact = torch.linalg.matrix_norm(dense_jacobian_of(step.branch, x), ord=2)
    assert estimate.shape == (2,)
    torch.testing.assert_close(estimate, exact, rtol=1e-3, atol=1e-8)


def test_paper_dot_is_not_contractive_at_large_inputs():
    """The reason these kinds are uncertified: the Jacobian norm exceeds 1."""
    step = invertible_attention("dot", 8, certified=False).double()
    x = torch.randn(4, 8, 4, 4, dtype=torch.float64) * 10
    assert float(step.branch.estimate_lipschitz(x).max()) > 1


def test_concat_separable_equals_naive():
    branch = PaperAttention(8, "concat").double()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    t = x.flatten(2).transpose(1, 2)
    q, k = branch.theta(t), branch.phi(t)
    n = t.shape[1]
    pairs = torch.cat(
        [q[:, :, None, :].expand(-1, n, n, -1), k[:, None, :, :].expand(-1, n, n, -1)], dim=-1
    )  # (B, N, N, 2C'): the paper's concatenation
    energy = F.elu(branch.concat(pairs)[..., 0])
    naive = energy / (1.5 * energy.sum(dim=1, keepdim=True))
    torch.testing.assert_close(
        branch.attention_map(x), naive.transpose(1, 2), rtol=1e-12, atol=1e-12
    )


def test_gaussian_matches_the_papers_formula():
    branch = PaperAttention(4, "gaussian").double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64) * 0.5
    t = x.flatten(2).transpose(1, 2)
    energy = torch.exp(t @ t.transpose(1, 2))
    reference = energy / (1.5 * energy.sum(dim=1, keepdim=True))
    torch.testing.assert_close(branch.attention_map(x), reference.transpose(1, 2))


def _rescaled(weight: torch.Tensor, coeff: float) -> torch.Tensor:
    """The paper's spectral normalisation: W / max(1, sigma(W) / coeff), sigma exact."""
    return weight / max(1.0, float(torch.linalg.matrix_norm(weight, 2)) / coeff)


def test_faithful_dot_is_the_papers_attention_dot():
    """The paper code's ``Attention_dot`` (convGamma): queries and keys 1x1 maps at 0.9,
    the value map at 0.5, energies ELU(q_i . k_j) normalised by 1.5 times their sum over
    i, then the output 1x1 map at 0.9; written here from that description, as 1x1
    convolutions on the image, with weights large enough that every rescaling acts."""
    torch.manual_seed(0)
    branch = PaperAttention(8, "dot").double()
    stress_weights(branch, 4.0)
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    b, c, h, w = x.shape

    def conv1x1(layer, coeff, inputs):
        weight = _rescaled(layer.weight, coeff)[:, :, None, None]
        return F.conv2d(inputs, weight, layer.bias)

    query = conv1x1(branch.theta, 0.9, x).view(b, -1, h * w).permute(0, 2, 1)
    key = conv1x1(branch.phi, 0.9, x).view(b, -1, h * w)
    energy = F.elu(torch.bmm(query, key))  # (B, N_i, N_j)
    energy = energy / (1.5 * energy.sum(dim=1, keepdim=True))
    value = conv1x1(branch.value, 0.5, x).view(b, c, h * w)
    reference = conv1x1(branch.out, 0.9, torch.bmm(value, energy).view(b, c, h, w))
    with torch.no_grad():
        torch.testing.assert_close(branch(x), reference, rtol=1e-12, atol=1e-12)
        assert float(spectral_norm(branch.value.constrained_weight())) <= 0.5 + 1e-12
    other = PaperAttention(8, "concat")
    assert other.value.rescale.coeff == 0.9


def test_factory_errors_list_valid_choices():
    with pytest.raises(ValueError, match="valid: gaussian, embedded_gaussian"):
        invertible_attention("softmax", 4)
    with pytest.raises(ValueError, match="valid options: .*slots"):
        invertible_attention("external", 4, heads=2)
    with pytest.raises(ValueError, match="valid estimators"):
        invertible_attention("l2", 4, estimator="magic")
    with pytest.raises(ValueError, match="coeff"):
        invertible_attention("l2", 4, coeff=1.5)
    with pytest.raises(ValueError, match=r"expects images \(B, 4, H, W\)"):
        invertible_attention("external", 4)(torch.randn(2, 3, 4, 4))


def test_factory_passes_options_through():
    step = invertible_attention(
        "l2",
        8,
        heads=2,
        estimator="roulette",
        n_terms=3,
        distribution="poisson",
        solver="banach",
        max_iter=50,
        strict=True,
    )
    assert step.branch.heads == 2
    assert step.estimator.n_exact == 3 and step.estimator.distribution == "poisson"
    assert step.solver == "banach" and step.max_iter == 50 and step.strict


@pytest.mark.parametrize("kind", PAPER_KINDS)
def test_certified_paper_kinds_keep_their_similarity_and_response(kind):
    """Certified by default; tanh features; softmax rows for the exponential kinds, the
    non-local normalisation by N of ELU similarities for dot and concat."""
    step = invertible_attention(kind, 8)
    branch = step.branch.double()
    assert isinstance(branch, CertifiedPaperAttention) and branch.certified_norm == "inf"
    assert step.lipschitz_bound() <= 0.9 * (1 + 1e-9)
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64) * 3
    u = torch.tanh(x.flatten(2).transpose(1, 2))  # (B, N, C)
    n = u.shape[1]
    if kind == "gaussian":
        expected = torch.softmax(u @ u.transpose(1, 2), dim=-1)
    else:
        theta, phi = branch.theta(u), branch.phi(u)
        if kind == "embedded_gaussian":
            expected = torch.softmax(phi @ theta.transpose(1, 2), dim=-1)
        elif kind == "dot":
            expected = F.elu(phi @ theta.transpose(1, 2)) / n
        else:
            pairs = torch.cat(
                [
                    phi[:, :, None, :].expand(-1, n, n, -1),
                    theta[:, None, :, :].expand(-1, n, n, -1),
                ],
                dim=-1,
            )  # (B, N_out, N_in, 2C'): the concatenation, naively
            w = branch.concat.weight[0]
            w_concat = torch.cat([w[phi.shape[-1] :], w[: phi.shape[-1]]])  # [w_phi; w_theta]
            expected = F.elu(pairs @ w_concat) / n
    torch.testing.assert_close(branch.attention_map(x), expected)
    if kind in ("gaussian", "embedded_gaussian"):
        torch.testing.assert_close(expected.sum(-1), torch.ones(2, n, dtype=torch.float64))


def test_certified_switch_and_unknown_similarity():
    assert invertible_attention("dot", 4, certified=False).lipschitz_bound() is None
    with pytest.raises(ConfigError, match="no faithful"):
        invertible_attention("external", 4, certified=False)
    with pytest.raises(ValueError, match="unknown similarity"):
        CertifiedPaperAttention(4, "external")


@pytest.mark.parametrize("certified", [False, True])
@pytest.mark.parametrize("kind", PAPER_KINDS)
def test_paper_kinds_forward_equals_their_attention_map_applied_to_the_values(kind, certified):
    """forward normalises after the product with the values (and the exponential kinds
    shift their logits): the same output and input gradient as applying the normalised
    attention map, float64."""
    branch = invertible_attention(kind, 8, certified=certified).branch.double()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64, requires_grad=True)
    t = x.flatten(2).transpose(1, 2)
    if certified:
        mixed = branch.attention_map(x) @ branch.value(torch.tanh(t))
        reference = branch._output(mixed, x)
    else:
        mixed = branch.attention_map(x) @ branch.value(t)
        reference = branch.out(mixed).transpose(1, 2).reshape(x.shape)
    out = branch(x)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    (grad_ref,) = torch.autograd.grad((reference * weights).sum(), x)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("certified", [False, True])
@pytest.mark.parametrize("kind", PAPER_KINDS)
def test_paper_kinds_second_order_gradients_equal_the_plain_formula(kind, certified):
    """The series differentiates vector-Jacobian products again: the input gradient of
    <J^T w, u> equals that of the attention map applied to the values, float64."""
    branch = invertible_attention(kind, 8, certified=certified).branch.double()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64, requires_grad=True)
    t = x.flatten(2).transpose(1, 2)
    if certified:
        reference = branch._output(branch.attention_map(x) @ branch.value(torch.tanh(t)), x)
    else:
        mixed = branch.attention_map(x) @ branch.value(t)
        reference = branch.out(mixed).transpose(1, 2).reshape(x.shape)
    w, u = torch.randn_like(x), torch.randn_like(x)
    grads = []
    for out in (branch(x), reference):
        (vjp,) = torch.autograd.grad(out, x, w, create_graph=True)
        grads.append(torch.autograd.grad((vjp * u).sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("certified", [False, True])
@pytest.mark.parametrize("kind", ["embedded_gaussian", "dot"])
def test_no_batched_product_of_two_transposed_operands_in_the_double_backward(
    kind, certified, monkeypatch
):
    """The similarities phi_j^T theta_i go through _pairwise_products so that no batched
    product in the series' double backward has both operands transposed (the case the
    CPU's bmm runs about 10x slower); with the plain product, one does, and the
    second-order gradients are the same (float64)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from flowattn.nn import lipschitz_attention

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.bmm.default:
                layouts.append(tuple(a.stride(-1) != 1 for a in args))
            return func(*args, **(kwargs or {}))

    x, w, u = (torch.randn(2, 8, 4, 4, dtype=torch.float64) for _ in range(3))
    x.requires_grad_(True)

    def second_order(branch):
        (vjp,) = torch.autograd.grad(branch(x), x, w, create_graph=True)
        layouts.clear()
        with Record():
            (grad,) = torch.autograd.grad((vjp * u).sum(), x)
        return set(layouts), grad

    layouts = []
    branch = invertible_attention(kind, 8, certified=certified).branch.double()
    routed, grad = second_order(branch)
    monkeypatch.setattr(
        lipschitz_attention, "_pairwise_products", lambda k, q: k @ q.transpose(1, 2)
    )
    plain, grad_plain = second_order(branch)
    assert (True, True) not in routed
    assert (True, True) in plain  # what the routing avoids
    torch.testing.assert_close(grad, grad_plain, rtol=1e-12, atol=1e-12)


SIMILARITY_MAPS = {
    "external": ("embed", "keys"),
    "l2": ("query",),
    "embedded_gaussian": ("theta", "phi"),
    "dot": ("theta", "phi"),
    "concat": ("theta", "phi"),
}


def _map_weight(branch, name):
    module = getattr(branch, name)
    return module if isinstance(module, torch.Tensor) else module.weight


@pytest.mark.parametrize("kind", sorted(SIMILARITY_MAPS))
@pytest.mark.parametrize("channels", [4, 12])
def test_similarity_maps_start_as_selections_or_random(kind, channels):
    selected = invertible_attention(kind, channels).branch
    drawn = invertible_attention(kind, channels, similarity_init="random").branch
    for name in SIMILARITY_MAPS[kind]:
        weight = _map_weight(selected, name).detach().flatten(0, -2)
        assert ((weight != 0).sum(-1) == 1).all()  # one coordinate per row
        assert set(weight[weight != 0].tolist()) <= {1.0, -1.0}
        assert (_map_weight(drawn, name) != 0).float().mean() > 0.9
    x = torch.randn(2, channels, 4, 4)
    assert selected.lipschitz_bound((channels, 4, 4)) <= 0.9 * (1 + 1e-6)
    assert torch.isfinite(selected(x)).all()


@pytest.mark.parametrize("kind", [*sorted(SIMILARITY_MAPS), "gaussian"])
def test_unknown_similarity_init_is_named(kind):
    with pytest.raises(ValueError, match="unknown similarity_init 'orthogonal'; valid: selection"):
        invertible_attention(kind, 4, similarity_init="orthogonal")
