"""Measuring helpers shared by the benchmarks: peak memory of a step on CPU (Linux) and
on CUDA, and the median ratio of paired timings with a bootstrap confidence interval."""

from __future__ import annotations

import ctypes
import ctypes.util
import random
import resource
import statistics
import time
from collections.abc import Callable, Sequence


def proc_status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def return_freed_memory_to_the_os() -> None:
    """Make glibc serve blocks >= 64 KiB with mmap, so freed tensors leave the resident
    set at once and the resident size tracks the memory really in use."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 64 * 1024)


def peak_rss_rise_mib(step: Callable[[], None]) -> float:
    """The peak resident-set rise (MiB) of one call of ``step`` above the resident size
    before it. Call it in a fresh process after :func:`return_freed_memory_to_the_os`
    and one warm-up call, so that memory kept from earlier work cannot hide the peak."""
    # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM).
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    base = proc_status_kib("VmRSS")
    step()
    return (proc_status_kib("VmHWM") - base) / 1024


def synchronizer(device: str | object) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` for a CUDA device (to pass as ``interleaved_times``'
    ``sync``, so queued work is counted in the call that queued it), else None."""
    import torch

    return torch.cuda.synchronize if torch.device(device).type == "cuda" else None


def peak_cuda_rise_mib(step: Callable[[], None]) -> float:
    """The peak rise (MiB) of CUDA memory held by tensors during one call of ``step``,
    above what they held before it (the caching allocator counts live tensors exactly,
    so no fresh process is needed; call ``step`` once before, for lazy initialisation)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def median_ratio_ci(
    numerators: Sequence[float], denominators: Sequence[float], *, draws: int = 4000, seed: int = 0
) -> tuple[float, float, float]:
    """Median of the paired ratios and its 95% bootstrap interval (resampling pairs)."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return statistics.median(ratios), boot[int(0.025 * draws)], boot[int(0.975 * draws) - 1]


def seconds_of(
    call: Callable[[], object], sync: Callable[[], None] | None = None
) -> tuple[float, object]:
    """Wall-clock seconds of one call and its result; ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before and after, so asynchronous work is counted
    in the call that queued it."""
    if sync is not None:
        sync()
    start = time.perf_counter()
    result = call()
    if sync is not None:
        sync()
    return time.perf_counter() - start, result


def interleaved_times(
    steps: dict[str, Callable[[], object]],
    reps: int,
    *,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of ``reps`` calls of each step, interleaved call by call in this process
    (the order reversed every other round, so neither always runs first), after
    ``warmup`` untimed rounds. ``sync``: as :func:`seconds_of`'s."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(seconds_of(steps[name], sync)[0])
    return times


class KernelWork:
    """Records, per call of the steps it wraps, the minor page faults (first touches of
    memory the allocator took fresh from the OS, which the kernel zero-fills) and the
    system CPU seconds. On CPU, a step whose large temporaries are served afresh on
    every call pays for them there, and how often that happens depends on the process's
    allocator state, which drifts: these explain timings that move between runs."""

    def __init__(self) -> None:
        self.faults: dict[str, list[int]] = {}
        self.system_seconds: dict[str, list[float]] = {}

    def wrap(self, name: str, step: Callable[[], object]) -> Callable[[], None]:
        self.faults[name], self.system_seconds[name] = [], []

        def call() -> None:
            before = resource.getrusage(resource.RUSAGE_SELF)
            step()
            after = resource.getrusage(resource.RUSAGE_SELF)
            self.faults[name].append(after.ru_minflt - before.ru_minflt)
            self.system_seconds[name].append(after.ru_stime - before.ru_stime)

        return call
