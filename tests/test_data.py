import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_celeba, write_svhn
from PIL import Image

from flowattn.data import (
    DataError,
    DatasetNotFoundError,
    ImageTensorDataset,
    load_dataset,
    stack_images,
)
from flowattn.errors import ConfigError

SHARED_NPZ = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10/cifar10_subset.npz"
rng = np.random.default_rng(0)


def test_shared_cifar10_subset():
    if not SHARED_NPZ.is_file():
        pytest.skip(f"shared CIFAR-10 subset not at {SHARED_NPZ}")
    train = load_dataset(SHARED_NPZ, "train")
    test = load_dataset(str(SHARED_NPZ), "test")
    assert (len(train), len(test)) == (5085, 1017)
    assert train.image_shape == (3, 32, 32)
    with np.load(SHARED_NPZ) as raw:
        expected = raw["x_test"][5]
        label = int(raw["y_test"][5])
    image, y = test[5]
    assert image.dtype == torch.uint8
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected) and y == label


def test_digits_is_the_default_and_has_fixed_splits():
    train, test = load_dataset(), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1500, 297)
    images = stack_images(train)
    assert images.dtype == torch.uint8 and images.shape[1:] == (1, 8, 8)
    assert images.max() == 255 and images.min() == 0
    assert 0 <= train[0][1] <= 9


def _write_cifar(root: Path, n: int = 4) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        entry = {"batch_label": name, "data": data, "labels": list(range(n)), "filenames": []}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = data
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return written


def test_cifar10_torchvision_pickles(tmp_path):
    written = _write_cifar(tmp_path)
    train = load_dataset("cifar10", "train", root=tmp_path)
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert (len(train), len(test)) == (20, 4)
    # CIFAR rows are channel-major: 1024 red, 1024 green, 1024 blue values
    expected = torch.from_numpy(written["test_batch"][2].reshape(3, 32, 32))
    assert torch.equal(test[2][0], expected) and test[2][1] == 2


def test_cifar10_missing_and_corrupted(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "cifar-10-batches-py")):
        load_dataset("cifar10", root=tmp_path)
    _write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])  # truncated
    with pytest.raises(DataError, match="corrupted"):
        load_dataset("cifar10", "train", root=tmp_path)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_cifar10_pickle_that_would_run_code_runs_nothing(tmp_path):
    _write_cifar(tmp_path)
    marker = tmp_path / "ran"
    entry = {"data": _RunsCode(marker), "labels": [0]}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(entry))
    with pytest.raises(DataError, match="refusing to load pathlib"):
        load_dataset("cifar10", "test", root=tmp_path)
    assert not marker.exists()


def test_cifar10_agrees_with_torchvision(tmp_path):
    from torchvision.datasets import CIFAR10

    _write_cifar(tmp_path)

    class _NoChecksums(CIFAR10):  # the reference reader, on files that are not the real ones
        def _check_integrity(self) -> bool:
            return True

        def _load_meta(self) -> None:
            self.classes = []

    reference = _NoChecksums(str(tmp_path), train=True)
    ours = load_dataset("cifar10", "train", root=tmp_path)
    assert torch.equal(stack_images(ours), torch.from_numpy(reference.data).permute(0, 3, 1, 2))
    assert [ours[i][1] for i in range(len(ours))] == list(reference.targets)


def test_svhn_mat_files(tmp_path):
    x = write_svhn(tmp_path, "test")
    ds = load_dataset("svhn", "test", root=tmp_path)
    assert len(ds) == 5
    image, label = ds[1]
    assert torch.equal(image, torch.from_numpy(x[:, :, :, 1].transpose(2, 0, 1).copy()))
    assert all(0 <= ds[i][1] <= 9 for i in range(5))  # SVHN's 10 means digit 0
    with pytest.raises(DatasetNotFoundError, match="train_32x32.mat"):
        load_dataset("svhn", "train", root=tmp_path)


def test_svhn_bad_files(tmp_path):
    (tmp_path / "train_32x32.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(DataError, match="train_32x32.mat"):
        load_dataset("svhn", "train", root=tmp_path)
    write_svhn(tmp_path / "f", "test", x=np.zeros((32, 32, 3, 2), dtype=np.float64))
    with pytest.raises(DataError, match="uint8"):
        load_dataset("svhn", "test", root=tmp_path / "f")


@pytest.mark.parametrize("size", [32, 64])
def test_celeba_folder_of_jpegs(tmp_path, size):
    images = write_celeba(tmp_path)
    train = load_dataset("celeba", "train", root=tmp_path, image_size=size)
    test = load_dataset("celeba", "test", root=tmp_path, image_size=size)
    assert (len(train), len(test)) == (3, 2)
    image, _ = train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, size, size)
    # centre crop 178x178 of the 218x178 image, then resize: a constant image stays constant
    Image.new("RGB", (178, 218), (10, 200, 30)).save(images / "000001.jpg", quality=100)
    flat = load_dataset("celeba", "train", root=tmp_path, image_size=size)[0][0]
    assert (flat.float().mean(dim=(1, 2)) - torch.tensor([10.0, 200.0, 30.0])).abs().max() < 3


def test_celeba_missing_and_corrupted(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="img_align_celeba"):
        load_dataset("celeba", root=tmp_path)
    images = write_celeba(tmp_path)
    (images / "000002.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    ds = load_dataset("celeba", "train", root=tmp_path, image_size=32)
    with pytest.raises(DataError, match="000002.jpg"):
        ds[1]


def test_image_folder(tmp_path):
    for i in range(3):
        pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        (tmp_path / "sub").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "sub" / f"{i}.png")
    ds = load_dataset(tmp_path)
    assert len(ds) == 3 and ds[0][0].shape == (3, 12, 12)
    gray = load_dataset("folder", root=tmp_path, channels=1, image_size=8)
    assert stack_images(gray).shape == (3, 1, 8, 8)
    Image.fromarray(np.zeros((20, 16, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(DataError, match="different sizes"):
        load_dataset(tmp_path)
    assert len(load_dataset("folder", root=tmp_path, image_size=4)) == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images"):
        load_dataset("folder", root=tmp_path / "empty")


def test_npz_layouts_and_bad_files(tmp_path):
    hwc = rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "hwc.npz", x_train=hwc, y_train=np.arange(4))
    np.savez(tmp_path / "chw.npz", x_train=hwc.transpose(0, 3, 1, 2))
    a = stack_images(load_dataset(tmp_path / "hwc.npz"))
    b = stack_images(load_dataset(tmp_path / "chw.npz"))
    assert torch.equal(a, b) and a.shape == (4, 3, 6, 6)
    assert load_dataset(tmp_path / "hwc.npz")[3][1] == 3
    np.savez(tmp_path / "gray.npz", x_test=hwc[..., 0])
    assert load_dataset(tmp_path / "gray.npz", "test").image_shape == (1, 6, 6)

    np.savez(tmp_path / "float.npz", x_train=hwc / 255.0)
    with pytest.raises(DataError, match="uint8"):
        load_dataset(tmp_path / "float.npz")
    np.savez(tmp_path / "flat.npz", x_train=hwc.reshape(4, -1))
    with pytest.raises(DataError, match=r"\(N, H, W, C\)"):
        load_dataset(tmp_path / "flat.npz")
    with pytest.raises(DataError, match="has no array 'x_test'; it has x_train"):
        load_dataset(tmp_path / "chw.npz", "test")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(tmp_path / "junk.npz")
    with pytest.raises(DatasetNotFoundError, match="missing.npz"):
        load_dataset(tmp_path / "missing.npz")


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        load_dataset("digits", "valid")
    with pytest.raises(ValueError, match="fixed image size"):
        load_dataset("digits", image_size=16)
    with pytest.raises(DataError, match="uint8"):
        ImageTensorDataset(torch.zeros(2, 1, 4, 4))


def test_camouflage_images_by_name_are_the_segmentation_sets():
    from flowattn.segmentation import camouflage_split

    test = load_dataset("camouflage", "test")
    images, _ = camouflage_split("test", 32)
    assert len(test) == 500 and torch.equal(stack_images(test), images)
    assert load_dataset("camouflage", "train", image_size=64)[0][0].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="unknown split .valid. for camouflage"):
        load_dataset("camouflage", "valid")


def test_an_image_folder_reads_every_suffix_the_package_writes_and_lists(tmp_path):
    """One suffix list: each listed format, written by PIL as a real file, is read back
    (lossless formats exactly)."""
    from flowattn.data import IMAGE_SUFFIXES

    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for i, suffix in enumerate(IMAGE_SUFFIXES):
        Image.fromarray(pixels).save(tmp_path / f"{i}{suffix}")
    images = stack_images(load_dataset(tmp_path))
    assert len(images) == len(IMAGE_SUFFIXES)
    for i, suffix in enumerate(IMAGE_SUFFIXES):
        if suffix not in (".jpg", ".jpeg", ".webp"):  # lossy by default
            assert torch.equal(images[i], torch.from_numpy(pixels).permute(2, 0, 1)), suffix


def test_a_dataset_added_to_sources_is_loaded_split_checked_and_sized(monkeypatch):
    """Adding a dataset is one entry in SOURCES: load_dataset dispatches to its loader,
    checks its splits and refuses image_size for a fixed-size one."""
    from flowattn import data

    seen = []

    def load(request):
        seen.append(request)
        return data.ImageTensorDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), name="toy")

    monkeypatch.setitem(data.SOURCES, "toy", data.Source(load, ("train", "dev")))
    assert len(load_dataset("toy", "dev")) == 2 and seen[0].split == "dev"
    with pytest.raises(ConfigError, match="valid splits: train, dev"):
        load_dataset("toy", "test")
    with pytest.raises(ConfigError, match="fixed image size"):
        load_dataset("toy", "train", image_size=8)
