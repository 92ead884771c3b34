import math

import pytest
import torch

from flowattn.capacity import budget_use
from flowattn.checkpoint import load_checkpoint
from flowattn.errors import ConfigError
from flowattn.runs import RunConfig, load_run_model, run_training
from flowattn.training import EMA, NonFiniteLossError, Trainer

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
    # the EMA weights: what load_run_model gives by default, and not the raw weights
    averaged = EMA.parameters_in(load_checkpoint(run)["trainer"]["ema"])
    model, _ = load_run_model(run)
    raw, _ = load_run_model(run, ema=False)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), averaged[name])
    assert any(
        not torch.equal(a, b) for a, b in zip(model.parameters(), raw.parameters(), strict=True)
    )
    # the attention step's budget share: logged at each evaluation and at the end (the
    # final one is that of the EMA weights at the first 8 test images), with a warning
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    (tag,) = [t for t in events.Tags()["scalars"] if t.startswith("budget_share/")]
    shares = events.Scalars(tag)
    assert [s.step for s in shares] == [2, 4]
    (use,) = budget_use(model, config.images("test")[:8], attention_only=True)
    assert math.isclose(shares[-1].value, use.share, rel_tol=1e-5)
    assert use.low == any(line.startswith(f"warning: {use.name} uses") for line in lines)


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
    assert load_checkpoint(tmp_path / "killed")["trainer"]["step"] == 6
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
    assert load_checkpoint(tmp_path / "run")["trainer"]["step"] == 3
    assert summary.interrupted == "Ctrl-C"
    assert any("Ctrl-C at step 3: checkpoint written" in line for line in lines)


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
    state = load_checkpoint(tmp_path / "run")["trainer"]
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert any("last good checkpoint (step 4)" in line for line in lines)


def test_config_keys_are_checked(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'batch_size'"):
        RunConfig.from_dict({"batch_sise": 3})
    with pytest.raises(ValueError, match="did you mean 'hidden'"):
        RunConfig.from_dict({"model": {"hiden": 3}})
    with pytest.raises(ConfigError, match="'preset': must be one of iresnet"):
        RunConfig.from_dict({"preset": "nope"})
    path = tmp_path / "c.toml"
    path.write_text('steps = 5\n[model]\nattention = "l2"\n')
    config = RunConfig.from_file(path, steps=7)
    assert config.steps == 7 and config.model == {"attention": "l2"}


def _files(run_dir):
    """Every file of a run directory with its bytes (to check that nothing changed)."""
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


def _corrupt_after_each_step(monkeypatch, value: float) -> None:
    """Every training step (whose loss was finite) then sets one weight to ``value``."""
    original = Trainer.train_step

    def corrupted(self):
        loss = original(self)
        with torch.no_grad():
            next(self.model.parameters()).fill_(value)
        return loss

    monkeypatch.setattr(Trainer, "train_step", corrupted)


def test_divergence_never_overwrites_the_good_checkpoint(tmp_path, monkeypatch):
    """A step whose loss was finite but whose weights are not usable (here: one weight
    blown to inf, an ActNorm scale that overflows) is never checkpointed; the good one
    still evaluates to a finite bpd; config.toml records what the resume changed."""
    config = _config(tmp_path, steps=4, checkpoint_every=2, eval_every=0)
    run_training(config, progress=False, log=_quiet)
    run = tmp_path / "run"
    (run / ".checkpoint.pt.dead1234.tmp").write_bytes(b"")  # left by a killed write
    original_toml = (run / "config.toml").read_text()
    before = load_checkpoint(run)["trainer"]["step"]
    assert before == 4

    _corrupt_after_each_step(monkeypatch, float("inf"))
    lines = []
    resumed = RunConfig.from_file(run / "config.toml", steps=8, lr=1000.0, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match=r"last good checkpoint \(step 4\) is kept"):
        run_training(resumed, resume=True, progress=False, log=lines.append)
    monkeypatch.undo()
    assert load_checkpoint(run)["trainer"]["step"] == 4
    assert any("not checkpointed" in x and "last good checkpoint (step 4)" in x for x in lines)
    assert any("removed .checkpoint.pt.dead1234.tmp" in x for x in lines)
    assert not list(run.glob(".checkpoint.pt.*.tmp"))
    model, _ = load_run_model(run)
    x = RunConfig.from_file(run / "config.toml").images("test", 16)
    assert math.isfinite(model.bits_per_dim(x).mean)
    toml = (run / "config.toml").read_text()
    assert toml.startswith(original_toml)  # the run's history is kept...
    assert "[[resumed]]" in toml and "lr = 1000.0" in toml.split("[[resumed]]")[1]
    assert RunConfig.from_file(run / "config.toml").lr == 1000.0  # ...and applied in order


def test_a_run_that_diverges_before_its_first_checkpoint_says_so(tmp_path, monkeypatch):
    _corrupt_after_each_step(monkeypatch, float("nan"))
    lines = []
    config = _config(tmp_path, steps=3, checkpoint_every=1, eval_every=0)
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        run_training(config, progress=False, log=lines.append)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert any("no checkpoint has been written yet" in line for line in lines)
    assert not any("is kept" in line for line in lines)


def test_resume_into_a_run_of_another_model_is_refused_before_anything_changes(tmp_path):
    config = _config(tmp_path, steps=2, eval_every=0)
    run_training(config, progress=False, log=_quiet)
    run = tmp_path / "run"
    before = _files(run)
    other = RunConfig.from_file(run / "config.toml", model={"hidden": 16})
    with pytest.raises(ValueError, match="holds a different model") as error:
        run_training(other, resume=True, progress=False, log=_quiet)
    assert "hidden 8 -> 16" in str(error.value) and "\n" not in str(error.value)
    assert _files(run) == before


@pytest.mark.parametrize("gradient", ["neumann", "backprop"])
def test_a_checkpoint_records_the_log_det_gradient_it_trained_with(tmp_path, gradient):
    """The series' gradient is written into the checkpoint's model config, so a resume
    with the other one is refused."""
    model = {**FAST["model"], "estimator": "series"}
    config = _config(tmp_path, steps=2, eval_every=0,
                     model={**model, "estimator_options": {"gradient": gradient}})  # fmt: skip
    run_training(config, progress=False, log=_quiet)
    state = load_checkpoint(tmp_path / "run")
    assert state["model_config"]["estimator_options"] == {"gradient": gradient}
    other = "backprop" if gradient == "neumann" else "neumann"
    switched = _config(tmp_path, steps=3, model={**model, "estimator_options": {"gradient": other}})
    with pytest.raises(ValueError, match=f"'gradient': '{gradient}'}} -> .*'{other}'"):
        run_training(switched, resume=True, progress=False, log=_quiet)


def test_plain_progress_lines_without_a_terminal(tmp_path):
    lines = []
    run_training(_config(tmp_path, steps=40, eval_every=0), progress=False, log=lines.append)
    steps = [line for line in lines if line.startswith("step ") and "train loss" in line]
    assert len(steps) == 20 and steps[0].startswith("step 2/40")
    assert not any("\r" in line for line in lines)
