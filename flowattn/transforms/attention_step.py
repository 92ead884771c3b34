r"""The invertible attention flow step: an attention branch made a residual step.

:func:`invertible_attention` builds :math:`y = x + g(x)` with g one of the attention
networks of :mod:`flowattn.nn.lipschitz_attention` or
:mod:`flowattn.nn.certified_paper_attention`, a log-det estimator and a fixed-point
inverse (:class:`~flowattn.transforms.residual.ResidualTransform`).

References:
    | Invertible Attention (Zha et al., 2021)
    | https://arxiv.org/abs/2106.09003
"""

from __future__ import annotations

__all__ = ["invertible_attention"]

from typing import Any

from ..logdet import LogDetEstimator, estimator_options, make_estimator
from ..nn.attention_kinds import attention_kind
from .residual import ResidualTransform

_RESIDUAL_OPTIONS = ("solver", "atol", "rtol", "max_iter", "strict")


def invertible_attention(
    kind: str,
    channels: int,
    *,
    certified: bool = True,
    coeff: float = 0.9,
    estimator: str | LogDetEstimator = "series",
    n_terms: int = 5,
    n_probes: int = 1,
    input_shape: tuple[int, int, int] | None = None,
    **options: Any,
) -> ResidualTransform:
    r"""Builds an invertible attention flow step :math:`y = x + g(x)`.

    Arguments:
        kind: The branch, one of :data:`~flowattn.nn.attention_kinds.KINDS`: the
            paper's ``gaussian``, ``embedded_gaussian``, ``dot``, ``concat``, or
            ``external``, ``l2``.
        channels: Number of channels C of the (B, C, H, W) inputs.
        certified: For the paper's kinds, the certified version
            (:class:`~flowattn.nn.certified_paper_attention.CertifiedPaperAttention`,
            the default: :math:`\mathrm{Lip}_\infty(g) \leq` ``coeff`` for every input) or,
            with False, the faithful reproduction
            (:class:`~flowattn.nn.lipschitz_attention.PaperAttention`, uncertified,
            ``lipschitz_bound()`` None). ``external`` and ``l2`` are certified either way.
        coeff: Lipschitz coefficient c < 1.
        estimator: ``"series"`` (truncated power series), ``"roulette"`` (unbiased
            Russian roulette), ``"exact"``, or a :class:`~flowattn.logdet.LogDetEstimator`.
        n_terms: Series terms (``series``), or exact leading terms (``roulette``).
        n_probes: Hutchinson probes per sample.
        input_shape: (C, H, W) of the step's inputs, for its certificate (the ``l2``
            kind's bound depends on N = H W); see
            :class:`~flowattn.transforms.residual.ResidualTransform`.
        options: Branch options (``reduction``; ``slots``, ``hidden``; ``heads``,
            ``head_dim``), estimator options (``probe``, ``gradient``, ``memory_efficient``,
            ``distribution``, ``p``, ``lam``) and inverse options (``solver``, ``atol``,
            ``rtol``, ``max_iter``, ``strict``).

    Returns:
        A :class:`~flowattn.transforms.residual.ResidualTransform`.

    Examples:
        >>> import torch
        >>> step = invertible_attention("external", 12, n_terms=5)
        >>> y, logabsdet = step(torch.randn(2, 12, 8, 8))
        >>> y.shape, logabsdet.shape
        (torch.Size([2, 12, 8, 8]), torch.Size([2]))
    """
    if input_shape is not None and (len(input_shape) != 3 or input_shape[0] != channels):
        raise ValueError(f"input_shape must be ({channels}, H, W), got {input_shape}")
    registered = attention_kind(kind)
    branch_names = registered.option_names(certified)
    residual_opts = {k: options.pop(k) for k in _RESIDUAL_OPTIONS if k in options}
    branch_opts = {k: options.pop(k) for k in list(options) if k in branch_names}

    if isinstance(estimator, LogDetEstimator):
        est_names: set[str] = set()
    else:
        est_names = estimator_options(estimator)
    est_opts = {k: options.pop(k) for k in list(options) if k in est_names}
    if not isinstance(estimator, LogDetEstimator):
        est_opts.update(n_terms=n_terms, n_probes=n_probes)
    if options:
        valid = sorted(branch_names | est_names | set(_RESIDUAL_OPTIONS))
        raise ValueError(
            f"unknown option(s) {', '.join(sorted(options))} for kind {kind!r} with estimator "
            f"{estimator!r}; valid options: {', '.join(valid)}"
        )
    est = make_estimator(estimator, **est_opts)
    branch = registered.build(channels, certified=certified, coeff=coeff, **branch_opts)
    return ResidualTransform(branch, est, input_shape=input_shape, **residual_opts)
