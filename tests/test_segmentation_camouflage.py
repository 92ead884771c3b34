import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowattn.segmentation import camouflage, camouflage_split
from flowattn.segmentation.camouflage import SPLITS

CIFAR = "../shared/data/cifar10/cifar10_subset.npz"


def _best_threshold_iou(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image, the best IoU of a grey-level threshold (32 quantiles, both polarities),
    chosen with the ground truth: an oracle brightness baseline."""
    grey = images.double().mean(1, keepdim=True)
    ious = []
    for g, m in zip(grey, masks, strict=True):
        best = 0.0
        for t in torch.quantile(g.flatten(), torch.linspace(0.02, 0.98, 32, dtype=torch.float64)):
            for pred in (g > t, g <= t):
                best = max(best, ((pred & m).sum() / (pred | m).sum()).item())
        ious.append(best)
    return torch.tensor(ious)


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_dtypes_and_determinism(size):
    images, masks = camouflage(6, size, seed=3)
    assert images.shape == (6, 3, size, size) and images.dtype == torch.uint8
    assert masks.shape == (6, 1, size, size) and masks.dtype == torch.bool
    frac = masks.double().mean(dim=(1, 2, 3))
    assert (frac > 0.01).all() and (frac < 0.5).all()  # one object, not the whole image
    again, masks_again = camouflage(6, size, seed=3)
    assert torch.equal(images, again) and torch.equal(masks, masks_again)
    assert not torch.equal(images, camouflage(6, size, seed=4)[0])


def test_a_brightness_threshold_does_not_find_the_object():
    """An oracle grey-level threshold (best of 64 per image, chosen with the mask) finds
    the camouflaged object much worse than the same object filled with another image."""
    images, masks = camouflage(200, 32, seed=0)
    others, _ = camouflage(200, 32, seed=5)
    control = torch.where(masks, others, images)  # same shapes, another image's texture
    camo, easy = _best_threshold_iou(images, masks), _best_threshold_iou(control, masks)
    # measured: 0.22 camouflaged, 0.37 control; predicting every pixel: the mask fraction
    assert camo.mean() < 0.3 and easy.mean() > camo.mean() + 0.1


def test_splits_are_fixed_and_disjoint():
    train, _ = camouflage_split("train", 32)
    test, test_masks = camouflage_split("test", 32)
    assert len(train) == SPLITS["train"][1] and len(test) == SPLITS["test"][1]
    assert torch.equal(test, camouflage_split("test", 32)[0])
    assert not torch.equal(train[: len(test)], test)
    with pytest.raises(ValueError, match="split must be one of train, test"):
        camouflage_split("valid")


def test_object_is_the_background_transformed():
    """Away from the soft boundary, outside the object the image is the background and
    inside it is the same background flipped, rotated by 180 degrees or shifted by half."""
    x = torch.from_numpy(np.load(CIFAR)["x_test"][:16]).permute(0, 3, 1, 2).contiguous()
    images, masks = camouflage(16, 32, seed=0, backgrounds=x)
    m = masks.double()
    near = F.max_pool2d(m, 9, stride=1, padding=4).bool()  # the object and 4 pixels around
    core = ~F.max_pool2d(1 - m, 9, stride=1, padding=4).bool()  # 4 pixels inside it
    checked = 0
    for i in range(len(x)):
        far = ~near[i].expand_as(x[i])
        diff = (images[i].int() - x[i].int()).abs()
        assert diff[far].max() <= 1
        b = x[i]
        fills = [b.flip(-1), b.flip(-2), b.flip(-1, -2), b.roll((16, 16), dims=(-2, -1))]
        inside = core[i].expand_as(b)
        if not inside.any():  # a small object: nothing 4 pixels inside it
            continue
        checked += 1
        errors = [(images[i].int() - f.int()).abs()[inside].max() for f in fills]
        assert min(errors) <= 1
    assert checked >= len(x) // 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be a positive integer"),
        ({"size": 8}, "size must be an integer of at least 16"),
        ({"backgrounds": torch.zeros(2, 1, 8, 8, dtype=torch.uint8)}, "backgrounds must be"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        camouflage(**{"n": 2, **kwargs})
