import numpy as np
import pytest
import torch
from PIL import Image

from flowattn.data import DataError, DatasetNotFoundError
from flowattn.segmentation.folders import load_cod_folder


def _write_set(folder, names=("a", "b", "c"), size=(20, 16)):
    """Real files: JPEG images and PNG masks with grey levels around 128 (as resized and
    JPEG-compressed masks have)."""
    (folder / "Imgs").mkdir(parents=True)
    (folder / "GT").mkdir()
    rng = np.random.default_rng(0)
    masks = {}
    for name in names:
        image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / "Imgs" / f"{name}.jpg", quality=90)
        mask = np.zeros((size[1], size[0]), np.uint8)
        mask[4:10, 5:15] = 255
        mask[0, 0], mask[0, 1] = 128, 129  # binarised as the field does: > 128
        Image.fromarray(mask).save(folder / "GT" / f"{name}.png")
        masks[name] = mask > 128
    return masks


def test_reads_images_and_binarised_masks(tmp_path):
    masks = _write_set(tmp_path / "CAMO")
    images, m, names = load_cod_folder(tmp_path / "CAMO")
    assert names == ["a", "b", "c"]
    assert images.shape == (3, 3, 16, 20) and images.dtype == torch.uint8
    assert m.shape == (3, 1, 16, 20) and m.dtype == torch.bool
    for i, name in enumerate(names):
        assert torch.equal(m[i, 0], torch.from_numpy(masks[name]))
    assert not m[0, 0, 0, 0] and m[0, 0, 0, 1]
    with Image.open(tmp_path / "CAMO" / "Imgs" / "b.jpg") as im:  # the decoded JPEG
        decoded = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(images[1], decoded)


@pytest.mark.parametrize("folder, split", [("TrainDataset", "train"), ("test", "test")])
def test_finds_the_split_folder(tmp_path, folder, split):
    _write_set(tmp_path / "COD10K" / folder, names=("x",))
    _, _, names = load_cod_folder(tmp_path / "COD10K", split)
    assert names == ["x"]


def test_resizes_to_a_square(tmp_path):
    _write_set(tmp_path / "set")
    images, masks, _ = load_cod_folder(tmp_path / "set", size=32)
    assert images.shape == (3, 3, 32, 32) and masks.shape == (3, 1, 32, 32)
    assert masks.any() and not masks.all()


def test_missing_mask(tmp_path):
    _write_set(tmp_path / "set")
    (tmp_path / "set" / "GT" / "b.png").unlink()
    with pytest.raises(DataError, match=r"b.jpg has no mask: expected .*GT/b.png"):
        load_cod_folder(tmp_path / "set")


def test_size_mismatch(tmp_path):
    _write_set(tmp_path / "set")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "set" / "GT" / "a.png")
    with pytest.raises(DataError, match="a.jpg is 20x16 but its mask a.png is 8x8"):
        load_cod_folder(tmp_path / "set")


def test_unreadable_file(tmp_path):
    _write_set(tmp_path / "set")
    (tmp_path / "set" / "Imgs" / "c.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot read .*c.jpg"):
        load_cod_folder(tmp_path / "set")


def test_images_of_different_sizes_need_size(tmp_path):
    _write_set(tmp_path / "set", names=("a",))
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "set" / "Imgs" / "z.jpg")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "set" / "GT" / "z.png")
    with pytest.raises(DataError, match="differ in size .*pass size="):
        load_cod_folder(tmp_path / "set")
    assert load_cod_folder(tmp_path / "set", size=12)[0].shape == (2, 3, 12, 12)


def test_not_a_set_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="expected .*Imgs and .*GT"):
        load_cod_folder(tmp_path)
    (tmp_path / "Imgs").mkdir()
    (tmp_path / "GT").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images"):
        load_cod_folder(tmp_path)


def test_segmentation_set_by_name_or_folder(tmp_path):
    from flowattn.segmentation import camouflage_split, segmentation_set

    images, masks = segmentation_set("camouflage", "test", 32)
    expected = camouflage_split("test", 32)
    assert torch.equal(images, expected[0]) and torch.equal(masks, expected[1])
    _write_set(tmp_path / "COD" / "TestDataset")
    images, masks = segmentation_set(tmp_path / "COD", "test", 16)
    assert images.shape == (3, 3, 16, 16) and masks.shape == (3, 1, 16, 16)
    with pytest.raises(DatasetNotFoundError, match="give 'camouflage' or the folder"):
        segmentation_set(tmp_path / "missing", "test")
