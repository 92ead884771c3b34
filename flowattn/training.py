r"""Training of density models by maximum likelihood on dequantised 8-bit images.

The loss is the bits-per-dim of the batch (:mod:`flowattn.metrics` convention), with
fresh dequantisation noise and log-det probes at every step; Adam with linear
learning-rate warm-up and gradient-norm clipping, as in i-ResNet and Glow, and an
exponential moving average (EMA) of the weights for evaluation.

:class:`Trainer` holds the whole state of a run (model, optimiser, EMA, step, batch
order, random states) so that a checkpointed run resumes exactly; :func:`train` is the
one-call form. With ``torch.distributed`` initialised (``torchrun``) the loss module
is wrapped in DistributedDataParallel and every rank draws a disjoint shard of each
global batch.

References:
    | Invertible Residual Networks (Behrmann et al., 2019)
    | https://arxiv.org/abs/1811.00995
"""

from __future__ import annotations

__all__ = ["EMA", "NonFiniteLossError", "TrainResult", "Trainer", "train"]

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .metrics import bits_per_dim
from .models import DensityModel


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainResult:
    """What a run did.

    Attributes:
        steps: Optimiser steps taken.
        images: Training images seen (all ranks).
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


class EMA:
    r"""Exponential moving average of a model's floating-point parameters.

    ``shadow = decay * shadow + (1 - decay) * param`` after every step, with the
    warm-up ``decay_t = min(decay, (1 + t) / (10 + t))`` so early averages are not
    dominated by the initial weights. :meth:`applied` swaps the averaged weights in.

    Examples:
        >>> net = nn.Linear(2, 2)
        >>> ema = EMA(net, decay=0.9)
        >>> ema.update()
        >>> with ema.applied():
        ...     pass
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.model = model
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in self.model.named_parameters():
            self.shadow[name].lerp_(p.detach(), 1 - decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        saved = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    p.copy_(saved[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {n: t.to(self.shadow[n]) for n, t in state["shadow"].items()}


class _BatchLoss(nn.Module):
    """Mean bits-per-dim of a uint8 batch (the module DDP wraps)."""

    def __init__(self, model: DensityModel):
        super().__init__()
        self.model = model

    def forward(self, batch: Tensor) -> Tensor:
        y, logdet = self.model.dequantize(batch)
        return bits_per_dim(self.model.log_prob(y) + logdet, self.model.num_dims).mean()


def _random_states() -> dict[str, Any]:
    """Every random state (torch, numpy, python, CUDA) as tensors and numbers only, so a
    checkpoint holding them loads with ``weights_only=True``."""
    states = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (the global state others may use)
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return random_states_to_data(states)


def random_states_to_data(states: dict[str, Any]) -> dict[str, Any]:
    """Random states with numpy's and python's tuples turned into tensors and numbers
    (states already in that form pass through)."""
    out = dict(states)
    numpy_state = states["numpy"]
    if isinstance(numpy_state, tuple):
        name, keys, pos, has_gauss, gauss = numpy_state[:5]
        out["numpy"] = {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        }
    python_state = states["python"]
    if isinstance(python_state, tuple):
        version, internal, gauss_next = python_state
        out["python"] = {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        }
    return out


def _set_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))  # noqa: NPY002
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class Trainer:
    r"""A training run: model, optimiser, EMA, batch order and step, checkpointable.

    Arguments:
        model: The density model, already on its device.
        images: uint8 training images (N, C, H, W).
        batch_size: Images per step (over all ranks).
        lr: Peak learning rate of Adam, reached linearly over ``warmup`` steps.
        warmup: Warm-up steps.
        clip: Gradient-norm clipping threshold (None: no clipping).
        ema: EMA decay (0 disables the EMA).
        max_bad_steps: Consecutive non-finite steps tolerated before
            :class:`NonFiniteLossError`.
        seed: Seed of the batch order.

    Examples:
        >>> from flowattn.models import build_model
        >>> model = build_model("glow", image_shape=(1, 8, 8), blocks=1, hidden=8)
        >>> x = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
        >>> trainer = Trainer(model, x, batch_size=16)
        >>> trainer.run(max_steps=2, progress=False).steps
        2
    """

    def __init__(
        self,
        model: DensityModel,
        images: Tensor,
        *,
        batch_size: int = 64,
        lr: float = 1e-3,
        warmup: int = 100,
        clip: float | None = 100.0,
        ema: float = 0.0,
        max_bad_steps: int = 20,
        seed: int = 0,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if tuple(images.shape[1:]) != model.image_shape:
            raise ValueError(
                f"images of shape {tuple(images.shape[1:])} do not fit a model of "
                f"image shape {model.image_shape}"
            )
        self.model = model
        self.images = images
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.distributed else 0
        self.world_size = torch.distributed.get_world_size() if self.distributed else 1
        if batch_size % self.world_size or batch_size < self.world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of {self.world_size}")
        if batch_size > len(images):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(images)} images")
        self.batch_size = batch_size
        self.warmup = warmup
        self.clip = clip
        self.max_bad_steps = max_bad_steps
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.ema = EMA(model, ema) if ema > 0 else None
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(images), generator=self.generator)
        self.cursor = 0
        self.step = 0
        self.bad_in_row = 0
        self.result = TrainResult()
        self.last_grad_norm = math.nan
        self.loss_module: nn.Module = _BatchLoss(model)
        if self.distributed:
            self._wrap_distributed()

    def _wrap_distributed(self) -> None:
        # ActNorm initialises on its first training batch; do it before wrapping, so that
        # DDP's construction broadcasts rank 0's initialisation to every rank.
        self.model.train()
        with torch.no_grad():
            self.loss_module(self._next_batch(advance=False))
        self.loss_module = nn.parallel.DistributedDataParallel(self.loss_module)

    def _next_batch(self, advance: bool = True) -> Tensor:
        if self.cursor + self.batch_size > len(self.images):
            self.order, self.cursor = torch.randperm(len(self.images), generator=self.generator), 0
        index = self.order[self.cursor : self.cursor + self.batch_size]
        if advance:
            self.cursor += self.batch_size
        return self.images[index[self.rank :: self.world_size]].to(self.model.device)

    def train_step(self) -> float:
        """One optimiser step; returns the loss (NaN if skipped as non-finite)."""
        self.model.train()
        factor = min(1.0, (self.step + 1) / max(1, self.warmup))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        start = time.perf_counter()
        batch = self._next_batch()
        loss = self.loss_module(batch)
        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip or math.inf)
            self.last_grad_norm = float(norm)
            finite = math.isfinite(self.last_grad_norm)
        if finite:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
        self.result.seconds += time.perf_counter() - start
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.result.skipped += 1
            self.bad_in_row += 1
            if self.bad_in_row >= self.max_bad_steps:
                raise NonFiniteLossError(
                    f"{self.bad_in_row} consecutive steps with a non-finite loss or gradient "
                    f"at step {self.step}; stopping (lower the learning rate or coefficients)"
                )
            return math.nan
        self.bad_in_row = 0
        self.step += 1
        self.result.steps += 1
        self.result.images += self.batch_size
        value = loss.item()
        self.result.losses.append(value)
        return value

    def run(
        self,
        max_steps: int | None = None,
        time_budget: float | None = None,
        *,
        progress: bool = True,
        callback: Callable[[int, float], None] | None = None,
    ) -> TrainResult:
        """Trains until ``max_steps`` total steps or ``time_budget`` seconds of this call.

        ``callback(step, loss)`` runs after every completed step (checkpoints, logs).
        """
        if max_steps is None and time_budget is None:
            raise ValueError("give max_steps or time_budget")
        bar = None
        if progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_steps, initial=self.step, desc="train", unit="step")
        started = self.result.seconds
        try:
            while max_steps is None or self.step < max_steps:
                if time_budget is not None and self.result.seconds - started >= time_budget:
                    break
                loss = self.train_step()
                if math.isnan(loss):
                    continue
                if callback is not None:
                    callback(self.step, loss)
                if bar is not None:
                    bar.update(1)
                    rate = self.result.images_per_second
                    bar.set_postfix(train_loss=f"{loss:.3f}", img_s=f"{rate:.0f}")
        finally:
            if bar is not None:
                bar.close()
        return self.result

    @contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """The EMA weights (if any) swapped in, in eval mode."""
        with self.model.evaluating():
            if self.ema is None:
                yield
            else:
                with self.ema.applied():
                    yield

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "step": self.step,
            "order": self.order,
            "cursor": self.cursor,
            "generator": self.generator.get_state(),
            "random": _random_states(),
            "result": {
                "steps": self.result.steps,
                "images": self.result.images,
                "seconds": self.result.seconds,
                "losses": self.result.losses,
                "skipped": self.result.skipped,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.step, self.order, self.cursor = state["step"], state["order"], state["cursor"]
        self.generator.set_state(state["generator"])
        _set_random_states(state["random"])
        self.result = TrainResult(**state["result"])


def train(
    model: DensityModel,
    images: Tensor,
    *,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 100,
    clip: float | None = 100.0,
    max_steps: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> TrainResult:
    r"""Trains ``model`` on uint8 ``images`` (N, C, H, W) until a step or time budget.

    The one-call form of :class:`Trainer` (no EMA, no checkpoints): see it for the
    arguments. Non-finite steps are skipped and counted.

    Examples:
        >>> from flowattn.models import build_model
        >>> model = build_model("glow", image_shape=(1, 8, 8), blocks=1, hidden=8)
        >>> x = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
        >>> train(model, x, batch_size=16, max_steps=3, progress=False).steps
        3
    """
    trainer = Trainer(
        model,
        images,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        clip=clip,
        seed=seed,
        max_bad_steps=10**9,
    )
    return trainer.run(max_steps, time_budget, progress=progress, callback=callback)
