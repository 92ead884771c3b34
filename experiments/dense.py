"""Dense prediction: does invertible attention match ordinary attention on camouflaged
object detection?

Zha et al. (2021), "Invertible Attention", arXiv 2106.09003, Sec. 5.3 report that
invertible attention performs as well as ordinary attention in a COD network. Here one
small encoder-decoder (:class:`flowattn.segmentation.SegmentationNet`) is trained with
each attention variant in its bottleneck slot: ``none``; the certified invertible
residual steps ``invertible:<kind>``; the paper's uncertified ``faithful:<kind>``; the
ordinary modules ``nonlocal``, ``sagan``, ``external``, ``cbam``. Every variant trains
with several seeds (the same seed gives every variant the same batches and flips); each
run stops when it has both taken ``steps`` steps and spent ``seconds`` of training CPU
time, and is evaluated at both points (the equal-steps and the equal-time budgets) with
the field's metrics (S-measure, E-measure, weighted F, MAE, by ``pysodmetrics``).

Reported: each metric's mean and standard deviation over seeds; the per-image S-measure
differences against ``reference`` (ordinary attention, default ``nonlocal``) and
against ``none``, as the mean over seeds of the per-seed paired mean with its standard
error over seeds; training CPU time per step and the memory autograd keeps for the
backward of one batch (saved tensors, exact byte count).

Outputs in ``--out``: ``dense.json`` (per-image values, resumable), ``dense.md`` (the
tables) and ``predictions.png`` (test images, their masks, each variant's map; seed 0,
equal-time budget).

    python -m experiments.dense --out runs/dense
    python -m experiments.dense --dataset PATH/TO/COD10K --image_size 64 --out runs/dense-cod10k
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flowattn.runs import resolve_device
from flowattn.segmentation import SegmentationNet, cod_scores, predict, segmentation_set, train
from flowattn.segmentation.fit import as_input
from flowattn.segmentation.loss import structure_loss
from flowattn.segmentation.network import slot_names

from .common import ensure_dir, parse_config, resume_state, set_threads, user_errors

SHOWN = 8  # test images in the prediction figure


@dataclass
class Config:
    """Settings of the dense-prediction experiment.

    Attributes:
        dataset: ``camouflage`` (embedded, no download) or a COD set folder.
        image_size: Image side (divisible by 8).
        train_images, test_images: Images used (0: all).
        variants: Attention slots (:func:`flowattn.segmentation.slot_names`).
        reference: The ordinary-attention variant differences are taken against.
        seeds: Training seeds.
        steps: The equal-steps budget.
        seconds: The equal-time budget, seconds of training CPU time.
        batch_size, lr, width: Training and network settings.
        threads: CPU threads.
        device: ``cpu``, ``cuda``...
        out: Output directory.
    """

    dataset: str = "camouflage"
    image_size: int = 32
    train_images: int = 0
    test_images: int = 0
    variants: list[str] = field(default_factory=slot_names)
    reference: str = "nonlocal"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 600
    seconds: float = 45.0
    batch_size: int = 32
    lr: float = 1e-3
    width: int = 16
    threads: int = 1
    device: str = "cpu"
    out: str = "runs/dense"


def saved_bytes(net: SegmentationNet, images: torch.Tensor, masks: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for the backward of one training batch
    (each storage counted once): the activation memory a training step holds."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    net.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = structure_loss(net(as_input(images)), masks)
    loss.backward()
    net.zero_grad(set_to_none=True)
    return sum(storages.values())


def run_one(variant: str, seed: int, config: Config, data: dict, device) -> dict:
    """One variant and seed: the scores at both budgets, cost, and (first seed) maps."""
    torch.manual_seed(seed)
    net = SegmentationNet(variant, width=config.width).to(device)
    x, m = data["train"]
    batch = (x[: config.batch_size].to(device), m[: config.batch_size].to(device))
    memory = saved_bytes(net, *batch)
    torch.manual_seed(seed)
    net = SegmentationNet(variant, width=config.width).to(device)
    results: dict[str, dict] = {}
    clock = {"seconds": 0.0, "since": time.process_time()}

    def after_step(step: int, loss: float) -> bool:
        clock["seconds"] += time.process_time() - clock["since"]
        reached = {"steps": step >= config.steps, "time": clock["seconds"] >= config.seconds}
        for budget, now in reached.items():
            if now and budget not in results:
                maps = predict(net, data["test"][0])
                scores = cod_scores(maps, data["test"][1])
                results[budget] = {
                    "step": step,
                    "seconds": clock["seconds"],
                    **scores.as_dict(),
                    "per_image_s": scores.per_image_s,
                }
                if budget == "time" and seed == config.seeds[0]:
                    results[budget]["maps"] = maps[:SHOWN, 0].tolist()
        clock["since"] = time.process_time()
        return len(results) == 2

    train(net, x, m, steps=10**9, batch_size=config.batch_size, lr=config.lr, seed=seed,
          after_step=after_step)  # fmt: skip
    return {
        "parameters": sum(p.numel() for p in net.parameters()),
        "saved_mib": memory / 2**20,
        "ms_per_step": 1000 * results["time"]["seconds"] / results["time"]["step"],
        **results,
    }


def seed_paired(runs: dict, a: str, b: str, budget: str, seeds: list[int]) -> list[float]:
    """Per seed, the mean over test images of S(a) - S(b)."""
    out = []
    for s in seeds:
        da = torch.tensor(runs[f"{a}|{s}"][budget]["per_image_s"], dtype=torch.float64)
        db = torch.tensor(runs[f"{b}|{s}"][budget]["per_image_s"], dtype=torch.float64)
        out.append(float((da - db).mean()))
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.mean(values), se


METRICS = ("S", "meanE", "maxE", "adpE", "wF", "MAE")


def summary(state: dict, config: Config) -> str:
    """The markdown tables: per budget, each variant's metrics (mean ± sd over seeds)
    and its paired S differences; then the costs."""
    runs, seeds = state["runs"], config.seeds
    done = [v for v in config.variants if all(f"{v}|{s}" in runs for s in seeds)]
    against = [r for r in (config.reference, "none") if r in done]
    lines = [state["header"], ""]
    for budget in ("steps", "time"):
        title = f"{config.steps} steps" if budget == "steps" else f"{config.seconds:g} s CPU"
        lines += [f"### Equal {'steps' if budget == 'steps' else 'time'}: {title}", ""]
        head = "| variant | steps | " + " | ".join(METRICS) + " |"
        head += "".join(f" S vs {r}: mean ± SE over seeds (z) |" for r in against)
        lines += [head, "| --- " * (2 + len(METRICS) + len(against)) + "|"]
        for v in done:
            rs = [runs[f"{v}|{s}"][budget] for s in seeds]
            row = f"| {v} | {statistics.mean(r['step'] for r in rs):.0f} |"
            for key in METRICS:
                values = [r[key] for r in rs]
                sd = statistics.stdev(values) if len(values) > 1 else math.nan
                row += f" {statistics.mean(values):.3f} ± {sd:.3f} |"
            for r in against:
                if r == v:
                    row += " - |"
                    continue
                mean, se = mean_se(seed_paired(runs, v, r, budget, seeds))
                row += f" {mean:+.4f} ± {se:.4f} ({mean / se if se > 0 else math.nan:+.1f}) |"
            lines.append(row)
        lines.append("")
    lines += ["Cost: parameters, training CPU time per step (at the equal-time budget, mean "
              "over seeds) and the memory autograd saves for one batch's backward.", "",
              "| variant | parameters | ms / step | saved for backward (MiB) |",
              "| --- | --- | --- | --- |"]  # fmt: skip
    for v in done:
        rs = [runs[f"{v}|{s}"] for s in seeds]
        lines.append(f"| {v} | {rs[0]['parameters']:,} | "
                     f"{statistics.mean(r['ms_per_step'] for r in rs):.1f} | "
                     f"{rs[0]['saved_mib']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_predictions(state: dict, config: Config, data: dict, path: Path) -> None:
    """Rows: test images, ground truth, then each variant's predicted map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(v, state["runs"][f"{v}|{config.seeds[0]}"]["time"]["maps"])
            for v in config.variants if f"{v}|{config.seeds[0]}" in state["runs"]]  # fmt: skip
    images, masks = data["test"][0][:SHOWN], data["test"][1][:SHOWN, 0]
    n = len(images)
    fig, axes = plt.subplots(len(rows) + 2, n, figsize=(1.1 * n + 1.6, 1.1 * (len(rows) + 2)),
                             squeeze=False)  # fmt: skip
    for j in range(n):
        axes[0, j].imshow(images[j].permute(1, 2, 0).numpy())
        axes[1, j].imshow(masks[j].numpy(), cmap="gray", vmin=0, vmax=1)
        for i, (_, maps) in enumerate(rows, start=2):
            axes[i, j].imshow(maps[j], cmap="gray", vmin=0, vmax=1)
    for i, label in enumerate(["image", "ground truth", *(v for v, _ in rows)]):
        axes[i, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"predicted maps at the equal-time budget, seed {config.seeds[0]}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load(config: Config) -> dict:
    data = {}
    for split, limit in (("train", config.train_images), ("test", config.test_images)):
        x, m = segmentation_set(config.dataset, split, config.image_size)
        data[split] = (x[:limit], m[:limit]) if limit > 0 else (x, m)
    return data


def run(config: Config) -> dict:
    set_threads(config.threads)
    device = resolve_device(config.device)
    if config.reference not in config.variants:
        raise ValueError(f"reference {config.reference!r} is not among the variants")
    for v in config.variants:  # every variant checked before any training
        SegmentationNet(v, width=config.width)
    data = load(config)
    out = ensure_dir(config.out)
    header = (
        f"Dataset `{config.dataset}` at {config.image_size}x{config.image_size}: "
        f"{len(data['train'][0])} train / {len(data['test'][0])} test images; seeds "
        f"{config.seeds}; budgets {config.steps} steps and {config.seconds:g} s of training "
        f"(CPU time); batch {config.batch_size}, Adam lr {config.lr:g}, width "
        f"{config.width}; {config.threads} thread(s), {device}; torch {torch.__version__}."
    )
    saved = out / "dense.json"
    state = resume_state(saved, header)
    print(header, flush=True)
    todo = [
        (v, s) for s in config.seeds for v in config.variants if f"{v}|{s}" not in state["runs"]
    ]
    for v, s in tqdm(todo, desc="runs", unit="run"):
        state["runs"][f"{v}|{s}"] = r = run_one(v, s, config, data, device)
        steps, timed = r["steps"], r["time"]
        tqdm.write(f"{v} seed {s}: S {steps['S']:.4f} at {steps['step']} steps, "
                   f"{timed['S']:.4f} at {timed['step']} steps ({config.seconds:g} s)")  # fmt: skip
        saved.write_text(json.dumps(state))
    text = summary(state, config)
    (out / "dense.md").write_text(text)
    write_predictions(state, config, data, out / "predictions.png")
    print("\n" + text + f"\nwrote {out}/dense.md, dense.json and predictions.png")
    return state


def main(argv: list[str] | None = None) -> None:
    config, _ = parse_config(Config, argv, __doc__.splitlines()[0])
    with user_errors():
        run(config)


if __name__ == "__main__":
    main()
