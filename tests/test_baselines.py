import torch

from flowattn.nn.baselines import SelfAttention2d


def test_sagan_shapes_gradients_and_rows():
    attn = SelfAttention2d(16, reduction=4)
    with torch.no_grad():
        attn.gamma.fill_(0.5)
    x = torch.randn(2, 16, 5, 3, requires_grad=True)
    out = attn(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in attn.parameters())
    a = attn.attention_map(x)
    assert a.shape == (2, 15, 15)
    assert torch.allclose(a.sum(-1), torch.ones(2, 15))


def test_sagan_matches_naive_loop():
    attn = SelfAttention2d(4, reduction=2).double()
    with torch.no_grad():
        attn.gamma.fill_(0.7)
    x = torch.randn(1, 4, 2, 3, dtype=torch.float64)
    t = x.flatten(2)[0]  # (C, N)
    q = attn.query.weight[:, :, 0, 0] @ t
    k = attn.key.weight[:, :, 0, 0] @ t
    v = attn.value.weight[:, :, 0, 0] @ t
    out = torch.zeros_like(t)
    for i in range(t.shape[1]):
        w = torch.softmax(torch.stack([q[:, i] @ k[:, j] for j in range(t.shape[1])]), 0)
        out[:, i] = sum(w[j] * v[:, j] for j in range(t.shape[1]))
    expected = x + 0.7 * out.reshape(1, 4, 2, 3)
    assert torch.allclose(attn(x), expected, atol=1e-12)


import pytest  # noqa: E402

from flowattn.nn.baselines import (  # noqa: E402
    CBAM,
    CrissCrossAttention2d,
    DisentangledNonLocal2d,
    ExternalAttention2d,
    MultiHeadSelfAttention2d,
    NonLocal2d,
)
from flowattn.nn.lipschitz_attention import SIMILARITIES  # noqa: E402

BASELINES = [
    *[(NonLocal2d, {"kind": k}) for k in SIMILARITIES],
    (ExternalAttention2d, {"heads": 1}),
    (ExternalAttention2d, {"heads": 4}),
    (MultiHeadSelfAttention2d, {"heads": 2}),
    (CBAM, {}),
    (DisentangledNonLocal2d, {}),
    (CrissCrossAttention2d, {"reduction": 2}),
]


@pytest.mark.parametrize("cls, options", BASELINES)
def test_baselines_shapes_and_gradients(cls, options):
    module = cls(8, **options)
    for p in module.parameters():  # leave the zero (identity) initialisation
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 8, 5, 3, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in module.parameters())
    with pytest.raises(ValueError, match="B, C, H, W"):
        module(torch.randn(8, 5, 3))


def test_separable_concat_equals_naive_concatenation():
    block = NonLocal2d(4, kind="concat", reduction=2).double()
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64)
    theta = block.theta(x).flatten(2).transpose(1, 2)  # (B, N, C')
    phi = block.phi(x).flatten(2).transpose(1, 2)
    n = theta.shape[1]
    pairs = torch.cat(
        [theta[:, :, None].expand(-1, -1, n, -1), phi[:, None].expand(-1, n, -1, -1)], dim=-1
    )  # (B, N, N, 2C')
    w = torch.cat([block.w_theta, block.w_phi])
    naive = torch.relu(pairs @ w) / n
    assert torch.allclose(block.attention_map(x), naive, atol=1e-12)


def test_external_attention_double_normalisation():
    module = ExternalAttention2d(8, slots=6, heads=2)
    a = module.attention_map(torch.randn(3, 8, 4, 4))
    assert a.shape == (6, 16, 6)
    assert torch.allclose(a.sum(dim=2), torch.ones(6, 16), atol=1e-6)


def test_criss_cross_matches_a_per_pixel_loop():
    module = CrissCrossAttention2d(4, reduction=2).double()
    with torch.no_grad():
        module.gamma.fill_(0.8)
    x = torch.randn(1, 4, 3, 2, dtype=torch.float64)
    q, k, v = module.query(x)[0], module.key(x)[0], module.value(x)[0]
    _, h, w = q.shape
    expected = x.clone()
    for i in range(h):
        for j in range(w):
            keys = [(r, j) for r in range(h) if r != i] + [(i, c) for c in range(w)]
            e = torch.stack([q[:, i, j] @ k[:, r, c] for r, c in keys])
            a = torch.softmax(e, 0)
            expected[0, :, i, j] += 0.8 * sum(a[n] * v[:, r, c] for n, (r, c) in enumerate(keys))
    assert torch.allclose(module(x), expected, atol=1e-12)
    col, row = module.weights(x)
    assert torch.allclose(col.sum(-1) + row.sum(-1), torch.ones(1, h, w, dtype=torch.float64))
