import pytest
import torch

from flowattn.runs import RunConfig, load_run_model, run_training
from flowattn.training import NonFiniteLossError, Trainer

FAST = {
    "preset": "iresnet-attn",
    "model": {"blocks": 1, "hidden": 8, "attention": "l2"},
    "batch_size": 16,
    "warmup": 2,
    "samples": 4,
    "log_every": 2,
}


def _config(tmp_path, name="run", **values):
    return RunConfig.from_dict({**FAST, "run_dir": str(tmp_path / name), **values})


def _quiet(*args):
    pass


def _params(run_dir):
    model, _ = load_run_model(run_dir, ema=False)
    return [p.detach().clone() for p in model.parameters()]


def test_run_writes_everything_and_reports(tmp_path):
    config = _config(tmp_path, steps=4, eval_every=2, checkpoint_every=2)
    lines = []
    summary = run_training(config, progress=False, log=lines.append)
    run = tmp_path / "run"
    for name in ("checkpoint.pt", "config.toml", "samples.png", "reconstructions.png"):
        assert (run / name).is_file()
    assert list(run.glob("events.out.tfevents.*"))
    assert summary.steps == 4 and summary.test_bpd.images == 297
    assert any("test bits/dim" in line for line in lines)
    saved = RunConfig.from_file(run / "config.toml")
    assert saved == config
    with pytest.raises(ValueError, match="--resume"):
        run_training(config, progress=False, log=_quiet)


class _Killed(Exception):
    pass


def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path, monkeypatch):
    settings = {"steps": 8, "eval_every": 3, "checkpoint_every": 3}
    run_training(_config(tmp_path, "straight", **settings), progress=False, log=_quiet)

    original = Trainer.train_step

    def dies_at_step_7(self):
        if self.step == 7:
            raise _Killed  # the process dies: nothing is saved after step 6
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_7)
    killed = _config(tmp_path, "killed", **settings)
    with pytest.raises(_Killed):
        run_training(killed, progress=False, log=_quiet)
    monkeypatch.undo()
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)["step"] == 6
    run_training(killed, resume=True, progress=False, log=_quiet)
    for a, b in zip(_params(tmp_path / "straight"), _params(tmp_path / "killed"), strict=True):
        assert torch.equal(a, b)


def test_ctrl_c_writes_a_final_checkpoint(tmp_path, monkeypatch):
    original = Trainer.train_step

    def interrupted_at_step_3(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_step_3)
    lines = []
    summary = run_training(_config(tmp_path, steps=10), progress=False, log=lines.append)
    assert summary.interrupted and summary.steps == 3
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 3
    assert any("interrupted at step 3" in line for line in lines)


def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = _config(tmp_path, steps=20, checkpoint_every=2, max_bad_steps=3)
    original = Trainer.train_step

    def broken_after_step_4(self):
        if self.step < 4:
            return original(self)
        log_prob = self.model.log_prob
        self.model.log_prob = lambda y: log_prob(y) * float("nan")  # every loss is NaN
        try:
            return original(self)
        finally:
            del self.model.log_prob

    monkeypatch.setattr(Trainer, "train_step", broken_after_step_4)
    lines = []
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        run_training(config, progress=False, log=lines.append)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert any("last good checkpoint" in line for line in lines)


def test_config_keys_are_checked(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'batch_size'"):
        RunConfig.from_dict({"batch_sise": 3})
    with pytest.raises(ValueError, match="did you mean 'hidden'"):
        RunConfig.from_dict({"model": {"hiden": 3}})
    with pytest.raises(ValueError, match="unknown preset"):
        RunConfig.from_dict({"preset": "nope"})
    path = tmp_path / "c.toml"
    path.write_text('steps = 5\n[model]\nattention = "l2"\n')
    config = RunConfig.from_file(path, steps=7)
    assert config.steps == 7 and config.model == {"attention": "l2"}
