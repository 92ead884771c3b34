"""How the training step of ``iresnet-attn`` grows with the image size, per attention kind.

For each image side S (default 16, 32, 64: CelebA-64 sized at the top) and each attention
kind (every registered kind, certified), a model ``iresnet-attn`` on
3 x S x S images (2 scales x 2 blocks, 16 hidden channels, the attention step at the end
of the first scale, ``attention_scale=0``, on N = (S/2)^2 tokens of 12 channels) and the
same model without attention (``iresnet``) take training steps (forward, backward, Adam)
on random 8-bit batches. The log-det is the 5-term series by default (``--estimator``;
differentiated with the library's default Neumann-series gradient): every step then does
the same work, where the roulette's random number of terms would make the step
times of one model vary more than the kinds differ. Printed per size and kind: the median step
time, the attention's share of the step (1 - t(iresnet) / t(kind)), the growth exponent
of the step time in N against the previous size, and the peak memory of one step (the
resident-set rise, each in a fresh process).

A kind whose step exceeds ``--budget`` seconds is not run at larger sizes (printed as
"over budget"): that is where it stops being practical on this machine.

With ``--device cuda`` the models run on the GPU, each step is timed to a
synchronisation, and peak memory is the rise of the memory that tensors hold on the
device, in this process.

Usage:
    python -m experiments.bench.scale
    python -m experiments.bench.scale --sizes 16 32 64 --kinds external dot --threads 1
    python -m experiments.bench.scale --device cuda --sizes 16 32 64 128
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys

import torch

from flowattn.models import build_model
from flowattn.nn.attention_kinds import KINDS
from flowattn.precision import use_ieee_float32
from flowattn.training import Trainer

from .measure import (
    peak_cuda_rise_mib,
    peak_rss_rise_mib,
    return_freed_memory_to_the_os,
    seconds_of,
    synchronizer,
)


def build(kind: str, size: int, hidden: int, estimator: str):
    torch.manual_seed(0)
    options = {"scales": 2, "blocks": 2, "hidden": hidden, "estimator": estimator}
    if kind == "none":
        return build_model("iresnet", image_shape=(3, size, size), **options)
    return build_model(
        "iresnet-attn", image_shape=(3, size, size), attention=kind, attention_scale=0, **options
    )


def trainer_for(kind: str, size: int, args) -> Trainer:
    images = torch.randint(0, 256, (4 * args.batch, 3, size, size), dtype=torch.uint8)
    model = build(kind, size, args.hidden, args.estimator).to(args.device)
    return Trainer(model, images, batch_size=args.batch, lr=1e-3, warmup=1)


def step_seconds(trainer: Trainer) -> float:
    return seconds_of(trainer.train_step, synchronizer(trainer.model.device))[0]


def memory_of(kind: str, size: int, args) -> float:
    """Peak memory rise (MiB) of one step: on the CPU the resident set's, in a fresh
    process; on CUDA the tensors', in this one."""
    if args.device.type == "cuda":
        trainer = trainer_for(kind, size, args)
        trainer.train_step()  # warm-up (ActNorm initialisation, allocator)
        return peak_cuda_rise_mib(trainer.train_step)
    command = [sys.executable, __file__, "--memory-of", kind, str(size)]
    command += ["--batch", str(args.batch), "--hidden", str(args.hidden)]
    command += ["--threads", str(args.threads), "--estimator", args.estimator]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    use_ieee_float32()  # as the flowattn command does (flowattn.precision says why)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--estimator", default="series", choices=["series", "roulette"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per step")
    parser.add_argument("--device", type=torch.device, default="cpu", help="cpu or cuda")
    parser.add_argument("--memory-of", nargs=2, metavar=("KIND", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        kind, size = args.memory_of[0], int(args.memory_of[1])
        return_freed_memory_to_the_os()
        trainer = trainer_for(kind, size, args)
        trainer.train_step()  # warm-up (ActNorm initialisation, allocator)
        print(peak_rss_rise_mib(trainer.train_step))
        return

    print(
        f"iresnet-attn step vs image size: batch {args.batch}, 2 scales x 2 blocks, "
        f"{args.hidden} hidden channels, {args.estimator} log-det, {args.threads} thread(s), "
        f"{args.device}, median of {args.reps} steps after one warm-up; "
        f"torch {torch.__version__}"
    )
    header = f"{'size':>5} {'N':>5} {'kind':<18} {'s/step':>8} {'attention share':>16} "
    print(header + f"{'growth in N':>12} {'peak MiB':>9}")
    over: set[str] = set()
    previous: dict[str, tuple[int, float]] = {}
    for size in args.sizes:
        n = (size // 2) ** 2
        base = None
        for kind in ("none", *args.kinds):
            name = "none (iresnet)" if kind == "none" else kind
            if kind in over:
                print(f"{size:>5} {n:>5} {name:<18} {'over budget at a smaller size':>46}")
                continue
            trainer = trainer_for(kind, size, args)
            first = step_seconds(trainer)
            if first > args.budget:
                over.add(kind)
                times = [first]
            else:
                times = [step_seconds(trainer) for _ in range(args.reps)]
            seconds = statistics.median(times)
            if kind == "none":
                base = seconds
            share = "" if kind == "none" or base is None else f"{1 - base / seconds:.0%}"
            growth = ""
            if kind in previous:
                n0, t0 = previous[kind]
                growth = f"N^{math.log(seconds / t0) / math.log(n / n0):.2f}"
            previous[kind] = (n, seconds)
            memory = f"{memory_of(kind, size, args):.0f}" if kind not in over else "-"
            note = f"  (one step: over the {args.budget:g} s budget)" if kind in over else ""
            print(
                f"{size:>5} {n:>5} {name:<18} {seconds:>8.3f} {share:>16} {growth:>12} "
                f"{memory:>9}{note}",
                flush=True,
            )


if __name__ == "__main__":
    main()
