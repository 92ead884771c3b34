r"""Certified versions of the paper's four attention kinds.

Zha et al. (2021) bound the Lipschitz constant of an attention :math:`A(x) = R(x) F(x)`
(response R, features F) by the product rule :math:`L(A) = k(\mu_R c_F + c_R \mu_F)`,
which needs :math:`\mu_F = \sup \|F(x)\|` and :math:`\mu_R = \sup \|R(x)\|` to exist. Their
features are unbounded linear maps of x and their dot and concatenation responses divide
by sums that can vanish, so the suprema are infinite and the bound does not hold. Here
every quantity of the formula is made finite and computed from the weights, in the
:math:`\ell_\infty` norm of the flattened image:

* features pass through :math:`u = \tanh(x)` first (1-Lipschitz, :math:`|u| \leq 1`), so
  the 1x1 maps :math:`\theta = W_\theta u`, :math:`\phi = W_\phi u`, :math:`v = W_v u` are
  bounded: :math:`\|v_i\|_\infty \leq a_v = \|W_v\|_\infty` (largest absolute row sum);
* responses keep each kind's similarity: a softmax over the source pixels i of
  :math:`u_j^\top u_i` (``gaussian``) or :math:`\phi_j^\top \theta_i`
  (``embedded_gaussian``), whose rows are stochastic; and, for ``dot`` and ``concat``, the
  non-local network's normalisation by N (Wang et al., 2018) of
  :math:`\mathrm{ELU}(\phi_j^\top \theta_i)` and
  :math:`\mathrm{ELU}(w_\phi^\top \phi_j + w_\theta^\top \theta_i)`;
* :math:`g(x)_j = s\, W_L \sum_i R_{ji} v_i + b`, with :math:`s = \min(1, c / L)` for the
  bound L below, so :math:`\mathrm{Lip}_\infty(g) \leq c` for every input and weight.

With :math:`S(W) = \sum_{ab} |W_{ab}|` (the :math:`\infty \to 1` norm),
:math:`m = S(W_\phi^\top W_\theta)`, which bounds
:math:`|\phi_j^\top \theta_i| = |u_j^\top W_\phi^\top W_\theta u_i|`, and
:math:`a = \|W_L W_v\|_\infty` (the output and value maps as one map, which the values
reach only through), the product rule row by row gives :math:`L = a (1 + \tfrac54 C)`
(gaussian, C channels), :math:`a (1 + \tfrac54 m)` (embedded gaussian), :math:`2 m\, a`
(dot) and :math:`\tfrac54 \kappa\, a` (concat, :math:`\kappa = \|W_\phi^\top w_\phi\|_1
+ \|W_\theta^\top w_\theta\|_1`). A softmax row moves in :math:`\ell_1` by at most half
the range of its logits' moves (the mean absolute deviation is at most half the range).
The factor 5/4 is the largest value of :math:`\tanh'(x) + |\tanh(x)|`: a channel moves a
similarity through its slope or weighs another pixel's move by its size, and cannot do
both fully at once. ``docs/maths.md`` derives them.

References:
    | Invertible Attention (Zha et al., 2021)
    | https://arxiv.org/abs/2106.09003

    | Non-local Neural Networks (Wang et al., 2018)
    | https://arxiv.org/abs/1711.07971
"""

from __future__ import annotations

__all__ = ["CertifiedPaperAttention"]

import torch
from torch import Tensor, nn

from ..lipschitz import inf_norm, selection_matrix
from .lipschitz_attention import (
    EXPONENTIAL,
    SIMILARITIES,
    BoundedOutputBranch,
    _mix_and_total,
    _paper_similarities,
    check_similarity_init,
)

_SLOPE_PLUS_SIZE = 1.25
r"""The largest value of :math:`\tanh'(x) + |\tanh(x)| = 1 - t^2 + |t|` (at :math:`|t| = 1/2`)."""


def _entry_sum(weight: Tensor) -> Tensor:
    """:math:`\\sum_{ab} |W_{ab}|`, the induced :math:`\\infty \\to 1` norm's upper bound."""
    return weight.abs().sum()


class CertifiedPaperAttention(BoundedOutputBranch):
    r"""One of the paper's four attention kinds, certified in :math:`\ell_\infty`.

    See the module docstring for the construction and the bound; ``attention_map``
    returns the response :math:`R_{ji}` (B, N, N), row j being output pixel j.

    Arguments:
        channels: Number of channels C.
        kind: ``gaussian``, ``embedded_gaussian``, ``dot`` or ``concat``.
        coeff: Bound c < 1 on the :math:`\ell_\infty` Lipschitz constant.
        reduction: Channel reduction of :math:`\theta, \phi` (C / reduction channels).
        similarity_init: ``selection`` starts :math:`W_\theta` and :math:`W_\phi` as the
            same selection of C / reduction channels
            (:func:`~flowattn.lipschitz.selection_matrix`), so :math:`m` is what data
            reach rather than what random rows could; ``random`` keeps PyTorch's init.
            (``gaussian`` has no such maps.)

    Examples:
        >>> g = CertifiedPaperAttention(8, "dot")
        >>> g(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
        >>> g.lipschitz_bound() <= 0.9 + 1e-6
        True
    """

    def __init__(
        self,
        channels: int,
        kind: str,
        coeff: float = 0.9,
        reduction: int = 4,
        similarity_init: str = "selection",
    ):
        super().__init__(channels, coeff)
        if kind not in SIMILARITIES:
            raise ValueError(f"unknown similarity {kind!r}; valid: {', '.join(SIMILARITIES)}")
        if reduction < 1:
            raise ValueError(f"reduction must be positive, got {reduction}")
        check_similarity_init(similarity_init)
        self.kind = kind
        inner = max(1, channels // reduction)
        if kind != "gaussian":
            self.theta = nn.Linear(channels, inner, bias=False)
            self.phi = nn.Linear(channels, inner, bias=False)
            if similarity_init == "selection":
                selected = selection_matrix(inner, channels)
                with torch.no_grad():
                    self.theta.weight.copy_(selected)
                    self.phi.weight.copy_(selected)
        if kind == "concat":
            self.concat = nn.Linear(2 * inner, 1, bias=False)
        self.value = nn.Linear(channels, channels, bias=False)
        self.out = nn.Linear(channels, channels)

    def _raw_bound(self) -> Tensor:
        """The certified bound of the branch without the scale s (``docs/maths.md``)."""
        a_v = inf_norm(self.out.weight @ self.value.weight)  # W_L W_v as one map
        if self.kind == "gaussian":
            return a_v * (1 + _SLOPE_PLUS_SIZE * self.channels)
        if self.kind == "concat":
            w_t, w_p = self.concat.weight[0].split(self.theta.out_features)
            # the logit w_phi . phi_j + w_theta . theta_i as alpha . u_j + beta . u_i
            kappa = (w_p @ self.phi.weight).abs().sum() + (w_t @ self.theta.weight).abs().sum()
            return _SLOPE_PLUS_SIZE * kappa * a_v
        m = _entry_sum(self.phi.weight.T @ self.theta.weight)  # |u_j^T W_phi^T W_theta u_i|
        return a_v * (1 + _SLOPE_PLUS_SIZE * m) if self.kind == "embedded_gaussian" else 2 * m * a_v

    def attention_map(self, x: Tensor) -> Tensor:
        energy, softmax = self._energies(torch.tanh(self._check(x)))
        return energy / (energy.sum(dim=-1, keepdim=True) if softmax else energy.shape[-1])

    def _energies(self, u: Tensor) -> tuple[Tensor, bool]:
        """Unnormalised responses (B, N_out, N_in) of the squashed tokens u (B, N, C), and
        whether they are divided by their row sums (softmax) rather than by N."""
        concat = self.concat.weight if self.kind == "concat" else None
        theta, phi = getattr(self, "theta", None), getattr(self, "phi", None)
        energy = _paper_similarities(self.kind, u, theta, phi, concat)
        return energy, self.kind in EXPONENTIAL

    def forward(self, x: Tensor) -> Tensor:
        u = torch.tanh(self._check(x))  # (B, N, C)
        energy, softmax = self._energies(u)
        # normalised after the product with the values, on (B, N, C) tensors rather than
        # the (B, N, N) responses: fewer N x N operations in every term of the series
        if softmax:
            mixed, total = _mix_and_total(energy, self.value(u))
            return self._output(mixed / total, x)
        return self._output(energy @ (self.value(u) / u.shape[1]), x)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, channels={self.channels}, coeff={self.coeff}, certified"
