"""Benchmark one training step of each invertible attention kind.

Prints, per kind, seconds per training step (forward + log-det + backward) and the
ratio to the paper's released code at the same setting, then the peak memory of a
step at 5, 10 and 20 series terms with the plain backward and with the
memory-efficient backward (Neumann gradient).

Peak memory is the rise of memory in use during one step, after a warm-up step: on
CPU the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``,
Linux and glibc only, in a fresh process per configuration, with large blocks served
by mmap so that freed memory leaves the resident set) minus the resident size before
the step; on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated before the step.

Usage:
    python experiments/bench/attention_step.py            # the issue's setting
    python experiments/bench/attention_step.py --kinds external l2 --steps 5
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
from measure import peak_rss_rise_mib, return_freed_memory_to_the_os

from flowattn import invertible_attention
from flowattn.transforms import CERTIFIED_KINDS, KINDS

# Seconds per step of the paper's released code (Zha et al., 2021) at batch 16,
# 12 channels, 16x16, 5 terms, 1 probe, float32, 2 CPU threads, as given in the
# project's issue; we did not re-run that code here.
PAPER_CODE_SECONDS = {"gaussian": 0.43, "embedded_gaussian": 0.96, "dot": 2.33, "concat": 4.10}


def make_step(args, kind: str, n_terms: int, memory_efficient: bool):
    options = {"gradient": "neumann", "memory_efficient": True} if memory_efficient else {}
    step = invertible_attention(
        kind, args.channels, n_terms=n_terms, n_probes=args.probes, **options
    )
    return step.to(args.device)


def one_step(step, x: torch.Tensor) -> None:
    y, logdet = step(x)
    log_normal = -0.5 * (y**2).flatten(1).sum(1) - 0.5 * y[0].numel() * math.log(2 * math.pi)
    loss = -(log_normal + logdet).mean()
    loss.backward()
    step.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_kind(args, kind: str) -> float:
    torch.manual_seed(0)
    step = make_step(args, kind, args.terms, memory_efficient=False)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=args.device) * 0.5
    for _ in range(2):
        one_step(step, x)
    times = []
    for _ in range(args.steps):
        sync(args.device)
        start = time.perf_counter()
        one_step(step, x)
        sync(args.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mib(args, kind: str, n_terms: int, memory_efficient: bool) -> float:
    """Peak memory of one step above the memory in use before it.

    On CPU each measurement runs in a fresh process, so that memory the allocator kept
    from earlier work cannot hide this step's peak.
    """
    if not args.device.startswith("cuda"):
        spec = json.dumps([kind, n_terms, memory_efficient])
        command = [sys.executable, __file__, *sys.argv[1:], "--memory-child", spec]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        return float(result.stdout.strip().splitlines()[-1])
    torch.manual_seed(0)
    step = make_step(args, kind, n_terms, memory_efficient)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=args.device) * 0.5
    one_step(step, x)  # warm-up: lazy initialisation, allocator pools
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    one_step(step, x)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def memory_child(args) -> None:
    """Prints the peak resident-set rise (MiB) of one CPU step, in this fresh process."""
    return_freed_memory_to_the_os()
    kind, n_terms, memory_efficient = json.loads(args.memory_child)
    torch.manual_seed(0)
    step = make_step(args, kind, n_terms, memory_efficient)
    x = torch.randn(args.batch, args.channels, args.size, args.size) * 0.5
    one_step(step, x)  # warm-up: lazy initialisation
    print(peak_rss_rise_mib(lambda: one_step(step, x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=12)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--terms", type=int, default=5)
    parser.add_argument("--probes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--memory-terms", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return

    print(
        f"setting: batch {args.batch}, {args.channels} channels, {args.size}x{args.size}, "
        f"{args.terms} terms, {args.probes} probe, float32, {args.threads} threads, "
        f"device {args.device}, torch {torch.__version__}"
    )
    print(f"{'kind':<18} {'s/step':>8} {'paper code':>11} {'speed-up':>9}")
    seconds = {}
    for kind in args.kinds:
        seconds[kind] = time_kind(args, kind)
        paper = PAPER_CODE_SECONDS.get(kind)
        ref = f"{paper:.2f}" if paper else "-"
        ratio = f"{paper / seconds[kind]:.1f}x" if paper else "-"
        print(f"{kind:<18} {seconds[kind]:>8.4f} {ref:>11} {ratio:>9}", flush=True)
    paper_ours = [seconds[k] for k in args.kinds if k in PAPER_CODE_SECONDS]
    for kind in args.kinds:
        if kind in CERTIFIED_KINDS and paper_ours:
            print(
                f"{kind}: {seconds[kind] / min(paper_ours):.2f}x the time of our fastest paper "
                f"kind, {seconds[kind] / max(paper_ours):.2f}x our slowest"
            )

    print("\npeak memory of one step (MiB)")
    header = " ".join(f"{t:>3} terms" for t in args.memory_terms)
    print(f"{'kind':<18} {'backward':<17} {header}  20/5 ratio")
    for kind in args.kinds:
        for efficient in (False, True):
            peaks = [peak_memory_mib(args, kind, t, efficient) for t in args.memory_terms]
            label = "memory-efficient" if efficient else "plain (backprop)"
            cells = " ".join(f"{p:>9.1f}" for p in peaks)
            ratio = peaks[-1] / peaks[0] if peaks[0] > 0 else float("nan")
            print(f"{kind:<18} {label:<17} {cells}  {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
