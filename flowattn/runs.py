r"""Training runs: a config, a run directory, logging, evaluation and checkpoints.

:class:`RunConfig` is everything that defines a run (a TOML file, every key
overridable); :func:`run_training` loads the data, builds the model, trains it with
periodic test bits-per-dim (EMA weights), TensorBoard scalars and images, and an atomic
checkpoint, and resumes from that checkpoint when asked. The run directory holds
``config.toml`` (the resolved config), ``checkpoint.pt``, TensorBoard event files,
``samples.png`` and ``reconstructions.png``.
"""

from __future__ import annotations

__all__ = ["RunConfig", "RunSummary", "load_run_model", "run_training"]

import dataclasses
import hashlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch

from . import configs
from .capacity import BudgetUse, budget_use, low_share_message
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_run_checkpoint,
    remove_stale_temporaries,
    run_checkpoint,
    save_checkpoint,
)
from .data import load_dataset, stack_images
from .errors import ConfigError, first_line
from .metrics import BitsPerDim, reconstruction_error
from .models import DensityModel, ModelConfig, Preset, build_model
from .runlock import RunLock, RunLockedError
from .training import EMA, BatchLoss, Every, Hook, NonFiniteLossError, Trainer, copy_parameters


@dataclass
class RunConfig:
    """Everything that defines a training run.

    Attributes:
        preset: Model preset (see :func:`flowattn.build_model`).
        dataset: Dataset name, ``.npz`` path or image folder (:func:`flowattn.data.load_dataset`).
        data_root: Where torchvision datasets are (default ``$FLOWATTN_DATA`` or ``./data``).
        image_size: Image side for ``celeba`` and folders.
        model: Overrides of the model config (``attention``, ``hidden``, ``blocks``, ...).
        steps: Total optimiser steps.
        time_budget: Stop after this many minutes of training (None: no limit).
        batch_size: Images per step, over all ranks.
        lr: Peak learning rate (Adam).
        warmup: Linear warm-up steps.
        clip: Gradient-norm clipping threshold.
        ema: EMA decay of the evaluation weights (0: none).
        eval_every: Steps between test evaluations (0: only at the end).
        eval_images: Test images in the periodic evaluations (0: all).
        checkpoint_every: Steps between checkpoints.
        log_every: Steps between TensorBoard scalars.
        max_bad_steps: Consecutive non-finite steps before stopping.
        samples: Images in the sample grid.
        temperature: Sampling temperature of the grid.
        seed: Seed of weights, batch order, probes and noise.
        device: ``cpu``, ``cuda``, ``cuda:1``... or ``auto``.
        run_dir: Where the run writes (default ``runs/<preset>-<dataset>-<date-time>``).
    """

    preset: Preset = "iresnet-attn"
    dataset: str = "digits"
    data_root: str | None = None
    image_size: int | None = None
    model: dict[str, Any] = field(default_factory=dict)
    steps: int = 2000
    time_budget: float | None = None
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    clip: float = 100.0
    ema: float = 0.99
    eval_every: int = 500
    eval_images: int = 0
    checkpoint_every: int = 500
    log_every: int = 25
    max_bad_steps: int = 20
    samples: int = 64
    temperature: float = 0.7
    seed: int = 0
    device: str = "auto"
    run_dir: str | None = None

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Builds a config, type-checked as the command line is; an unknown key raises a
        ConfigError naming the closest."""
        config = configs.parse_values(cls, values)  # the types
        config._check_values()
        return config

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> RunConfig:
        """The config of a TOML file (its ``[[resumed]]`` changes applied), with
        ``overrides`` on top (``model`` overrides merge into its ``[model]`` table)."""
        data = configs.read_file(path)
        if not isinstance(data.get("model", {}), dict):
            raise ConfigError(f"config key 'model' must be a table, got {data['model']!r}")
        model = {**data.pop("model", {}), **overrides.pop("model", {})}
        return cls.from_dict({**data, **overrides, "model": model})

    def check(self) -> None:
        """Checks the type and range of every key; a ConfigError names the key."""
        configs.checked_types(self)
        self._check_values()

    def _check_values(self) -> None:
        """Ranges, the device, and the model options (by building the model config)."""
        positive = ("steps", "batch_size", "checkpoint_every", "log_every", "max_bad_steps")
        for name in (*positive, "samples"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"config key {name!r} must be at least 1, got {getattr(self, name)}"
                )
        for name in ("warmup", "eval_every", "eval_images", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key {name!r} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "clip", "time_budget"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"config key {name!r} must be a positive number, got {value}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"config key 'temperature' must be >= 0, got {self.temperature}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"config key 'ema' must be in [0, 1), got {self.ema}")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"config key 'image_size' must be at least 1, got {self.image_size}")
        resolve_device(self.device)
        if "preset" in self.model:
            raise ConfigError("set the model with the config key 'preset', not a model option")
        # the model options are checked by building the config
        shape = (3, 32, 32) if "image_shape" not in self.model else self.model["image_shape"]
        ModelConfig.from_dict({"preset": self.preset, "image_shape": shape, **self.model})

    def images(self, split: str, limit: int | None = None) -> torch.Tensor:
        """The run's dataset split as uint8 images (N, C, H, W)."""
        options: dict[str, Any] = {"root": self.data_root}
        if self.image_size is not None:
            options["image_size"] = self.image_size
        return stack_images(load_dataset(self.dataset, split, **options), limit)

    def to_toml(self) -> str:
        """The config as TOML (None values are left out)."""
        return configs.to_toml(self)


#: What the global generator is seeded with at each stage of a run, from the run's seed:
#: the model's initialisation takes the seed itself; training (probes, dequantisation
#: noise) the seed plus ``rank`` times the rank (each rank its own stream); the final
#: evaluation and the sample and reconstruction grids their own offsets.
SEED_OFFSETS = {"rank": 1000, "evaluation": 3, "images": 7}


@dataclass
class RunSummary:
    """What :func:`run_training` reports at the end."""

    run_dir: Path
    steps: int
    test_bpd: BitsPerDim | None
    samples: Path | None
    reconstructions: Path | None
    skipped: int
    interrupted: bool = False
    rank: int = 0
    checksum: str = ""
    losses: list[float] = field(default_factory=list)


def parameter_checksum(model: torch.nn.Module) -> str:
    """A short hash of a model's parameters (ranks of a DDP run must agree on it)."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().double().numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _write_images(model: DensityModel, config: RunConfig, x_test, run_dir: Path, writer, step):
    from .plots import save_grid

    torch.manual_seed(config.seed + SEED_OFFSETS["images"])
    samples = model.sample(config.samples, temperature=config.temperature)
    samples_path = run_dir / "samples.png"
    nrow = max(1, int(math.sqrt(config.samples)))
    save_grid(samples, samples_path, nrow=nrow)
    originals = x_test[:nrow]
    recon = model.reconstruct(originals)
    grid = torch.cat([originals, recon.to(originals.device)]).float() / 255
    recon_path = run_dir / "reconstructions.png"
    save_grid(grid, recon_path, nrow=nrow)
    if writer is not None:
        from torchvision.utils import make_grid

        writer.add_image("samples", make_grid(samples, nrow=nrow), step)
        writer.add_image("reconstructions", make_grid(grid, nrow=nrow), step)
    return samples_path, recon_path, reconstruction_error(originals.cpu(), recon.cpu())


def load_run_model(
    run_or_checkpoint: str | Path,
    *,
    device: str = "auto",
    ema: bool = True,
) -> tuple[DensityModel, dict[str, Any]]:
    """The model of a run or checkpoint (EMA weights by default), in eval mode, and the
    checkpoint."""
    target = resolve_device(device)
    state = load_run_checkpoint(run_or_checkpoint)
    trainer = state["trainer"]
    try:
        model = build_model(ModelConfig.from_dict(state["model_config"]))
        model.load_state_dict(trainer["model"])
    except (KeyError, RuntimeError, TypeError) as error:
        reason = first_line(error)
        raise CheckpointError(f"checkpoint does not match its model config: {reason}") from None
    if ema and trainer.get("ema") is not None:
        copy_parameters(model, EMA.parameters_in(trainer["ema"]))
    return model.to(target).eval(), state


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers send), handled like Ctrl-C."""


def state_is_finite(trainer: Trainer, batch: torch.Tensor) -> str | None:
    """Why a training state must not be checkpointed (None when it may): every
    parameter and EMA weight finite, and a finite loss on a held batch with the raw and
    with the EMA weights (a finite step can still blow the weights up)."""
    for name, p in trainer.model.named_parameters():
        if not torch.isfinite(p).all():
            return f"parameter {name} is not finite"
    if trainer.ema is not None:
        for name, t in trainer.ema.named_parameters():
            if not torch.isfinite(t).all():
                return f"EMA weight {name} is not finite"
    model = trainer.model
    held_loss = BatchLoss(model)  # not the DDP wrapper: this runs on rank 0 alone
    with torch.no_grad(), model.evaluating():
        loss = float(held_loss(batch))
        if not math.isfinite(loss):
            return f"the loss on a held batch is {loss}"
        if trainer.ema is not None:
            with trainer.ema.applied():
                loss = float(held_loss(batch))
            if not math.isfinite(loss):
                return f"the loss on a held batch with the EMA weights is {loss}"
    return None


def _resume_history(config: RunConfig, saved: dict[str, Any], step: int) -> str:
    """A ``[[resumed]]`` table recording what a resume changed (empty if nothing)."""
    now = dataclasses.asdict(config)
    changes = {k: v for k, v in now.items() if k not in ("model", "run_dir") and saved.get(k) != v}
    model = {k: v for k, v in now["model"].items() if saved.get("model", {}).get(k) != v}
    if model:
        changes["model"] = model
    if not changes:
        return ""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    table = {k: v for k, v in changes.items() if v is not None}
    # a [[resumed]] table appended after the [model] table; `changes` inline (tomli_w would
    # write it as a [resumed.changes] section, or the whole array inline under [model])
    head = tomli_w.dumps({"step": step, "time": stamp})
    return f"\n[[resumed]]\n{head}changes = {_inline_toml(table)}\n"


def _inline_toml(value: Any) -> str:
    """A value as inline TOML (tables as ``{ k = v }``), scalars written by tomli_w."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_inline_toml(v)}" for k, v in value.items()) + " }"
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def unwritable_reason(directory: Path) -> str | None:
    """Why files cannot be created in ``directory`` (or in the folders it would be made
    in), or None if they can: its nearest existing ancestor (itself included) is a file,
    or is read-only."""
    for parent in (directory, *directory.parents):
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file"
            if not os.access(parent, os.W_OK):
                return f"{parent} is read-only"
            return None
    return None


def _check_resumed_model(saved: dict[str, Any], now: ModelConfig, run_dir: Path) -> None:
    """Raises if the checkpoint's model config differs from the run's (both resolved)."""
    resolved, current = ModelConfig.from_dict(saved).to_dict(), now.to_dict()
    if resolved != current:
        changed = [k for k in current if resolved.get(k) != current[k]]
        diff = ", ".join(f"{k} {resolved[k]!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(
            f"--resume: {run_dir} holds a different model ({diff}); resume with the run's "
            "own model settings or choose another --run-dir"
        )


def run_training(
    config: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    log=print,
) -> RunSummary:
    """Trains a model as ``config`` says, in ``config.run_dir``; see the module docstring.

    With ``resume``, continues from ``run_dir/checkpoint.pt`` (model, optimiser, EMA, step,
    batch order and random states), so the run ends as an uninterrupted one would.

    Safety: the run directory is locked for the process (:class:`~flowattn.runlock.RunLock`);
    a state is checkpointed only after :func:`state_is_finite` passes, and the replaced
    checkpoint is kept as ``checkpoint.prev.pt``; Ctrl-C (a ``KeyboardInterrupt``, or
    :class:`Terminated`, which the ``flowattn train`` command raises on SIGTERM: library
    code installs no signal handler) writes a checkpoint and returns with
    ``interrupted`` set. Everything is validated before the run directory is created.
    """
    config.check()
    rank = _rank()
    device = resolve_device(config.device)
    if config.run_dir is None:
        if resume:
            raise ConfigError("--resume needs the --run-dir of the run to continue")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        config = dataclasses.replace(
            config, run_dir=f"runs/{config.preset}-{Path(config.dataset).stem}-{stamp}"
        )
    run_dir = Path(config.run_dir)
    problem = unwritable_reason(run_dir)
    if problem is not None:
        raise ConfigError(f"cannot use {run_dir} as a run directory: {problem}")
    checkpoint_path = run_dir / CHECKPOINT_NAME
    if resume and not checkpoint_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
    if not resume and checkpoint_path.is_file():
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose "
            "another --run-dir"
        )
    state = None
    if resume:
        state = load_run_checkpoint(checkpoint_path, map_location=device)

    x_train, x_test = config.images("train"), config.images("test")
    model_options = {k: v for k, v in config.model.items() if k != "image_shape"}
    torch.manual_seed(config.seed)
    try:
        model = build_model(config.preset, image_shape=tuple(x_train.shape[1:]), **model_options)
    except ValueError as error:  # a model option the config check could not see
        raise ConfigError(f"model options {model_options}: {error}") from None
    model.to(device)
    if "image_shape" in config.model and tuple(config.model["image_shape"]) != model.image_shape:
        raise ConfigError(
            f"model image_shape {tuple(config.model['image_shape'])} does not match the "
            f"dataset's images {model.image_shape}"
        )
    if state is not None:
        _check_resumed_model(state["model_config"], model.config, run_dir)
    # probes and dequantisation noise differ per rank
    torch.manual_seed(config.seed + SEED_OFFSETS["rank"] * rank)
    trainer = Trainer(
        model,
        x_train,
        batch_size=config.batch_size,
        lr=config.lr,
        warmup=config.warmup,
        clip=config.clip,
        ema=config.ema,
        max_bad_steps=config.max_bad_steps,
        seed=config.seed,
    )
    if state is not None:
        try:
            trainer.load_state_dict(state["trainer"])
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            reason = first_line(error)
            raise ConfigError(
                f"--resume: {checkpoint_path} does not fit this run: {reason}"
            ) from None
        if trainer.world_size > 1:  # the checkpoint holds rank 0's random state
            torch.manual_seed(config.seed + SEED_OFFSETS["rank"] * rank + trainer.step)

    lock = None
    created = not run_dir.exists()
    if rank == 0:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except RunLockedError:
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
    try:
        return _train_locked(
            config, model, trainer, state, x_train, x_test, run_dir, lock, rank,
            progress=progress, log=log, device=device,
        )  # fmt: skip
    finally:
        if lock is not None:
            lock.release()


class Checkpointer:
    """Writes the run's checkpoint when called (an action for
    :class:`~flowattn.training.Every`) or at :meth:`save`, but only a state that
    :func:`state_is_finite` passes; the replaced checkpoint is kept as
    ``checkpoint.prev.pt``. ``good_step`` is the step of the last good checkpoint."""

    def __init__(self, trainer: Trainer, path: Path, held: torch.Tensor, configs: tuple,
                 good_step: int | None, log) -> None:  # fmt: skip
        self.trainer, self.path, self.held, self.configs = trainer, path, held, configs
        self.good_step, self.log = good_step, log

    def kept(self) -> str:
        """Where the last good checkpoint is, in words."""
        if self.good_step is None:
            return "no checkpoint was written"
        return f"the last good checkpoint (step {self.good_step}) is kept at {self.path}"

    def save(self) -> bool:
        """Checkpoints the current state if it is finite; whether it did."""
        problem = state_is_finite(self.trainer, self.held)
        if problem is not None:
            kept = "no checkpoint has been written yet" if self.good_step is None else self.kept()
            self.log(f"step {self.trainer.step}: not checkpointed, {problem}; {kept}")
            return False
        contents = run_checkpoint(*self.configs, self.trainer.state_dict())
        save_checkpoint(contents, self.path)
        self.good_step = self.trainer.step
        return True

    def __call__(self, trainer: Trainer) -> None:
        self.save()


class PlainProgress(Hook):
    """A line every 5% of ``total`` steps or every minute, for logs without a progress
    bar."""

    def __init__(self, total: int, log) -> None:
        self.total, self.log = total, log
        self.every, self.last = max(1, total // 20), time.monotonic()

    def after_step(self, trainer: Trainer, loss: float) -> None:
        if trainer.step % self.every == 0 or time.monotonic() - self.last > 60:
            self.last = time.monotonic()
            self.log(
                f"step {trainer.step}/{self.total}: train loss {loss:.4f} (bits/dim, training "
                f"estimator), {trainer.result.images_per_second:.0f} img/s"
            )


class TrainingScalars:
    """TensorBoard scalars of the step just taken (an action for
    :class:`~flowattn.training.Every`): loss, gradient norm, learning rate, skipped steps,
    speed, and each residual step's Lipschitz bound and log-dets."""

    def __init__(self, writer) -> None:
        self.writer = writer

    def __call__(self, trainer: Trainer) -> None:
        step, write = trainer.step, self.writer.add_scalar
        write("train/bpd", trainer.result.losses[-1], step)
        write("train/grad_norm", trainer.last_grad_norm, step)
        write("train/lr", trainer.optimizer.param_groups[0]["lr"], step)
        write("train/skipped_steps", trainer.result.skipped, step)
        write("train/images_per_s", trainer.result.images_per_second, step)
        for name, residual in trainer.model.residual_steps():
            short = name.split(" ")[0]
            bound = residual.lipschitz_bound()
            if bound is not None:
                write(f"lipschitz/{short}", bound, step)
            if residual.last_logabsdet is not None:
                logdet = residual.last_logabsdet.float()
                write(f"logdet_mean/{short}", logdet.mean(), step)
                write(f"logdet_std/{short}", logdet.std(), step)


class BudgetShares:
    """The share of its certified bound that each attention step's local Jacobian norm
    reaches at a few test images (:func:`~flowattn.capacity.budget_use`, evaluation
    weights), written to TensorBoard as ``budget_share/<step>``: an action for
    :class:`~flowattn.training.Every`."""

    def __init__(self, images: torch.Tensor, writer, last_step: int) -> None:
        self.images, self.writer, self.last_step = images, writer, last_step

    def __call__(self, trainer: Trainer) -> None:
        if trainer.step >= self.last_step:  # the final measurement, on 8 images, follows
            return
        with trainer.evaluation_weights():
            uses = budget_use(trainer.model, self.images, attention_only=True)
        write_budget_shares(self.writer, uses, trainer.step)


def write_budget_shares(writer, uses: list[BudgetUse], step: int) -> None:
    """``budget_share/<step name>`` scalars for the measured steps that have a bound."""
    for use in uses:
        if use.share is not None:
            writer.add_scalar(f"budget_share/{use.name.split(' ')[0]}", use.share, step)


class TestEvaluation:
    """Test bits/dim with the evaluation (EMA) weights, written to TensorBoard: an action
    for :class:`~flowattn.training.Every`."""

    def __init__(self, images: torch.Tensor, seed: int, writer, last_step: int) -> None:
        self.images, self.seed, self.writer, self.last_step = images, seed, writer, last_step

    def __call__(self, trainer: Trainer) -> None:
        if trainer.step >= self.last_step:  # the final evaluation, on every image, follows
            return
        with trainer.evaluation_weights():
            result = trainer.model.bits_per_dim(self.images, batch_size=256, seed=self.seed)
        self.writer.add_scalar("test/bpd", result.mean, trainer.step)
        self.writer.add_scalar("test/bpd_stderr", result.stderr, trainer.step)


def _open_run_directory(config, model, trainer, state, x_train, x_test, run_dir, lock,
                        device, log):  # fmt: skip
    """Rank 0's preparation of the (locked) run directory: stale temporaries removed, the
    config written (or the resume recorded in it), and a TensorBoard writer opened."""
    for stale in remove_stale_temporaries(run_dir):
        log(f"removed {stale.name}, left by an interrupted checkpoint write")
    if lock.stale_pid is not None:
        log(f"took over the lock of process {lock.stale_pid}, which is no longer running")
    config_path = run_dir / "config.toml"
    if state is None:
        config_path.write_text(config.to_toml())
    else:
        history = _resume_history(config, state.get("run_config", {}), trainer.step)
        if history:
            with config_path.open("a") as f:
                f.write(history)
        log(f"resumed {run_dir / CHECKPOINT_NAME} at step {trainer.step}")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"{config.preset} on {config.dataset}: {len(x_train)} train / {len(x_test)} test "
        f"images {model.image_shape}, {n_params:,} parameters, device {device}; "
        f"run directory {run_dir}"
    )
    return writer


def _train_locked(config, model, trainer, state, x_train, x_test, run_dir, lock, rank, *,
                  progress, log, device) -> RunSummary:  # fmt: skip
    """The part of :func:`run_training` that runs under the run directory's lock."""
    checkpoint_path = run_dir / CHECKPOINT_NAME
    if rank == 0 and not checkpoint_path.is_file() and state is not None:
        raise FileNotFoundError(f"--resume: {checkpoint_path} disappeared")
    if rank == 0 and state is None and checkpoint_path.is_file():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it")
    writer = _open_run_directory(config, model, trainer, state, x_train, x_test, run_dir,
                                 lock, device, log) if rank == 0 else None  # fmt: skip
    checkpointer = Checkpointer(
        trainer,
        checkpoint_path,
        held=x_train[: config.batch_size].to(device),
        configs=(model.config.to_dict(), dataclasses.asdict(config)),
        good_step=None if state is None else trainer.step,
        log=log,
    )
    hooks: list[Hook] = []
    if rank == 0:
        eval_x = x_test if config.eval_images == 0 else x_test[: config.eval_images]
        evaluation = TestEvaluation(eval_x, config.seed, writer, config.steps)
        hooks += [
            Every(TrainingScalars(writer), steps=config.log_every),
            Every(checkpointer, steps=config.checkpoint_every),
        ]
        if config.eval_every:
            hooks.append(Every(evaluation, steps=config.eval_every))
            hooks.append(Every(BudgetShares(x_test[:4].to(device), writer, config.steps),
                               steps=config.eval_every))  # fmt: skip
        if not progress:
            hooks.append(PlainProgress(config.steps, log))

    interrupted = False
    budget = None if config.time_budget is None else config.time_budget * 60
    try:
        trainer.run(config.steps, budget, progress=progress, hooks=hooks)
    except KeyboardInterrupt as stop:
        interrupted = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
        if rank == 0 and checkpointer.save():
            log(f"{interrupted} at step {trainer.step}: checkpoint written to {checkpoint_path}")
    except NonFiniteLossError as error:
        kept = checkpointer.kept()
        if checkpointer.good_step is None:
            kept += " (the run diverged before its first)"
        if rank == 0:
            log(f"stopping; {kept}")
        raise NonFiniteLossError(f"{error}; {kept}") from None
    common = {
        "skipped": trainer.result.skipped,
        "rank": rank,
        "checksum": parameter_checksum(model),
        "losses": trainer.result.losses,
    }
    if interrupted:
        if writer is not None:
            writer.close()
        return RunSummary(
            run_dir, trainer.step, None, None, None, interrupted=interrupted, **common
        )
    if rank == 0 and not checkpointer.save():
        writer.close()
        raise NonFiniteLossError(
            f"the final state (step {trainer.step}) is not finite and was not checkpointed; "
            + checkpointer.kept()
        )
    if rank != 0:
        return RunSummary(run_dir, trainer.step, None, None, None, **common)

    torch.manual_seed(config.seed + SEED_OFFSETS["evaluation"])
    with trainer.evaluation_weights():
        # the dequantisation noise is seeded with the run's seed, as `flowattn eval` does
        bpd = model.bits_per_dim(x_test, batch_size=256, seed=config.seed)
        samples, recon, error = _write_images(model, config, x_test, run_dir, writer, trainer.step)
        uses = budget_use(model, x_test[:8].to(device), attention_only=True)
    write_budget_shares(writer, uses, trainer.step)
    writer.add_scalar("test/bpd", bpd.mean, trainer.step)
    writer.add_scalar("test/bpd_stderr", bpd.stderr, trainer.step)
    writer.close()
    log(f"test bits/dim after {trainer.step} steps (EMA weights): {bpd} [{bpd.seconds:.1f} s]")
    log(f"reconstruction of {min(len(x_test), 8)} test images: {error}")
    log(f"samples: {samples}")
    log(f"reconstructions: {recon}")
    for use in uses:
        if use.low:
            log(f"warning: {low_share_message(use)}")
    if trainer.result.skipped:
        log(f"{trainer.result.skipped} steps skipped (non-finite loss or gradient)")
    return RunSummary(run_dir, trainer.step, bpd, samples, recon, **common)
