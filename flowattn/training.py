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

__all__ = [
    "EMA",
    "BatchLoss",
    "BatchOrder",
    "Every",
    "Hook",
    "NonFiniteLossError",
    "StepCallback",
    "TrainResult",
    "Trainer",
    "WarmedUpDecay",
    "copy_parameters",
    "train",
]

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import NonFiniteLossError
from .images import check_images
from .metrics import bits_per_dim
from .models import DensityModel


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

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data (for a checkpoint)."""
        return dataclasses.asdict(self)


class NonFiniteSteps:
    """The skip policy: a step whose loss or gradient is not finite is skipped and
    counted; ``max_in_row`` of them in a row raise :class:`NonFiniteLossError`."""

    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row
        self.in_row = 0

    def record(self, finite: bool, step: int) -> None:
        """Counts one step (finite or not); raises when too many in a row were not."""
        self.in_row = 0 if finite else self.in_row + 1
        if self.in_row >= self.max_in_row:
            raise NonFiniteLossError(
                f"{self.in_row} consecutive steps with a non-finite loss or gradient "
                f"at step {step}; stopping (lower the learning rate or coefficients)"
            )


def warmed_up_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    """Sets each parameter group's learning rate to its base rate times ``factor``."""
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * factor


def _world() -> tuple[bool, int, int]:
    """(distributed, rank, world size) of this process."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed:
        return False, 0, 1
    return True, torch.distributed.get_rank(), torch.distributed.get_world_size()


@torch.no_grad()
def copy_parameters(model: nn.Module, values: dict[str, Tensor]) -> None:
    """Copies ``values[name]`` into each of the model's parameters, in place (the one
    weight swap: EMA weights in and out, a checkpoint's EMA weights loaded)."""
    for name, p in model.named_parameters():
        p.copy_(values[name])


class WarmedUpDecay:
    r"""The averaging rule of :class:`EMA`, an ``avg_fn`` for torch's ``AveragedModel``:
    ``average + (1 - d_t) (current - average)`` with ``d_t = min(decay, (1 + t) / (10 + t))``
    at the t-th update (a picklable class, not a lambda)."""

    def __init__(self, decay: float):
        self.decay = decay

    def __call__(self, average: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        t = int(num_averaged)
        decay = min(self.decay, (1 + t) / (10 + t))
        return average + (current - average) * (1 - decay)


class EMA:
    r"""Exponential moving average of a model's parameters, kept in a
    ``torch.optim.swa_utils.AveragedModel``.

    The average starts at the model's weights and after the t-th :meth:`update` is
    ``d_t * average + (1 - d_t) * param``, with the warm-up
    ``d_t = min(decay, (1 + t) / (10 + t))`` so early averages are not dominated by the
    initial weights (:class:`WarmedUpDecay`). :meth:`applied` swaps the averaged
    weights into the model for a block (buffers stay the model's own).

    Arguments:
        model: The model whose parameters are averaged.
        decay: The decay, in [0, 1).

    Examples:
        >>> net = nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(0.0)
        >>> ema = EMA(net, decay=0.5)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(1.0)
        >>> ema.update()  # d_1 = min(0.5, 2 / 11): 0 + (1 - 2 / 11) * (1 - 0)
        >>> with ema.applied():
        ...     round(net.weight.item(), 6)
        0.818182
        >>> net.weight.item()  # the model's own weights are back after the block
        1.0
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        from torch.optim.swa_utils import AveragedModel

        self.model = model
        self.decay = decay
        self.averaged = AveragedModel(model, avg_fn=WarmedUpDecay(decay))
        self.averaged.update_parameters(model)  # the average starts at the current weights

    @property
    def updates(self) -> int:
        """Updates since the average started."""
        return int(self.averaged.n_averaged) - 1

    def update(self) -> None:
        self.averaged.update_parameters(self.model)

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        """The averaged parameters, named as the model's."""
        return self.averaged.module.named_parameters()

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the block, its own back after it."""
        saved = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        copy_parameters(self.model, dict(self.named_parameters()))
        try:
            yield
        finally:
            copy_parameters(self.model, saved)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "averaged": self.averaged.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.averaged.avg_fn = WarmedUpDecay(self.decay)
        self.averaged.load_state_dict(state["averaged"])

    @staticmethod
    def parameters_in(state: dict[str, Any]) -> dict[str, Tensor]:
        """The averaged parameters, by name, in a saved :meth:`state_dict`."""
        prefix = "module."
        return {k[len(prefix) :]: v for k, v in state["averaged"].items() if k.startswith(prefix)}


class BatchLoss(nn.Module):
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
    return _as_data(states)


def _as_data(states: dict[str, Any]) -> dict[str, Any]:
    """Random states with numpy's and python's tuples turned into tensors and numbers."""
    name, keys, pos, has_gauss, gauss = states["numpy"][:5]
    version, internal, gauss_next = states["python"]
    return {
        **states,
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def _set_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))  # noqa: NPY002
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class BatchOrder:
    """Shuffled passes over ``num_images`` indices, cut into global batches; each rank
    takes its own disjoint slice (``rank::world_size``) of every batch. A pass's leftover
    images that do not fill a batch are skipped, and the next pass is a new permutation.

    Arguments:
        num_images: Images to draw from.
        batch_size: Images per global batch (a multiple of ``world_size``).
        seed: Seed of the permutations.
        rank: This process's rank.
        world_size: Number of processes.

    Examples:
        >>> order = BatchOrder(5, batch_size=2, seed=0)
        >>> batches = [order.next() for _ in range(3)]  # two batches, then a new pass
        >>> sorted(torch.cat(batches[:2]).tolist()) == sorted(set(torch.cat(batches[:2]).tolist()))
        True
        >>> restored = BatchOrder(5, batch_size=2, seed=1)
        >>> restored.load_state_dict(order.state_dict())
        >>> torch.equal(restored.next(), order.next())
        True
    """

    def __init__(
        self, num_images: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        if batch_size < world_size or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of {world_size}")
        if batch_size > num_images:
            raise ValueError(f"batch_size {batch_size} exceeds the {num_images} images")
        self.num_images, self.batch_size = num_images, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(num_images, generator=self.generator)
        self.cursor = 0

    def next(self, advance: bool = True) -> Tensor:
        """This rank's indices of the next batch (``advance=False``: peek)."""
        if self.cursor + self.batch_size > self.num_images:
            self.order, self.cursor = torch.randperm(self.num_images, generator=self.generator), 0
        index = self.order[self.cursor : self.cursor + self.batch_size]
        if advance:
            self.cursor += self.batch_size
        return index[self.rank :: self.world_size]

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order, "cursor": self.cursor, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.cursor = state["order"], state["cursor"]
        self.generator.set_state(state["generator"])


class Hook:
    """Something a :class:`Trainer` calls as it runs: :meth:`after_step` after every
    completed (finite) step, :meth:`after_run` when :meth:`Trainer.run` returns or is
    stopped by an exception. Subclasses override what they need."""

    def after_step(self, trainer: Trainer, loss: float) -> None:
        """Runs after each completed step; ``loss`` is the step's training bits/dim."""

    def after_run(self, trainer: Trainer) -> None:
        """Runs when :meth:`Trainer.run` ends (normally or not)."""


class Every(Hook):
    """Calls ``action(trainer)`` every ``steps`` completed steps and/or every ``seconds``
    of training time (time in training steps only, so evaluations do not shift it).

    Arguments:
        action: A callable taking the trainer.
        steps: Period in steps (None or 0: no step period).
        seconds: Period in seconds of training time (None or 0: no time period).

    Examples:
        >>> from flowattn.models import build_model
        >>> model = build_model("glow", image_shape=(1, 8, 8), blocks=1, hidden=8)
        >>> x = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
        >>> trainer, seen = Trainer(model, x, batch_size=16), []
        >>> hook = Every(lambda t: seen.append(t.step), steps=2)
        >>> _ = trainer.run(max_steps=5, progress=False, hooks=[hook])
        >>> seen
        [2, 4]
    """

    def __init__(
        self,
        action: Callable[[Trainer], None],
        *,
        steps: int | None = None,
        seconds: float | None = None,
    ):
        if not steps and not seconds:
            raise ValueError("give a period: steps or seconds")
        self.action, self.steps, self.seconds = action, steps or None, seconds or None
        self.last_time: float | None = None

    def due(self, trainer: Trainer) -> bool:
        """Whether the step just completed ends a period (each multiple of ``seconds`` of
        training time is crossed once)."""
        now, last = trainer.result.seconds, self.last_time
        self.last_time = now
        if self.steps is not None and trainer.step % self.steps == 0:
            return True
        if self.seconds is not None and last is not None:
            return now // self.seconds > last // self.seconds
        return False

    def after_step(self, trainer: Trainer, loss: float) -> None:
        if self.due(trainer):
            self.action(trainer)


class StepCallback(Hook):
    """Calls ``callback(step, loss)`` after every completed step."""

    def __init__(self, callback: Callable[[int, float], None]):
        self.callback = callback

    def after_step(self, trainer: Trainer, loss: float) -> None:
        self.callback(trainer.step, loss)


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
        check_images(images, shape=model.image_shape, uint8=True, owner="the model")
        self.model = model
        self.images = images
        self.distributed, self.rank, self.world_size = _world()
        self.batches = BatchOrder(len(images), batch_size, seed, self.rank, self.world_size)
        self.batch_size = batch_size
        self.warmup = warmup
        self.clip = clip
        self.skips = NonFiniteSteps(max_bad_steps)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.ema = EMA(model, ema) if ema > 0 else None
        self.step = 0
        self.stopping = False
        self.result = TrainResult()
        self.last_grad_norm = math.nan
        self.loss_module: nn.Module = BatchLoss(model)
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
        return self.images[self.batches.next(advance)].to(self.model.device)

    def train_step(self) -> float:
        """One optimiser step; returns the loss (NaN if skipped as non-finite)."""
        self.model.train()
        warmed_up_lr(self.optimizer, self.base_lrs, min(1.0, (self.step + 1) / max(1, self.warmup)))
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
        self.skips.record(finite, self.step)
        if not finite:
            return math.nan
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
        hooks: Sequence[Hook] = (),
    ) -> TrainResult:
        """Trains until ``max_steps`` total steps, ``time_budget`` seconds of training in
        this call, or a hook calls :meth:`stop`: :func:`run_steps`."""
        return run_steps(self, max_steps, time_budget, progress=progress, hooks=hooks)

    def stop(self) -> None:
        """Ends :meth:`run` after the current step (for hooks)."""
        self.stopping = True

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
            "batches": self.batches.state_dict(),
            "random": _random_states(),
            "result": self.result.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = state["step"]
        self.batches.load_state_dict(state["batches"])
        _set_random_states(state["random"])
        self.result = TrainResult(**state["result"])


def run_steps(
    trainer: Trainer,
    max_steps: int | None = None,
    time_budget: float | None = None,
    *,
    progress: bool = True,
    hooks: Sequence[Hook] = (),
) -> TrainResult:
    """The training loop: ``trainer.train_step()`` until ``max_steps`` total steps,
    ``time_budget`` seconds of training in this call, or a hook calls
    :meth:`Trainer.stop`; skipped (non-finite) steps run no hook. A progress bar on
    rank 0 shows the loss and the images per second.

    Every hook's ``after_step`` runs after each completed step (logs, evaluations,
    checkpoints: see :class:`Every`), and its ``after_run`` when the call ends.
    """
    if max_steps is None and time_budget is None:
        raise ValueError("give max_steps or time_budget")
    bar = None
    if progress and trainer.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=trainer.step, desc="train", unit="step")
    started = trainer.result.seconds
    trainer.stopping = False
    try:
        while (max_steps is None or trainer.step < max_steps) and not trainer.stopping:
            if time_budget is not None and trainer.result.seconds - started >= time_budget:
                break
            loss = trainer.train_step()
            if math.isnan(loss):
                continue
            for hook in hooks:
                hook.after_step(trainer, loss)
            if bar is not None:
                bar.update(1)
                rate = trainer.result.images_per_second
                bar.set_postfix(train_loss=f"{loss:.3f}", img_s=f"{rate:.0f}")
    finally:
        if bar is not None:
            bar.close()
        for hook in hooks:
            hook.after_run(trainer)
    return trainer.result


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
    hooks = [] if callback is None else [StepCallback(callback)]
    return trainer.run(max_steps, time_budget, progress=progress, hooks=hooks)
