"""The ``flowattn`` command: train, evaluate, sample, reconstruct, certify, attention,
segment.

``flowattn train`` with no arguments trains a small certified ``iresnet-attn`` on the
embedded digits dataset for a few minutes on CPU, then prints the test bits-per-dim and
writes sample and reconstruction grids. Every subcommand's ``--help`` lists its options;
every field of a training config is a ``train`` flag.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from . import configs
from .data import IMAGE_SUFFIXES
from .errors import ConfigError, UserError, first_line
from .evaluation import EXACT_MAX_DIMS
from .precision import use_ieee_float32
from .transforms import ConvergenceWarning


def segment(args: argparse.Namespace) -> int:
    from .segmentation.command import run

    return run(args)


class UsageError(ConfigError):
    """A bad command line: printed as one line, exit status 2."""


MAX_SAMPLES = 10_000  # samples of one `flowattn sample` grid (all held in memory)


def _count(text: str) -> int:
    """A positive integer flag."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _output_image(text: str | Path) -> Path:
    """An image path to write: a known image suffix, a parent that is (or can be) a
    folder, and that folder writable (a Path is one already checked)."""
    import os

    if isinstance(text, Path):
        return text

    path = Path(text)
    if text.endswith(("/", os.sep)) or path.suffix.lower() not in IMAGE_SUFFIXES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an image file name: end it in {', '.join(IMAGE_SUFFIXES)}"
        )
    from .runs import unwritable_reason

    problem = unwritable_reason(path.parent)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {problem}")
    return path


def _raise_terminated(signum, frame) -> None:
    from .runs import Terminated

    raise Terminated()


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from .runs import RunConfig, run_training
    from .training import NonFiniteLossError

    config = RunConfig.from_dict({f.name: args[f.name] for f in dataclasses.fields(RunConfig)})

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        cuda = torch.cuda.is_available() and config.device != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            config.device = f"cuda:{local}"
    # SIGTERM (what schedulers send) stops the run like Ctrl-C, with a checkpoint; the
    # command installs the handler, the library does not
    main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        summary = run_training(
            config,
            resume=args.resume,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except NonFiniteLossError as error:
        print(f"flowattn: error: {error}", file=sys.stderr)
        return 1
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if args.print_checksum:
        losses = summary.losses
        k = max(1, len(losses) // 5)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(
            f"rank {summary.rank} parameter checksum {summary.checksum} "
            f"first loss {first:.4f} last loss {last:.4f}",
            flush=True,
        )
    if summary.interrupted:
        return 143 if summary.interrupted == "SIGTERM" else 130
    return 0


def _load(args: argparse.Namespace):
    from .runs import load_run_model

    return load_run_model(args.run, device=args.device, ema=not args.no_ema)


def _run_images(state: dict, split: str, limit: int | None) -> torch.Tensor:
    from .runs import RunConfig

    return RunConfig(**state.get("run_config", {})).images(split, limit)


def cmd_eval(args: argparse.Namespace) -> int:
    model, state = _load(args)
    x = _run_images(state, args.split, args.limit)
    options: dict = {}
    estimator = None if args.estimator == "auto" else args.estimator
    if estimator is not None and estimator != "exact":
        options["n_probes"] = args.n_probes
        if args.n_terms is not None:
            options["n_terms"] = args.n_terms
    seed = state.get("run_config", {}).get("seed", 0) if args.seed is None else args.seed
    result = model.bits_per_dim(
        x,
        repeats=args.repeats,
        batch_size=args.batch_size,
        estimator=estimator,
        seed=seed,
        progress=not args.no_progress,
        **options,
    )
    weights = "EMA" if state["trainer"].get("ema") is not None and not args.no_ema else "raw"
    print(
        f"{args.split} ({weights} weights, step {state['trainer']['step']}): {result} "
        f"[{result.seconds:.1f} s]"
    )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import math

    from .plots import save_grid

    if args.n > MAX_SAMPLES:
        raise UsageError(f"-n {args.n}: at most {MAX_SAMPLES} samples in one grid")
    model, _ = _load(args)
    torch.manual_seed(args.seed)
    samples = model.sample(args.n, temperature=args.temperature, batch_size=args.batch_size)
    out = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(samples, out, nrow=max(1, int(math.sqrt(args.n))))
    print(f"wrote {args.n} samples at temperature {args.temperature} to {out}")
    return 0


def _images_from(paths: list[str], state: dict, split: str, limit: int) -> torch.Tensor:
    from .data import DATASETS, load_dataset, stack_images

    if not paths:
        return _run_images(state, split, limit)
    batches = []
    for path in paths:
        p = Path(path)
        if p.is_file() and p.suffix.lower() != ".npz":
            from PIL import Image, UnidentifiedImageError
            from torchvision.transforms.functional import pil_to_tensor

            try:
                with Image.open(p) as image:
                    batches.append(pil_to_tensor(image.convert("RGB"))[None])
            except (UnidentifiedImageError, OSError) as error:
                reason = first_line(error, default="unreadable")
                raise UsageError(
                    f"{path} is not an image file that can be read: {reason}"
                ) from None
        elif p.exists() or path in DATASETS:
            batches.append(stack_images(load_dataset(path, split), limit))
        else:
            raise UsageError(f"no such image, folder or dataset: {path}")
    shapes = {tuple(b.shape[1:]) for b in batches}
    if len(shapes) > 1:
        raise UsageError(f"images of different shapes: {sorted(shapes)}")
    return torch.cat(batches)[:limit]


def _fit_channels(x: torch.Tensor, model) -> torch.Tensor:
    if x.shape[1] == 3 and model.image_shape[0] == 1:
        x = x.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
    if tuple(x.shape[1:]) != model.image_shape:
        raise UsageError(
            f"images of shape {tuple(x.shape[1:])} do not fit the model's "
            f"{model.image_shape}; resize them first"
        )
    return x


def cmd_reconstruct(args: argparse.Namespace) -> int:
    import math

    from .metrics import reconstruction_error
    from .plots import save_grid

    model, state = _load(args)
    x = _fit_channels(_images_from(args.images, state, args.split, args.limit), model)
    x_hat = model.reconstruct(x.to(model.device)).cpu()
    error = reconstruction_error(x, x_hat)
    out = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    nrow = min(len(x), max(8, int(math.sqrt(len(x)))))
    rows = []
    for start in range(0, len(x), nrow):
        rows += [x[start : start + nrow], x_hat[start : start + nrow]]
    save_grid(torch.cat(rows).float() / 255, out, nrow=nrow)
    print(f"{len(x)} images: {error}")
    print(f"wrote {out} (rows alternate inputs and reconstructions)")
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    from .capacity import budget_use, low_share_message

    model, state = _load(args)
    x = _run_images(state, "test", args.n).to(model.device)
    steps = list(model.residual_steps())
    if not steps:
        print("the model has no residual steps: every step is exactly invertible (coupling)")
        return 0
    uses = budget_use(model, x)
    z = model.encode(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        x_back = model.decode(z)
    print(f"{'step':<40} {'bound':>8} {'norm':>4} {'local':>8} {'local l2':>8} {'share':>6} "
          f"{'iters':>6} {'residual':>9} converged")  # fmt: skip
    all_ok = True
    for use, (name, step) in zip(uses, steps, strict=True):
        bound = "none" if use.bound is None else f"{use.bound:.4f}"
        share = "-" if use.share is None else f"{use.share:.1%}"
        approx = "" if use.exact else "~"
        r = step.last_inverse
        all_ok &= bool(r.converged)
        print(f"{name:<40} {bound:>8} {use.norm:>4} {approx + f'{use.local:.3g}':>8} "
              f"{approx + f'{use.local_l2:.3g}':>8} {share:>6} {r.iterations:>6} "
              f"{r.residual:>9.2e} {r.converged}")  # fmt: skip
    x_levels, _ = model.dequantize.inverse(x_back)
    levels = (x_levels.cpu() - x.cpu().float()).abs().max()
    print(f"inverse of {len(x)} test images: max error {int(levels)} pixel levels")
    print(
        f"local: the largest Jacobian norm of the branch at the {len(x)} test images, in the "
        "certificate's norm (inf or 2) and in l2; share: local / bound; ~ marks lower "
        "estimates (power iteration, sampled rows), the rest are exact (dense Jacobians)"
    )
    for use in uses:
        if use.low:
            print(f"warning: {low_share_message(use)}")
    return 0 if all_ok else 1


def cmd_attention(args: argparse.Namespace) -> int:
    from .plots import attention_figure

    model, state = _load(args)
    x = _fit_channels(_images_from([args.image], state, "test", 1), model)
    path = attention_figure(model, x[0].to(model.device), args.output, n_queries=args.queries)
    print(f"wrote {path}")
    return 0


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run directory or a checkpoint file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--no-ema", action="store_true", help="use the raw, not the EMA, weights")


def _subcommand(description: str) -> ArgumentParser:
    return ArgumentParser(exit_on_error=False, description=description)


def _build() -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
    """The ``flowattn`` parser and its subcommands' parsers, by name."""
    from .runs import RunConfig

    parser = ArgumentParser(
        prog="flowattn",
        description=__doc__.splitlines()[0],
        exit_on_error=False,
        parser_mode=configs.parser_mode(),
    )
    subcommands: dict[str, tuple[ArgumentParser, str]] = {}

    p = configs.config_parser(
        RunConfig,
        description="Train a density model. Flags after --config override the file's values; "
        "a model option is --model.KEY VALUE (or --model KEY=VALUE).",
    )
    subcommands["train"] = (
        p,
        "train a density model (no arguments: small certified iresnet-attn on digits)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-checksum", action="store_true", help=argparse.SUPPRESS)

    p = _subcommand("Test bits-per-dim of a run, with its standard error.")
    subcommands["eval"] = (p, "test bits-per-dim of a run, with its standard error")
    _add_run_arguments(p)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=_count, help="evaluate the first N images only")
    p.add_argument(
        "--estimator",
        choices=["auto", "exact", "roulette", "series"],
        default="auto",
        help="log-det estimator: auto (default) is exact where the images have at most "
        f"{EXACT_MAX_DIMS} values, else the unbiased roulette with per-image draws; "
        "series is biased and is printed with its certified bias bound",
    )
    p.add_argument(
        "--n-terms",
        type=_count,
        help="series terms (default 5), or exact leading terms of the roulette (default 2)",
    )
    p.add_argument("--n-probes", type=_count, default=1, help="probes per image (default 1)")
    p.add_argument("--repeats", type=_count, default=1, help="dequantisation/probe draws")
    p.add_argument("--batch-size", type=_count, default=256)
    p.add_argument(
        "--seed",
        type=int,
        help="seed of the dequantisation noise (default: the run's seed, as at the end "
        "of training, so the figures agree)",
    )
    p.add_argument("--no-progress", action="store_true")

    p = _subcommand("Write a grid of samples.")
    subcommands["sample"] = (p, "write a grid of samples")
    _add_run_arguments(p)
    p.add_argument("-n", type=_count, default=64, help=f"number of samples (<= {MAX_SAMPLES})")
    p.add_argument("--temperature", type=_temperature, default=0.7)
    p.add_argument("-o", "--output", type=_output_image, default=Path("samples.png"))
    p.add_argument("--batch-size", type=_count, default=256)
    p.add_argument("--seed", type=int, default=0)

    p = _subcommand("Encode and decode images; print the error.")
    subcommands["reconstruct"] = (p, "encode and decode images; print the error")
    _add_run_arguments(p)
    p.add_argument(
        "--images",
        nargs="*",
        default=[],
        help="image files, folders, .npz files or dataset names (default: the run's test set)",
    )
    p.add_argument("--split", default="test", help="split of datasets given by name")
    p.add_argument("--limit", type=_count, default=16)
    p.add_argument("-o", "--output", type=_output_image, default=Path("reconstructions.png"))

    p = _subcommand("Lipschitz bounds of every residual step, and an inverse check.")
    subcommands["certify"] = (p, "Lipschitz bounds of every residual step, inverse check")
    _add_run_arguments(p)
    p.add_argument("-n", type=_count, default=16, help="test images to invert")

    p = _subcommand("A picture of the attention maps for an image.")
    subcommands["attention"] = (p, "picture of the attention maps for an image")
    _add_run_arguments(p)
    p.add_argument("--image", required=True, help="an image file, or a dataset name/path")
    p.add_argument("--queries", type=int, default=4, help="query pixels (or slots) shown")
    p.add_argument("-o", "--output", type=_output_image, default=Path("attention.png"))

    from .segmentation import command as segment_command

    subcommands["segment"] = (
        segment_command.build_parser(),
        "camouflaged object detection: train|eval|predict",
    )

    commands = parser.add_subcommands(dest="command", required=True)
    for name, (sub, help_text) in subcommands.items():
        commands.add_subcommand(name, sub, help=help_text)
    segment_command.add_actions(subcommands["segment"][0])  # after its parent is added
    return parser, {name: sub for name, (sub, _) in subcommands.items()}


def build_parser() -> ArgumentParser:
    """The ``flowattn`` command's parser (jsonargparse; raises instead of exiting)."""
    return _build()[0]


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "sample": cmd_sample,
    "reconstruct": cmd_reconstruct,
    "certify": cmd_certify,
    "attention": cmd_attention,
    "segment": segment,
}


def _suggestion(flag: str, parser: ArgumentParser) -> str:
    """``; did you mean --X?`` for the closest of ``parser``'s options, spelled as given."""
    from .names import closest

    close = closest(flag.lstrip("-").replace("-", "_"), list(parser.get_defaults().keys()))
    if close is None:
        return ""
    name = close.replace("_", "-") if "-" in flag.lstrip("-") else close
    return f"; did you mean --{name}?"


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parses a command line (dashed flags included); ``train --resume`` without a
    config reads the run's own ``config.toml`` first, so flags given override it."""
    from .runs import RunConfig

    if argv and argv[0] == "train":
        argv = configs.dashed_flags(argv, RunConfig)
    parser, subcommands = _build()
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as error:
        message = configs.one_line(error, RunConfig.fields())
        command = next((a for a in argv if a in subcommands), None)
        prefix = "flowattn" if command is None else f"flowattn {command}"
        unknown = message.partition("nrecognized arguments: ")[2].split(" ")[0]
        if unknown and command is not None:
            message = f"unknown option {unknown}{_suggestion(unknown, subcommands[command])}"
        raise configs.ConfigError(f"{prefix}: error: {message}") from None
    train = args.get("train")
    if args.command == "train" and train.resume and not train.config:
        if train.run_dir is None:
            raise UsageError("--resume needs the --run-dir of the run to continue")
        saved = Path(train.run_dir) / "config.toml"
        if not saved.is_file():
            raise UsageError(f"--resume: no run at {train.run_dir} (no config.toml)")
        return _parse(["train", "--config", str(saved), *argv[1:]])
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # validated user errors only: anything else is a bug and keeps its traceback
    user_errors = (UserError, FileNotFoundError)
    try:
        args = _parse(argv)
        use_ieee_float32()  # the command's process: residual steps need IEEE float32 on CUDA
        return COMMANDS[args.command](args[args.command])
    except SystemExit as stop:  # --help, --print_config
        return stop.code if isinstance(stop.code, int) else 0
    except (*user_errors, PermissionError) as error:
        message = first_line(error)
        if not message.startswith("flowattn"):
            message = f"flowattn: error: {message}"
        print(message, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
