"""The image density model: an nflows ``Flow`` with the bits/dim, encode, decode and
sample API (evaluation itself is :mod:`flowattn.evaluation`)."""

from __future__ import annotations

__all__ = ["DensityModel", "draw_from"]

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from nflows.distributions import Distribution, StandardNormal
from nflows.flows import Flow
from nflows.transforms import CompositeTransform, Transform
from torch import Tensor, nn

from .. import evaluation
from ..images import check_images
from ..logdet import LogDetEstimator
from ..transforms.preprocess import UniformDequantization
from ..transforms.residual import ResidualTransform

if TYPE_CHECKING:
    from .config import ModelConfig


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
        >>> from flowattn import build_model
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

    def check_images(self, x: Tensor, *, uint8: bool | None = None) -> Tensor:
        """``x`` on the model's device after :func:`flowattn.images.check_images` with the
        model's shape: uint8 (``uint8=True``), floats in [0, 1] (False) or either (None)."""
        return check_images(x, shape=self.image_shape, uint8=uint8, owner="model").to(self.device)

    def _log_prob(self, inputs: Tensor, context: Tensor | None) -> Tensor:
        inputs = self.check_images(inputs, uint8=False)
        # certificates first, while no activation is held (peak memory)
        with self.certified_once():
            return super()._log_prob(inputs, context)

    @contextlib.contextmanager
    def certified_once(self) -> Iterator[None]:
        """Every residual step computes its certificate once, on entry, for the block
        (:meth:`~flowattn.transforms.residual.ResidualTransform.certified_once`): leave
        it before the weights change."""
        with _every_step(self._residual_steps, "certified_once"):
            yield

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
        with _every_step(self._residual_steps, "log_dets_skipped"):
            yield

    def residual_steps(self) -> Iterator[tuple[str, ResidualTransform]]:
        """The residual steps (convolutional and attention) with readable names such as
        ``scale0.step2 (ConvResidualBranch)``."""
        yield from self._residual_steps

    def lipschitz_bounds(self) -> dict[str, float | None]:
        """Each residual step's certified Lipschitz bound at the model's image size (None
        where uncertified)."""
        return {name: step.lipschitz_bound() for name, step in self.residual_steps()}

    #: Bits/dim of uint8 images (N, C, H, W) with an honest standard error and the
    #: estimator's certified bias bound: :func:`flowattn.evaluation.bits_per_dim`, as a
    #: method (the model is its first argument).
    bits_per_dim = evaluation.bits_per_dim

    def encode(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> latents (B, D). uint8 images use bin centres."""
        if x.dtype == torch.uint8:
            x, _ = UniformDequantization(noise=False)(self.check_images(x, uint8=True))
        x = self.check_images(x, uint8=False)
        with self.evaluating(), torch.no_grad(), self.log_dets_skipped(), self.certified_once():
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
        return _levels(self.dequantize, x_hat) if x.dtype == torch.uint8 else x_hat

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
        return _levels(self.dequantize, images) if as_uint8 else images


def draw_from(model: nn.Module, generator: torch.Generator | None) -> int:
    """Makes every random draw of ``model`` (the log-det estimators' probes and numbers of
    terms, the dequantisation noise) come from ``generator``, a CPU generator, instead of
    torch's default one (None: back to it). Returns the number of modules set.

    Examples:
        >>> from flowattn.models import build_model
        >>> model = build_model("iresnet", image_shape=(1, 4, 4), scales=1, blocks=1, hidden=4)
        >>> x = torch.rand(2, 1, 4, 4)
        >>> runs = []
        >>> for _ in range(2):
        ...     _ = draw_from(model, torch.Generator().manual_seed(0))
        ...     runs.append(model.log_prob(x))
        >>> torch.equal(*runs)
        True
    """
    drawing = [m for m in model.modules() if isinstance(m, LogDetEstimator | UniformDequantization)]
    for module in drawing:
        module.generator = generator
    return len(drawing)


def _levels(dequantize: UniformDequantization, images: Tensor) -> Tensor:
    """Images in [0, 1] quantised to uint8 levels (the dequantisation's inverse)."""
    return dequantize.inverse(images)[0].to(torch.uint8)


@contextlib.contextmanager
def _every_step(steps: list[tuple[str, ResidualTransform]], context: str) -> Iterator[None]:
    """Enters the context manager method ``context`` of every step for the block."""
    with contextlib.ExitStack() as stack:
        for _, step in steps:
            stack.enter_context(getattr(step, context)())
        yield


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
