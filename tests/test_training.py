import math

import pytest
import torch

from flowattn.data import load_dataset, stack_images
from flowattn.models import build_model
from flowattn.training import EMA, BatchOrder, Every, Hook, Trainer, train


@pytest.mark.parametrize("preset, fall", [("glow", 0.5), ("resflow", 0.3)])
def test_loss_falls_on_digits(preset, fall, device):
    images = stack_images(load_dataset("digits"))
    model = build_model(preset, image_shape=(1, 8, 8), blocks=2, hidden=16).to(device)
    result = train(model, images, batch_size=64, lr=3e-3, warmup=5, max_steps=60, progress=False)
    assert result.steps == 60 and result.images == 60 * 64 and result.skipped == 0
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - fall
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
    with pytest.raises(TypeError, match="uint8"):
        train(model, torch.zeros(4, 1, 8, 8), max_steps=1)
    with pytest.raises(ValueError, match=r"expects images \(B, 1, 8, 8\)"):
        train(model, torch.zeros(4, 1, 4, 4, dtype=torch.uint8), max_steps=1)


def _constant_net(value: float) -> torch.nn.Module:
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(value)
    return net


def test_ema_follows_the_warmed_up_recurrence():
    """average_t = d_t average_{t-1} + (1 - d_t) w_t, d_t = min(decay, (1 + t) / (10 + t)),
    from the initial weights, computed by hand."""
    net = _constant_net(0.0)
    ema = EMA(net, decay=0.6)
    expected, weights = 0.0, [1.0, -2.0, 4.0, 0.5, 3.0]
    for t, w in enumerate(weights, start=1):
        with torch.no_grad():
            net.weight.fill_(w)
        ema.update()
        d = min(0.6, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * w
        assert ema.updates == t
        assert dict(ema.named_parameters())["weight"].item() == pytest.approx(expected)
    with ema.applied():
        assert net.weight.item() == pytest.approx(expected)
    assert net.weight.item() == weights[-1]


def test_ema_state_round_trips_and_reads_the_old_layout():
    net = _constant_net(1.0)
    ema = EMA(net, decay=0.9)
    for w in (2.0, 3.0):
        with torch.no_grad():
            net.weight.fill_(w)
        ema.update()
    state = ema.state_dict()
    fresh = EMA(_constant_net(0.0), decay=0.5)
    fresh.load_state_dict(state)
    assert fresh.decay == 0.9 and fresh.updates == 2
    assert torch.equal(dict(fresh.named_parameters())["weight"], ema.averaged.module.weight)
    assert EMA.parameters_in(state)["weight"].item() == ema.averaged.module.weight.item()


def test_learning_rate_warms_up_linearly_then_holds():
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    model = build_model("glow", image_shape=(1, 8, 8), blocks=1, hidden=4)
    trainer = Trainer(model, images, batch_size=8, lr=0.01, warmup=4)
    rates = []
    for _ in range(6):
        trainer.train_step()
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])


def test_batch_order_covers_each_pass_and_resumes_exactly():
    order = BatchOrder(10, batch_size=3, seed=4)
    first_pass = torch.cat([order.next() for _ in range(3)])
    assert len(set(first_pass.tolist())) == 9  # 3 batches, no repeats; 1 image left over
    saved = order.state_dict()
    ahead = [order.next() for _ in range(5)]
    resumed = BatchOrder(10, batch_size=3, seed=99)
    resumed.load_state_dict(saved)
    again = [resumed.next() for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(ahead, again, strict=True))
    ranks = [BatchOrder(10, batch_size=4, seed=1, rank=r, world_size=2).next() for r in (0, 1)]
    assert set(ranks[0].tolist()).isdisjoint(ranks[1].tolist()) and len(ranks[0]) == 2
    with pytest.raises(ValueError, match="multiple of 2"):
        BatchOrder(10, batch_size=3, world_size=2)


def test_hooks_run_every_period_and_can_stop_the_run():
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    model = build_model("glow", image_shape=(1, 8, 8), blocks=1, hidden=4)
    trainer = Trainer(model, images, batch_size=8)
    seen, ended = [], []

    class StopAtFive(Hook):
        def after_step(self, trainer, loss):
            if trainer.step == 5:
                trainer.stop()

        def after_run(self, trainer):
            ended.append(trainer.step)

    hooks = [Every(lambda t: seen.append(t.step), steps=2), StopAtFive()]
    trainer.run(max_steps=100, progress=False, hooks=hooks)
    assert trainer.step == 5 and seen == [2, 4] and ended == [5]
    timed = Every(lambda t: seen.append(("t", t.step)), seconds=1e-9)
    trainer.run(max_steps=8, progress=False, hooks=[timed])
    assert [s for s in seen if isinstance(s, tuple)] == [("t", 7), ("t", 8)]
