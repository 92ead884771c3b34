r"""The registry of invertible attention kinds: the one place that names them.

Each kind is one :class:`AttentionKind` record in :data:`REGISTRY`: its name, the
certified branch that builds it, the paper's uncertified (faithful) form where there is
one, and the options both take. Everything else (model configs, the CLI, the
segmentation network's slot, the experiments, the tests) reads the registry, so adding
a kind is one branch class plus one line here.

A *variant* is a kind in one form: ``"dot"`` (certified, the default) or
``"faithful:dot"`` (the paper's uncertified reproduction); :func:`parse_variant`
reads one.

References:
    | Invertible Attention (Zha et al., 2021)
    | https://arxiv.org/abs/2106.09003
"""

from __future__ import annotations

__all__ = [
    "FAITHFUL_PREFIX",
    "KINDS",
    "PAPER_KINDS",
    "REGISTRY",
    "VARIANTS",
    "AttentionKind",
    "attention_kind",
    "parse_variant",
]

import inspect
from dataclasses import dataclass

from ..errors import ConfigError
from ..names import closest
from .certified_paper_attention import CertifiedPaperAttention
from .lipschitz_attention import (
    SIMILARITIES,
    AttentionBranch,
    ExternalAttention,
    L2SelfAttention,
    PaperAttention,
)

FAITHFUL_PREFIX = "faithful:"


@dataclass(frozen=True)
class AttentionKind:
    """One invertible attention kind.

    Arguments:
        name: The kind's name (``"dot"``).
        certified: The certified branch class (:math:`\\mathrm{Lip}(g) \\leq c` for every
            input and weight).
        faithful: The paper's uncertified reproduction of the kind, or None.
        similarity: For the paper's kinds, the similarity the branch classes take as
            their ``kind`` argument; None for branches that take no such argument.

    Examples:
        >>> kind = attention_kind("dot")
        >>> kind.build(8).lipschitz_bound() <= 0.9 + 1e-6
        True
        >>> kind.build(8, certified=False).lipschitz_bound() is None
        True
    """

    name: str
    certified: type[AttentionBranch]
    faithful: type[AttentionBranch] | None = None
    similarity: str | None = None

    def branch_class(self, certified: bool = True) -> type[AttentionBranch]:
        """The class of the certified or, with False, the faithful branch."""
        if certified:
            return self.certified
        if self.faithful is None:
            raise ConfigError(f"attention kind {self.name!r} has no faithful (uncertified) form")
        return self.faithful

    def option_names(self, certified: bool = True) -> set[str]:
        """The branch's own options (beyond ``channels`` and ``coeff``)."""
        parameters = inspect.signature(self.branch_class(certified).__init__).parameters
        return {
            name
            for name, p in parameters.items()
            if name not in ("self", "channels", "coeff", "kind") and p.kind is not p.VAR_KEYWORD
        }

    def build(
        self, channels: int, *, certified: bool = True, coeff: float = 0.9, **options
    ) -> AttentionBranch:
        """The branch g: (B, C, H, W) -> (B, C, H, W) on ``channels`` channels."""
        names = self.option_names(certified)
        unknown = set(options) - names
        if unknown:
            valid = ", ".join(sorted(names)) or "none"
            raise ValueError(
                f"unknown option(s) {', '.join(sorted(unknown))} for attention kind "
                f"{self.name!r}; valid: {valid}"
            )
        cls = self.branch_class(certified)
        if self.similarity is not None:
            return cls(channels, self.similarity, coeff=coeff, **options)
        return cls(channels, coeff=coeff, **options)


REGISTRY: dict[str, AttentionKind] = {
    kind.name: kind
    for kind in (
        *(
            AttentionKind(name, CertifiedPaperAttention, PaperAttention, similarity=name)
            for name in SIMILARITIES
        ),
        AttentionKind("external", ExternalAttention),
        AttentionKind("l2", L2SelfAttention),
    )
}
"""Every invertible attention kind, by name."""

KINDS: tuple[str, ...] = tuple(REGISTRY)
"""The names of the kinds, each certified by default."""

PAPER_KINDS: tuple[str, ...] = tuple(k for k, v in REGISTRY.items() if v.faithful is not None)
"""The kinds of Zha et al. (2021), the ones with a faithful (uncertified) form."""

VARIANTS: tuple[str, ...] = (*KINDS, *(FAITHFUL_PREFIX + k for k in PAPER_KINDS))
"""Every variant name: the certified kinds, then the faithful forms."""


def attention_kind(name: str) -> AttentionKind:
    """The registered kind called ``name``; a :class:`~flowattn.errors.ConfigError`
    (a ValueError) suggests the closest name."""
    if name not in REGISTRY:
        close = closest(name, KINDS)
        hint = f"did you mean {close!r}? " if close else ""
        raise ConfigError(f"unknown attention kind {name!r}; {hint}valid: {', '.join(KINDS)}")
    return REGISTRY[name]


def parse_variant(variant: str) -> tuple[AttentionKind, bool]:
    """The kind of a variant name and whether it is certified.

    Examples:
        >>> kind, certified = parse_variant("faithful:concat")
        >>> kind.name, certified
        ('concat', False)
    """
    certified = not variant.startswith(FAITHFUL_PREFIX)
    kind = attention_kind(variant.removeprefix(FAITHFUL_PREFIX))
    if not certified:
        kind.branch_class(certified=False)  # a clear error for a kind with no faithful form
    return kind, certified
