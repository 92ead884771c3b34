"""``flowattn segment train|eval|predict`` through the real ``flowattn`` entry point."""

import re

import numpy as np
import pytest
from PIL import Image

from flowattn.cli import main


def _scores(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"(S|meanE|maxE|adpE|wF|MAE) ([0-9.]+)", text)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("segment")
    args = ["segment", "train", "--steps", "3", "--width", "4", "--batch-size", "8",
            "--attention", "invertible:dot", "--out", str(out), "--no-progress"]  # fmt: skip
    return out, args


def test_train_prints_metrics_that_eval_reproduces(trained, capsys):
    out, args = trained
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "test (500 images)" in printed and len(_scores(printed)) == 6
    assert (out / "segmenter.pt").is_file()
    with Image.open(out / "predictions.png") as grid:
        assert grid.size[0] > 2 * grid.size[1]  # rows of 8 images: image, truth, map
    assert main(["segment", "eval", str(out)]) == 0
    assert _scores(capsys.readouterr().out) == pytest.approx(_scores(printed), abs=1e-4)


def test_predict_writes_one_png_map_per_image_at_its_size(trained, tmp_path, capsys):
    out, args = trained
    if not (out / "segmenter.pt").is_file():
        assert main(args) == 0
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    maps = tmp_path / "maps"
    assert main(["segment", "predict", str(out), str(tmp_path), "-o", str(maps),
                 "--threshold", "0.5"]) == 0  # fmt: skip
    assert "wrote 2 maps" in capsys.readouterr().out
    with Image.open(maps / "a.png") as a, Image.open(maps / "b.png") as b:
        assert (a.size, a.mode, b.size) == ((70, 50), "L", (40, 40))
        assert set(np.unique(np.asarray(a))) <= {0, 255}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["segment", "train", "--image-size", "20"], "multiple of 8"),
        (["segment", "train", "--steps", "0"], "--steps must be at least 1"),
        (["segment", "train", "--dataset", "/no/such/set"], "give 'camouflage' or the folder"),
        (["segment", "eval", "/no/such/model.pt"], "no checkpoint at"),
        (["segment", "predict", "m.pt", "x.png", "--threshold", "2"], "--threshold must lie"),
    ],
)
def test_bad_inputs_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_density_checkpoint_is_not_a_segmenter(tmp_path, capsys):
    from flowattn.checkpoint import save_checkpoint

    save_checkpoint({"step": 1}, tmp_path / "checkpoint.pt")
    assert main(["segment", "eval", str(tmp_path / "checkpoint.pt")]) == 2
    assert "not a segmenter checkpoint" in capsys.readouterr().err


def _write_cod_set(folder, n: int, rng) -> None:
    """A real COD layout: JPEG images in Imgs/, PNG masks in GT/."""
    (folder / "Imgs").mkdir(parents=True)
    (folder / "GT").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(
            folder / "Imgs" / f"{i}.jpg"
        )
        mask = np.zeros((24, 40), np.uint8)
        mask[5:15, 10:30] = 255
        Image.fromarray(mask).save(folder / "GT" / f"{i}.png")


def test_train_and_eval_on_a_real_cod_folder(tmp_path, capsys):
    rng = np.random.default_rng(1)
    _write_cod_set(tmp_path / "COD" / "TrainDataset", 6, rng)
    _write_cod_set(tmp_path / "COD" / "TestDataset", 4, rng)
    out = tmp_path / "run"
    args = ["segment", "train", "--dataset", str(tmp_path / "COD"), "--image-size", "16",
            "--steps", "2", "--width", "4", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "6 images of (3, 16, 16)" in printed and "test (4 images)" in printed
    assert main(["segment", "eval", str(out)]) == 0
    assert f"{tmp_path / 'COD'} test (4 images)" in capsys.readouterr().out
