r"""Pictures of attention maps of a model's attention steps.

For an image, :func:`attention_figure` runs the model's forward pass, captures the
input of every attention module (invertible attention branches and ordinary SAGAN
attention in coupling networks) and draws, for a few query pixels, where each one
attends. External attention has no queries: its panels show the pixel weights of its
first memory slots instead.
"""

from __future__ import annotations

__all__ = ["attention_figure", "attention_modules", "save_grid"]

from pathlib import Path

import torch
from torch import Tensor, nn

from .models import DensityModel
from .nn.baselines import SelfAttention2d
from .nn.lipschitz_attention import AttentionBranch, ExternalAttention


def save_grid(images: Tensor, path: str | Path, nrow: int = 8, min_side: int = 32) -> Path:
    """Writes images (N, C, H, W) in [0, 1] as a PNG grid, enlarging small images
    (nearest neighbour, integer factor) to at least ``min_side`` pixels."""
    from torchvision.utils import save_image

    factor = max(1, -(-min_side // images.shape[-1]))
    if factor > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=factor)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.float(), path, nrow=nrow, padding=2, pad_value=0.5)
    return path


def attention_modules(model: DensityModel) -> list[tuple[str, nn.Module]]:
    """The attention modules of a model, with short names."""
    found = [
        (name.split(" ")[0], step.branch)
        for name, step in model.residual_steps()
        if isinstance(step.branch, AttentionBranch)
    ]
    sagan = [m for m in model.modules() if isinstance(m, SelfAttention2d)]
    return found + [(f"coupling attention {i}", m) for i, m in enumerate(sagan)]


def _maps(module: nn.Module, x: Tensor, queries: list[int]) -> tuple[list[Tensor], list[str]]:
    """Per-query (or per-slot) weight maps (H, W) for the first image of x."""
    h, w = x.shape[-2:]
    with torch.no_grad():
        a = module.attention_map(x[:1])[0]
    if isinstance(module, ExternalAttention):  # (N, S): pixel weights of each slot
        return [a[:, s].reshape(h, w) for s in range(len(queries))], [
            f"slot {s}" for s in range(len(queries))
        ]
    maps = [a[q].reshape(h, w) for q in queries]  # (N_query, N_key)
    return maps, [f"query ({q // w}, {q % w})" for q in queries]


def attention_figure(
    model: DensityModel, image: Tensor, path: str | Path, *, n_queries: int = 4
) -> Path:
    """Draws the attention maps of ``model`` for one uint8 image (C, H, W) to ``path``.

    Raises a ValueError when the model has no attention modules.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"the model ({model.config.preset}) has no attention steps")
    inputs: dict[str, Tensor] = {}
    handles = []
    for name, module in modules:

        def hook(mod, args, name=name):
            inputs.setdefault(name, args[0].detach())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        model.encode(image[None])
    finally:
        for h in handles:
            h.remove()

    rows = []
    for name, module in modules:
        x = inputs[name]
        n = x.shape[-2] * x.shape[-1]
        queries = torch.linspace(0, n - 1, n_queries + 2).round().long()[1:-1].tolist()
        maps, titles = _maps(module, x, queries)
        rows.append((name, type(module).__name__, maps, titles, queries, x.shape[-1]))

    cols = n_queries + 1
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.3 * len(rows)), squeeze=False)
    picture = image.permute(1, 2, 0).cpu().numpy()
    for r, (name, kind, maps, titles, queries, width) in enumerate(rows):
        ax = axes[r][0]
        ax.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray")
        ax.set_title(f"{kind}\n{name}", fontsize=7)
        for c, (m, title) in enumerate(zip(maps, titles, strict=True), start=1):
            ax = axes[r][c]
            ax.imshow(m.cpu().numpy(), cmap="viridis")
            if title.startswith("query"):
                q = queries[c - 1]
                ax.plot(q % width, q // width, "r+", markersize=8)
            ax.set_title(title, fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
