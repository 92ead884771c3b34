r"""Image density models: presets, configuration and the model API.

A model is an nflows ``Flow`` over images in :math:`[0, 1]^{C \times H \times W}`:
preprocessing (logit or shift, log-dets counted), then ``scales`` multi-scale levels,
each a squeeze followed by ``blocks`` flow steps, with half of the channels factored
out after every level but the last (the factored-out latents are kept, so decoding
reproduces the input), and a standard normal base distribution on the flattened
latent. Presets:

* ``iresnet``: i-ResNet (Behrmann et al., 2019): ActNorm + certified convolutional
  residual block (ELU). It trains with the unbiased Russian-roulette log-det by default
  (``estimator="series"`` gives i-ResNet's truncated series, whose bias training can
  exploit: see :meth:`DensityModel.series_bias_bound`).
* ``iresnet-attn``: i-ResNet with an invertible attention step at the end of the first
  scale, as in Zha et al. (2021); ``attention`` picks the kind (default ``external``),
  ``attention_scale`` another scale (fewer tokens, cheaper steps).
* ``resflow``: Residual Flows (Chen et al., 2019): LipSwish, unbiased Russian-roulette
  log-det with the Neumann gradient.
* ``glow``: Glow (Kingma & Dhariwal, 2018): ActNorm, 1x1 convolution, affine coupling.
* ``glow-attn``: Glow with ordinary (non-invertible) self-attention in the coupling
  conditioners of the first scale.

``size`` (``tiny``, ``small``, ``paper``) sets ``scales``, ``blocks`` and ``hidden``
unless they are given; ``paper`` is 3 scales x 16 blocks x 512 hidden channels.

References:
    | Invertible Attention (Zha et al., 2021)
    | https://arxiv.org/abs/2106.09003

    | Invertible Residual Networks (Behrmann et al., 2019)
    | https://arxiv.org/abs/1811.00995

    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
    | https://arxiv.org/abs/1807.03039
"""

from __future__ import annotations

__all__ = [
    "EXACT_MAX_DIMS",
    "PRESETS",
    "SIZES",
    "DensityModel",
    "ModelConfig",
    "build_model",
]

import contextlib
import dataclasses
import math
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from nflows.distributions import Distribution, StandardNormal
from nflows.flows import Flow
from nflows.transforms import (
    ActNorm,
    CompositeTransform,
    MultiscaleCompositeTransform,
    PointwiseAffineTransform,
    SqueezeTransform,
    Transform,
)
from torch import Tensor

from .errors import ConfigError
from .logdet import (
    ESTIMATORS,
    ExactLogDet,
    LogDetEstimator,
    PowerSeriesLogDet,
    RussianRouletteLogDet,
    estimator_defaults,
    make_estimator,
    series_truncation_bound,
)
from .metrics import BitsPerDim, bits_per_dim, summarize_bits_per_dim
from .names import check_names, closest
from .nn.attention_kinds import KINDS, PAPER_KINDS
from .nn.conv_branch import ACTIVATIONS, ConvResidualBranch
from .solvers import SOLVERS
from .transforms.attention_step import invertible_attention
from .transforms.glow import glow_step
from .transforms.preprocess import LogitTransform, UniformDequantization, outside_range
from .transforms.residual import ResidualTransform

Preset = Literal["iresnet", "iresnet-attn", "resflow", "glow", "glow-attn"]
PRESETS: tuple[str, ...] = typing.get_args(Preset)
SIZES = {
    "tiny": {"scales": 2, "blocks": 2, "hidden": 16},
    "small": {"scales": 3, "blocks": 4, "hidden": 64},
    "paper": {"scales": 3, "blocks": 16, "hidden": 512},
}
ORDINARY_ATTENTION = ("sagan",)
#: Images of at most this many values are evaluated with the exact log-det by default.
EXACT_MAX_DIMS = 256
#: Images per block of dequantisation noise drawn from one seeded generator.
NOISE_CHUNK = 1024
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
            64 at scale 1). Glow presets: the scale whose couplings use ``sagan``.
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
    attention_scale: int = 0
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
        from .configs import read_file

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
        values = self.to_dict()
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
        config = ModelConfig(**values)
        config._check()
        return config

    @property
    def residual(self) -> bool:
        return not self.preset.startswith("glow")

    def _check(self) -> None:
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ConfigError(f"image_shape must be (C, H, W), got {self.image_shape}")
        _, h, w = self.image_shape
        for name in ("scales", "blocks", "hidden", "n_terms", "n_probes", "max_iter"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if h % 2**self.scales or w % 2**self.scales:
            raise ConfigError(
                f"{self.scales} scales need H and W divisible by {2**self.scales}; "
                f"image_shape is {self.image_shape}: use fewer scales"
            )
        if (
            not isinstance(self.attention_scale, int)
            or isinstance(self.attention_scale, bool)
            or not 0 <= self.attention_scale < self.scales
        ):
            raise ConfigError(
                f"attention_scale must be an integer in [0, {self.scales - 1}] (the model "
                f"has {self.scales} scales), got {self.attention_scale!r}"
            )
        if not isinstance(self.attention_certified, bool):
            raise ConfigError(
                f"attention_certified must be true or false, got {self.attention_certified!r}"
            )
        if not 0 < self.coeff < 1 or not 0 < self.attention_coeff < 1:
            raise ConfigError("coeff and attention_coeff must be in (0, 1)")
        if self.preprocess not in PREPROCESSING:
            raise ConfigError(f"preprocess must be one of {', '.join(PREPROCESSING)}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {', '.join(SOLVERS)}")
        if self.residual:
            if self.activation not in ACTIVATIONS:
                raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}")
            if self.estimator not in ESTIMATORS:
                raise ConfigError(f"estimator must be one of {', '.join(ESTIMATORS)}")
            if self.attention is not None and self.attention not in KINDS:
                raise ConfigError(
                    f"preset {self.preset!r} takes an invertible attention kind "
                    f"({', '.join(KINDS)}) or none, got {self.attention!r}"
                )
            uncertified = self.attention is not None and not self.attention_certified
            if uncertified and self.attention not in PAPER_KINDS:
                raise ConfigError(
                    f"attention kind {self.attention!r} has no uncertified form: "
                    "attention_certified = false is for the paper's kinds "
                    f"({', '.join(PAPER_KINDS)})"
                )
            if self.extra_step not in (None, *EXTRA_STEPS):
                raise ConfigError(
                    f"extra_step must be one of {', '.join(EXTRA_STEPS)} or none, "
                    f"got {self.extra_step!r}"
                )
            if self.extra_step is not None and self.attention is not None:
                raise ConfigError(
                    f"extra_step={self.extra_step!r} is a control in place of the attention "
                    f"step: it takes attention = none, got {self.attention!r}"
                )
        elif self.extra_step is not None:
            raise ConfigError(f"extra_step is for residual presets, not {self.preset!r}")
        elif self.attention is not None and self.attention not in ORDINARY_ATTENTION:
            raise ConfigError(
                f"preset {self.preset!r} takes ordinary attention "
                f"({', '.join(ORDINARY_ATTENTION)}) or none, got {self.attention!r}"
            )


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


class DensityModel(Flow):
    r"""A flow density model over images, with the bits-per-dim and inversion API.

    ``log_prob(y)`` takes dequantised images :math:`y \in [0, 1]^{C \times H \times W}`
    (B, C, H, W) and returns the log-density (B,) in nats, every preprocessing log-det
    included. :meth:`bits_per_dim` takes 8-bit images. :meth:`encode` maps images to
    the flat latent (B, D), :meth:`decode` back, :meth:`sample` draws images.

    Arguments:
        preprocess: Transform applied first (e.g. logit), data -> real line.
        body: The flow proper, ending in flat (B, D) latents or image-shaped ones.
        image_shape: (C, H, W).
        distribution: Base distribution (default standard normal on D values).
        config: The :class:`ModelConfig` it was built from, if any.
        levels: The body's steps grouped by scale (nflows ``CompositeTransform`` each,
            already inside ``body``), which names the residual steps ``scaleL.stepK``;
            without it they are named by their module path.

    Examples:
        >>> model = build_model("iresnet-attn", image_shape=(1, 8, 8), blocks=1, hidden=8)
        >>> x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
        >>> model.bits_per_dim(x).mean > 0
        True
        >>> bool((model.reconstruct(x) == x).all())
        True
    """

    def __init__(
        self,
        preprocess: Transform,
        body: Transform,
        image_shape: tuple[int, int, int],
        distribution: Distribution | None = None,
        config: ModelConfig | None = None,
        levels: Sequence[CompositeTransform] | None = None,
    ):
        self.num_dims = math.prod(image_shape)
        if distribution is None:
            distribution = StandardNormal([self.num_dims])
        super().__init__(CompositeTransform([preprocess, body]), distribution)
        self.image_shape = tuple(image_shape)
        self.config = config
        self.dequantize = UniformDequantization(bits=8)
        # (readable name, step) of every residual step; a plain list, not submodules (the
        # steps are registered once, inside the body)
        self._residual_steps = _residual_steps_of(body, levels)

    @property
    def device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def _check_images(self, x: Tensor, *, uint8: bool | None = None) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"model expects images (B, {', '.join(map(str, self.image_shape))}), "
                f"got shape {tuple(x.shape)}"
            )
        if uint8 is True and x.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images (0..255), got {x.dtype}")
        if uint8 is False:
            if not x.is_floating_point():
                raise TypeError(
                    f"expected float images in [0, 1], got {x.dtype} "
                    "(use bits_per_dim for 8-bit images)"
                )
            if x.numel() and outside_range(x, 0, 1):
                raise ValueError("expected float images in [0, 1]")
        return x.to(self.device)

    def _log_prob(self, inputs: Tensor, context: Tensor | None) -> Tensor:
        inputs = self._check_images(inputs, uint8=False)
        if not torch.is_grad_enabled():  # branches cache their certificates already
            return super()._log_prob(inputs, context)
        with contextlib.ExitStack() as stack:
            # certificates first, while no activation is held (peak memory)
            for _, step in self.residual_steps():
                stack.enter_context(step.certified_once())
            return super()._log_prob(inputs, context)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Puts the model in eval mode for the block, restoring the previous mode."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @contextlib.contextmanager
    def log_dets_skipped(self) -> Iterator[None]:
        """Every residual step skips its log-det estimate within the block
        (:meth:`~flowattn.transforms.residual.ResidualTransform.log_dets_skipped`):
        :meth:`encode`, :meth:`decode` and :meth:`sample` discard the log-dets."""
        with contextlib.ExitStack() as stack:
            for _, step in self.residual_steps():
                stack.enter_context(step.log_dets_skipped())
            yield

    def residual_steps(self) -> Iterator[tuple[str, ResidualTransform]]:
        """The residual steps (convolutional and attention) with readable names such as
        ``scale0.step2 (ConvResidualBranch)``."""
        yield from self._residual_steps

    def estimator_description(self) -> str:
        """The log-det estimator(s) of the residual steps, or that there are none."""
        groups: dict[tuple, list[LogDetEstimator]] = {}
        for _, step in self.residual_steps():
            est = step.estimator
            if isinstance(est, RussianRouletteLogDet):  # one line whatever p each step has
                key = (type(est), est.n_exact, est.distribution, est.lam, est.per_sample,
                       est.n_probes, est.probe)  # fmt: skip
            else:
                key = (type(est), est.describe())
            groups.setdefault(key, []).append(est)
        names = [
            RussianRouletteLogDet.describe_steps(group)
            if isinstance(group[0], RussianRouletteLogDet)
            else group[0].describe()
            for group in groups.values()
        ]
        return "; ".join(names) if names else "exact (no residual steps)"

    def residual_step_facts(self) -> list[tuple[str, ResidualTransform, int, float | None]]:
        """``(name, step, dims, bound)`` for every residual step: its input's number of
        values D per image and its branch's certified Lipschitz bound at the step's
        ``input_shape`` (None where uncertified)."""
        facts = []
        for name, step in self.residual_steps():
            if step.input_shape is None:
                raise ValueError(
                    f"residual step {name} has no input_shape: build it with "
                    "ResidualTransform(..., input_shape=(C, H, W)) for its certificate"
                )
            facts.append((name, step, math.prod(step.input_shape), step.lipschitz_bound()))
        return facts

    def lipschitz_bounds(self) -> dict[str, float | None]:
        """Each residual step's certified Lipschitz bound at the model's image size (None
        where uncertified)."""
        return {name: bound for name, _, _, bound in self.residual_step_facts()}

    def series_bias_bound(self, n_terms: int) -> float:
        r"""A certified bound, in bits/dim, on the bias of the log-density when every
        residual step's log-det is the power series truncated after ``n_terms`` terms.

        A step with D values and certified bound :math:`L \geq \|J_g\|` (any induced
        norm) has :math:`|\operatorname{tr}(J_g^k)| \leq D \rho(J_g)^k \leq D L^k`, so its
        truncation error is at most
        :math:`-D (\ln(1 - L) + \sum_{k \leq n} L^k / k)` nats
        (:func:`~flowattn.logdet.series_truncation_bound`); the bound is the sum over
        steps divided by :math:`D_{image} \ln 2`. Infinite when a step is uncertified.

        Examples:
            >>> model = build_model("iresnet", image_shape=(1, 8, 8), blocks=1, hidden=8)
            >>> model.series_bias_bound(5) > model.series_bias_bound(20) > 0
            True
        """
        return self._series_bias_bound(self.residual_step_facts(), n_terms)

    def _series_bias_bound(self, facts: list, n_terms: int) -> float:
        """:meth:`series_bias_bound` from :meth:`residual_step_facts` already taken."""
        total = 0.0
        for _, _, dims, bound in facts:
            if bound is None:
                return math.inf
            total += series_truncation_bound(bound, n_terms, dims)
        return total / (self.num_dims * math.log(2))

    @contextlib.contextmanager
    def using_estimator(self, estimator: str | LogDetEstimator | None, **options: Any):
        """Temporarily replaces every residual step's log-det estimator.

        ``estimator`` is an instance (shared by every step) or a name for
        :func:`~flowattn.logdet.make_estimator` with ``options``; a named estimator gets
        each step's certified Lipschitz bound (``lipschitz``: it chooses the roulette's
        distribution) unless ``options`` give one. None changes nothing.
        """
        if estimator is None:
            yield
            return
        facts = self.residual_step_facts()
        saved = [(step, step.estimator) for _, step, _, _ in facts]
        try:
            for _, step, _, bound in facts:
                if isinstance(estimator, LogDetEstimator):
                    step.estimator = estimator
                else:
                    step.estimator = make_estimator(estimator, **{"lipschitz": bound, **options})
            yield
        finally:
            for step, original in saved:
                step.estimator = original

    def default_estimator(self) -> str:
        """The log-det estimator :meth:`bits_per_dim` uses when none is named: ``exact``
        when the images have at most :data:`EXACT_MAX_DIMS` values (the dense Jacobian is
        affordable), else the unbiased ``roulette``; ``exact`` too for models without
        residual steps (their log-dets are exact anyway)."""
        if self.num_dims <= EXACT_MAX_DIMS or not any(True for _ in self.residual_steps()):
            return "exact"
        return "roulette"

    def bits_per_dim(
        self,
        x: Tensor,
        *,
        repeats: int = 1,
        batch_size: int = 256,
        estimator: str | LogDetEstimator | None = None,
        seed: int = 0,
        progress: bool = False,
        **estimator_options: Any,
    ) -> BitsPerDim:
        r"""Bits per dimension of 8-bit images, with an honest standard error.

        Each image is dequantised with uniform noise, :math:`y = (x + u) / 256`, and
        :math:`\mathrm{bpd} = -(\ln p(y) - D \ln 256) / (D \ln 2)`, an upper bound on
        the code length of x (see :mod:`flowattn.metrics`); a model uniform on
        :math:`[0, 1)^D` gets exactly 8. Runs in eval mode.

        The default log-det estimator is exact where affordable (images of at most
        :data:`EXACT_MAX_DIMS` values), else the unbiased Russian roulette with draws
        independent per image and a distribution chosen from each step's certified
        Lipschitz bound so its variance is finite: the standard error over images is then
        a valid one. A truncated ``series`` must be asked for; its figure carries the
        certified bound on its bias (:meth:`series_bias_bound`).

        The dequantisation noise comes from its own generator seeded with ``seed`` (image
        i's noise does not depend on ``batch_size`` or on the estimator's draws), so two
        models evaluated with one seed see the same noise and their figures can be
        compared per image (:func:`~flowattn.metrics.paired_difference`).

        Arguments:
            x: uint8 images (N, C, H, W).
            repeats: Dequantisation and log-det draws per image.
            batch_size: Images per forward pass (fewer for the exact estimator on large
                images, whose dense Jacobians are D x D per image).
            estimator: Log-det estimator: a name (``exact``, ``roulette``, ``series``),
                an instance, or None for :meth:`default_estimator`.
            seed: Seed of the dequantisation noise.
            progress: Show a progress bar.
            estimator_options: Options of a named estimator (``n_terms``, ``n_probes``,
                ``p``...).

        Returns:
            A :class:`~flowattn.metrics.BitsPerDim`: mean, standard error, the estimator,
            its certified bias bound (0 unless a series was asked for), the per-image
            values and the seconds it took.
        """
        x = self._check_images(x, uint8=True)
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        name = self.default_estimator() if estimator is None else estimator
        bias_bound, error_bar_certified = self._estimator_guarantees(name, estimator_options)
        if name == "exact" or isinstance(name, ExactLogDet):
            batch_size = min(batch_size, max(1, 2**26 // self.num_dims**2))
        start_time = time.perf_counter()
        with (
            self.evaluating(),
            self.using_estimator(name, **estimator_options),
            torch.no_grad(),
        ):
            description = self.estimator_description()
            values = self._per_image_bits_per_dim(x, repeats, batch_size, seed, progress)
        result = summarize_bits_per_dim(
            values,
            description,
            bias_bound=bias_bound,
            error_bar_certified=error_bar_certified,
        )
        return dataclasses.replace(result, seconds=time.perf_counter() - start_time)

    def _per_image_bits_per_dim(
        self, x: Tensor, repeats: int, batch_size: int, seed: int, progress: bool
    ) -> Tensor:
        """Bits/dim (N, repeats) of every image and draw, with the current estimator;
        image i's noise comes from the generator of its chunk of :data:`NOISE_CHUNK`."""
        values = torch.empty(x.shape[0], repeats, dtype=torch.float64)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=x.shape[0] * repeats, desc="bits/dim", unit="image")
        for r in range(repeats):
            for chunk in range(0, x.shape[0], NOISE_CHUNK):
                xc = x[chunk : chunk + NOISE_CHUNK]
                generator = torch.Generator().manual_seed(
                    hash((seed, r, chunk // NOISE_CHUNK)) % 2**63
                )
                noise = torch.rand(xc.shape, generator=generator)
                for start in range(0, xc.shape[0], batch_size):
                    xb = xc[start : start + batch_size]
                    nb = noise[start : start + batch_size]
                    y, logdet = self.dequantize.with_noise(xb, nb.to(self.device))
                    log_prob = self.log_prob(y) + logdet
                    bpd = bits_per_dim(log_prob, self.num_dims).cpu()
                    values[chunk + start : chunk + start + len(xb), r] = bpd
                    if bar is not None:
                        bar.update(len(xb))
        if bar is not None:
            bar.close()
        return values

    def _estimator_guarantees(
        self, estimator: str | LogDetEstimator, options: dict[str, Any]
    ) -> tuple[float, bool]:
        """(certified bias bound in bits/dim, whether the error bar is certified) of an
        evaluation with this estimator."""
        if isinstance(estimator, str) and estimator not in ESTIMATORS:
            make_estimator(estimator)  # raises the error listing the valid names
        facts = self.residual_step_facts()
        if not facts:
            return 0.0, True
        if isinstance(estimator, PowerSeriesLogDet) or estimator == "series":
            n_terms = estimator.n_terms if isinstance(estimator, PowerSeriesLogDet) else None
            n_terms = options.get("n_terms", 5) if n_terms is None else n_terms
            return self._series_bias_bound(facts, n_terms), True
        if isinstance(estimator, RussianRouletteLogDet):
            return 0.0, estimator.variance_certified and estimator.per_sample
        if estimator == "roulette":
            certified = all(
                make_estimator("roulette", **{"lipschitz": bound, **options}).variance_certified
                and options.get("per_sample", True)
                for _, _, _, bound in facts
            )
            return 0.0, certified
        return 0.0, True

    def encode(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> latents (B, D). uint8 images use bin centres."""
        if x.dtype == torch.uint8:
            x, _ = UniformDequantization(noise=False)(self._check_images(x, uint8=True))
        x = self._check_images(x, uint8=False)
        with self.evaluating(), torch.no_grad(), self.log_dets_skipped():
            z, _ = self._transform(x)
        return z.reshape(x.shape[0], -1)

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, D) -> images (B, C, H, W) in [0, 1] (unclamped)."""
        if z.dim() != 2 or z.shape[1] != self.num_dims:
            raise ValueError(f"expected latents (B, {self.num_dims}), got shape {tuple(z.shape)}")
        with self.evaluating(), torch.no_grad(), self.log_dets_skipped():
            x, _ = self._transform.inverse(z.to(self.device))
        return x.reshape(z.shape[0], *self.image_shape)

    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(encode(x)): float images in [0, 1] -> float; uint8 -> uint8 (quantised)."""
        x_hat = self.decode(self.encode(x))
        if x.dtype == torch.uint8:
            x_hat, _ = self.dequantize.inverse(x_hat)
            return x_hat.to(torch.uint8)
        return x_hat

    def sample(
        self,
        num_samples: int,
        context: Tensor | None = None,
        batch_size: int | None = None,
        *,
        temperature: float = 1.0,
        as_uint8: bool = False,
    ) -> Tensor:
        """Draws images (n, C, H, W) in [0, 1] (or uint8) with latents scaled by ``temperature``."""
        if context is not None:
            raise ValueError("image density models are unconditional: context must be None")
        if temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {temperature}")
        batch_size = num_samples if batch_size is None else batch_size
        out = []
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            z = torch.randn(n, self.num_dims, device=self.device) * temperature
            out.append(self.decode(z).clamp(0, 1))
        images = torch.cat(out) if out else torch.empty(0, *self.image_shape)
        if as_uint8:
            images, _ = self.dequantize.inverse(images)
            return images.to(torch.uint8)
        return images


def _residual_steps_of(
    body: Transform, levels: Sequence[CompositeTransform] | None
) -> list[tuple[str, ResidualTransform]]:
    """(readable name, step) of the residual steps in ``body``, in order."""
    if levels is None:
        return [(n, m) for n, m in body.named_modules() if isinstance(m, ResidualTransform)]
    steps = []
    for level, composite in enumerate(levels):
        (children,) = composite.children()  # the composite's one ModuleList of steps
        for k, step in enumerate(children):
            if isinstance(step, ResidualTransform):
                steps.append((f"scale{level}.step{k} ({type(step.branch).__name__})", step))
    return steps


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
