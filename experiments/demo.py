"""Inverting real images through one untrained invertible attention step of each kind.

Images x in [0, 1] are squeezed (C, H, W) -> (4C, H/2, W/2) and sent through one residual
attention step y = s + g(s) of every registered variant (the paper's kinds faithful and
certified, the certified extra kinds), freshly initialised; y is inverted by fixed-point
iteration and the reconstruction compared with the input in 8-bit pixel levels. Each
row prints the step's certified Lipschitz bound (``none`` where it has none), its local
spectral norm at the inputs, the solver's iterations, the largest error and the share
of exact pixels. The figure has the inputs in its first row, then one row of
reconstructions per variant. :mod:`experiments.invertibility` does the same after
training each step (Zha et al. 2021, "Invertible Attention", arXiv 2106.09003, Sec. 5.1).

By default it uses scikit-learn's 8x8 handwritten digits, which ship with scikit-learn
(no download); ``--dataset`` takes any dataset name, ``.npz`` file or image folder.

    python -m experiments.demo
    python -m experiments.demo --dataset ../shared/data/cifar10/cifar10_subset.npz --n 8
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from nflows.transforms import SqueezeTransform

from flowattn.data import load_dataset, stack_images
from flowattn.nn.attention_kinds import VARIANTS, parse_variant
from flowattn.plots import save_grid
from flowattn.transforms import ConvergenceWarning, invertible_attention

from .common import ensure_dir, parse_config, user_errors


@dataclass
class Config:
    """The demo's settings (the flags).

    Attributes:
        dataset: Dataset name, ``.npz`` path or image folder (its test split; the digits'
            training split).
        n: Images inverted.
        max_iter: Fixed-point iteration cap.
        seed: Seed of the steps' weights.
        out: Output folder (``reconstructions.png``).
    """

    dataset: str = "digits"
    n: int = 16
    max_iter: int = 500
    seed: int = 0
    out: str = "outputs/demo"


def _images(config: Config) -> torch.Tensor:
    split = "train" if config.dataset == "digits" else "test"
    return stack_images(load_dataset(config.dataset, split), config.n)


def run(config: Config) -> list[dict]:
    """Inverts the images through each variant; returns one row per variant (its bound,
    local norm, iterations, largest error in levels and share of exact pixels)."""
    if config.n < 1 or config.max_iter < 1:
        raise ValueError(f"n and max_iter must be at least 1, got {config.n}, {config.max_iter}")
    torch.manual_seed(config.seed)
    images = _images(config)
    x = images.double() / 255.0
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"image sides must be even to squeeze, got {tuple(x.shape)}")
    squeeze = SqueezeTransform(2)
    z, _ = squeeze(x)
    print(f"{len(x)} images from {config.dataset}; attention on squeezed {tuple(z.shape[1:])}")
    print(
        f"{'variant':<26} {'Lip bound':>10} {'local |J|_2':>11} {'iters':>6} "
        f"{'max err (levels)':>17} {'exact pixels':>13}"
    )
    grid, rows = [x], []
    for variant in VARIANTS:
        kind, certified = parse_variant(variant)
        step = invertible_attention(
            kind.name,
            z.shape[1],
            certified=certified,
            max_iter=config.max_iter,
            input_shape=tuple(z.shape[1:]),
        ).double()
        with torch.no_grad():
            y, _ = step(z)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            z_back, _ = step.inverse(y)
        levels = (squeeze.inverse(z_back)[0].clamp(0, 1) * 255).round().to(torch.uint8)
        error = (levels.int() - images.int()).abs()
        row = {
            "variant": variant,
            "bound": step.lipschitz_bound(),
            "local": float(step.branch.estimate_lipschitz(z).max()),
            "iterations": step.last_inverse.iterations,
            "max_error": int(error.max()),
            "exact": float((error == 0).double().mean()),
            "converged": not caught,
        }
        bound = "none" if row["bound"] is None else f"{row['bound']:.3f}"
        flag = "" if row["converged"] else "  (did not converge)"
        print(
            f"{variant:<26} {bound:>10} {row['local']:>11.3f} {row['iterations']:>6} "
            f"{row['max_error']:>17} {row['exact']:>12.1%}{flag}"
        )
        rows.append(row)
        grid.append(levels.double() / 255)
    path = ensure_dir(config.out) / "reconstructions.png"
    save_grid(torch.cat(grid).float(), path, nrow=len(x))
    print(f"wrote {path}: first row inputs, then one row of reconstructions per variant")
    return rows


def main(argv: list[str] | None = None) -> None:
    config, _ = parse_config(Config, argv, __doc__.splitlines()[0])
    with user_errors():
        run(config)


if __name__ == "__main__":
    main()
