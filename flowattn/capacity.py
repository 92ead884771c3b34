r"""How much of its certified Lipschitz budget each residual step uses at data points.

A residual step :math:`y = x + g(x)` is certified with a bound :math:`L \ge
\mathrm{Lip}(g)` that holds for every input. What the branch can model depends on how
large its Jacobian actually gets where the data are: a branch whose local norm
:math:`\|J_g(x)\|` stays a tiny share of :math:`L` at test images is nearly the
identity there, and its certificate is far looser than it needs to be.

:func:`budget_use` measures, for every residual step of a model, the largest local
Jacobian norm over a batch of images, in the certificate's own norm (``inf`` or ``2``)
and in l2, and its share of the bound. Local norms are exact (dense Jacobians) when a
sample has at most ``max_dense`` elements, else lower estimates (power iteration for
l2, a random subset of the Jacobian's rows for l-inf).

References:
    | Invertible Attention (Zha et al., 2021)
    | https://arxiv.org/abs/2106.09003
"""

from __future__ import annotations

__all__ = [
    "LOW_SHARE",
    "BudgetUse",
    "budget_use",
    "local_jacobian_norm",
    "low_share_message",
    "worst_case_norm",
]

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .lipschitz import jacobian_norm, jacobian_spectral_norm
from .logdet import dense_jacobian

LOW_SHARE = 0.05
"""Below this share of its bound an attention step is reported as using little of it."""


@dataclass(frozen=True)
class BudgetUse:
    """One residual step's local Jacobian norms at a batch of images.

    Attributes:
        name: The step's readable name (``DensityModel.residual_steps``).
        attention: Whether the branch is an attention branch (else convolutional).
        bound: The certified Lipschitz bound, or None for an uncertified branch.
        norm: The certificate's norm, ``"inf"`` or ``"2"`` (``"2"`` when uncertified).
        local: The largest local Jacobian norm over the images, in ``norm``.
        local_l2: The same in l2.
        exact: Whether ``local`` and ``local_l2`` come from dense Jacobians (exact), or
            are lower estimates.
    """

    name: str
    attention: bool
    bound: float | None
    norm: str
    local: float
    local_l2: float
    exact: bool

    @property
    def share(self) -> float | None:
        """``local / bound``, or None without a bound."""
        return None if not self.bound else self.local / self.bound

    @property
    def low(self) -> bool:
        """An attention step using less than :data:`LOW_SHARE` of its bound."""
        return self.attention and self.share is not None and self.share < LOW_SHARE


def low_share_message(use: BudgetUse) -> str:
    """What a low share means, for a warning about the step ``use`` describes."""
    return (
        f"{use.name} uses {use.share:.2%} of its certified bound at test images (below "
        f"{LOW_SHARE:.0%}): its attention branch is close to zero there, so the step is "
        "nearly the identity and models little"
    )


def local_jacobian_norm(
    branch: nn.Module,
    x: Tensor,
    ord: float = math.inf,
    *,
    max_dense: int = 1024,
    n_rows: int = 128,
    n_iter: int = 30,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, bool]:
    """Per-sample induced norm (B,) of the Jacobian of ``branch`` at ``x`` (B, ...).

    Arguments:
        branch: A map acting on each sample independently, same shape in and out.
        x: The points (B, ...).
        ord: ``math.inf`` (max row sum of absolute values) or 2 (spectral norm).
        max_dense: Up to this many elements per sample the Jacobian is built densely
            and the norm is exact; above it, a lower estimate.
        n_rows: Rows of the Jacobian sampled for the l-inf lower estimate.
        n_iter: Power iterations for the l2 lower estimate.
        generator: Random generator for the sampled rows and the power iteration.

    Returns:
        The norms (B,) and whether they are exact.
    """
    if ord not in (2, math.inf):
        raise ValueError(f"ord must be inf or 2, got {ord!r}")
    x = x.detach()
    d = x[0].numel()
    if d > max_dense and ord == 2:
        return jacobian_spectral_norm(branch, x, n_iter=n_iter, generator=generator), False
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        inputs = x.clone().requires_grad_(True)
        out = branch(inputs)
        if d <= max_dense:
            return jacobian_norm(dense_jacobian(out, inputs), ord).detach(), True
        rows = torch.randperm(d, generator=generator)[:n_rows]
        basis = torch.zeros(len(rows), *x.shape, dtype=x.dtype, device=x.device)
        basis.view(len(rows), x.shape[0], d)[torch.arange(len(rows)), :, rows.to(x.device)] = 1
        (grads,) = torch.autograd.grad(out, inputs, basis, is_grads_batched=True)
    return grads.flatten(2).abs().sum(-1).max(0).values.detach(), False


def worst_case_norm(
    branch: nn.Module, starts: Tensor, *, steps: int = 60, lr: float = 0.05
) -> float:
    r"""The largest l-inf Jacobian norm of ``branch`` that gradient ascent on the input
    finds from each of the points ``starts`` (B, ...): a lower estimate of
    :math:`\sup_x \|J_g(x)\|_\infty`, to compare with a certified bound.

    From each start, the Jacobian row with the largest l1 norm is followed: Adam on the
    input raises that row's l1 norm (one vector-Jacobian product, differentiated again).
    The result is the largest row l1 norm met on the way, over all starts.
    """
    best = 0.0
    for start in starts.detach():
        x = start[None].clone()
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            inputs = x.clone().requires_grad_(True)
            jac = dense_jacobian(branch(inputs), inputs)[0]
        row_norms = jac.abs().sum(-1)
        row = int(row_norms.argmax())
        best = max(best, float(row_norms[row]))
        x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        for _ in range(steps):
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                out = branch(x).flatten()[row]
                (grad,) = torch.autograd.grad(out, x, create_graph=True)
                value = grad.abs().sum()
                best = max(best, float(value.detach()))
                # the weights get no gradient; a linear map gives none to x either
                (ascent,) = torch.autograd.grad(value, x, materialize_grads=True)
            x.grad = -ascent
            opt.step()
    return best


def budget_use(
    model, x: Tensor, *, max_dense: int = 1024, seed: int = 0, attention_only: bool = False
) -> list[BudgetUse]:
    """Every residual step's local Jacobian norms at the images ``x`` (B, C, H, W).

    Arguments:
        model: A :class:`~flowattn.models.DensityModel`.
        x: Images, uint8 or in [0, 1], on the model's device.
        max_dense: See :func:`local_jacobian_norm`.
        seed: Seed of the sampled rows and power-iteration starts.
        attention_only: Measure the attention steps only.

    Returns:
        One :class:`BudgetUse` per (attention) residual step, in flow order.
    """
    from .nn.lipschitz_attention import AttentionBranch

    steps = list(model.residual_steps())
    if attention_only:
        steps = [(name, step) for name, step in steps if isinstance(step.branch, AttentionBranch)]
    if not steps:
        return []
    inputs: dict[str, Tensor] = {}
    handles = [
        step.register_forward_pre_hook(_Recorder(inputs, name).record) for name, step in steps
    ]
    try:
        model.encode(x)
    finally:
        for handle in handles:
            handle.remove()
    generator = torch.Generator().manual_seed(seed)
    uses = []
    for name, step in steps:
        branch, h = step.branch, inputs[name]
        bound = step.lipschitz_bound()
        norm = getattr(branch, "certified_norm", None) if bound is not None else None
        norm = norm or "2"
        options = {"max_dense": max_dense, "generator": generator}
        with torch.no_grad():
            l2, exact = local_jacobian_norm(branch, h, 2, **options)
            if norm == "inf":
                local, exact_inf = local_jacobian_norm(branch, h, math.inf, **options)
                exact = exact and exact_inf
            else:
                local = l2
        uses.append(
            BudgetUse(
                name,
                isinstance(branch, AttentionBranch),
                bound,
                norm,
                float(local.max()),
                float(l2.max()),
                exact,
            )  # fmt: skip
        )
    return uses


class _Recorder:
    """A forward pre-hook that keeps a step's first input under its name."""

    def __init__(self, inputs: dict[str, Tensor], name: str) -> None:
        self.inputs, self.name = inputs, name

    def record(self, module: nn.Module, args: tuple) -> None:
        self.inputs.setdefault(self.name, args[0].detach())
