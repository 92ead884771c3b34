"""Training step of flowattn's i-ResNet against the Residual Flows reference, same process.

The matched pair (issue 12): 3 x 32 x 32 inputs, squeeze, 3 scales x 4 blocks (12x16x16,
24x8x8, 48x4x4, half the channels factored out between scales), 3-1-3 convolutions with
``--hidden`` channels, ActNorm per block, logit preprocessing, branch bound 0.9, batch
16, Adam with gradient clipping at 1; about 439k parameters each at 64 hidden channels.
The reference is Residual Flows' own code (github rtqichen/residual-flows), built as its
``train_img.py`` builds it (``resflows.resflow.ResidualFlow``, squeeze first, factor out,
``fc_end`` off, ``vnorms=2222``, spectral-norm tolerance 1e-3, its Lipschitz update after
every step), imported from the checkout given with ``--reference`` (never copied here).

Settings:

* (a) i-ResNet: 5-term power series, ELU, backprop through the series; also timed, as
  ``flowattn-neumann``, our same model with the series' Neumann gradient (the library's
  default: the same expected gradient, see ``flowattn.logdet``), against the same
  reference;
* (b) Residual Flows: Russian roulette (Poisson 2, 2 exact terms, one draw per batch),
  Neumann gradient, memory-efficient backward, LipSwish.

Both models' certificates run every step (flowattn's proven FFT bound; the reference's
spectral-norm power iteration, a lower estimate). Step times are interleaved step by step
in one process (order alternating, warm-up first) and reported as medians with the median
ratio and its bootstrap 95% interval; peak memory is the resident-set rise of one step
after two warm-up steps, each model in a fresh process (``--memory-pairs N``: N rounds,
printed as the mean paired difference with its standard error, since one process's
figure moves by about a MiB). With ``--device cuda`` both models run on the GPU, each
step is timed to a synchronisation, and peak memory is the rise of the memory that
tensors hold on the device (exact, so one round in this process). Without
``--reference`` only flowattn's figures print.

Usage:
    python -m experiments.bench.train_step --reference /path/to/residual-flows
    python -m experiments.bench.train_step --settings a --reps 15 --threads 1
    python -m experiments.bench.train_step --reference PATH --settings b --memory-pairs 8
    python -m experiments.bench.train_step --reference PATH --device cuda --reps 30
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from flowattn.models import build_model
from flowattn.precision import use_ieee_float32

from .measure import (
    interleaved_times,
    median_ratio_ci,
    peak_cuda_rise_mib,
    peak_rss_rise_mib,
    return_freed_memory_to_the_os,
    synchronizer,
)

SETTINGS = {
    "a": "5-term series, ELU, backprop through the series (i-ResNet)",
    "b": "roulette (Poisson 2, 2 exact terms), Neumann gradient, memory-efficient, LipSwish",
}


def build_ours(setting: str, args, gradient: str = "backprop") -> torch.nn.Module:
    """Our model of ``setting``; in (a), ``gradient`` is the series' log-det gradient."""
    if setting == "a":
        options = {"activation": "elu", "estimator": "series", "n_terms": 5,
                   "estimator_options": {"gradient": gradient}}  # fmt: skip
    else:
        options = {"activation": "lipswish", "estimator": "roulette", "n_terms": 2,
                   "estimator_options": {"distribution": "poisson", "lam": 2.0,
                                         "gradient": "neumann", "memory_efficient": True,
                                         "per_sample": False}}  # fmt: skip
    return build_model("iresnet", image_shape=(3, 32, 32), scales=3, blocks=args.blocks,
                       hidden=args.hidden, coeff=0.9, **options)  # fmt: skip


def build_reference(setting: str, args):
    sys.path.insert(0, str(Path(args.reference).resolve()))
    import resflows.layers as layers
    from resflows.resflow import ResidualFlow

    model = ResidualFlow(
        (args.batch, 12, 16, 16),
        n_blocks=[args.blocks] * 3,
        intermediate_dim=args.hidden,
        factor_out=True,
        init_layer=layers.LogitTransform(0.05),
        actnorm=True,
        coeff=0.9,
        vnorms="2222",
        sn_atol=1e-3,
        sn_rtol=1e-3,
        n_power_series=5 if setting == "a" else None,
        n_dist="poisson",
        n_exact_terms=2,
        kernels="3-1-3",
        activation_fn="elu" if setting == "a" else "swish",
        fc_end=False,
        preact=True,
        neumann_grad=setting == "b",
        grad_in_forward=setting == "b",
        first_resblock=True,
    )
    return model, layers.SqueezeLayer(2)


def ours_step(model, optimizer, x: torch.Tensor) -> None:
    y, logdet = model.dequantize(x)
    loss = -(model.log_prob(y) + logdet).mean() / (x[0].numel() * math.log(2))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def reference_step(model, squeeze, optimizer, x: torch.Tensor) -> None:
    """train_img.py's density step: dequantise, squeeze, model(x, 0), bits/dim, clip at
    1, Adam, then its Lipschitz update of every normalised layer."""
    import resflows.layers.base as base_layers

    y = (x.float() + torch.rand_like(x, dtype=torch.float)) / 256
    z, delta_logp = model(squeeze(y), 0)
    logpz = (-0.5 * math.log(2 * math.pi) - z.pow(2) / 2).flatten(1).sum(1, keepdim=True)
    logpx = logpz - delta_logp - math.log(256) * x[0].numel()
    loss = -logpx.mean() / (x[0].numel() * math.log(2))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, base_layers.SpectralNormConv2d | base_layers.SpectralNormLinear):
                m.compute_weight(update=True)


def steppers(setting: str, args) -> dict:
    """name -> a function running one training step, each on its own model."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, device=args.device)
    ours = build_ours(setting, args).to(args.device)
    ours_opt = torch.optim.Adam(ours.parameters(), lr=1e-4)
    out = {"flowattn": lambda: ours_step(ours, ours_opt, x)}
    sizes = {"flowattn": sum(p.numel() for p in ours.parameters())}
    if args.reference:
        reference, squeeze = build_reference(setting, args)
        reference.to(args.device)
        ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-4)
        out["reference"] = lambda: reference_step(reference, squeeze, ref_opt, x)
        sizes["reference"] = sum(p.numel() for p in reference.parameters())
    if setting == "a":  # built last: the models above start as they always have
        neumann = build_ours(setting, args, gradient="neumann").to(args.device)
        neumann.load_state_dict(ours.state_dict())
        neumann_opt = torch.optim.Adam(neumann.parameters(), lr=1e-4)
        out["flowattn-neumann"] = lambda: ours_step(neumann, neumann_opt, x)
        sizes["flowattn-neumann"] = sizes["flowattn"]
    return out, sizes


def time_setting(setting: str, args) -> dict:
    steps, sizes = steppers(setting, args)
    times = interleaved_times(steps, args.reps, warmup=args.warmup, sync=synchronizer(args.device))
    return {"times": times, "sizes": sizes}


def peak_memory_mib(setting: str, name: str, args) -> float:
    """The peak resident-set rise of one step of ``name``, in a fresh process."""
    command = [sys.executable, __file__, *sys.argv[1:], "--memory-child", f"{setting}:{name}"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def peak_memories(setting: str, names: list[str], args) -> dict[str, list[float]]:
    """Each model's peak resident-set rise in ``--memory-pairs`` fresh processes, one
    round of the models after another, the order reversed every other round. On CUDA,
    one round in this process (see :func:`peak_cuda_rise_mib`)."""
    if args.device.type == "cuda":
        steps, _ = steppers(setting, args)
        peaks = {}
        for name in names:
            for _ in range(2):  # as memory_child's warm-up steps
                steps[name]()
            peaks[name] = [peak_cuda_rise_mib(steps[name])]
        return peaks
    peaks: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.memory_pairs):
        for name in names if round_ % 2 == 0 else names[::-1]:
            peaks[name].append(peak_memory_mib(setting, name, args))
    return peaks


def paired_difference(ours: list[float], reference: list[float]) -> str:
    """The mean paired difference (MiB) with its standard error when there are pairs."""
    differences = [a - b for a, b in zip(ours, reference, strict=True)]
    if len(differences) == 1:
        return (f"{differences[0]:+.2f} MiB (one measurement each; on CPU --memory-pairs N "
                "repeats, --memory-child SETTING:NAME runs one)")  # fmt: skip
    error = statistics.stdev(differences) / math.sqrt(len(differences))
    values = ", ".join(f"{d:+.2f}" for d in differences)
    mean = statistics.mean(differences)
    return f"{mean:+.2f} +- {error:.2f} MiB (SE over {len(differences)} pairs: {values})"


def memory_child(args) -> None:
    return_freed_memory_to_the_os()
    setting, name = args.memory_child.split(":")
    if name.startswith("flowattn"):
        args.reference = None
    steps, _ = steppers(setting, args)
    # two warm-up steps: lazy initialisation and the first spectral-norm iterations,
    # and the first of our certificates' warm-started calls (a first call eigensolves
    # every frequency, the second is the first to run the Cholesky tests)
    for _ in range(2):
        steps[name]()
    print(peak_rss_rise_mib(steps[name]))


def main() -> None:
    use_ieee_float32()  # as the flowattn command does (flowattn.precision says why)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", help="a checkout of github rtqichen/residual-flows")
    parser.add_argument("--settings", default="ab", help="which settings: a, b or ab")
    parser.add_argument("--hidden", type=int, default=64, help="hidden channels (512: paper)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per scale")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=15, help="timed steps per model (>= 15)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", type=torch.device, default="cpu", help="cpu or cuda")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--memory-pairs", type=int, default=1,
                        help="fresh processes per model for peak memory (mean +- SE)")  # fmt: skip
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_pairs < 1:
        raise SystemExit(f"error: --memory-pairs must be at least 1, got {args.memory_pairs}")
    if args.reference and not (Path(args.reference) / "resflows" / "resflow.py").is_file():
        raise SystemExit(f"error: {args.reference} is not a residual-flows checkout")
    if args.memory_child:
        memory_child(args)
        return
    print(
        f"batch {args.batch}, 3 scales x {args.blocks} blocks, {args.hidden} hidden channels, "
        f"{args.threads} thread(s), {args.device}, torch {torch.__version__}; "
        f"{args.reps} interleaved steps "
        f"per model after {args.warmup} warm-up steps"
    )
    for setting in args.settings:
        result = time_setting(setting, args)
        times, sizes = result["times"], result["sizes"]
        print(f"\n({setting}) {SETTINGS[setting]}")
        peaks = {} if args.no_memory else peak_memories(setting, list(times), args)
        for name in times:
            memory = f", peak memory {statistics.mean(peaks[name]):.1f} MiB" if peaks else ""
            print(
                f"  {name:<16} {sizes[name]:,} parameters: median step "
                f"{statistics.median(times[name]):.3f} s{memory}"
            )
        if "reference" not in times:
            continue
        for name in (n for n in times if n.startswith("flowattn")):
            ratio, low, high = median_ratio_ci(times[name], times["reference"])
            print(f"  step time {name} / reference: {ratio:.2f} (95% CI {low:.2f}-{high:.2f})")
            if peaks:
                difference = paired_difference(peaks[name], peaks["reference"])
                print(f"  peak memory {name} - reference: {difference}")


if __name__ == "__main__":
    main()
