"""``flowattn segment``: train, evaluate and apply a camouflaged-object segmenter.

``flowattn segment train`` with no arguments trains a :class:`SegmentationNet` with a
certified invertible attention step on the embedded camouflage set (no download) for a
few CPU minutes, prints the test metrics and writes ``segmenter.pt`` and a picture of
predictions in ``--out``. ``--dataset PATH`` trains on a real COD set instead
(``Imgs/`` and ``GT/``, see :func:`~flowattn.segmentation.load_cod_folder`).
``eval`` prints a saved network's metrics on a set; ``predict`` writes its predicted
maps as PNG files, one per image, at each image's own size.
"""

from __future__ import annotations

__all__ = ["add_actions", "build_parser", "run"]

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser, Namespace

from ..data import IMAGE_SUFFIXES, DataError
from ..errors import ConfigError
from .fit import evaluate, load_segmenter, predict, save_segmenter, train
from .folders import read_image, segmentation_set
from .network import SegmentationNet, slot_names
from .scores import cod_scores

CHECKPOINT = "segmenter.pt"


def _model_path(path: str) -> Path:
    p = Path(path)
    return p / CHECKPOINT if p.is_dir() else p


def _print_scores(scores, what: str) -> None:
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in scores.as_dict().items())
    print(f"{what}: {metrics}")


def _write_figure(images, masks, maps, path: Path) -> None:
    from ..plots import save_grid

    n = min(8, len(images))
    rows = [images[:n].float() / 255, masks[:n].float().expand(-1, 3, -1, -1),
            maps[:n].expand(-1, 3, -1, -1)]  # fmt: skip
    save_grid(torch.cat(rows), path, nrow=n, min_side=64)


def _check(args: Namespace) -> None:
    for name in ("steps", "batch_size", "width"):
        if name in args and args[name] < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {args[name]}")
    size = args.get("image_size")
    if size is not None and (size < 16 or size % 8):
        raise ConfigError(f"--image-size must be a multiple of 8 of at least 16, got {size}")
    if args.get("threshold") is not None and not 0 < args.threshold < 1:
        raise ConfigError(f"--threshold must lie in (0, 1), got {args.threshold}")


def segment_train(args: Namespace) -> int:
    from ..runs import resolve_device

    device = resolve_device(args.device)
    images, masks = segmentation_set(args.dataset, "train", args.image_size)
    test_images, test_masks = segmentation_set(args.dataset, "test", args.image_size)
    torch.manual_seed(args.seed)
    net = SegmentationNet(args.attention, width=args.width).to(device)
    print(f"training {args.attention} (width {args.width}, "
          f"{sum(p.numel() for p in net.parameters()):,} parameters) on {args.dataset}: "
          f"{len(images)} images of {tuple(images.shape[1:])}, {args.steps} steps")  # fmt: skip
    progress = not args.no_progress and sys.stderr.isatty()
    losses = train(net, images, masks, steps=args.steps, batch_size=args.batch_size,
                   lr=args.lr, seed=args.seed, progress=progress)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_segmenter(net, out / CHECKPOINT, dataset=str(args.dataset),
                   image_size=int(images.shape[-1]), steps=len(losses))  # fmt: skip
    maps = predict(net, test_images)
    _print_scores(cod_scores(maps, test_masks), f"test ({len(test_images)} images)")
    _write_figure(test_images, test_masks, maps, out / "predictions.png")
    print(f"wrote {out / CHECKPOINT} and {out / 'predictions.png'} "
          "(rows: images, ground truth, predicted maps)")  # fmt: skip
    return 0


def segment_eval(args: Namespace) -> int:
    net, meta = load_segmenter(_model_path(args.model), device=args.device)
    dataset = args.dataset or meta["dataset"]
    images, masks = segmentation_set(dataset, args.split, args.image_size or meta["image_size"])
    _print_scores(evaluate(net, images, masks), f"{dataset} {args.split} ({len(images)} images)")
    return 0


def _image_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no image or folder {p}")
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(paths)}")
    return files


def segment_predict(args: Namespace) -> int:
    import numpy as np
    from PIL import Image

    net, meta = load_segmenter(_model_path(args.model), device=args.device)
    size = meta["image_size"]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    files = _image_files(args.images)
    for file in files:
        rgb = np.asarray(read_image(file, "RGB"))
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
        small = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        p = F.interpolate(predict(net, small.clamp(0, 1)), size=x.shape[-2:], mode="bilinear")
        p = p > args.threshold if args.threshold is not None else p
        grey = (p[0, 0].double() * 255).round().to(torch.uint8).numpy()
        Image.fromarray(grey).save(out / f"{file.stem}.png")
    print(f"wrote {len(files)} maps to {out}/ (PNG, object = white)")
    return 0


def build_parser() -> ArgumentParser:
    """The parser of ``flowattn segment``, before :func:`add_actions` (jsonargparse adds
    nested subcommands once their parent is registered)."""
    return ArgumentParser(exit_on_error=False, description=__doc__.splitlines()[0])


def add_actions(parser: ArgumentParser) -> None:
    """Adds the ``train``, ``eval`` and ``predict`` actions to ``parser``."""
    p = ArgumentParser(exit_on_error=False, description="Train a segmentation network.")
    p.add_argument("--dataset", default="camouflage", help="camouflage or a COD set folder")
    p.add_argument("--image-size", type=int, default=32, help="image side (divisible by 8)")
    p.add_argument("--attention", default="invertible:embedded_gaussian", choices=slot_names())
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--out", default="runs/segment", help="folder for segmenter.pt and pictures")
    p.add_argument("--no-progress", action="store_true")
    actions = {"train": (p, "train on a COD set (default: the embedded camouflage set)")}
    p = ArgumentParser(exit_on_error=False, description="Metrics of a saved network.")
    p.add_argument("model", help="segmenter.pt, or the folder holding it")
    p.add_argument("--dataset", help="camouflage or a COD set folder (default: its own)")
    p.add_argument("--split", default="test")
    p.add_argument("--image-size", type=int, help="default: the size it was trained at")
    p.add_argument("--device", default="cpu")
    actions["eval"] = (p, "print a saved network's metrics on a set")
    p = ArgumentParser(exit_on_error=False, description="Predicted maps of image files.")
    p.add_argument("model", help="segmenter.pt, or the folder holding it")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("-o", "--output", default="predictions", help="folder for the PNG maps")
    p.add_argument("--threshold", type=float, help="binary masks at this probability")
    p.add_argument("--device", default="cpu")
    actions["predict"] = (p, "write predicted maps of image files as PNG")
    sub = parser.add_subcommands(dest="action", required=True)
    for name, (p, help_text) in actions.items():
        sub.add_subcommand(name, p, help=help_text)


ACTIONS = {"train": segment_train, "eval": segment_eval, "predict": segment_predict}


def run(args: Namespace) -> int:
    """Runs the action ``args.action`` of a parsed ``flowattn segment`` command line."""
    _check(args[args.action])
    return ACTIONS[args.action](args[args.action])
