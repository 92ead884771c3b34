import torch

from flowattn.attention import SelfAttention2d


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
