"""Sampling and reconstruction speed of the density presets (images per second).

Each preset (``--presets``; tiny size, as in the CPU density configs) is built on the
images of ``--dataset`` (default the shared CIFAR-10 subset), trained for ``--steps``
steps so its residual branches are not at their initial weights, and then timed: the
median over ``--reps`` calls of ``DensityModel.sample(n)`` (temperature 1) and of
``DensityModel.reconstruct`` on n test images, at the default inverse tolerance (a few
float32 epsilons). Printed: images per second of each, the fixed-point iterations per
residual step of the last call, and the largest reconstruction error in pixel levels.

The last column compares, in this process and interleaved (alternating order, median
ratio with a bootstrap 95% interval), ``sample`` with nflows' ``sample_and_log_prob``,
which draws the same way through the same inverse but also estimates every residual
step's log-det: what skipping those estimates buys.

With ``--baseline PATH`` (a checkout of an older flowattn, e.g. ``git worktree add
/tmp/filed 8e6ace6``, the code when the speed issue was filed), a second table compares
with that code in this process: the same weights loaded into the baseline's model of the
preset, ``sample`` (same seeds) and ``reconstruct`` calls interleaved, and the median
ratio baseline / this with its bootstrap 95% interval: the speed-up.

With ``--device cuda`` the models run on the GPU and every call is timed to a
synchronisation.

Usage:
    python -m experiments.bench.sampling
    python -m experiments.bench.sampling --presets iresnet glow --n 256 --threads 2
    python -m experiments.bench.sampling --baseline /tmp/filed --presets iresnet resflow
    python -m experiments.bench.sampling --device cuda --n 256
"""

from __future__ import annotations

import argparse
import statistics
from importlib import import_module
from pathlib import Path

import torch

from flowattn.data import load_dataset, stack_images
from flowattn.models import build_model
from flowattn.precision import use_ieee_float32
from flowattn.training import Trainer

from .baseline import import_baseline
from .measure import interleaved_times, median_ratio_ci, seconds_of, synchronizer

PRESETS = ("iresnet", "iresnet-attn", "resflow", "glow", "glow-attn")
# ../shared beside the repository
SHARED = str(Path(__file__).resolve().parents[3] / "shared/data/cifar10/cifar10_subset.npz")


def timed(call, reps: int, sync=None) -> tuple[float, object]:
    """Median seconds of ``reps`` calls, and the last call's result (``sync``: as
    ``measure.seconds_of``'s)."""
    times, result = [], None
    for _ in range(reps):
        seconds, result = seconds_of(call, sync)
        times.append(seconds)
    return statistics.median(times), result


def main() -> None:
    use_ieee_float32()  # as the flowattn command does (flowattn.precision says why)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--dataset", default=SHARED)
    parser.add_argument("--n", type=int, default=64, help="images per call")
    parser.add_argument("--steps", type=int, default=20, help="training steps first")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", help="checkout of an older flowattn to compare with")
    parser.add_argument("--device", type=torch.device, default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    baseline = None if args.baseline is None else import_baseline(args.baseline)
    torch.set_num_threads(args.threads)
    x_train = stack_images(load_dataset(args.dataset, "train"), 512)
    x_test = stack_images(load_dataset(args.dataset, "test"), args.n).to(args.device)
    shape = tuple(x_train.shape[1:])
    print(
        f"{args.dataset}: images {shape}, tiny models trained {args.steps} steps; "
        f"{args.n} images per call, median of {args.reps} calls, {args.threads} thread(s), "
        f"{args.device}, torch {torch.__version__}"
    )
    print(f"{'preset':<14} {'sample img/s':>13} {'reconstruct img/s':>18} "
          f"{'iterations per step':>22} {'max error (levels)':>19} "
          f"{'with / without log-dets':>22}")  # fmt: skip
    models = {}
    for preset in args.presets:
        torch.manual_seed(0)
        model = build_model(preset, image_shape=shape, size="tiny").to(args.device)
        Trainer(model, x_train, batch_size=32, lr=1e-3, warmup=1).run(args.steps, progress=False)
        model.eval()
        models[preset] = model
        torch.manual_seed(1)
        sync = synchronizer(args.device)
        sample_s, _ = timed(lambda m=model: m.sample(args.n), args.reps, sync)
        recon_s, x_hat = timed(lambda m=model: m.reconstruct(x_test), args.reps, sync)
        iterations = [step.last_inverse.iterations for _, step in model.residual_steps()]
        error = int((x_hat.int() - x_test.int()).abs().max())
        its = ",".join(map(str, iterations)) or "-"
        ratio = "-"
        if iterations:
            with_log_dets, without = interleaved(model, args.n, args.reps)
            ratio = ratio_text(with_log_dets, without)
        print(
            f"{preset:<14} {args.n / sample_s:>13.1f} {args.n / recon_s:>18.1f} {its:>22} "
            f"{error:>19} {ratio:>22}",
            flush=True,
        )
    if baseline is not None:
        print(f"\nagainst {args.baseline} (median of {max(args.reps, 5)} interleaved calls each)")
        print(f"{'preset':<14} {'sample: baseline / this':>26} "
              f"{'reconstruct: baseline / this':>30} {'baseline iterations':>20}")  # fmt: skip
        for preset, model in models.items():
            old = baseline_model(baseline, preset, model, shape)
            sample, recon, iterations = against_baseline(model, old, x_test, args.n, args.reps)
            print(f"{preset:<14} {sample:>26} {recon:>30} {iterations:>20}", flush=True)


def ratio_text(numerators: list[float], denominators: list[float]) -> str:
    """The median ratio of paired times and its bootstrap 95% interval, as printed."""
    return "{:.2f} ({:.2f}-{:.2f})".format(*median_ratio_ci(numerators, denominators))


def baseline_model(baseline, preset: str, model, shape: tuple[int, ...]):
    """The baseline package's model of ``preset`` with ``model``'s weights."""
    old = (
        import_module(f"{baseline.__name__}.models")
        .build_model(preset, image_shape=shape, size="tiny")
        .to(model.device)
    )
    try:
        old.load_state_dict(model.state_dict())
    except RuntimeError as error:
        message = f"the baseline's {preset} model does not take these weights: {error}"
        raise SystemExit(message) from error
    return old.eval()


def against_baseline(model, old, x_test, n: int, reps: int) -> tuple[str, str, str]:
    """Interleaved sample and reconstruct calls of the two models (the same seed for each
    pair of samples): the median ratios baseline / this with 95% intervals, and the
    baseline's iterations per residual step."""
    seeds = {"this": 0, "baseline": 0}

    def sampler(name: str, m):
        def call():
            seeds[name] += 1
            torch.manual_seed(seeds[name])
            return m.sample(n)

        return call

    reps, sync = max(reps, 5), synchronizer(model.device)
    times = interleaved_times(
        {"this": sampler("this", model), "baseline": sampler("baseline", old)}, reps, sync=sync
    )
    sample = ratio_text(times["baseline"], times["this"])
    calls = {"this": lambda: model.reconstruct(x_test), "baseline": lambda: old.reconstruct(x_test)}
    times = interleaved_times(calls, reps, sync=sync)
    recon = ratio_text(times["baseline"], times["this"])
    iterations = [step.last_inverse.iterations for _, step in old.residual_steps()]
    return sample, recon, ",".join(map(str, iterations)) or "-"


def interleaved(model, n: int, reps: int) -> tuple[list[float], list[float]]:
    """Seconds of ``sample_and_log_prob(n)`` and of ``sample(n)``, alternating which goes
    first, after one warm-up call of each."""
    calls = {
        "with": lambda: model.sample_and_log_prob(n),
        "without": lambda: model.sample(n),
    }
    with torch.no_grad():
        times = interleaved_times(calls, max(reps, 5), warmup=1, sync=synchronizer(model.device))
    return times["with"], times["without"]


if __name__ == "__main__":
    main()
