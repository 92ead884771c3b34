"""Density-model benchmark: equal wall-clock training budgets on the CIFAR-10 subset.

Each model (a preset, optionally ``preset:attention``) is trained for the same
wall-clock budget on the training images, then evaluated on the test images. Prints
a table of test bits-per-dim (mean ± standard error, with an unbiased Russian-roulette
log-det for residual models and the training estimator's figure too), training images/s
and sampling images/s, and writes a CSV, a JSON with the loss curves and sample grids.

    python experiments/bench/density.py --budget 20            # the default, ~2 h
    python experiments/bench/density.py --budget 2 --models iresnet,glow
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from flowattn.data import load_dataset, stack_images
from flowattn.models import build_model
from flowattn.plots import save_grid
from flowattn.training import train

DEFAULT_MODELS = "iresnet,iresnet-attn:external,iresnet-attn:gaussian,glow,glow-attn"


def run_one(spec: str, args: argparse.Namespace, x_train, x_test, out: Path) -> dict:
    preset, _, attention = spec.partition(":")
    options = {"attention": attention} if attention else {}
    torch.manual_seed(args.seed)
    model = build_model(preset, image_shape=tuple(x_train.shape[1:]), size=args.size, **options)
    print(f"\n== {spec}: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    result = train(
        model,
        x_train,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        time_budget=args.budget * 60,
        seed=args.seed,
        progress=not args.no_progress,
    )
    row = {
        "model": spec,
        "steps": result.steps,
        "train_img_s": result.images_per_second,
        "skipped": result.skipped,
        "final_train_bpd": sum(result.losses[-50:]) / max(1, len(result.losses[-50:])),
    }
    torch.manual_seed(args.seed + 1)
    bpd = model.bits_per_dim(x_test, repeats=args.eval_repeats, batch_size=128)
    row["test_bpd"], row["test_se"], row["estimator"] = bpd.mean, bpd.stderr, bpd.estimator
    if any(True for _ in model.residual_steps()):
        unbiased = model.bits_per_dim(
            x_test, repeats=args.eval_repeats, batch_size=128, estimator="roulette", n_terms=2
        )
        row["unbiased_bpd"], row["unbiased_se"] = unbiased.mean, unbiased.stderr
    else:
        row["unbiased_bpd"], row["unbiased_se"] = bpd.mean, bpd.stderr
    model.eval()
    start = time.perf_counter()
    samples = model.sample(args.sample_n, temperature=args.temperature)
    row["sample_img_s"] = args.sample_n / (time.perf_counter() - start)
    save_grid(samples, out / f"samples_{spec.replace(':', '_')}.png", nrow=8)
    row["curve"] = result.losses
    print(
        f"{spec}: test {row['unbiased_bpd']:.4f} ± {row['unbiased_se']:.4f} bpd "
        f"({result.steps} steps, {row['train_img_s']:.1f} img/s)",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10/cifar10_subset.npz")
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated presets")
    parser.add_argument("--budget", type=float, default=20.0, help="minutes per model")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-repeats", type=int, default=1)
    parser.add_argument("--sample-n", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--out", default="outputs/bench_density")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_train = stack_images(load_dataset(args.data, "train"))
    x_test = stack_images(load_dataset(args.data, "test"))
    print(
        f"data {args.data}: {len(x_train)} train / {len(x_test)} test images "
        f"{tuple(x_train.shape[1:])}; budget {args.budget:g} min per model, "
        f"{args.threads} threads, size {args.size}"
    )
    rows = [run_one(spec, args, x_train, x_test, out) for spec in args.models.split(",")]

    header = (
        "| model | test bpd (unbiased) ± SE | test bpd (training estimator) | steps "
        "| train img/s | sample img/s |"
    )
    print(f"\n{header}\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {r['unbiased_bpd']:.4f} ± {r['unbiased_se']:.4f} "
            f"| {r['test_bpd']:.4f} ± {r['test_se']:.4f} | {r['steps']} "
            f"| {r['train_img_s']:.1f} | {r['sample_img_s']:.1f} |"
        )
    print("\ntraining estimators: " + "; ".join(f"{r['model']}: {r['estimator']}" for r in rows))
    base = {r["model"]: r["unbiased_bpd"] for r in rows}
    if "iresnet" in base:
        for name, value in base.items():
            if name.startswith("iresnet-attn"):
                print(f"{name} - iresnet: {value - base['iresnet']:+.4f} bpd")
    fields = [k for k in rows[0] if k != "curve"]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r[k] for k in fields} for r in rows)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}))
    print(f"wrote {out}/results.csv, results.json and samples_*.png")


if __name__ == "__main__":
    main()
