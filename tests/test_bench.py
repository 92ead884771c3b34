"""The benchmark scripts run end to end (tiny budgets; their figures are not checked)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_density_benchmark_runs(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments/bench/density.py"),
            "--data",
            "digits",
            "--models",
            "glow,iresnet-attn:external",
            "--budget",
            "0.02",
            "--sample-n",
            "4",
            "--no-progress",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| glow |" in done.stdout and "| iresnet-attn:external |" in done.stdout
    assert (tmp_path / "results.csv").is_file()
