import math

import pytest
import torch

from flowattn.data import load_dataset, stack_images
from flowattn.models import build_model
from flowattn.training import train


def test_loss_falls_on_digits():
    images = stack_images(load_dataset("digits"))
    model = build_model("glow", image_shape=(1, 8, 8), blocks=2, hidden=16)
    result = train(model, images, batch_size=64, lr=3e-3, warmup=5, max_steps=60, progress=False)
    assert result.steps == 60 and result.images == 60 * 64 and result.skipped == 0
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5
    assert result.images_per_second > 0


def test_time_budget_and_callback():
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    model = build_model("glow", image_shape=(1, 8, 8), blocks=1, hidden=4)
    seen = []
    result = train(
        model, images, batch_size=8, time_budget=0.0, progress=False, callback=seen.append
    )
    assert result.steps == 0 and seen == []
    result = train(
        model,
        images,
        batch_size=8,
        max_steps=3,
        progress=False,
        callback=lambda step, loss: seen.append((step, loss)),
    )
    assert [s for s, _ in seen] == [1, 2, 3] and all(math.isfinite(v) for _, v in seen)


def test_non_finite_steps_are_skipped_and_counted(monkeypatch):
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    model = build_model("glow", image_shape=(1, 8, 8), blocks=1, hidden=4)
    original = model.log_prob
    calls = {"n": 0}

    def sometimes_nan(y):
        calls["n"] += 1
        out = original(y)
        return out * math.nan if calls["n"] % 2 else out

    monkeypatch.setattr(model, "log_prob", sometimes_nan)
    before = [p.detach().clone() for p in model.parameters()]
    result = train(model, images, batch_size=8, max_steps=2, progress=False)
    assert result.steps == 2 and result.skipped == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_bad_arguments():
    model = build_model("glow", image_shape=(1, 8, 8), blocks=1, hidden=4)
    with pytest.raises(ValueError, match="max_steps or time_budget"):
        train(model, torch.zeros(4, 1, 8, 8, dtype=torch.uint8), batch_size=2)
    with pytest.raises(ValueError, match="uint8"):
        train(model, torch.zeros(4, 1, 8, 8), max_steps=1)
