"""Validating invertibility: one attention block, trained, then inverted by fixed point.

The first experiment of Zha et al. (2021), "Invertible Attention", arXiv 2106.09003,
Sec. 5.1. Images x in [0, 1] are squeezed (C, H, W) -> (4C, H/2, W/2) and sent through
one residual attention step y = s + g(s), trained with Adam so that y matches a fixed
Gaussian target z_i ~ N(0, I) drawn once per training image (mean squared error). The
trained step is then inverted on held-out images by fixed-point iteration (Anderson,
tolerance of a few float32 epsilons) and the reconstruction is compared with the input:
the largest absolute error in pixel levels, the PSNR, the shares of pixels and of
whole images exact after rounding to 8 bits, and how the solver ended.

Variants (``--kinds``):

- the paper's four kinds (spectrally normalised, coefficient c, not certified):
  ``gaussian``, ``embedded_gaussian``, ``dot``, ``concat``;
- the certified kinds: ``external``, ``l2`` (Lip_inf(g) <= c by construction);
- the ordinary attention baselines of :mod:`flowattn.nn.baselines` made residual,
  x + g(x), with no constraint at all: ``sagan``, ``nonlocal:<kind>``, ``external2d``,
  ``external2d:heads``, ``mhsa``, ``cbam``, ``dnl``, ``criss-cross``.

Outputs in ``--out``: ``results.md`` and ``results.csv`` (one row per variant),
``reconstructions.png`` (a figure: the held-out inputs, then one row of
reconstructions per variant, titled with its error) and ``grid_<variant>.png`` (input
row over reconstruction row, full resolution).

    python -m experiments.invertibility --config experiments/configs/invertibility/cifar10.toml
    python -m experiments.invertibility --config ... --kinds '[external, sagan]' --steps 50
"""

from __future__ import annotations

import csv
import math
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from nflows.transforms import SqueezeTransform
from torch import Tensor, nn

from flowattn.lipschitz import jacobian_spectral_norm
from flowattn.metrics import reconstruction_error
from flowattn.nn import attention_kinds
from flowattn.nn import baselines as ordinary
from flowattn.nn.lipschitz_attention import SIMILARITIES
from flowattn.plots import save_grid
from flowattn.transforms import ResidualTransform, invertible_attention

from .common import (
    DataConfig,
    describe_size,
    ensure_dir,
    parse_config,
    set_threads,
    user_errors,
)

ORDINARY = {
    "sagan": ordinary.SelfAttention2d,
    **{f"nonlocal:{kind}": partial(ordinary.NonLocal2d, kind=kind) for kind in SIMILARITIES},
    "external2d": ordinary.ExternalAttention2d,
    "external2d:heads": partial(ordinary.ExternalAttention2d, heads=4),
    "mhsa": partial(ordinary.MultiHeadSelfAttention2d, heads=4),
    "cbam": ordinary.CBAM,  # no skip connection of its own (see build_step)
    "dnl": ordinary.DisentangledNonLocal2d,
    "criss-cross": ordinary.CrissCrossAttention2d,
}
# The paper's kinds twice (the faithful reproduction and the certified version), the
# other certified kinds, and the ordinary modules.
PREFIX = attention_kinds.FAITHFUL_PREFIX
FAITHFUL = tuple(v for v in attention_kinds.VARIANTS if v.startswith(PREFIX))
INVERTIBLE = (*FAITHFUL, *(v for v in attention_kinds.VARIANTS if v not in FAITHFUL))
VARIANTS = (*INVERTIBLE, *ORDINARY)


class AttentionTerm(nn.Module):
    """The attention term g(x) = block(x) - x of a block whose output already adds its
    input (SAGAN, non-local, external, DNL, criss-cross and multi-head blocks)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x) - x


def group_of(variant: str) -> str:
    """``paper (faithful)``, ``paper (certified)``, ``certified`` or ``ordinary``."""
    if variant in FAITHFUL:
        return "paper (faithful)"
    if variant in attention_kinds.PAPER_KINDS:
        return "paper (certified)"
    return "ordinary" if variant in ORDINARY else "certified"


def build_step(variant: str, channels: int, coeff: float) -> ResidualTransform:
    """The residual step x + g(x) of a variant on ``channels`` channels."""
    if variant == "cbam":  # CBAM rescales its input; as a branch: y = x + CBAM(x)
        return ResidualTransform(ordinary.CBAM(channels))
    if variant in ORDINARY:
        return ResidualTransform(AttentionTerm(ORDINARY[variant](channels)))
    if variant in INVERTIBLE:
        kind, certified = attention_kinds.parse_variant(variant)
        return invertible_attention(kind.name, channels, certified=certified, coeff=coeff)
    raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")


@dataclass
class Config(DataConfig):
    """One dataset's settings (the keys of a config file, and the flags).

    Attributes:
        dataset: Dataset name, ``.npz`` path or image folder.
        root: Where torchvision-layout datasets are ("": $FLOWATTN_DATA or ./data).
        image_size: Resize to this side (celeba, folder); 0: the dataset's own size.
        train_images: Training images used (0: all).
        test_images: Held-out images inverted.
        steps: Adam steps of the fit.
        batch_size: Images per step.
        lr: Learning rate.
        coeff: Lipschitz coefficient c of the invertible kinds.
        seed: Seed of weights, batches and targets.
        threads: CPU threads.
        kinds: The variants to train and invert.
        show: Images per row in the figures.
        out: Output folder.
    """

    test_images: int = 64
    steps: int = 500
    batch_size: int = 32
    lr: float = 1e-3
    coeff: float = 0.9
    seed: int = 0
    threads: int = 2
    kinds: list[str] = field(default_factory=lambda: list(VARIANTS))
    show: int = 8
    out: str = "outputs/invertibility/cifar10"


def fit(step: ResidualTransform, s: Tensor, target: Tensor, config: Config) -> float:
    """Fits y = s + g(s) to the targets by Adam on the MSE; returns the mean MSE of the
    last tenth of the steps."""
    params = list(step.parameters())
    if not params:
        return math.nan
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    for _ in range(config.steps):
        index = torch.randint(len(s), (config.batch_size,), generator=generator)
        y = s[index] + step.branch(s[index])
        loss = (y - target[index]).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tail = losses[-max(1, config.steps // 10) :]
    return sum(tail) / len(tail)


def evaluate(
    step: ResidualTransform, squeeze: SqueezeTransform, x_test: Tensor
) -> tuple[dict, Tensor]:
    """Inverts the trained step on held-out images; returns the row and reconstructions."""
    x = x_test.double().div(255).float()
    with torch.no_grad():
        s, _ = squeeze(x)
        y = s + step.branch(s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-convergence is recorded, not warned
            start = time.perf_counter()
            s_hat, _ = step.inverse(y)
            seconds = time.perf_counter() - start
        x_hat, _ = squeeze.inverse(s_hat)
    solve = step.last_inverse
    finite = bool(torch.isfinite(x_hat).all())
    row: dict = {
        "iterations": solve.iterations,
        "residual": solve.residual,
        "converged": solve.converged,
        "inverse_s": seconds,
    }
    bound = step.lipschitz_bound(tuple(s.shape[1:]))  # None: uncertified
    norm = getattr(step.branch, "certified_norm", None)
    row["certified_bound"] = "none" if bound is None else f"{bound:.3f} (l-{norm})"
    local = jacobian_spectral_norm(step.branch, s[:16].detach(), n_iter=30)
    row["local_lip2"] = float(local.max())
    if finite:
        err = reconstruction_error(x, x_hat, peak=1.0)
        same = x_hat.clamp(0, 1).mul(255).round().to(torch.uint8) == x_test
        row.update(
            max_abs_levels=err.max_abs,
            psnr_db=err.psnr,
            exact_uint8=float(same.double().mean()),
            exact_images=f"{int(same.flatten(1).all(dim=1).sum())}/{len(x_test)}",
        )
    else:
        row.update(
            max_abs_levels=math.inf,
            psnr_db=-math.inf,
            exact_uint8=0.0,
            exact_images=f"0/{len(x_test)}",
        )
    return row, torch.nan_to_num(x_hat, nan=0.5).clamp(0, 1)


def run(config: Config, progress: bool = True) -> list[dict]:
    """Trains and inverts every variant; writes the table and figures; returns the rows."""
    unknown = [k for k in config.kinds if k not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown kind(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    set_threads(config.threads)
    out = ensure_dir(config.out)
    x_train, x_test = config.images("train"), config.images("test")
    squeeze = SqueezeTransform(2)
    with torch.no_grad():
        s_train, _ = squeeze(x_train.float() / 255)
    target = torch.randn(s_train.shape, generator=torch.Generator().manual_seed(config.seed + 1))
    print(
        f"data {config.dataset}: {len(x_train)} train / {len(x_test)} held-out images "
        f"{tuple(x_train.shape[1:])} -> squeezed {tuple(s_train.shape[1:])}; "
        f"{config.steps} Adam steps of batch {config.batch_size}, lr {config.lr:g}, "
        f"c = {config.coeff:g}, {config.threads} threads",
        flush=True,
    )
    rows, reconstructions = [], {}
    kinds = config.kinds
    if progress:
        from tqdm.auto import tqdm

        kinds = tqdm(kinds, desc="variants", unit="variant")
    for variant in kinds:
        torch.manual_seed(config.seed)
        step = build_step(variant, s_train.shape[1], config.coeff)
        start = time.perf_counter()
        mse = fit(step, s_train, target, config)
        train_s = time.perf_counter() - start
        step.eval()
        row, x_hat = evaluate(step, squeeze, x_test)
        row = {
            "variant": variant,
            "group": group_of(variant),
            "train_mse": mse,
            "train_s": train_s,
            **row,
        }
        rows.append(row)
        reconstructions[variant] = x_hat[: config.show]
        both = torch.cat([x_test[: config.show].float() / 255, x_hat[: config.show]])
        save_grid(both, out / f"grid_{variant.replace(':', '_')}.png", nrow=config.show)
        print(f"{variant}: {_summary(row)}", flush=True)
    write_table(rows, config, out, len(x_train), len(x_test))
    figure(x_test[: config.show].float() / 255, reconstructions, rows, out / "reconstructions.png")
    print(f"wrote {out}/results.md, results.csv, reconstructions.png and grid_*.png")
    return rows


def _summary(row: dict) -> str:
    status = "converged" if row["converged"] else "NOT converged"
    return (
        f"max |err| {row['max_abs_levels']:.3g} levels, PSNR {row['psnr_db']:.1f} dB, "
        f"{100 * row['exact_uint8']:.1f}% exact; {status} in {row['iterations']} iterations "
        f"(residual {row['residual']:.2g}); local ||J_g||_2 {row['local_lip2']:.3f}"
    )


COLUMNS = (
    ("variant", "variant"),
    ("group", "group"),
    ("certified_bound", "certified Lip(g)"),
    ("local_lip2", "local ‖J_g‖₂ (est.)"),
    ("train_mse", "train MSE"),
    ("iterations", "inverse iterations"),
    ("residual", "final residual"),
    ("converged", "converged"),
    ("max_abs_levels", "max abs error (levels)"),
    ("psnr_db", "PSNR (dB)"),
    ("exact_uint8", "pixels exact after rounding"),
    ("exact_images", "images exact after rounding"),
)


def _cell(key: str, value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if key == "exact_uint8":
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return "diverged" if key in ("max_abs_levels", "psnr_db") else str(value)
        if key in ("residual",):
            return f"{value:.1e}"
        if key == "max_abs_levels":
            return f"{value:.3g}"
        if key == "local_lip2":
            return f"{value:.3g}"
        return f"{value:.3f}" if key != "psnr_db" else f"{value:.1f}"
    return str(value)


def write_table(rows: list[dict], config: Config, out: Path, n_train: int, n_test: int) -> None:
    """Writes ``results.csv`` (every field) and ``results.md`` (the table, with its setting)."""
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"Dataset `{config.dataset}`: {n_train} training images, {n_test} held-out images, "
        f"{describe_size(config.image_size)}; squeeze + one residual attention step; "
        f"{config.steps} Adam steps (batch {config.batch_size}, lr {config.lr:g}) on the MSE "
        f"to a fixed N(0, I) target; c = {config.coeff:g}; inverse: Anderson, float32; "
        f"{config.threads} CPU threads.",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(k, r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines[2:]))


def figure(x: Tensor, reconstructions: dict[str, Tensor], rows: list[dict], path: Path) -> None:
    """Inputs on top, then one row of reconstructions per variant, titled with its error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = x.shape[0]
    fig, axes = plt.subplots(
        len(rows) + 1, n, figsize=(1.1 * n, 1.25 * (len(rows) + 1)), squeeze=False
    )
    panels = [("held-out inputs", x)] + [
        (
            f"{r['variant']} ({r['group']}): max |err| "
            f"{_cell('max_abs_levels', r['max_abs_levels'])} levels, "
            f"PSNR {_cell('psnr_db', r['psnr_db'])} dB",
            reconstructions[r["variant"]],
        )
        for r in rows
    ]
    for i, (title, images) in enumerate(panels):
        for j in range(n):
            ax = axes[i, j]
            image = images[j].permute(1, 2, 0).numpy()
            ax.imshow(
                image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1
            )
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_title(title, fontsize=8, loc="left")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.97, wspace=0.05, hspace=0.45)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    config, args = parse_config(
        Config, argv, __doc__.splitlines()[0], **{"no-progress": "no progress bar"}
    )
    with user_errors():
        run(config, progress=not args.no_progress)


if __name__ == "__main__":
    main()
