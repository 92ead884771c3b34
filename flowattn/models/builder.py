"""``build_model``: a multi-scale residual (i-ResNet, Residual Flows, invertible
attention) or coupling (Glow) density model from a :class:`ModelConfig`."""

from __future__ import annotations

__all__ = ["build_model"]

from pathlib import Path
from typing import Any

from nflows.transforms import (
    ActNorm,
    CompositeTransform,
    MultiscaleCompositeTransform,
    PointwiseAffineTransform,
    SqueezeTransform,
    Transform,
)

from ..logdet import LogDetEstimator, make_estimator
from ..nn.conv_branch import ConvResidualBranch
from ..transforms.attention_step import invertible_attention
from ..transforms.glow import glow_step
from ..transforms.preprocess import LogitTransform
from ..transforms.residual import ResidualTransform
from .config import ModelConfig
from .density import DensityModel


def _residual_level(
    config: ModelConfig, shape: tuple[int, int, int], level: int
) -> list[Transform]:
    def estimator(lipschitz: float) -> LogDetEstimator:
        options = {"n_terms": config.n_terms, "n_probes": config.n_probes}
        if config.estimator == "roulette":
            # the branches' bounds (<= coeff by construction) choose a finite-variance
            # roulette; training shares one draw per batch (unbiased batch mean, fewer terms)
            options.update(lipschitz=lipschitz, per_sample=False)
        return make_estimator(config.estimator, **{**options, **config.estimator_options})

    channels = shape[0]

    def conv_block() -> list[Transform]:
        branch = ConvResidualBranch(channels, config.hidden, config.coeff, config.activation)
        residual = ResidualTransform(
            branch,
            estimator(config.coeff),
            solver=config.solver,
            max_iter=config.max_iter,
            input_shape=shape,
        )
        return [ActNorm(channels), residual]

    steps: list[Transform] = []
    for _ in range(config.blocks):
        steps += conv_block()
    here = level == config.attention_scale
    if here and config.attention is not None:
        if config.attention_certified or config.estimator != "roulette":
            attention_estimator = estimator(config.attention_coeff)
        else:
            # A faithful (uncertified) paper kind can be far from contractive: the full
            # series the roulette estimates then diverges (non-finite losses), so it
            # trains with the paper's own truncated series, as the paper does.
            attention_estimator = make_estimator("series", n_terms=5, n_probes=config.n_probes)
        step = invertible_attention(
            config.attention,
            channels,
            certified=config.attention_certified,
            coeff=config.attention_coeff,
            estimator=attention_estimator,
            solver=config.solver,
            max_iter=config.max_iter,
            input_shape=shape,
            **config.attention_options,
        )
        steps += [ActNorm(channels), step]
    elif here and config.extra_step == "actnorm":
        steps.append(ActNorm(channels))
    elif here and config.extra_step == "conv":
        steps += conv_block()
    return steps


def _coupling_level(
    config: ModelConfig, shape: tuple[int, int, int], level: int
) -> list[Transform]:
    channels = shape[0]
    attention = level == config.attention_scale and config.attention == "sagan"
    return [
        glow_step(channels, config.hidden, attention=attention, flip=bool(b % 2))
        for b in range(config.blocks)
    ]


def build_model(
    preset: str | Path | ModelConfig = "iresnet-attn",
    image_shape: tuple[int, int, int] | None = None,
    **config: Any,
) -> DensityModel:
    r"""Builds a density model from a preset name, a TOML config file or a config.

    Arguments:
        preset: A name in :data:`PRESETS`, a path to a ``.toml`` file (its ``[model]``
            table), or a :class:`ModelConfig`.
        image_shape: (C, H, W) of the images (default (3, 32, 32), or the file's).
        config: Overrides of :class:`ModelConfig` fields (``size``, ``scales``,
            ``blocks``, ``hidden``, ``attention``, ``estimator``...).

    Returns:
        A :class:`DensityModel`.

    Examples:
        >>> model = build_model("glow", image_shape=(3, 8, 8), size="tiny")
        >>> model.sample(2).shape
        torch.Size([2, 3, 8, 8])
    """
    if image_shape is not None:
        config["image_shape"] = tuple(image_shape)
    if isinstance(preset, ModelConfig):
        cfg = ModelConfig.from_dict({**preset.to_dict(), **config})
    elif isinstance(preset, Path) or str(preset).endswith(".toml"):
        cfg = ModelConfig.from_file(preset, **config)
    else:
        cfg = ModelConfig.from_dict({"preset": preset, **config})

    if cfg.preprocess == "logit":
        preprocess: Transform = LogitTransform(cfg.logit_alpha)
    else:
        preprocess = PointwiseAffineTransform(shift=-0.5, scale=1.0)

    body = MultiscaleCompositeTransform(cfg.scales)
    shape: tuple[int, ...] | None = cfg.image_shape
    level_steps = _residual_level if cfg.residual else _coupling_level
    levels: list[CompositeTransform] = []
    for level in range(cfg.scales):
        c, h, w = shape
        c, h, w = 4 * c, h // 2, w // 2
        steps = [SqueezeTransform(), *level_steps(cfg, (c, h, w), level)]
        levels.append(CompositeTransform(steps))
        shape = body.add_transform(levels[-1], (c, h, w))
    return DensityModel(preprocess, body, cfg.image_shape, config=cfg, levels=levels)
