"""experiments/bench/baseline.py: an older flowattn imported beside this one."""

import subprocess
import sys
from pathlib import Path

import pytest

import flowattn
from experiments.bench.baseline import import_baseline

ROOT = Path(__file__).resolve().parents[1]


def test_an_older_checkout_imports_as_its_own_package(tmp_path):
    """A checkout of this repository at HEAD (a real git checkout), with one module
    added that uses absolute ``flowattn`` imports (as the alias modules of releases
    before 0.3 did), loads as a separate package: its modules are its own objects, not
    this package's."""
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(checkout)],
                   check=True, capture_output=True)  # fmt: skip
    probe = "from flowattn.models import build_model\nimport flowattn.nn.conv_branch as conv\n"
    (checkout / "flowattn" / "absolute_probe.py").write_text(probe)
    try:
        old = import_baseline(checkout, name="flowattn_baseline_test")
        from flowattn_baseline_test import absolute_probe  # absolute imports inside
        from flowattn_baseline_test.models import build_model

        assert old.__name__ == "flowattn_baseline_test" and old is not flowattn
        assert build_model.__module__ == "flowattn_baseline_test.models.builder"
        assert absolute_probe.build_model is build_model
        assert absolute_probe.conv.__name__ == "flowattn_baseline_test.nn.conv_branch"
        copy = Path(old.__file__).parent
        loaded = {
            name
            for name, module in list(sys.modules.items())
            if copy in Path(getattr(module, "__file__", None) or "/").parents
        }
        assert "flowattn_baseline_test.models" in loaded
        assert all(name.split(".")[0] == "flowattn_baseline_test" for name in loaded), loaded
        model = build_model("iresnet", image_shape=(3, 8, 8), size="tiny")
        assert type(model).__module__.startswith("flowattn_baseline_test")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(checkout)],
                       check=True, capture_output=True)  # fmt: skip


def test_a_directory_without_the_package_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no flowattn package"):
        import_baseline(tmp_path)
