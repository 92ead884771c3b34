"""Attention ablation: does the invertible attention step help, against controls?

Zha et al. (2021), "Invertible Attention", arXiv 2106.09003, Sec. 5.2 put an attention
step into an i-ResNet and report better bits/dim. ``iresnet-attn`` adds two things to
``iresnet``: the attention step and the ActNorm before it. This experiment separates
them. Every model is trained with several seeds; each run stops when it has both taken
``steps`` steps and spent ``seconds`` of training time, and its EMA weights are evaluated
at both points (the equal-steps and the equal-time budgets). The models:

* ``iresnet``: no extra step;
* ``iresnet+actnorm``: the attention step's ActNorm with no branch (the same number of
  flow steps, the attention switched off);
* ``iresnet+conv``: that ActNorm and one more convolutional residual block in place of
  the attention step (a control with extra capacity that is not attention);
* ``iresnet-attn:<kind>``: the attention step of each certified kind.

A spec may end in ``@<scale>`` to place its step at another scale than ``--model``'s
``attention_scale`` (e.g. ``iresnet-attn:external@0`` beside a run at scale 1), and an
attention spec in ``/<init>`` to start its similarity maps another way
(``iresnet-attn:dot/random``: PyTorch's random init instead of the default selections,
``flowattn.lipschitz.selection_matrix``). A spec run beside its ``/random`` twin gets a
table of the paired differences between the two, which isolates the init.

Test bits/dim are exact (dense Jacobians) where the images have at most
``flowattn.evaluation.EXACT_MAX_DIMS`` values (digits, CIFAR at 8x8), else the unbiased
roulette with its certified error bar. Every model and seed sees the same test images and
dequantisation noise, so differences are paired image by image; across seeds (the same
seed trains every model from the same data order) the mean of the per-seed differences
is reported with its standard error over seeds, which includes training noise.

Outputs in ``--out``: ``ablation.json`` (per-image values, resumable), ``ablation.md``
(the tables) and ``samples.png`` (seed 0's samples at the equal-time budget, one
labelled panel per model, in the order of ``models``).

    python -m experiments.attention_ablation --dataset digits --out runs/ablation-digits
    python -m experiments.attention_ablation --downsample 4 --out runs/ablation-cifar8
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flowattn.capacity import budget_use
from flowattn.models import ModelConfig, build_model
from flowattn.nn.attention_kinds import KINDS
from flowattn.nn.lipschitz_attention import SIMILARITY_INITS
from flowattn.runs import resolve_device
from flowattn.training import Hook, Trainer

from .common import DataConfig, ensure_dir, parse_config, resume_state, set_threads, user_errors

CONTROLS = ("iresnet", "iresnet+actnorm", "iresnet+conv")


@dataclass
class Config(DataConfig):
    """Settings of the ablation (the data fields are :class:`common.DataConfig`'s).

    Attributes:
        downsample: Average-pool the images by this factor (4: CIFAR-10 at 8x8).
        models: Model specs (see the module docstring).
        seeds: Training seeds; each model trains once per seed.
        steps: The equal-steps budget.
        seconds: The equal-time budget, in seconds of training.
        batch_size, lr, warmup, ema: Training settings.
        model: Extra model options for every model (``size``, ``blocks``...).
        eval_seed: Seed of the test dequantisation noise (the same for every run).
        threads: CPU threads.
        device: ``cpu``, ``cuda``...
        out: Output directory.
    """

    dataset: str = "digits"
    downsample: int = 1
    models: list[str] = field(
        default_factory=lambda: [*CONTROLS, *(f"iresnet-attn:{k}" for k in KINDS)]
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 1200
    seconds: float = 60.0
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.99
    model: dict = field(default_factory=dict)
    eval_seed: int = 0
    threads: int = 1
    device: str = "cpu"
    out: str = "runs/attention-ablation"


def model_config(spec: str, config: Config, image_shape: tuple[int, ...]) -> ModelConfig:
    """The model of a spec: ``iresnet``, ``iresnet+<extra step>``, ``iresnet-attn:<kind>``,
    each optionally followed by ``@<scale>``, the ``attention_scale`` of its extra or
    attention step (over ``--model``'s)."""
    options = {"image_shape": image_shape, **config.model}
    spec, slash, init = spec.partition("/")
    if slash:
        if init not in SIMILARITY_INITS:
            raise ValueError(
                f"{spec}/{init}: the init after / is one of {', '.join(SIMILARITY_INITS)}"
            )
        options["attention_options"] = {
            **options.get("attention_options", {}),
            "similarity_init": init,
        }
    spec, at, scale = spec.partition("@")
    if at:
        if not scale.isdigit():
            raise ValueError(f"{spec}@{scale}: the scale after @ is a number, e.g. @1")
        options["attention_scale"] = int(scale)
    preset, _, kind = spec.partition(":")
    preset, _, extra = preset.partition("+")
    options["preset"] = preset
    if kind:
        options["attention"] = kind
    if extra:
        options["extra_step"] = extra
    if preset == "iresnet-attn" and not kind:
        raise ValueError(f"{spec!r}: name the attention kind, e.g. iresnet-attn:external")
    if slash and preset != "iresnet-attn":
        raise ValueError(f"{spec}/{init}: only an attention spec has similarity maps to start")
    return ModelConfig.from_dict(options)


def images(config: Config, split: str) -> torch.Tensor:
    """uint8 test or train images, average-pooled by ``downsample`` and rounded."""
    x = config.images(split)
    if config.downsample > 1:
        x = F.avg_pool2d(x.float(), config.downsample).round().to(torch.uint8)
    return x


class Budgets(Hook):
    """Evaluates the EMA weights when the run reaches ``steps`` and when it reaches
    ``seconds`` of training, and stops it once both are reached.

    Training time is the process's CPU time spent outside this hook (the training steps):
    on one thread that is the step's own time, unlike wall time, which other processes
    on the machine inflate."""

    def __init__(self, config: Config, x_test: torch.Tensor, bar) -> None:
        self.config, self.x_test, self.bar = config, x_test, bar
        self.results: dict[str, dict] = {}
        self.seconds = 0.0
        self.left = time.process_time()

    def after_step(self, trainer: Trainer, loss: float) -> None:
        self.seconds += time.process_time() - self.left
        self.bar.update(1)
        reached = {
            "steps": trainer.step >= self.config.steps,
            "time": self.seconds >= self.config.seconds,
        }
        for budget, now in reached.items():
            if now and budget not in self.results:
                self.results[budget] = self.evaluate(trainer)
        if len(self.results) == 2:
            trainer.stop()
        self.left = time.process_time()

    def evaluate(self, trainer: Trainer) -> dict:
        with trainer.evaluation_weights():
            bpd = trainer.model.bits_per_dim(self.x_test, seed=self.config.eval_seed)
            uses = budget_use(trainer.model, self.x_test[:8], attention_only=True)
        return {
            "step": trainer.step,
            "seconds": self.seconds,
            "bpd": bpd.mean,
            "se": bpd.stderr,
            "estimator": bpd.estimator,
            "values": bpd.values.tolist(),
            "share": [u.share for u in uses],
        }


def run_one(spec: str, seed: int, config: Config, data: dict, device) -> dict:
    """One model and seed: the two budgets' evaluations, the share of the attention
    step's bound at initialisation, and (seed 0) samples at the equal-time budget."""
    torch.manual_seed(seed)
    model = build_model(model_config(spec, config, tuple(data["train"].shape[1:]))).to(device)
    x_test = data["test"].to(device)
    init_share = [u.share for u in budget_use(model, x_test[:8], attention_only=True)]
    trainer = Trainer(model, data["train"], batch_size=config.batch_size, lr=config.lr,
                      warmup=config.warmup, ema=config.ema, seed=seed)  # fmt: skip
    with tqdm(desc=f"{spec} seed {seed}", unit="step", leave=False) as bar:
        budgets = Budgets(config, x_test, bar)
        budgets.left = time.process_time()
        trainer.run(None, math.inf, progress=False, hooks=[budgets])  # Budgets stops it
    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "init_share": init_share,
        **budgets.results,
    }
    if seed == config.seeds[0]:
        with trainer.evaluation_weights():
            torch.manual_seed(seed)
            result["samples"] = model.sample(36, temperature=0.7).clamp(0, 1).cpu().tolist()
    return result


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-image differences a - b."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


def _across_seeds(runs: dict, a: str, b: str, budget: str, seeds: list[int]) -> str:
    """``mean ± SE over seeds (z) [per seed]`` of the paired differences a - b."""
    per_seed = [
        paired(runs[f"{a}|{s}"][budget]["values"], runs[f"{b}|{s}"][budget]["values"])
        for s in seeds
    ]
    means = [d for d, _ in per_seed]
    mean = statistics.mean(means)
    se = statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else math.nan
    z = mean / se if se > 0 else math.nan
    return (
        f"{mean:+.4f} ± {se:.4f} ({z:+.1f}) [{', '.join(f'{d:+.3f}±{e:.3f}' for d, e in per_seed)}]"
    )


def _twin_table(runs: dict, models: list[str], config: Config) -> list[str]:
    """Lines of the table of each model against its ``/random`` twin, if any ran."""
    twins = [m for m in models if f"{m}/random" in models]
    if not twins:
        return []
    lines = ["### Similarity init: selection - random (same steps, same seeds)", "",
             "| model | equal steps: mean ± SE over seeds (z) [per seed] | equal time |",
             "| --- | --- | --- |"]  # fmt: skip
    for m in twins:
        cells = [_across_seeds(runs, m, f"{m}/random", b, config.seeds) for b in ("steps", "time")]
        lines.append(f"| {m} | {cells[0]} | {cells[1]} |")
    return [*lines, ""]


def summary(state: dict, config: Config) -> str:
    """The markdown tables: per budget, each model's bpd and its paired differences from
    each control, per seed and across seeds."""
    runs = state["runs"]
    models = [m for m in config.models if all(f"{m}|{s}" in runs for s in config.seeds)]
    lines = [state["header"], ""]
    for budget, title in (("steps", f"{config.steps} steps"), ("time", f"{config.seconds:g} s")):
        lines += [f"### Equal {'steps' if budget == 'steps' else 'time'}: {title}", ""]
        controls = [c for c in CONTROLS if c in models]
        head = "| model | params | steps | test bpd (mean over seeds) |"
        head += "".join(f" vs {c}: mean ± SE over seeds (z) [per seed] |" for c in controls)
        lines += [head, "| --- " * (4 + len(controls)) + "|"]
        for m in models:
            rs = [runs[f"{m}|{s}"][budget] for s in config.seeds]
            row = (
                f"| {m} | {runs[f'{m}|{config.seeds[0]}']['parameters']:,} "
                f"| {statistics.mean(r['step'] for r in rs):.0f} "
                f"| {statistics.mean(r['bpd'] for r in rs):.4f} |"
            )
            for c in controls:
                if c == m:
                    row += " - |"
                    continue
                row += f" {_across_seeds(runs, m, c, budget, config.seeds)} |"
            lines.append(row)
        lines.append("")
    lines += _twin_table(runs, models, config)
    shares = [
        (m, runs[f"{m}|{s}"]) for m in models if m.startswith("iresnet-attn") for s in config.seeds
    ]
    if shares:
        lines += ["Share of the attention step's certified bound used at 8 test images "
                  "(local Jacobian norm / bound; mean over seeds): at initialisation, at the "
                  "equal-steps budget, at the equal-time budget.", ""]  # fmt: skip
        lines += ["| model | init | steps | time |", "| --- | --- | --- | --- |"]
        for m in dict(shares):
            rs = [r for name, r in shares if name == m]

            def mean_share(key, rs=rs):
                values = [r[key][0] if key == "init_share" else r[key]["share"][0] for r in rs]
                return f"{statistics.mean(values):.2%}"

            lines.append(f"| {m} | {mean_share('init_share')} | {mean_share('steps')} "
                         f"| {mean_share('time')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_samples(state: dict, config: Config, path: Path) -> None:
    """Seed 0's samples (equal-time budget): one labelled 6x6 panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for m in config.models:
        run = state["runs"].get(f"{m}|{config.seeds[0]}")
        if run is not None and "samples" in run:
            x = torch.tensor(run["samples"]).float()
            c, h, w = x.shape[1:]
            grid = x.view(6, 6, c, h, w).permute(0, 3, 1, 4, 2).reshape(6 * h, 6 * w, c)
            panels.append((m, grid.squeeze(-1).numpy()))
    if not panels:
        return
    cols = min(len(panels), 5)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, grid) in zip(axes.flat, panels, strict=False):
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name.replace("iresnet-attn:", "attn: "), fontsize=9)
    fig.suptitle(f"samples at the equal-time budget, seed {config.seeds[0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config: Config) -> dict:
    set_threads(config.threads)
    device = resolve_device(config.device)
    data = {"train": images(config, "train"), "test": images(config, "test")}
    shape = tuple(data["train"].shape[1:])
    for spec in config.models:  # every spec checked before any training
        model_config(spec, config, shape)
    out = ensure_dir(config.out)
    header = (
        f"Dataset `{config.dataset}` {shape} (downsample {config.downsample}): "
        f"{len(data['train'])} train / {len(data['test'])} test images; seeds {config.seeds}; "
        f"budgets {config.steps} steps and {config.seconds:g} s of training (CPU time); batch "
        f"{config.batch_size}, Adam lr {config.lr:g}, warm-up {config.warmup}, EMA "
        f"{config.ema:g}; model options {config.model or 'defaults'}; {config.threads} "
        f"thread(s), {device}; torch {torch.__version__}."
    )
    saved = out / "ablation.json"
    state = resume_state(saved, header)
    print(header, flush=True)
    for seed in config.seeds:
        for spec in config.models:
            key = f"{spec}|{seed}"
            if key in state["runs"]:
                continue
            state["runs"][key] = run_one(spec, seed, config, data, device)
            r = state["runs"][key]
            print(f"{spec} seed {seed}: {r['steps']['bpd']:.4f} at {r['steps']['step']} steps, "
                  f"{r['time']['bpd']:.4f} at {r['time']['step']} steps "
                  f"({config.seconds:g} s)", flush=True)  # fmt: skip
            saved.write_text(json.dumps(state))
    text = summary(state, config)
    (out / "ablation.md").write_text(text)
    write_samples(state, config, out / "samples.png")
    print("\n" + text + f"\nwrote {out}/ablation.md, ablation.json and samples.png")
    return state


def main(argv: list[str] | None = None) -> None:
    config, _ = parse_config(Config, argv, __doc__.splitlines()[0])
    with user_errors():
        run(config)


if __name__ == "__main__":
    main()
