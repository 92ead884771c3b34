import subprocess
import sys

import pytest

from flowattn.cli import main

SMALL = ["--steps", "6", "--batch-size", "16", "--samples", "4", "--no-progress"]
SMALL += ["--model", "blocks=1", "--model", "hidden=8"]


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
    att = tmp_path / "a.png"
    assert main(["attention", str(run), "--image", "digits", "-o", str(att)]) == 0
    assert att.is_file() and att.stat().st_size > 1000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["train", "--batch-sise", "3"], "did you mean --batch-size?"),
        (["train", "--model", "hiden=3"], "did you mean 'hidden'?"),
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
    for command in ("train", "eval", "sample", "reconstruct", "certify", "attention", "demo"):
        assert command in out
    train_help = subprocess.run(
        [sys.executable, "-m", "flowattn", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    from flowattn.runs import RunConfig

    for name in RunConfig.fields():
        assert f"--{name.replace('_', '-')}" in train_help
