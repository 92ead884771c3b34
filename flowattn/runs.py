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
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .data import load_dataset, stack_images
from .metrics import BitsPerDim, reconstruction_error
from .models import DensityModel, ModelConfig, build_model
from .names import check_names
from .training import NonFiniteLossError, Trainer


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

    preset: str = "iresnet-attn"
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
        """Builds a config; an unknown key raises a ValueError naming the closest."""
        check_names(values, cls.fields(), "config key")
        config = cls(**values)
        config.check()
        return config

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> RunConfig:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no such config file: {path}") from None
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path} is not valid TOML: {error}") from None
        model = {**data.pop("model", {}), **overrides.pop("model", {})}
        return cls.from_dict({**data, **overrides, "model": model})

    def check(self) -> None:
        positive = ("steps", "batch_size", "checkpoint_every", "log_every", "max_bad_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
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
        lines, model = [], {}
        for key, value in dataclasses.asdict(self).items():
            if key == "model":
                model = value
            elif value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("\n[model]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in model.items() if v is not None]
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


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
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def load_run_model(
    run_or_checkpoint: str | Path, *, device: str = "auto", ema: bool = True
) -> tuple[DensityModel, dict[str, Any]]:
    """The model of a run or checkpoint (EMA weights by default), in eval mode."""
    state = load_checkpoint(run_or_checkpoint)
    try:
        model = build_model(ModelConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as error:
        raise ValueError(f"checkpoint does not match its model config: {error}") from None
    if ema and state.get("ema") is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state["ema"]["shadow"][name])
    return model.to(resolve_device(device)).eval(), state


def _write_images(model: DensityModel, config: RunConfig, x_test, run_dir: Path, writer, step):
    from .plots import save_grid

    torch.manual_seed(config.seed + 7)
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


def run_training(
    config: RunConfig, *, resume: bool = False, progress: bool = True, log=print
) -> RunSummary:
    """Trains a model as ``config`` says, in ``config.run_dir``; see the module docstring.

    With ``resume``, continues from ``run_dir/checkpoint.pt`` (model, optimiser, EMA, step,
    batch order and random states), so the run ends as an uninterrupted one would.
    """
    config.check()
    rank = _rank()
    device = resolve_device(config.device)
    if config.run_dir is None:
        if resume:
            raise ValueError("--resume needs the --run-dir of the run to continue")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        config = dataclasses.replace(
            config, run_dir=f"runs/{config.preset}-{Path(config.dataset).stem}-{stamp}"
        )
    run_dir = Path(config.run_dir)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    if resume and not checkpoint_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
    if not resume and checkpoint_path.is_file():
        raise ValueError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose "
            "another --run-dir"
        )

    x_train, x_test = config.images("train"), config.images("test")
    model_options = {k: v for k, v in config.model.items() if k != "image_shape"}
    torch.manual_seed(config.seed)
    model = build_model(config.preset, image_shape=tuple(x_train.shape[1:]), **model_options)
    model.to(device)
    if "image_shape" in config.model and tuple(config.model["image_shape"]) != model.image_shape:
        raise ValueError(
            f"model image_shape {tuple(config.model['image_shape'])} does not match the "
            f"dataset's images {model.image_shape}"
        )
    # probes and dequantisation noise differ per rank
    torch.manual_seed(config.seed + 1000 * rank)
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
    if resume:
        state = load_checkpoint(checkpoint_path, map_location=device)
        trainer.load_state_dict(state["trainer"])
        if trainer.world_size > 1:  # the checkpoint holds rank 0's random state
            torch.manual_seed(config.seed + 1000 * rank + trainer.step)
        if rank == 0:
            log(f"resumed {checkpoint_path} at step {trainer.step}")

    writer = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(config.to_toml())
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir))
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"{config.preset} on {config.dataset}: {len(x_train)} train / {len(x_test)} test "
            f"images {model.image_shape}, {n_params:,} parameters, device {device}; "
            f"run directory {run_dir}"
        )
    eval_x = x_test if config.eval_images == 0 else x_test[: config.eval_images]

    def save() -> None:
        if rank != 0:
            return
        save_checkpoint(
            {
                "model_config": model.config.to_dict(),
                "run_config": dataclasses.asdict(config),
                "model": model.state_dict(),
                "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
                "step": trainer.step,
                "trainer": trainer.state_dict(),
            },
            checkpoint_path,
        )

    def on_step(step: int, loss: float) -> None:
        if rank != 0:
            return
        if step % config.log_every == 0:
            writer.add_scalar("train/bpd", loss, step)
            writer.add_scalar("train/grad_norm", trainer.last_grad_norm, step)
            writer.add_scalar("train/lr", trainer.optimizer.param_groups[0]["lr"], step)
            writer.add_scalar("train/skipped_steps", trainer.result.skipped, step)
            writer.add_scalar("train/images_per_s", trainer.result.images_per_second, step)
            for name, residual in model.residual_steps():
                short = name.split(" ")[0]
                bound = residual.lipschitz_bound()
                if bound is not None:
                    writer.add_scalar(f"lipschitz/{short}", bound, step)
                if residual.last_logabsdet is not None:
                    logdet = residual.last_logabsdet.float()
                    writer.add_scalar(f"logdet_mean/{short}", logdet.mean(), step)
                    writer.add_scalar(f"logdet_std/{short}", logdet.std(), step)
        if config.eval_every and step % config.eval_every == 0 and step < config.steps:
            with trainer.evaluation_weights():
                result = model.bits_per_dim(eval_x, batch_size=256, seed=config.seed)
            writer.add_scalar("test/bpd", result.mean, step)
            writer.add_scalar("test/bpd_stderr", result.stderr, step)
        if step % config.checkpoint_every == 0:
            save()

    interrupted = False
    budget = None if config.time_budget is None else config.time_budget * 60
    try:
        trainer.run(config.steps, budget, progress=progress, callback=on_step)
    except KeyboardInterrupt:
        interrupted = True
        save()
        if rank == 0:
            log(f"interrupted at step {trainer.step}: checkpoint written to {checkpoint_path}")
    except NonFiniteLossError:
        if rank == 0:
            log(f"stopping; the last good checkpoint is kept at {checkpoint_path}")
        raise
    common = {
        "skipped": trainer.result.skipped,
        "rank": rank,
        "checksum": parameter_checksum(model),
        "losses": trainer.result.losses,
    }
    if interrupted:
        return RunSummary(run_dir, trainer.step, None, None, None, interrupted=True, **common)
    save()
    if rank != 0:
        return RunSummary(run_dir, trainer.step, None, None, None, **common)

    torch.manual_seed(config.seed + 3)
    with trainer.evaluation_weights():
        # the dequantisation noise is seeded with the run's seed, as `flowattn eval` does
        bpd = model.bits_per_dim(x_test, batch_size=256, seed=config.seed)
        samples, recon, error = _write_images(model, config, x_test, run_dir, writer, trainer.step)
    writer.add_scalar("test/bpd", bpd.mean, trainer.step)
    writer.add_scalar("test/bpd_stderr", bpd.stderr, trainer.step)
    writer.close()
    log(f"test bits/dim after {trainer.step} steps (EMA weights): {bpd} [{bpd.seconds:.1f} s]")
    log(f"reconstruction of {min(len(x_test), 8)} test images: {error}")
    log(f"samples: {samples}")
    log(f"reconstructions: {recon}")
    if trainer.result.skipped:
        log(f"{trainer.result.skipped} steps skipped (non-finite loss or gradient)")
    return RunSummary(run_dir, trainer.step, bpd, samples, recon, **common)
