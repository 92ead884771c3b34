import pytest
import torch

from flowattn import checkpoint
from flowattn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_and_run_directory(tmp_path):
    save_checkpoint({"step": 7, "weights": torch.arange(3)}, tmp_path / "checkpoint.pt")
    state = load_checkpoint(tmp_path)  # a run directory works too
    assert state["step"] == 7 and torch.equal(state["weights"], torch.arange(3))


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1}, path)

    def dies_mid_write(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(checkpoint.torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file left


def test_unreadable_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"step": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a flowattn checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class _Payload:
    """An object whose unpickling runs a command (what a malicious checkpoint carries)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": "flowattn-checkpoint-4", "x": _Payload(marker)}, tmp_path / "evil.pt")
    torch.save(_Payload(marker), tmp_path / "bare.pt")  # not even a dict
    for name in ("evil.pt", "bare.pt"):
        with pytest.raises(CheckpointError, match="refusing to load") as error:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(error.value)
    assert not marker.exists()


def test_random_states_are_stored_as_data_and_restored(tmp_path):
    import random

    import numpy as np

    from flowattn.training import _random_states, _set_random_states

    torch.manual_seed(3)
    np.random.seed(4)  # noqa: NPY002
    random.seed(5)
    save_checkpoint({"random": _random_states()}, tmp_path / "checkpoint.pt")
    expected = (torch.rand(2), np.random.rand(2), random.random())  # noqa: NPY002
    _set_random_states(load_checkpoint(tmp_path)["random"])  # read with weights_only=True
    got = (torch.rand(2), np.random.rand(2), random.random())  # noqa: NPY002
    assert torch.equal(expected[0], got[0]) and (expected[1] == got[1]).all()
    assert expected[2] == got[2]


def test_previous_checkpoint_kept_mode_and_stale_temporaries(tmp_path):
    import os

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2}, path)
    assert load_checkpoint(path)["step"] == 2
    assert load_checkpoint(tmp_path / checkpoint.PREVIOUS_NAME)["step"] == 1
    umask = os.umask(0o022)
    try:
        save_checkpoint({"step": 3}, path)
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    (tmp_path / ".checkpoint.pt.x1y2.tmp").write_bytes(b"")  # left by a killed write
    removed = checkpoint.remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".checkpoint.pt.x1y2.tmp"]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("format, version", [("1", "0.1"), ("2", "0.2"), ("3", "0.3 or 0.4")])
def test_a_checkpoint_of_an_earlier_format_is_refused_naming_its_version(tmp_path, format, version):
    torch.save({"format": f"flowattn-checkpoint-{format}", "trainer": {}}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=f"written by flowattn {version} .*retrain"):
        load_checkpoint(tmp_path / "old.pt")


def test_a_checkpoint_without_a_run_is_refused_by_the_run_readers(tmp_path):
    """A valid format-3 file that is not a training run's (a segmentation checkpoint, a
    hand-written one) names the keys of RUN_SCHEMA it lacks."""
    from flowattn.checkpoint import RUN_SCHEMA, load_run_checkpoint, run_checkpoint
    from flowattn.errors import CheckpointError

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"trainer": {}}, path)
    with pytest.raises(CheckpointError, match="has no model_config, run_config"):
        load_run_checkpoint(path)
    save_checkpoint(run_checkpoint({"preset": "glow"}, {"seed": 3}, {"step": 1}), path)
    state = load_run_checkpoint(tmp_path)
    assert set(RUN_SCHEMA) <= set(state) and state["run_config"] == {"seed": 3}
