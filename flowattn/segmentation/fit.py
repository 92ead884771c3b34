"""Training a :class:`~flowattn.segmentation.SegmentationNet`, predicting with it, and
saving it.

Training is Adam on :func:`~flowattn.segmentation.structure_loss` over random batches
(drawn from a seeded generator, so a seed fixes the data order) with random horizontal
flips of image and mask together. Prediction maps uint8 images to object probabilities.
A trained network is saved as a flowattn checkpoint (data only, read back with
``torch.load(weights_only=True)``) that names its attention slot and width.

References:
    | Invertible Attention (Zha et al., 2021), section 5.3
    | https://arxiv.org/abs/2106.09003
"""

from __future__ import annotations

__all__ = ["as_input", "evaluate", "load_segmenter", "predict", "save_segmenter", "train"]

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .loss import structure_loss
from .network import SegmentationNet
from .scores import CODScores, cod_scores

KIND = "segmenter"  # the checkpoint's "kind", which density-model checkpoints do not have


def as_input(images: Tensor) -> Tensor:
    """uint8 images (N, C, H, W) as floats in [0, 1] (floats are checked, not scaled)."""
    if images.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255
    if not images.is_floating_point() or images.min() < 0 or images.max() > 1:
        raise ValueError("expected uint8 images, or floating-point images in [0, 1]")
    return images


def train(
    net: SegmentationNet,
    images: Tensor,
    masks: Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
    after_step: Callable[[int, float], bool] | None = None,
) -> list[float]:
    """Trains ``net`` in place for ``steps`` steps (fewer if ``after_step`` returns True).

    Arguments:
        net: The network, on the device training runs on.
        images: uint8 images (N, 3, S, S); masks: bool (N, 1, S, S).
        steps: Training steps.
        batch_size: Images per step.
        lr: Adam's learning rate.
        seed: Seed of the batches and flips.
        progress: Show a progress bar.
        after_step: Called with (step, loss) after each step; True stops training.

    Returns:
        The loss of each step.

    Examples:
        >>> from flowattn.segmentation import camouflage
        >>> images, masks = camouflage(8, 32)
        >>> losses = train(SegmentationNet("invertible:dot", width=4), images, masks, steps=2)
        >>> len(losses)
        2
    """
    if len(images) != len(masks) or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"images {tuple(images.shape)} and masks {tuple(masks.shape)} do not match"
        )
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    device = next(net.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    losses: list[float] = []
    for step in tqdm(range(1, steps + 1), desc="training", disable=not progress, leave=False):
        index = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
        x, m = as_input(images[index]), masks[index]
        flip = (torch.rand(len(index), generator=generator) < 0.5)[:, None, None, None]
        x, m = torch.where(flip, x.flip(-1), x), torch.where(flip, m.flip(-1), m)
        loss = structure_loss(net(x.to(device)), m.to(device))
        losses.append(loss.item())
        if not torch.isfinite(loss):  # before the update, so the weights stay finite
            raise FloatingPointError(f"the loss is {losses[-1]} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None and after_step(step, losses[-1]):
            break
    net.eval()
    return losses


@torch.no_grad()
def predict(net: SegmentationNet, images: Tensor, batch_size: int = 100) -> Tensor:
    """Object probabilities (N, 1, S, S) of images (N, 3, S, S), in evaluation mode."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    x = as_input(images)
    out = torch.cat([net(x[i : i + batch_size].to(device)).sigmoid().cpu()
                     for i in range(0, len(x), batch_size)])  # fmt: skip
    net.train(was_training)
    return out


def evaluate(net: SegmentationNet, images: Tensor, masks: Tensor) -> CODScores:
    """The COD metrics of ``net``'s predictions against ``masks``."""
    return cod_scores(predict(net, images), masks)


def save_segmenter(net: SegmentationNet, path: str | Path, **meta: Any) -> Path:
    """Writes ``net`` (its slot, width and weights) and ``meta`` (numbers, strings)."""
    state = {"kind": KIND, "settings": net.settings(), "meta": meta,
             "state_dict": net.state_dict()}  # fmt: skip
    return save_checkpoint(state, path, keep_previous=False)


def load_segmenter(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[SegmentationNet, dict]:
    """The network saved by :func:`save_segmenter`, in evaluation mode, and its ``meta``.

    Raises:
        CheckpointError: Not a segmenter checkpoint (or not a readable checkpoint).
    """
    state = load_checkpoint(path, map_location=device)
    if state.get("kind") != KIND:
        raise CheckpointError(f"{path} is not a segmenter checkpoint (a density model's?)")
    net = SegmentationNet(**state["settings"])
    net.load_state_dict(state["state_dict"])
    return net.to(device).eval(), state["meta"]
