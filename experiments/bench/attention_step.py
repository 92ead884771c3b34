"""Benchmark one training step of each invertible attention kind, against the paper's code.

Prints, per kind, seconds per training step (forward + log-det + backward) of our
faithful and certified versions, each with the Neumann-series gradient of the log-det
(the library's default) and with backpropagation through the series (the paper's way;
the same expected gradient, see ``flowattn.logdet``), and, with ``--reference PATH`` (a
checkout of github Schwartz-Zha/InvertibleAttention, never copied here), of the paper's
own step (``inv_attention.InvAttention_<kind>``: its power series with create_graph,
its soft spectral normalisation), interleaved step by step in one process (order
alternating, warm-up first): medians, and the median ratio paper / ours with a bootstrap 95%
interval; beside them, each version's median minor page faults and system CPU seconds
per step (on CPU, large temporaries that the allocator takes fresh from the OS on every
step cost system time, and how often that happens drifts with the process's allocator
state, which moves the ratios between runs), and the largest |log-det| of one step at
the benchmark's input (astronomically large where a version's series diverges there, as
the dot kind's does, faithful and in the paper's code: its row then times a meaningless
estimate). Then the peak memory of a step at 5, 10 and 20 series terms with
backpropagation through the series, with the Neumann gradient, and with the Neumann
gradient computed in the forward pass (memory-efficient).

Peak memory is the rise of memory in use during one step, after a warm-up step: on
CPU the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``,
Linux and glibc only, in a fresh process per configuration, with large blocks served
by mmap so that freed memory leaves the resident set) minus the resident size before
the step; on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated before the step.

Usage:
    python -m experiments.bench.attention_step --reference /path/to/InvertibleAttention
    python -m experiments.bench.attention_step --kinds external l2 --steps 5 --no-memory
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch

from flowattn import invertible_attention
from flowattn.nn.attention_kinds import KINDS, PAPER_KINDS
from flowattn.precision import use_ieee_float32

from .measure import (
    KernelWork,
    interleaved_times,
    median_ratio_ci,
    peak_cuda_rise_mib,
    peak_rss_rise_mib,
    return_freed_memory_to_the_os,
    synchronizer,
)

GRADIENTS = ("neumann", "backprop")
# the backward passes whose peak memory is measured (certified steps)
BACKWARDS = {
    "backprop": {"gradient": "backprop", "memory_efficient": False},
    "neumann": {"gradient": "neumann", "memory_efficient": False},
    "neumann, memory-efficient": {"gradient": "neumann", "memory_efficient": True},
}


def make_step(
    args,
    kind: str,
    n_terms: int,
    memory_efficient: bool,
    certified: bool = True,
    gradient: str = "neumann",
):
    step = invertible_attention(
        kind, args.channels, certified=certified, n_terms=n_terms, n_probes=args.probes,
        gradient=gradient, memory_efficient=memory_efficient,
    )  # fmt: skip
    return step.to(args.device)


def make_paper_step(args, kind: str) -> torch.nn.Module:
    """The paper's step ``InvAttention_<kind>`` from the checkout at ``args.reference``."""
    checkout = str(Path(args.reference).resolve())
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    import inv_attention

    cls = getattr(inv_attention, f"InvAttention_{kind}")
    step = cls(args.channels, numTraceSamples=args.probes, numSeriesTerms=args.terms)
    return step.to(args.device)


def log_likelihood_loss(y: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    log_normal = -0.5 * (y**2).flatten(1).sum(1) - 0.5 * y[0].numel() * math.log(2 * math.pi)
    return -(log_normal + logdet).mean()


def one_step(step, x: torch.Tensor) -> None:
    y, logdet = step(x)
    log_likelihood_loss(y, logdet).backward()
    step.zero_grad(set_to_none=True)


def paper_step(step, x: torch.Tensor) -> None:
    """The paper's step: its input must require grad (its trace differentiates Fx in x)."""
    y, trace = step(x.detach().requires_grad_(True))
    log_likelihood_loss(y, trace).backward()
    step.zero_grad(set_to_none=True)


def time_kind(args, kind: str) -> tuple[dict[str, list[float]], KernelWork, dict[str, float]]:
    """Seconds per step of each version of ``kind``, interleaved step by step, the page
    faults and system time of each step, and each version's :func:`log_det_size`."""
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=args.device) * 0.5
    versions = (["faithful"] if kind in PAPER_KINDS else []) + ["certified"]
    steps, sizes = {}, {}
    for version in versions:
        first = None
        for gradient in args.gradients:
            step = make_step(args, kind, args.terms, False, version == "certified", gradient)
            if first is None:
                first = step
            else:  # the same weights for every gradient of a version
                step.load_state_dict(first.state_dict())
            name = f"{version} {gradient}"
            steps[name] = partial(one_step, step, x)
            sizes[name] = log_det_size(step, x)
    if args.reference and kind in PAPER_KINDS:
        paper = make_paper_step(args, kind)
        steps["paper backprop"] = partial(paper_step, paper, x)
        sizes["paper backprop"] = log_det_size(paper, x.detach().requires_grad_(True))
    kernel = KernelWork()
    steps = {name: kernel.wrap(name, step) for name, step in steps.items()}
    times = interleaved_times(steps, args.steps, warmup=args.warmup, sync=synchronizer(args.device))
    return times, kernel, sizes


def log_det_size(step, x: torch.Tensor) -> float:
    """The largest |log-det| (the paper's step: |trace-series estimate|) of one step at
    the benchmark's input. A contractive step's is at most -D log(1 - Lip); values many
    orders above D = C H W mean the series diverged there, and the row times a
    meaningless estimate."""
    _, logdet = step(x)
    return float(logdet.detach().abs().max())


def peak_memory_mib(args, kind: str, n_terms: int, backward: str) -> float:
    """Peak memory of one step above the memory in use before it.

    ``backward`` is one of :data:`BACKWARDS`. On CPU each measurement runs in a fresh
    process, so that memory the allocator kept from earlier work cannot hide this step's
    peak.
    """
    if not args.device.startswith("cuda"):
        spec = json.dumps([kind, n_terms, backward])
        command = [sys.executable, __file__, *sys.argv[1:], "--memory-child", spec]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        return float(result.stdout.strip().splitlines()[-1])
    torch.manual_seed(0)
    step = make_step(args, kind, n_terms, **BACKWARDS[backward])
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=args.device) * 0.5
    one_step(step, x)  # warm-up: lazy initialisation, allocator pools
    return peak_cuda_rise_mib(lambda: one_step(step, x))


def memory_child(args) -> None:
    """Prints the peak resident-set rise (MiB) of one CPU step, in this fresh process."""
    return_freed_memory_to_the_os()
    kind, n_terms, backward = json.loads(args.memory_child)
    torch.manual_seed(0)
    step = make_step(args, kind, n_terms, **BACKWARDS[backward])
    x = torch.randn(args.batch, args.channels, args.size, args.size) * 0.5
    one_step(step, x)  # warm-up: lazy initialisation
    print(peak_rss_rise_mib(lambda: one_step(step, x)))


def main() -> None:
    use_ieee_float32()  # as the flowattn command does (flowattn.precision says why)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=12)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--terms", type=int, default=5)
    parser.add_argument("--probes", type=int, default=1)
    parser.add_argument(
        "--gradients", nargs="+", default=list(GRADIENTS), choices=GRADIENTS,
        help="log-det gradients of our steps to time (the paper's step backprops)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per version")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reference", help="a checkout of github Schwartz-Zha/InvertibleAttention")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--memory-terms", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.reference and not (Path(args.reference) / "inv_attention.py").is_file():
        raise SystemExit(f"error: {args.reference} is not an InvertibleAttention checkout")
    if args.memory_child:
        memory_child(args)
        return

    print(
        f"setting: batch {args.batch}, {args.channels} channels, {args.size}x{args.size}, "
        f"{args.terms} terms, {args.probes} probe, float32, {args.threads} threads, "
        f"device {args.device}, torch {torch.__version__}; {args.steps} interleaved steps "
        f"per version after {args.warmup} warm-up steps"
    )
    print(f"{'kind':<18} {'version':<10} {'gradient':<9} {'s/step':>8} {'faults':>7} "
          f"{'system s':>9} {'max |log-det|':>14}  paper / this (95% CI)")  # fmt: skip
    for kind in args.kinds:
        times, kernel, sizes = time_kind(args, kind)
        paper = times.get("paper backprop")
        for name, values in times.items():
            ratio = ""
            if paper is not None and values is not paper:
                ratio = "{:.2f}x ({:.2f}-{:.2f})".format(*median_ratio_ci(paper, values))
            # the warm-up calls are recorded too (they come first); leave them out
            faults = statistics.median(kernel.faults[name][args.warmup :])
            system = statistics.median(kernel.system_seconds[name][args.warmup :])
            version, gradient = name.split()
            print(
                f"{kind:<18} {version:<10} {gradient:<9} {statistics.median(values):>8.4f} "
                f"{faults:>7.0f} {system:>9.3f} {sizes[name]:>14.3g}  {ratio}",
                flush=True,
            )
    if args.no_memory:
        return

    print("\npeak memory of one step (MiB)")
    header = " ".join(f"{t:>3} terms" for t in args.memory_terms)
    ratio_name = f"{args.memory_terms[-1]}/{args.memory_terms[0]} ratio"
    print(f"{'kind':<18} {'backward':<25} {header}  {ratio_name}")
    for kind in args.kinds:
        for backward in BACKWARDS:
            peaks = [peak_memory_mib(args, kind, t, backward) for t in args.memory_terms]
            cells = " ".join(f"{p:>9.1f}" for p in peaks)
            ratio = peaks[-1] / peaks[0] if peaks[0] > 0 else float("nan")
            print(f"{kind:<18} {backward:<25} {cells}  {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
