r"""Training of density models by maximum likelihood on dequantised 8-bit images.

The loss is the bits-per-dim of the batch (:mod:`flowattn.metrics` convention), with
fresh dequantisation noise and log-det probes at every step; Adam with linear
learning-rate warm-up and gradient-norm clipping, as in i-ResNet and Glow.

References:
    | Invertible Residual Networks (Behrmann et al., 2019)
    | https://arxiv.org/abs/1811.00995
"""

from __future__ import annotations

__all__ = ["TrainResult", "train"]

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .metrics import bits_per_dim
from .models import DensityModel


@dataclass
class TrainResult:
    """What a call to :func:`train` did.

    Attributes:
        steps: Optimiser steps taken.
        images: Training images seen.
        seconds: Wall-clock time spent in training steps.
        losses: Training bits-per-dim of every step.
        skipped: Steps skipped because the loss or gradient was not finite.
    """

    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    skipped: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.nan


def train(
    model: DensityModel,
    images: Tensor,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 100,
    clip: float | None = 100.0,
    max_steps: int | None = None,
    time_budget: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> TrainResult:
    r"""Trains ``model`` on uint8 ``images`` (N, C, H, W) until a step or time budget.

    Arguments:
        model: The density model (moved to nothing: put it on its device first).
        images: uint8 training images (N, C, H, W), on any device.
        optimizer: Default Adam with learning rate ``lr``.
        batch_size: Images per step (batches drawn without replacement per epoch).
        lr: Peak learning rate, reached linearly over ``warmup`` steps.
        warmup: Warm-up steps.
        clip: Gradient-norm clipping threshold (None: no clipping).
        max_steps: Stop after this many steps.
        time_budget: Stop when this many seconds of training have passed.
        generator: Random generator for the batch order.
        progress: Show a tqdm progress bar with loss (bits/dim) and images/s.
        callback: Called as ``callback(step, loss)`` after every step.

    Returns:
        A :class:`TrainResult`.

    Example:
        >>> from flowattn.models import build_model
        >>> model = build_model("glow", image_shape=(1, 8, 8), blocks=1, hidden=8)
        >>> x = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
        >>> train(model, x, batch_size=16, max_steps=3, progress=False).steps
        3
    """
    if max_steps is None and time_budget is None:
        raise ValueError("give max_steps or time_budget")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {images.shape}")
    device = model.device
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    result = TrainResult()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    order = torch.randperm(len(images), generator=generator)
    cursor = 0
    try:
        while True:
            if max_steps is not None and result.steps >= max_steps:
                break
            if time_budget is not None and result.seconds >= time_budget:
                break
            start = time.perf_counter()
            if cursor + batch_size > len(images):
                order, cursor = torch.randperm(len(images), generator=generator), 0
            batch = images[order[cursor : cursor + batch_size]].to(device)
            cursor += batch_size
            factor = min(1.0, (result.steps + 1) / max(1, warmup))
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            y, logdet = model.dequantize(batch)
            loss = bits_per_dim(model.log_prob(y) + logdet, model.num_dims).mean()
            optimizer.zero_grad(set_to_none=True)
            finite = bool(torch.isfinite(loss))
            if finite:
                loss.backward()
                if clip is not None:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                    finite = bool(torch.isfinite(norm))
            if finite:
                optimizer.step()
            result.seconds += time.perf_counter() - start
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                result.skipped += 1
                continue
            result.steps += 1
            result.images += len(batch)
            result.losses.append(loss.item())
            if callback is not None:
                callback(result.steps, result.losses[-1])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    bpd=f"{result.losses[-1]:.3f}", img_s=f"{result.images_per_second:.0f}"
                )
    finally:
        if bar is not None:
            bar.close()
    return result
