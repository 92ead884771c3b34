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
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_unreadable_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"step": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a flowattn checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
