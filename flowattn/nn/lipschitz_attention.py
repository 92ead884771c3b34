r"""Attention networks with Lipschitz bounds: the residual branches of invertible attention.

Every branch maps images (B, C, H, W) to (B, C, H, W) and is meant as the residual
branch g of :class:`~flowattn.transforms.residual.ResidualTransform` (built by
:func:`~flowattn.transforms.attention_step.invertible_attention`). Pixels are the
N = H W tokens, channels their features.

* :class:`PaperAttention` (``gaussian``, ``embedded_gaussian``, ``dot``, ``concat`` with
  ``certified=False``): faithful to Zha et al. (2021): spectrally normalised 1x1 maps
  with coefficient c, attention divided by 1.5 times its sum over queries, output map :math:`W_L`.
  These are *not* provably contractive (exp and ELU of unbounded dot products, sums
  that can approach zero); :meth:`lipschitz_bound` returns None and
  :meth:`estimate_lipschitz` measures the local Jacobian norm.
* :class:`ExternalAttention` (``external``): external attention with double
  normalisation (Guo et al., 2021), certified in :math:`\ell_\infty` independently of N.
* :class:`L2SelfAttention` (``l2``): L2 self-attention with tied query and key
  (Kim et al., 2021), certified in :math:`\ell_\infty` with a bound growing as log N.
* :class:`~flowattn.nn.certified_paper_attention.CertifiedPaperAttention`: the
  paper's four kinds made certified (the default of ``invertible_attention``).

References:
    | Invertible Attention (Zha et al., 2021)
    | https://arxiv.org/abs/2106.09003

    | Beyond Self-attention: External Attention using Two Linear Layers (Guo et al., 2021)
    | https://arxiv.org/abs/2105.02358

    | The Lipschitz Constant of Self-Attention (Kim et al., 2021)
    | https://arxiv.org/abs/2006.04710
"""

from __future__ import annotations

__all__ = [
    "AttentionBranch",
    "BoundedOutputBranch",
    "ExternalAttention",
    "L2SelfAttention",
    "PaperAttention",
    "SIMILARITIES",
]

import math

import torch
import torch.nn.functional as F
from scipy.special import lambertw
from torch import Tensor, nn

from ..images import check_images
from ..lipschitz import (
    ConstrainedLinear,
    SpectralRescale,
    contraction_scale,
    inf_norm,
    jacobian_spectral_norm,
    selection_matrix,
)

SIMILARITIES = ("gaussian", "embedded_gaussian", "dot", "concat")
"""The paper's four pairwise similarities (its attention kinds, after Wang et al., 2018)."""
EXPONENTIAL = ("gaussian", "embedded_gaussian")  # normalised by their sums as a softmax
SIMILARITY_INITS = ("selection", "random")
"""How the certified branches start their similarity maps: as
:func:`~flowattn.lipschitz.selection_matrix` (the default) or as PyTorch's random init."""


def check_similarity_init(similarity_init: str) -> None:
    """Raises ValueError unless ``similarity_init`` is one of :data:`SIMILARITY_INITS`."""
    if similarity_init not in SIMILARITY_INITS:
        raise ValueError(
            f"unknown similarity_init {similarity_init!r}; valid: {', '.join(SIMILARITY_INITS)}"
        )


def _tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, N, C)."""
    return check_images(x).flatten(2).transpose(1, 2)


def _shifted_exp(logits: Tensor) -> Tensor:
    """:math:`\\exp(l - \\max l)` along the last dimension, the max held constant: the
    numerators of a softmax, for normalising after a product with the values."""
    return torch.exp(logits - logits.detach().amax(dim=-1, keepdim=True))


def _elu_in_place(similarity: Tensor) -> Tensor:
    """ELU of a freshly computed (B, N, N) similarity, in place: autograd then
    differentiates it through its result (:math:`e + 1` where negative) rather than
    through the exponential of its input, which makes every term of the series cheaper.
    The similarity must not be needed by anything else's backward."""
    return F.elu(similarity, inplace=True)


class _ContiguousGradient(torch.autograd.Function):
    """Identity (a copy) whose gradients, of every order, are made contiguous."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _ContiguousGradient.apply(grad.contiguous())

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        return tangent.clone()


def _pairwise_products(k: Tensor, q: Tensor) -> Tensor:
    """:math:`k_j^\top q_i` (B, N_k, N_q) of tokens k (B, N_k, C) and q (B, N_q, C).

    The value is ``k @ q.transpose(1, 2)``; the difference is speed. Autograd's
    backward of that product, differentiated again (the series' double backward),
    multiplies a transposed view of q's second-order gradient by a transposed view of an
    N x N gradient, a case the CPU's batched matmul runs about 10x slower than the same
    product with one operand contiguous. Routing q's transpose through
    :class:`_ContiguousGradient` makes that gradient contiguous.
    """
    return k @ _ContiguousGradient.apply(q.transpose(1, 2))


def _paper_similarities(
    kind: str,
    tokens: Tensor,
    theta: nn.Module | None = None,
    phi: nn.Module | None = None,
    concat_weight: Tensor | None = None,
) -> Tensor:
    r"""Unnormalised similarities (B, N_out, N_in) of the paper's kinds between tokens
    (B, N, C), output pixel j against source pixel i: :math:`\exp(t_j^\top t_i)`
    (``gaussian``), :math:`\exp(\phi_j^\top \theta_i)` (``embedded_gaussian``), both
    with each row's largest logit subtracted (a constant of the normalisation, against
    overflow); :math:`\mathrm{ELU}(\phi_j^\top \theta_i)` (``dot``) and
    :math:`\mathrm{ELU}(w_\phi^\top \phi_j + w_\theta^\top \theta_i)` (``concat``,
    ``concat_weight`` (1, 2 C') holding :math:`[w_\theta; w_\phi]`)."""
    if kind == "gaussian":
        return _shifted_exp(tokens @ tokens.transpose(1, 2))
    q, k = theta(tokens), phi(tokens)
    if kind == "embedded_gaussian":
        return _shifted_exp(_pairwise_products(k, q))
    if kind == "dot":
        return _elu_in_place(_pairwise_products(k, q))
    w_q, w_k = concat_weight[0].split(q.shape[-1])
    return _elu_in_place((k @ w_k)[:, :, None] + (q @ w_q)[:, None, :])


def _mix_and_total(energy: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """``energy @ values`` (B, N, C) and ``energy.sum(-1, keepdim=True)`` (B, N, 1) from
    one product with the values and a column of ones: the sum's backward is then part of
    the product's, with no separate pass over the (B, N, N) energies."""
    ones = torch.ones_like(values[..., :1])
    mixed = energy @ torch.cat([values, ones], dim=-1)
    return mixed[..., :-1], mixed[..., -1:]


def _image(tokens: Tensor, like: Tensor) -> Tensor:
    """(B, N, C) -> (B, C, H, W) shaped like ``like``."""
    return tokens.transpose(1, 2).reshape(like.shape)


class AttentionBranch(nn.Module):
    r"""Base class of attention branches g: (B, C, H, W) -> (B, C, H, W).

    Attributes:
        certified_norm: ``"inf"`` when :meth:`lipschitz_bound` certifies the
            :math:`\ell_\infty` Lipschitz constant, None for uncertified branches.
    """

    certified_norm: str | None = None

    def __init__(self, channels: int, coeff: float):
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        if not 0 < coeff < 1:
            raise ValueError(f"coeff must be in (0, 1) for an invertible step, got {coeff}")
        self.channels = channels
        self.coeff = coeff

    def _check(self, x: Tensor) -> Tensor:
        return _tokens(check_images(x, channels=self.channels, owner=type(self).__name__))

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float | None:
        """A certified bound on Lip(g) in :attr:`certified_norm` for inputs of shape
        ``input_shape`` (C, H, W) (needed only by branches whose bound depends on N), or
        None."""
        return None

    def attention_map(self, x: Tensor) -> Tensor:
        """Attention weights (B, N, M) for visualisation, one layout for every kind: row
        n holds the weights output pixel n gives the M = N source pixels (or the M
        memory slots)."""
        raise NotImplementedError

    def estimate_lipschitz(self, x: Tensor, n_iter: int = 20) -> Tensor:
        """Per-sample spectral norm (B,) of the Jacobian at ``x`` (power iteration, a lower
        estimate of the local Lipschitz constant)."""
        return jacobian_spectral_norm(self, x, n_iter=n_iter)


DOT_VALUE_COEFF = 0.5
"""Spectral-norm coefficient of the faithful ``dot`` kind's value map: the paper's code
builds that convolution with ``coeff=.5`` (every other map of every kind with 0.9)."""


class PaperAttention(AttentionBranch):
    r"""The paper's invertible attention branch (uncertified), one of four similarities.

    With tokens :math:`x_i` (pixels), :math:`\theta, \phi` 1x1 maps to C / reduction
    channels, value map V and output map :math:`W_L`, all spectrally normalised to
    ``coeff``:

    * ``gaussian``: :math:`e_{ij} = \exp(x_i^\top x_j)`;
    * ``embedded_gaussian``: :math:`e_{ij} = \exp(\theta(x_i)^\top \phi(x_j))`;
    * ``dot``: :math:`e_{ij} = \mathrm{ELU}(\theta(x_i)^\top \phi(x_j))`;
    * ``concat``: :math:`e_{ij} = \mathrm{ELU}(w^\top [\theta(x_i); \phi(x_j)])`, computed in
      the separable form :math:`\mathrm{ELU}(w_\theta^\top \theta(x_i) + w_\phi^\top \phi(x_j))`
      (no (B, C, N, N) tensor).

    Then :math:`a_{ij} = e_{ij} / (1.5 \sum_{i'} e_{i'j})` and
    :math:`g(x)_j = W_L \sum_i a_{ij} V x_i`. The exponential kinds are computed as a
    softmax over i divided by 1.5 (identical, without overflow). As in the paper's code
    (``Attention_dot`` in its ``inv_attention.py``), ``dot``'s value map V is normalised
    to spectral norm 0.5 (:data:`DOT_VALUE_COEFF`), not to ``coeff``.

    Arguments:
        channels: Number of channels C.
        kind: One of ``gaussian``, ``embedded_gaussian``, ``dot``, ``concat``.
        coeff: Spectral-norm coefficient c of every 1x1 map.
        reduction: Channel reduction k of :math:`\theta, \phi` (C / k channels).

    Examples:
        >>> g = PaperAttention(8, "concat")
        >>> g(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
        >>> g.lipschitz_bound() is None
        True
    """

    def __init__(self, channels: int, kind: str, coeff: float = 0.9, reduction: int = 4):
        super().__init__(channels, coeff)
        if kind not in SIMILARITIES:
            raise ValueError(f"unknown similarity {kind!r}; valid: {', '.join(SIMILARITIES)}")
        self.kind = kind
        inner = max(1, channels // reduction)
        if kind != "gaussian":
            self.theta = ConstrainedLinear(channels, inner, SpectralRescale(coeff))
            self.phi = ConstrainedLinear(channels, inner, SpectralRescale(coeff))
        if kind == "concat":
            self.concat = ConstrainedLinear(2 * inner, 1, SpectralRescale(coeff), bias=False)
        value_coeff = DOT_VALUE_COEFF if kind == "dot" else coeff
        self.value = ConstrainedLinear(channels, channels, SpectralRescale(value_coeff))
        self.out = ConstrainedLinear(channels, channels, SpectralRescale(coeff))

    def attention_map(self, x: Tensor) -> Tensor:
        """Attention weights :math:`a_{ij}` laid out (B, N_j, N_i): row j, output pixel j,
        sums to 1/1.5."""
        energy = self._energies(x)
        return energy / (1.5 * energy.sum(dim=-1, keepdim=True))

    def _energies(self, x: Tensor) -> Tensor:
        """Unnormalised :math:`e_{ij}` laid out as (B, N_j, N_i)."""
        concat = self.concat.constrained_weight() if self.kind == "concat" else None
        theta, phi = getattr(self, "theta", None), getattr(self, "phi", None)
        return _paper_similarities(self.kind, self._check(x), theta, phi, concat)

    def forward(self, x: Tensor) -> Tensor:
        # sum_i a_ij V x_i computed as (sum_i e_ij V x_i) / (1.5 sum_i e_ij): the
        # normalisation acts on (B, N, C) tensors instead of the (B, N, N) attention,
        # which removes N x N divisions from every vector-Jacobian product of the series
        mixed, total = _mix_and_total(self._energies(x), self.value(_tokens(x)))
        return _image(self.out(mixed / (1.5 * total)), x)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, channels={self.channels}, coeff={self.coeff}"


class BoundedOutputBranch(AttentionBranch):
    r"""Base of branches certified in :math:`\ell_\infty` by a bound independent of N:
    subclasses give :meth:`_raw_bound` (the bound of the branch before its output map is
    scaled) and an output map ``self.out`` (``nn.Linear``), which is scaled by
    :math:`s = \min(1, c / \text{raw bound})` so the bound is at most ``coeff``."""

    certified_norm = "inf"

    def _raw_bound(self) -> Tensor:
        raise NotImplementedError

    def _output(self, mixed: Tensor, like: Tensor) -> Tensor:
        """``s W_out mixed + b`` for mixed tokens (B, N, hidden), as an image like ``like``."""
        scale = contraction_scale(self.coeff, self._raw_bound())
        return _image(scale * F.linear(mixed, self.out.weight) + self.out.bias, like)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        r"""The certified :math:`\ell_\infty` bound (the same for every N, so
        ``input_shape`` is not needed)."""
        with torch.no_grad():
            raw = self._raw_bound()
            return float(contraction_scale(self.coeff, raw) * raw)


class ExternalAttention(BoundedOutputBranch):
    r"""External attention with double normalisation, certified in :math:`\ell_\infty`.

    .. math:: g(x)_i = s \, W_2 M_v \, \mathrm{DN}(M_k W_1 x)_i + b, \qquad
              \mathrm{DN}(A)_{is} = \mathrm{softmax}_s\big(A_{is} - \log\sum_j e^{A_{js}}\big)

    (softmax over pixels, then :math:`\ell_1` over the S memory slots). The centring
    moves each logit by at most twice the logits' largest move, and a softmax row moves
    in :math:`\ell_1` by at most half the range of its logits' moves, so a pixel's slot
    weights move in :math:`\ell_1` by at most :math:`2 \|M_k W_1\|_\infty \|dx\|_\infty`,
    and, for every input and every N (``docs/maths.md``),

    .. math:: \mathrm{Lip}_\infty(g) \leq s \, \|M_k W_1\|_\infty
              \min\big(\|W_2 M_v\|_\infty, 2 \max_{ab} |(W_2 M_v)_{ab}|\big),

    with :math:`\|\cdot\|_\infty` the largest absolute row sum. The factor
    :math:`s = \min(1, c / \text{bound})` keeps the bound at most ``coeff``
    by construction while leaving each map free (sharp attention logits can be paid
    for by smaller value maps).

    Arguments:
        channels: Number of channels C.
        coeff: Bound c < 1 on the :math:`\ell_\infty` Lipschitz constant.
        slots: Number S of external memory slots.
        hidden: Width of the features attended over (default C).
        similarity_init: ``selection`` starts :math:`W_1` and :math:`M_k` as signed
            selections of one coordinate per row (:func:`~flowattn.lipschitz.selection_matrix`),
            so the logits' certified bound is what data reach, not what random rows
            could; ``random`` keeps PyTorch's init.

    Examples:
        >>> g = ExternalAttention(8, slots=16)
        >>> g(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
        >>> g.lipschitz_bound() <= 0.9 + 1e-6
        True
    """

    certified_norm = "inf"

    def __init__(
        self,
        channels: int,
        coeff: float = 0.9,
        slots: int = 32,
        hidden: int | None = None,
        similarity_init: str = "selection",
    ):
        super().__init__(channels, coeff)
        hidden = channels if hidden is None else hidden
        if slots < 1 or hidden < 1:
            raise ValueError(f"slots and hidden must be positive, got {slots}, {hidden}")
        check_similarity_init(similarity_init)
        self.slots = slots
        self.embed = nn.Linear(channels, hidden)
        self.keys = nn.Linear(hidden, slots, bias=False)
        self.values = nn.Linear(slots, hidden, bias=False)
        self.out = nn.Linear(hidden, channels)
        if similarity_init == "selection":
            with torch.no_grad():
                self.embed.weight.copy_(selection_matrix(hidden, channels))
                self.embed.bias.zero_()
                self.keys.weight.copy_(selection_matrix(slots, hidden))

    def _raw_bound(self) -> Tensor:
        logits = inf_norm(self.keys.weight @ self.embed.weight)  # M_k W_1
        values = self.out.weight @ self.values.weight  # W_2 M_v
        return logits * torch.minimum(inf_norm(values), 2 * values.abs().amax())

    def attention_map(self, x: Tensor) -> Tensor:
        logits = self.keys(self.embed(self._check(x)))  # (B, N, S)
        centred = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        return torch.softmax(centred, dim=2)

    def forward(self, x: Tensor) -> Tensor:
        return self._output(self.values(self.attention_map(x)), x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, slots={self.slots}, coeff={self.coeff}"


def _phi_inverse(y: float) -> float:
    r"""Inverse of :math:`\phi(x) = x e^{x + 1}` on :math:`x \geq 0`: :math:`W_0(y / e)`."""
    return float(lambertw(y / math.e).real)


class L2SelfAttention(AttentionBranch):
    r"""Multi-head L2 self-attention with tied query and key, certified in :math:`\ell_\infty`.

    Per head h, with :math:`q_i = W^Q_h x_i \in \mathbb{R}^d`,

    .. math:: P_{ij} = \mathrm{softmax}_j\Big(-\frac{\|q_i - q_j\|^2}{\sqrt{d}}\Big), \qquad
              f^h(x)_i = W^V_h \sum_j P_{ij} A_h x_j, \qquad
              A_h = \frac{W^{Q\top}_h W^Q_h}{\sqrt{d}},

    and :math:`g(x)_i = s \, W^O [f^1(x)_i; \dots; f^H(x)_i]`. Kim et al. (2021, Theorem 3.2)
    bound the :math:`\ell_\infty` Lipschitz constant of the unscaled map by

    .. math:: \big(4\phi^{-1}(N - 1) + 1/\sqrt{d}\big) \|W^O\|_\infty
              \max_h \|W^Q_h\|_\infty \|W^{Q\top}_h\|_\infty \|W^V_h\|_\infty,

    with :math:`\phi(x) = x e^{x+1}` (norms here of maps acting on column vectors), or by
    the same factor times :math:`\sum_h \|W^O_h W^V_h\|_\infty \|W^Q_h\|_\infty
    \|W^{Q\top}_h\|_\infty` (each head's value and output maps as one map; the smaller
    of the two is used).
    We use the larger factor :math:`4\phi^{-1}(N-1) + 1`, which also covers reading the
    theorem with :math:`1/\sqrt{d}` multiplying every term, and scale the output by
    :math:`s = \min(1, c / \text{bound})` *for the N of the input*, so the bound is at
    most ``coeff`` at every image size. The bound grows as log N.

    Arguments:
        channels: Number of channels C.
        coeff: Bound c < 1 on the :math:`\ell_\infty` Lipschitz constant.
        heads: Number of heads H.
        head_dim: Query dimension d per head (default C / H, at least 1).
        similarity_init: ``selection`` starts each head's :math:`W^Q_h` as a selection
            of d coordinates (:func:`~flowattn.lipschitz.selection_matrix`, shifted by
            one channel per head); ``random`` draws it with standard deviation
            :math:`1/\sqrt{C}`.

    Examples:
        >>> g = L2SelfAttention(8, heads=2)
        >>> g(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
        >>> g.lipschitz_bound((8, 4, 4)) <= 0.9 + 1e-6
        True
    """

    certified_norm = "inf"

    def __init__(
        self,
        channels: int,
        coeff: float = 0.9,
        heads: int = 1,
        head_dim: int | None = None,
        similarity_init: str = "selection",
    ):
        super().__init__(channels, coeff)
        if heads < 1:
            raise ValueError(f"heads must be positive, got {heads}")
        check_similarity_init(similarity_init)
        d = max(1, channels // heads) if head_dim is None else head_dim
        dv = max(1, channels // heads)
        self.heads, self.head_dim, self.value_dim = heads, d, dv
        if similarity_init == "selection":
            query = torch.stack([selection_matrix(d, channels).roll(h, 1) for h in range(heads)])
        else:
            query = torch.randn(heads, d, channels) / math.sqrt(channels)
        self.query = nn.Parameter(query)
        self.value = nn.Parameter(torch.randn(heads, dv, channels) / math.sqrt(channels))
        self.out = nn.Linear(heads * dv, channels)

    def _raw_bound(self, num_pixels: int) -> Tensor:
        q_norms = self.query.abs().sum(dim=2).amax(dim=1) * self.query.abs().sum(dim=1).amax(dim=1)
        v_norms = self.value.abs().sum(dim=2).amax(dim=1)
        factor = 4 * _phi_inverse(num_pixels - 1) + 1
        per_head = inf_norm(self.out.weight) * (q_norms * v_norms).max()
        # or each head's value and output maps as one: sum_h ||W_O^h W_V^h|| q_h
        blocks = self.out.weight.unflatten(1, (self.heads, self.value_dim))  # (C, H, dv)
        merged = torch.einsum("chv,hvk->hck", blocks, self.value)
        merged = (merged.abs().sum(dim=2).amax(dim=1) * q_norms).sum()
        return factor * torch.minimum(per_head, merged)

    def _scale(self, num_pixels: int) -> Tensor:
        return contraction_scale(self.coeff, self._raw_bound(num_pixels))

    def _queries(self, t: Tensor) -> Tensor:
        return torch.einsum("hdc,bnc->bhnd", self.query, t)

    def _attention(self, q: Tensor) -> Tensor:
        """Per-head attention (B, H, N, N) from queries (B, H, N, d)."""
        # -||q_i - q_j||^2 up to the term ||q_i||^2, constant in j under the softmax.
        logits = (2 * q @ q.transpose(-1, -2) - (q * q).sum(-1)[:, :, None, :]) / math.sqrt(
            self.head_dim
        )
        return torch.softmax(logits, dim=-1)

    def attention_map(self, x: Tensor, *, per_head: bool = False) -> Tensor:
        attn = self._attention(self._queries(self._check(x)))
        return attn if per_head else attn.mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        t = self._check(x)
        n = t.shape[1]
        q = self._queries(t)  # (B, H, N, d); A_h x_j = W_Q^T q_j / sqrt(d)
        attn = self._attention(q)  # (B, H, N, N)
        mixed = torch.einsum("hdc,bhnd->bhnc", self.query, attn @ q) / math.sqrt(self.head_dim)
        heads = torch.einsum("hvc,bhnc->bnhv", self.value, mixed).flatten(2)
        projected = self._scale(n) * F.linear(heads, self.out.weight) + self.out.bias
        return _image(projected, x)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """The certified bound for inputs of shape ``input_shape`` (C, H, W): it grows
        with the number of pixels N = H W, so the shape is required."""
        if input_shape is None or len(input_shape) != 3:
            raise ValueError(
                "the l2 attention bound depends on the number of pixels N: pass the "
                f"input shape (C, H, W), got {input_shape!r}"
            )
        n = math.prod(input_shape[1:])
        with torch.no_grad():
            return float(self._scale(n) * self._raw_bound(n))

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, heads={self.heads}, head_dim={self.head_dim}, "
            f"coeff={self.coeff}"
        )
