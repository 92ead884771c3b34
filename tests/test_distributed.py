"""DDP on CPU: `torchrun --nproc_per_node=2 -m flowattn train` with the gloo backend."""

import os
import re
import subprocess
import sys
from pathlib import Path


def test_torchrun_two_cpu_processes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun),
        "--nproc_per_node=2",
        "--master_port=29531",
        "-m",
        "flowattn",
        "train",
        "--steps",
        "30",
        "--batch-size",
        "32",
        "--eval-every",
        "0",
        "--samples",
        "4",
        "--no-progress",
        "--print-checksum",
        "--run-dir",
        str(tmp_path / "ddp"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = re.findall(
        r"rank (\d) parameter checksum (\w+) first loss ([\d.]+) last loss ([\d.]+)", done.stdout
    )
    assert sorted(r[0] for r in ranks) == ["0", "1"], done.stdout
    assert ranks[0][1] == ranks[1][1]  # identical parameters on both ranks
    for _, _, first, last in ranks:
        assert float(last) < float(first)  # the loss falls
    assert (tmp_path / "ddp" / "checkpoint.pt").is_file()  # written by rank 0 only
    assert done.stdout.count("test bits/dim") == 1
