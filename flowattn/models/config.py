"""``ModelConfig``: everything that defines a model's architecture, with the presets'
and sizes' defaults, checked once when it is resolved."""

from __future__ import annotations

__all__ = ["EXTRA_STEPS", "MAX_ATTENTION_TOKENS", "PRESETS", "SIZES", "ModelConfig"]

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..configs import checked_types, read_file
from ..errors import ConfigError
from ..logdet import ESTIMATORS, estimator_defaults
from ..names import check_names, closest
from ..nn.attention_kinds import attention_kind
from ..nn.conv_branch import ACTIVATIONS
from ..solvers import SOLVERS

Preset = Literal["iresnet", "iresnet-attn", "resflow", "glow", "glow-attn"]
PRESETS: tuple[str, ...] = typing.get_args(Preset)
SIZES = {
    "tiny": {"scales": 2, "blocks": 2, "hidden": 16},
    "small": {"scales": 3, "blocks": 4, "hidden": 64},
    "paper": {"scales": 3, "blocks": 16, "hidden": 512},
}
ORDINARY_ATTENTION = ("sagan",)
PREPROCESSING = ("logit", "shift")

_PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "iresnet": {"activation": "elu", "estimator": "roulette", "preprocess": "logit"},
    "iresnet-attn": {
        "activation": "elu",
        "estimator": "roulette",
        "attention": "external",
        "preprocess": "logit",
    },
    "resflow": {"activation": "lipswish", "estimator": "roulette", "preprocess": "logit"},
    "glow": {"preprocess": "shift"},
    "glow-attn": {"attention": "sagan", "preprocess": "shift"},
}


#: The most tokens the attention step gets by default (``ModelConfig.attention_scale``).
MAX_ATTENTION_TOKENS = 64

EXTRA_STEPS = ("actnorm", "conv")
"""The controls ``ModelConfig.extra_step`` can put where the attention step would be."""


@dataclass
class ModelConfig:
    """Everything that defines a model's architecture (see :func:`build_model`).

    Attributes:
        preset: One of :data:`PRESETS`.
        image_shape: (C, H, W) of the images.
        size: ``tiny``, ``small`` or ``paper``: defaults for scales, blocks, hidden.
        scales: Multi-scale levels (H and W must be divisible by 2**scales).
        blocks: Flow steps per level.
        hidden: Hidden channels of residual branches and coupling conditioners.
        coeff: Certified Lipschitz bound of each convolutional residual branch.
        activation: ``elu`` or ``lipswish`` (residual presets).
        attention: Invertible kind (residual presets: one of
            :data:`~flowattn.transforms.KINDS`), ``sagan`` (Glow presets), or None.
        attention_coeff: Lipschitz coefficient of the invertible attention step.
        attention_certified: For the paper's four kinds, the certified version (default)
            or, with False, the faithful uncertified reproduction.
        attention_options: Extra branch options (``heads``, ``slots``, ``reduction``...).
        attention_scale: The scale (0 = the first) at whose end the attention step, or
            the ``extra_step`` control, goes. Each scale halves H and W, so the step's
            N = H W / 4**(attention_scale + 1) tokens shrink fourfold per scale, and its
            N x N responses sixteenfold (on 3 x 32 x 32 images: 256 tokens at scale 0,
            64 at scale 1). None (the default): for residual presets the first scale
            whose step has at most :data:`MAX_ATTENTION_TOKENS` tokens (the last if none
            has): 0 on 8x8 images, 1 on 32x32, where the attention step at scale 0 took
            51-67% of a training step and lost at equal time (docs/results.md); for Glow
            presets 0. Glow presets: the scale whose couplings use ``sagan``.
        extra_step: Residual presets without attention: one more step where
            ``iresnet-attn`` puts its attention step (the end of ``attention_scale``), the
            controls of an attention ablation: ``actnorm`` (the attention step's ActNorm
            with no branch, so the step count is the same) or ``conv`` (that ActNorm and
            one more convolutional residual block, with ``coeff``). None: no extra step.
        estimator: The training log-det estimator of residual presets: ``roulette``
            (default: unbiased, geometric number of terms chosen from the certified
            bounds ``coeff`` and ``attention_coeff`` so its variance is finite, one draw
            per batch, Neumann gradient), ``series`` (truncated: biased, and training
            can exploit the bias) or ``exact``.
        n_terms: Series terms (default 5), or exact leading terms of the roulette
            (default 2).
        n_probes: Hutchinson probes per sample.
        estimator_options: Extra estimator options (``gradient``, ``memory_efficient``...).
        solver: Fixed-point solver of the inverses (``anderson`` or ``banach``).
        max_iter: Iteration cap of the inverses.
        preprocess: ``logit`` (Real NVP) or ``shift`` (Glow's y - 1/2).
        logit_alpha: Margin of the logit.
    """

    preset: str = "iresnet-attn"
    image_shape: tuple[int, int, int] = (3, 32, 32)
    size: str = "tiny"
    scales: int | None = None
    blocks: int | None = None
    hidden: int | None = None
    coeff: float = 0.9
    activation: str | None = None
    attention: str | None = None
    attention_coeff: float = 0.9
    attention_certified: bool = True
    attention_options: dict[str, Any] = field(default_factory=dict)
    attention_scale: int | None = None
    extra_step: str | None = None
    estimator: str | None = None
    n_terms: int | None = None
    n_probes: int = 1
    estimator_options: dict[str, Any] = field(default_factory=dict)
    solver: str = "anderson"
    max_iter: int = 500
    preprocess: str | None = None
    logit_alpha: float = 0.05

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Builds and resolves a config; unknown keys raise a ValueError naming the closest."""
        check_names(values, [f.name for f in dataclasses.fields(cls)], "model option")
        return cls(**values).resolved()

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> ModelConfig:
        """Reads a TOML file: its ``[model]`` table, or its top level if it has none."""
        data = read_file(path)
        values = data.get("model", data)
        return cls.from_dict({**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self) -> ModelConfig:
        """Fills preset and size defaults and checks every value."""
        if self.preset not in PRESETS:
            close = closest(self.preset, PRESETS)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise ConfigError(
                f"unknown preset {self.preset!r}{hint}; valid presets: {', '.join(PRESETS)}"
            )
        if self.size not in SIZES:
            raise ConfigError(f"unknown size {self.size!r}; valid sizes: {', '.join(SIZES)}")
        values = checked_types(self).to_dict()  # the one type check (flowattn.configs)
        for key, value in {**SIZES[self.size], **_PRESET_DEFAULTS[self.preset]}.items():
            if values[key] is None:
                values[key] = value
        if values["n_terms"] is None:
            values["n_terms"] = 2 if values["estimator"] == "roulette" else 5
        estimator = values["estimator"]
        if estimator in ESTIMATORS and "gradient" not in values["estimator_options"]:
            # recorded, so that a saved config keeps the log-det gradient it trained with
            # should the default change (the series' did, from "backprop", in 0.2.1)
            default = estimator_defaults(estimator).get("gradient")
            if default is not None:
                values["estimator_options"] = {**values["estimator_options"], "gradient": default}
        for key in ("attention", "extra_step"):
            if values[key] in ("none", ""):
                values[key] = None
        values["image_shape"] = tuple(int(s) for s in values["image_shape"])
        if values["attention_scale"] is None:
            residual = not values["preset"].startswith("glow")
            values["attention_scale"] = _default_attention_scale(values) if residual else 0
        config = ModelConfig(**values)
        _check(config)
        return config

    @property
    def residual(self) -> bool:
        return not self.preset.startswith("glow")


def _check(config: ModelConfig) -> None:
    """Raises a :class:`~flowattn.errors.ConfigError` naming the first setting of a
    resolved config that is out of range or inconsistent with another."""
    if len(config.image_shape) != 3 or min(config.image_shape) < 1:
        raise ConfigError(f"image_shape must be (C, H, W), got {config.image_shape}")
    _, h, w = config.image_shape
    for name in ("scales", "blocks", "hidden", "n_terms", "n_probes", "max_iter"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {getattr(config, name)!r}")
    if h % 2**config.scales or w % 2**config.scales:
        raise ConfigError(
            f"{config.scales} scales need H and W divisible by {2**config.scales}; "
            f"image_shape is {config.image_shape}: use fewer scales"
        )
    if not 0 <= config.attention_scale < config.scales:
        raise ConfigError(
            f"attention_scale must be an integer in [0, {config.scales - 1}] (the model "
            f"has {config.scales} scales), got {config.attention_scale!r}"
        )
    if not 0 < config.coeff < 1 or not 0 < config.attention_coeff < 1:
        raise ConfigError("coeff and attention_coeff must be in (0, 1)")
    if config.preprocess not in PREPROCESSING:
        raise ConfigError(f"preprocess must be one of {', '.join(PREPROCESSING)}")
    if config.solver not in SOLVERS:
        raise ConfigError(f"solver must be one of {', '.join(SOLVERS)}")
    if config.residual:
        if config.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}")
        if config.estimator not in ESTIMATORS:
            raise ConfigError(f"estimator must be one of {', '.join(ESTIMATORS)}")
        if config.attention is not None:  # the registry names an unknown or missing form
            attention_kind(config.attention).branch_class(config.attention_certified)
        if config.extra_step not in (None, *EXTRA_STEPS):
            raise ConfigError(
                f"extra_step must be one of {', '.join(EXTRA_STEPS)} or none, "
                f"got {config.extra_step!r}"
            )
        if config.extra_step is not None and config.attention is not None:
            raise ConfigError(
                f"extra_step={config.extra_step!r} is a control in place of the attention "
                f"step: it takes attention = none, got {config.attention!r}"
            )
    elif config.extra_step is not None:
        raise ConfigError(f"extra_step is for residual presets, not {config.preset!r}")
    elif config.attention is not None and config.attention not in ORDINARY_ATTENTION:
        raise ConfigError(
            f"preset {config.preset!r} takes ordinary attention "
            f"({', '.join(ORDINARY_ATTENTION)}) or none, got {config.attention!r}"
        )


def _default_attention_scale(values: dict[str, Any]) -> int:
    """The first scale whose step sees at most :data:`MAX_ATTENTION_TOKENS` tokens (H W /
    4**(scale + 1)), else the last; 0 where the sizes are not valid yet (:func:`_check`
    names the problem)."""
    scales, shape = values["scales"], values["image_shape"]
    if scales < 1 or len(shape) != 3:  # the types are checked already
        return 0
    _, h, w = shape
    for scale in range(scales):
        if (h >> (scale + 1)) * (w >> (scale + 1)) <= MAX_ATTENTION_TOKENS:
            return scale
    return scales - 1
