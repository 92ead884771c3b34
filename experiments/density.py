"""Density modelling: bits-per-dim of flows with and without attention, against wall time.

The second experiment of Zha et al. (2021), "Invertible Attention", arXiv 2106.09003,
Sec. 5.2: i-ResNet, i-ResNet with an invertible attention step of each kind, Glow, and
Glow with ordinary (SAGAN) attention in its coupling networks. Each model trains for the
same budget (wall-clock minutes of training, or steps, whichever ends first); every
``eval_every`` seconds of training its test bits-per-dim is taken on ``eval_images``
held-out images with the EMA weights, which gives the curve of test bpd against wall
time. At the end every model is evaluated on all ``test_images`` with
``DensityModel.bits_per_dim``'s default: the exact log-det where affordable, else the
unbiased Russian roulette with per-image draws and a finite variance (so the standard
error is valid); every model sees the same images and dequantisation noise, and its
difference from the ``baseline`` model is reported as a paired difference with its
standard error. 64 samples are drawn and timed.

A model spec is ``preset``, ``preset:attention`` (``preset:faithful:<kind>`` for the
paper's uncertified reproduction of a kind), and optionally ``@estimator`` for the
training log-det estimator (``iresnet@series`` trains with i-ResNet's truncated series;
the default is the unbiased roulette); a series-trained model also gets the figure its
own series would claim, with the series' certified bias bound.

Outputs in ``--out``: ``results.md`` and ``results.csv`` (one row per model),
``curves.csv`` (model, step, training seconds, test bpd, standard error),
``bpd_vs_time.png`` (the curves) and ``samples_<model>.png``.

    python -m experiments.density --config experiments/configs/density/cifar10-cpu.toml
    python -m experiments.density --config experiments/configs/density/cifar10-gpu.toml
    python -m experiments.density --models '[iresnet, glow]' --budget 2 --dataset digits
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowattn.evaluation import estimator_description
from flowattn.metrics import BitsPerDim, NonFiniteDensityError, paired_values_difference
from flowattn.models import ModelConfig, build_model
from flowattn.nn.attention_kinds import KINDS, parse_variant
from flowattn.plots import save_grid
from flowattn.runs import resolve_device
from flowattn.training import Every, NonFiniteLossError, Trainer
from flowattn.transforms import ConvergenceWarning

from .common import (
    DataConfig,
    describe_size,
    ensure_dir,
    parse_config,
    set_threads,
    user_errors,
)

MODELS = ["iresnet", *(f"iresnet-attn:{kind}" for kind in KINDS), "glow", "glow-attn"]
SIGNIFICANT_Z = 2.0  # a paired difference this many standard errors from zero


@dataclass
class Config(DataConfig):
    """One run's settings (the keys of a config file, and the flags).

    Attributes:
        dataset: Dataset name, ``.npz`` path or image folder.
        root: Where torchvision-layout datasets are ("": $FLOWATTN_DATA or ./data).
        image_size: Resize to this side (celeba, folder); 0: the dataset's own size.
        train_images: Training images used (0: all).
        test_images: Test images of the final evaluation (0: all).
        eval_images: Test images of each evaluation along the curve.
        models: Model specs, ``preset[:attention][@estimator]``.
        baseline: The model that paired differences are taken against.
        model: Options of every model (``size``, ``hidden``...).
        batch_size: Images per step.
        lr: Peak learning rate (Adam).
        warmup: Linear warm-up steps.
        ema: EMA decay of the evaluation weights.
        budget: Minutes of training per model.
        steps: Step limit per model (0: none).
        eval_every: Seconds of training between evaluations along the curve.
        sample_n: Samples drawn and timed per model.
        temperature: Sampling temperature.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        threads: CPU threads.
        seed: Seed of weights, batches, probes and noise.
        out: Output folder.
        resume: Keep the models already in ``out/results.json``; train the rest.
    """

    eval_images: int = 256
    models: list[str] = field(default_factory=lambda: list(MODELS))
    baseline: str = "iresnet"
    model: dict[str, Any] = field(default_factory=lambda: {"size": "tiny"})
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.99
    budget: float = 4.0
    steps: int = 0
    eval_every: float = 30.0
    sample_n: int = 64
    temperature: float = 0.7
    device: str = "auto"
    threads: int = 2
    seed: int = 0
    out: str = "outputs/density/cifar10-cpu"
    resume: bool = False


def model_config(spec: str, config: Config, image_shape: tuple[int, ...]) -> ModelConfig:
    """The model of a spec ``preset[:attention][@estimator]`` with the run's options; an
    attention ``faithful:<kind>`` is the paper's uncertified reproduction of the kind."""
    spec, _, estimator = spec.partition("@")
    preset, _, attention = spec.partition(":")
    options = {"preset": preset, "image_shape": image_shape, **config.model}
    if attention:
        kind, certified = parse_variant(attention)  # iresnet-attn:faithful:dot: uncertified
        options["attention"] = kind.name
        if not certified:
            options["attention_certified"] = False
    if estimator:
        options["estimator"] = estimator
    return ModelConfig.from_dict(options)


def build(spec: str, image_shape: tuple[int, ...], config: Config, device: torch.device):
    """The model of a spec, seeded, on ``device``."""
    torch.manual_seed(config.seed)
    return build_model(model_config(spec, config, image_shape)).to(device)


def figure_or_none(model, x: torch.Tensor, seed: int, **options) -> BitsPerDim | None:
    """``model.bits_per_dim`` (the one evaluation; default estimator exact or unbiased,
    see the module docstring), or None where the model's log-density is not finite (a
    diverged model, or a step that is not invertible)."""
    try:
        return model.bits_per_dim(x, batch_size=128, seed=seed, **options)
    except NonFiniteDensityError as error:
        print(f"  {error}", flush=True)
        return None


class Curve:
    """Test bpd of the EMA weights on ``x_eval`` (a point: step, training seconds, bpd,
    SE), printed as it is taken: an action for :class:`~flowattn.training.Every`."""

    def __init__(self, spec: str, x_eval: torch.Tensor, seed: int):
        self.spec, self.x_eval, self.seed = spec, x_eval, seed
        self.points: list[dict] = []

    def __call__(self, trainer: Trainer) -> None:
        torch.manual_seed(self.seed)
        with trainer.evaluation_weights():
            bpd = figure_or_none(trainer.model, self.x_eval, self.seed)
        mean, stderr = (math.nan, math.nan) if bpd is None else (bpd.mean, bpd.stderr)
        self.points.append({"step": trainer.step, "train_s": trainer.result.seconds,
                            "test_bpd": mean, "test_se": stderr})  # fmt: skip
        if trainer.step:
            print(f"{self.spec}: step {trainer.step}, {trainer.result.seconds:.0f} s, "
                  f"test bpd {mean:.4f} ± {stderr:.4f}", flush=True)  # fmt: skip


def run_one(spec: str, config: Config, data: dict, device: torch.device, out: Path):
    """Trains one model for the budget; returns its result row and its curve."""
    x_train, x_test = data["train"], data["test"]
    model = build(spec, tuple(x_train.shape[1:]), config, device)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"\n== {spec}: {parameters:,} parameters", flush=True)
    trainer = Trainer(
        model,
        x_train,
        batch_size=config.batch_size,
        lr=config.lr,
        warmup=config.warmup,
        ema=config.ema,
        seed=config.seed,
    )
    x_eval = x_test[: config.eval_images] if config.eval_images > 0 else x_test
    curve = Curve(spec, x_eval, config.seed)
    curve(trainer)  # the untrained model
    notes = []
    try:
        trainer.run(config.steps or None, config.budget * 60, progress=False,
                    hooks=[Every(curve, seconds=config.eval_every)])  # fmt: skip
    except NonFiniteLossError as error:
        notes.append(f"training stopped at step {trainer.step}: {error}")
        print(f"  {notes[-1]}", flush=True)
    if curve.points[-1]["step"] != trainer.step:
        curve(trainer)
    result = trainer.result
    row = {
        "model": spec,
        "training": estimator_description(model),
        "parameters": parameters,
        "steps": result.steps,
        "train_s": result.seconds,
        "train_img_s": result.images_per_second,
        "skipped": result.skipped,
    }
    if result.skipped:
        notes.append(f"{result.skipped} non-finite steps skipped")
    values = None
    with trainer.evaluation_weights():
        torch.manual_seed(config.seed + 1)
        bpd = figure_or_none(model, x_test, config.seed)
        if bpd is None:
            notes.append("test log-density not finite")
            row.update(test_bpd=math.nan, test_se=math.nan, estimator="non-finite")
        else:
            values = bpd.values.tolist()
            row.update(test_bpd=bpd.mean, test_se=bpd.stderr, estimator=bpd.estimator,
                       eval_s=bpd.seconds)  # fmt: skip
        row.update(series_claim=math.nan, series_bias_bound=math.nan)
        if model.config.residual and model.config.estimator == "series" and bpd is not None:
            # what the training estimator itself would report: biased, with its bound
            torch.manual_seed(config.seed + 1)
            claim = figure_or_none(model, x_test, config.seed, estimator="series",
                                   n_terms=model.config.n_terms)  # fmt: skip
            if claim is not None:
                row.update(series_claim=claim.mean, series_bias_bound=claim.bias_bound)
        torch.manual_seed(config.seed + 2)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            samples = model.sample(config.sample_n, temperature=config.temperature)
        row["sample_img_s"] = config.sample_n / (time.perf_counter() - start)
        failed = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        if failed:
            notes.append(f"sampling: {failed} fixed-point inverse(s) did not converge")
    row["note"] = "; ".join(notes)
    samples = torch.nan_to_num(samples.cpu(), nan=0.5).clamp(0, 1)
    save_grid(samples, out / f"samples_{spec.replace(':', '_')}.png", nrow=8)
    print(
        f"{spec}: test {row['test_bpd']:.4f} ± {row['test_se']:.4f} bpd after "
        f"{result.steps} steps ({row['train_img_s']:.1f} img/s)",
        flush=True,
    )
    return row, curve.points, values


def setting(config: Config, data: dict, device: torch.device) -> str:
    """One line saying what the figures were measured on."""
    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    limit = f"{config.budget:g} min of training per model"
    if config.steps:
        limit += f" or {config.steps} steps"
    options = ", ".join(f"{k}={v}" for k, v in config.model.items())
    return (
        f"Dataset `{config.dataset}`: {len(data['train'])} training / {len(data['test'])} test "
        f"images, {describe_size(config.image_size)}; {limit}; batch {config.batch_size}, "
        f"Adam lr {config.lr:g}, EMA {config.ema:g}; model options {options or 'defaults'}; "
        f"{hardware}; torch {torch.__version__}."
    )


def _bpd(mean: float, stderr: float) -> str:
    return "non-finite" if math.isnan(mean) else f"{mean:.4f} ± {stderr:.4f}"


def add_paired_differences(rows: list[dict], values: dict, baseline: str) -> None:
    """Adds each model's paired difference from ``baseline`` over the same test images and
    dequantisation noise (``vs_baseline`` ± ``vs_baseline_se``, and whether it is
    significant: more than ``SIGNIFICANT_Z`` standard errors from zero)."""
    base = values.get(baseline)
    for row in rows:
        row.update(vs_baseline=math.nan, vs_baseline_se=math.nan, significant="")
        mine = values.get(row["model"])
        if base is None or mine is None or row["model"] == baseline:
            continue
        diff = paired_values_difference(torch.tensor(mine), torch.tensor(base))
        verdict = "no"
        if diff.significant(SIGNIFICANT_Z):
            verdict = "yes: better" if diff.mean < 0 else "yes: worse"
        row.update(vs_baseline=diff.mean, vs_baseline_se=diff.stderr, significant=verdict)


def write_results(
    rows: list[dict], curves: dict, values: dict, header: str, baseline: str, out: Path
) -> None:
    """``results.json`` (for ``resume``; with the per-image values), ``results.csv``,
    ``curves.csv`` and ``results.md``; prints the table."""
    add_paired_differences(rows, values, baseline)
    state = {"header": header, "rows": rows, "curves": curves, "values": values}
    (out / "results.json").write_text(json.dumps(state, indent=1))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with (out / "curves.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "step", "train_s", "test_bpd", "test_se"])
        for spec, curve in curves.items():
            for p in curve:
                writer.writerow([spec, p["step"], p["train_s"], p["test_bpd"], p["test_se"]])
    lines = [
        header,
        "",
        f"| model | test bpd ± SE | paired difference from {baseline} ± SE | significant "
        "| parameters | steps | train img/s | sample img/s | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        diff = "" if math.isnan(r["vs_baseline"]) else f"{r['vs_baseline']:+.4f} ± "
        diff += "" if math.isnan(r["vs_baseline"]) else f"{r['vs_baseline_se']:.4f}"
        lines.append(
            f"| {r['model']} | {_bpd(r['test_bpd'], r['test_se'])} | {diff or '-'} "
            f"| {r['significant'] or '-'} | {r['parameters']:,} | {r['steps']} "
            f"| {r['train_img_s']:.1f} | {r['sample_img_s']:.1f} | {r['note']} |"
        )
    claims = [r for r in rows if not math.isnan(r.get("series_claim", math.nan))]
    lines += [
        "",
        "Test bpd: exact log-dets where there are no estimated ones (Glow) or the images "
        "are small, else the unbiased Russian roulette with per-image draws and a "
        "variance made finite by the certified Lipschitz bounds; the SE is over test "
        "images. Every model sees the same test images and dequantisation noise, so the "
        f"paired difference from {baseline} is taken image by image; 'significant' means "
        f"more than {SIGNIFICANT_Z:g} standard errors from zero.",
        "",
        "Evaluation estimators: " + "; ".join(f"{r['model']}: {r['estimator']}" for r in rows),
        "",
        "Training estimators: " + "; ".join(f"{r['model']}: {r.get('training', '')}" for r in rows),
    ]
    for r in claims:
        lines += [
            "",
            f"{r['model']} trains with the truncated series; that series would report "
            f"{r['series_claim']:.4f} bits/dim on the same images (true: "
            f"{r['test_bpd']:.4f} ± {r['test_se']:.4f}; the series' certified bias bound "
            f"is {r['series_bias_bound']:.3g} bits/dim).",
        ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


def plot_curves(curves: dict, header: str, path: Path) -> None:
    """Test bpd against training wall time, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    finite = []
    colours = plt.get_cmap("tab20")  # one colour per model, up to 20
    for index, (spec, curve) in enumerate(curves.items()):
        points = [p for p in curve if math.isfinite(p["test_bpd"])]
        t = [p["train_s"] / 60 for p in points]
        bpd = [p["test_bpd"] for p in points]
        finite += bpd[1:]
        style = "--" if spec.startswith("glow") else "-"
        label = spec if len(points) > 1 else f"{spec} (non-finite: not shown)"
        ax.plot(t, bpd, style, marker="o", markersize=3, label=label, color=colours(index % 20))
    if finite:  # the first evaluation (untrained) would squash the rest of the plot
        low, high = min(finite), sorted(finite)[int(0.9 * (len(finite) - 1))]
        ax.set_ylim(low - 0.05 * (high - low + 0.1), high + 0.3 * (high - low + 0.1))
    ax.set_xlabel("training wall time (min)")
    ax.set_ylabel("test bits/dim (EMA weights)")
    ax.set_title("\n".join(textwrap.wrap(header, 110)), fontsize=7, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: Config) -> list[dict]:
    set_threads(config.threads)
    device = resolve_device(config.device)
    data = {"train": config.images("train"), "test": config.images("test")}
    for spec in config.models:  # check every model's options before training any
        model_config(spec, config, tuple(data["train"].shape[1:]))
    out = ensure_dir(config.out)
    header = setting(config, data, device)
    print(header, flush=True)
    rows, curves, values = [], {}, {}
    saved = out / "results.json"
    if config.resume and saved.is_file():
        state = json.loads(saved.read_text())
        if state["header"] != header:
            raise SystemExit(
                f"error: {saved} was measured in another setting:\n  {state['header']}\n"
                "use another out, or resume with the same settings"
            )
        rows = [r for r in state["rows"] if r["model"] in config.models]
        curves = {r["model"]: state["curves"][r["model"]] for r in rows}
        values = {m: v for m, v in state.get("values", {}).items() if m in curves}
        print(f"resuming: {', '.join(curves) or 'nothing'} already done", flush=True)
    for spec in config.models:
        if spec in curves:
            continue
        row, curve, image_values = run_one(spec, config, data, device, out)
        rows.append(row)
        curves[spec] = curve
        if image_values is not None:
            values[spec] = image_values
        rows.sort(key=lambda r: config.models.index(r["model"]))  # the config's order
        # after every model: partial results survive
        write_results(rows, curves, values, header, config.baseline, out)
        plot_curves(curves, header, out / "bpd_vs_time.png")
    print(f"wrote {out}/results.md, results.csv, curves.csv, bpd_vs_time.png and samples_*.png")
    return rows


def main(argv: list[str] | None = None) -> None:
    config, _ = parse_config(Config, argv, __doc__.splitlines()[0])
    with user_errors():
        run(config)


if __name__ == "__main__":
    main()
