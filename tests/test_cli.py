import subprocess
import sys
from pathlib import Path

import pytest

from flowattn.cli import main

SMALL = ["--steps", "6", "--batch-size", "16", "--samples", "4", "--no-progress"]
SMALL += ["--model.blocks", "1", "--model.hidden", "8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run shared by the tests of the other subcommands."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *SMALL, "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_train_prints_bpd_and_grid_paths(run, capsys):
    assert (run / "samples.png").is_file() and (run / "reconstructions.png").is_file()
    assert main(["train", *SMALL, "--run-dir", str(run), "--resume", "--steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "test bits/dim after 8 steps" in out
    assert "samples: " in out and "reconstructions: " in out


def _figure(out: str, after: str) -> str:
    """The 'mean ± se' printed after the text ``after``."""
    line = next(line for line in out.splitlines() if after in line)
    return line.split(": ", 1)[1].split(" bits/dim")[0]


def test_main_job_figure_is_the_exact_one_eval_prints(tmp_path, capsys):
    """The figure `train` prints at the end is exact (digits: 64 values per image) and
    equals `flowattn eval RUN --estimator exact` on the same run."""
    run_dir = tmp_path / "run"
    assert main(["train", *SMALL, "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "exact (dense Jacobian)" in out and "BIASED" not in out
    trained = _figure(out, "test bits/dim after 6 steps")
    assert main(["eval", str(run_dir), "--no-progress", "--estimator", "exact"]) == 0
    evaluated = _figure(capsys.readouterr().out, "test (EMA weights")
    assert trained == evaluated and "±" in trained
    assert main(["eval", str(run_dir), "--no-progress"]) == 0  # auto: exact here too
    assert _figure(capsys.readouterr().out, "test (EMA weights") == trained


def test_eval_names_the_estimator_and_the_series_bias(run, capsys):
    assert main(["eval", str(run), "--no-progress", "--limit", "8", "--estimator", "exact"]) == 0
    out = capsys.readouterr().out
    assert "exact (dense Jacobian)" in out and "±" in out
    assert main(["eval", str(run), "--no-progress", "--limit", "8", "--estimator", "series"]) == 0
    out = capsys.readouterr().out
    assert "power series, 5 terms" in out and "BIASED" in out and "certified bound" in out
    args = ["eval", str(run), "--no-progress", "--limit", "8", "--estimator", "roulette"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "per-sample draws" in out and "variance finite" in out and "BIASED" not in out


def test_sample_reconstruct_certify_attention(run, tmp_path, capsys):
    assert (
        main(["sample", str(run), "-n", "9", "--temperature", "0.5", "-o", str(tmp_path / "s.png")])
        == 0
    )
    assert (tmp_path / "s.png").is_file()
    out_png = tmp_path / "r.png"
    assert (
        main(["reconstruct", str(run), "--images", "digits", "--limit", "5", "-o", str(out_png)])
        == 0
    )
    assert "5 images: max |error| 0 levels" in capsys.readouterr().out
    assert main(["certify", str(run), "-n", "4"]) == 0
    out = capsys.readouterr().out
    assert "ExternalAttention" in out and "ConvResidualBranch" in out and "True" in out
    assert "share" in out and "%" in out
    # the warning appears exactly when the attention step's share is below LOW_SHARE
    from flowattn.capacity import LOW_SHARE, budget_use
    from flowattn.runs import RunConfig, load_run_model

    model, state = load_run_model(run)
    images = RunConfig(**state["run_config"]).images("test", 4)
    (use,) = budget_use(model, images, attention_only=True)
    assert ("warning:" in out) == (use.share < LOW_SHARE)
    assert f"{use.share:.1%}" in out
    att = tmp_path / "a.png"
    assert main(["attention", str(run), "--image", "digits", "-o", str(att)]) == 0
    assert att.is_file() and att.stat().st_size > 1000


def test_a_run_trained_on_a_device_resumes_samples_and_reconstructs_on_the_cpu(
    device, tmp_path, capsys
):
    run_dir = str(tmp_path / "run")
    assert main(["train", *SMALL, "--device", str(device), "--run-dir", run_dir]) == 0
    assert "test bits/dim after 6 steps" in capsys.readouterr().out
    resume = ["--resume", "--steps", "8", "--device", "cpu"]
    assert main(["train", *SMALL, *resume, "--run-dir", run_dir]) == 0
    assert "test bits/dim after 8 steps" in capsys.readouterr().out
    sample = ["sample", run_dir, "-n", "4", "--device", "cpu", "-o", str(tmp_path / "s.png")]
    assert main(sample) == 0 and (tmp_path / "s.png").is_file()
    images = ["--images", "digits", "--limit", "5", "-o", str(tmp_path / "r.png")]
    assert main(["reconstruct", run_dir, "--device", "cpu", *images]) == 0
    assert "5 images: max |error| 0 levels" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "nope"], "'preset': must be one of iresnet, iresnet-attn"),
        (["train", "--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["train", "--batch-sise", "3"], "did you mean --batch-size?"),
        (["train", "--model.hiden", "3"], "did you mean 'hidden'?"),
        (["eval", "/nonexistent/run"], "no checkpoint at /nonexistent/run"),
    ],
)
def test_user_errors_are_one_line_with_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unreadable_checkpoint_and_wrong_image_size(run, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main(["sample", str(bad)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    import numpy as np

    np.savez(tmp_path / "big.npz", x_test=np.zeros((2, 16, 16, 1), dtype=np.uint8))
    assert main(["reconstruct", str(run), "--images", str(tmp_path / "big.npz")]) == 2
    assert "do not fit the model's (1, 8, 8)" in capsys.readouterr().err


def test_help_lists_every_subcommand_and_flag():
    out = subprocess.run(
        [sys.executable, "-m", "flowattn", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("train", "eval", "sample", "reconstruct", "certify", "attention", "segment"):
        assert command in out
    train_help = subprocess.run(
        [sys.executable, "-m", "flowattn", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    from flowattn.runs import RunConfig

    for name in RunConfig.fields():
        assert f"--{name}" in train_help


def test_flags_are_spelled_with_dashes_as_the_other_subcommands_spell_theirs():
    from flowattn.configs import dashed_flags
    from flowattn.runs import RunConfig

    argv = ["train", "--batch-size", "8", "--model.hidden", "16", "--run-dir=x", "--resume"]
    assert dashed_flags(argv, RunConfig) == [
        "train", "--batch_size", "8", "--model.hidden", "16", "--run_dir=x", "--resume"
    ]  # fmt: skip
    assert dashed_flags(["--not-a-field", "a-b"], RunConfig) == ["--not-a-field", "a-b"]


def _run_files(run_dir):
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


BAD_CONFIG_VALUES = [
    ('lr = "fast"', "'lr'"),
    ('ema = "x"', "'ema'"),
    ('warmup = "x"', "'warmup'"),
    ('temperature = "hot"', "'temperature'"),
    ('time_budget = "x"', "'time_budget'"),
    ("model = 3", "'model'"),
    ('device = "gpu"', "'gpu'"),
    ('seed = "abc"', "'seed'"),
    ("temperature = nan", "'temperature'"),
]


@pytest.mark.parametrize("line, names", BAD_CONFIG_VALUES, ids=[b[0] for b in BAD_CONFIG_VALUES])
def test_bad_config_values_are_one_line_errors_before_any_run_directory(
    line, names, tmp_path, capsys
):
    config = tmp_path / "bad.toml"
    config.write_text(f'dataset = "digits"\n{line}\n')
    run_dir = tmp_path / "new-run"
    assert main(["train", "--config", str(config), "--run-dir", str(run_dir)]) == 2
    assert names in _one_line_error(capsys)
    assert not run_dir.exists()


def _bad_invocations(run, tmp):
    (tmp / "notes.txt").write_text("not an image")
    (tmp / "fake.png").write_text("not a png either")
    (tmp / "fake.npz").write_text("not an archive")
    (tmp / "afile").write_text("a file, not a folder")
    return [
        (["train", "--run-dir", str(run), "--resume", *SMALL[6:], "--model.hidden", "16"],
         "holds a different model"),
        (["train", "--run-dir", str(run), "--resume", "--model.preset", "glow"], "preset"),
        (["train", "--run-dir", str(run), "--resume", "--preset", "glow"],
         "holds a different model"),
        (["reconstruct", str(run), "--images", str(tmp / "notes.txt")], "not an image file"),
        (["reconstruct", str(run), "--images", str(tmp / "fake.png")], "not an image file"),
        (["reconstruct", str(run), "--images", str(tmp / "fake.npz")], "not an .npz archive"),
        (["attention", str(run), "--image", str(tmp / "notes.txt")], "not an image file"),
        (["sample", str(run), "-n", "0"], "at least 1"),
        (["sample", str(run), "-n", "-3"], "at least 1"),
        (["sample", str(run), "-n", "2000000000"], "at most 10000"),
        (["sample", str(run), "--temperature", "nan"], "finite"),
        (["sample", str(run), "-o", str(tmp / "bad") + "/"], "not an image file name"),
        (["sample", str(run), "-o", str(tmp / "afile" / "s.png")], "is a file"),
        (["sample", str(run), "--device", "gpu"], "unknown device 'gpu'"),
        (["reconstruct", str(run), "--limit", "0"], "at least 1"),
        (["certify", str(run), "-n", "0"], "at least 1"),
        (["certify", str(run), "-n", "-1"], "at least 1"),
        (["eval", str(run), "--limit", "-3"], "at least 1"),
        (["eval", str(run), "--batch-size", "0"], "at least 1"),
        (["train", "--device", "gpu", "--run-dir", str(tmp / "r2")], "unknown device 'gpu'"),
        (["train", "--run-dir", str(tmp / "afile" / "run")], "is a file"),
    ]  # fmt: skip


def test_bad_inputs_are_one_line_errors_and_change_no_run_file(run, tmp_path, capsys):
    before = _run_files(run)
    for argv, expected in _bad_invocations(run, tmp_path):
        assert main(argv) == 2, argv
        line = _one_line_error(capsys)
        assert expected in line, (argv, line)
    assert _run_files(run) == before
    assert not (tmp_path / "r2").exists()


def test_a_checkpoint_that_would_run_code_runs_nothing(run, tmp_path, capsys):
    import shutil

    import torch
    from test_checkpoint import _Payload

    evil = tmp_path / "evil-run"
    evil.mkdir()
    shutil.copy(run / "config.toml", evil / "config.toml")
    marker = tmp_path / "pwned"
    torch.save({"format": "flowattn-checkpoint-4", "x": _Payload(marker)}, evil / "checkpoint.pt")
    for argv in (
        ["eval", str(evil)],
        ["sample", str(evil), "-o", str(tmp_path / "s.png")],
        ["reconstruct", str(evil), "-o", str(tmp_path / "r.png")],
        ["certify", str(evil)],
        ["attention", str(evil), "--image", "digits", "-o", str(tmp_path / "a.png")],
        ["train", "--run-dir", str(evil), "--resume"],
    ):
        assert main(argv) == 2, argv
        assert "refusing to load" in _one_line_error(capsys)
    assert not marker.exists()


def test_old_format_checkpoints_are_refused_naming_the_version(run, tmp_path, capsys):
    import random
    import shutil

    import numpy as np
    import torch

    from flowattn.checkpoint import load_checkpoint

    state = load_checkpoint(run)
    trainer = dict(state["trainer"])
    trainer["random"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),  # noqa: NPY002
                         "python": random.getstate()}  # fmt: skip
    old = {"format": "flowattn-checkpoint-1", "model_config": state["model_config"],
           "run_config": state["run_config"], "model": trainer["model"], "ema": trainer["ema"],
           "step": trainer["step"], "trainer": trainer}  # fmt: skip
    old_run = tmp_path / "old"
    old_run.mkdir()
    shutil.copy(run / "config.toml", old_run / "config.toml")
    torch.save(old, old_run / "checkpoint.pt")
    assert main(["eval", str(old_run), "--no-progress", "--limit", "8"]) == 2
    assert "flowattn 0.1 checkpoints did" in _one_line_error(capsys)
    old["trainer"] = {**trainer, "random": {}}  # data only, but the old format
    torch.save(old, old_run / "checkpoint.pt")
    assert main(["eval", str(old_run), "--no-progress", "--limit", "8"]) == 2
    assert "written by flowattn 0.1 (format 'flowattn-checkpoint-1')" in _one_line_error(capsys)


def test_two_trainings_in_one_run_directory_and_sigterm(tmp_path):
    """The second `train` on a locked run directory exits 2 naming the holder's PID; the
    first, sent SIGTERM (what schedulers send), checkpoints and exits 143."""
    import os
    import signal
    import time

    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "flowattn", "train", "--run-dir", str(run_dir), *SMALL[2:]]
    first = subprocess.Popen([*argv, "--steps", "100000", "--checkpoint-every", "100000"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        lock = run_dir / "lock"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.0)  # let it train a few steps
        second = subprocess.run([*argv, "--steps", "6"], capture_output=True, text=True)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by process {first.pid}" in lines[0]
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, err
    assert "SIGTERM at step" in out and (run_dir / "checkpoint.pt").is_file()
    assert lock.read_text() == ""  # released
    assert not list(run_dir.glob(".checkpoint.pt.*.tmp"))
    assert (
        os.stat(run_dir / "checkpoint.pt").st_mode & 0o777
        == os.stat(run_dir / "config.toml").st_mode & 0o777
    )


def test_a_read_only_run_directory_is_a_one_line_error(run, tmp_path):
    """Writes into a run directory the user cannot write to fail with one line, exit 2,
    and change nothing. Root ignores permissions, so as root the commands run as the
    unprivileged user 'nobody' (setpriv); as anyone else, as themselves."""
    import os
    import shutil
    import stat
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="flowattn-ro-"))
    try:
        ro = base / "run"
        shutil.copytree(run, ro)
        for path in (base, ro, *ro.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH
                 | stat.S_IXOTH)  # fmt: skip
        before = _run_files(ro)
        prefix = []
        if os.geteuid() == 0:
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        python = [*prefix, sys.executable, "-m", "flowattn"]
        home = base / "home"  # writable by the unprivileged user (matplotlib's cache)
        home.mkdir()
        home.chmod(0o777)
        env = {**os.environ, "HOME": str(home), "MPLCONFIGDIR": str(home)}
        for argv in (
            ["train", "--run-dir", str(ro), "--resume", "--steps", "9", "--no-progress"],
            ["sample", str(ro), "-n", "4", "-o", str(ro / "more.png")],
        ):
            done = subprocess.run([*python, *argv], capture_output=True, text=True, env=env)
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2, done.stderr
            assert len(lines) == 1, done.stderr
            assert "read-only" in lines[0] or "cannot write" in lines[0], lines[0]
        assert _run_files(ro) == before
    finally:
        for path in base.rglob("*"):
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_an_internal_error_keeps_its_traceback(run, monkeypatch):
    """Only validated user errors become one-line messages: a ValueError from inside the
    library (a bug) propagates."""
    import flowattn.runs

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(flowattn.runs, "load_run_model", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["eval", str(run), "--no-progress"])
