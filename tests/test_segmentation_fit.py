import pytest
import torch

from flowattn.checkpoint import CheckpointError, save_checkpoint
from flowattn.segmentation import (
    SegmentationNet,
    camouflage,
    evaluate,
    load_segmenter,
    predict,
    save_segmenter,
    structure_loss,
    train,
)
from flowattn.segmentation.fit import as_input


@pytest.fixture(scope="module")
def data():
    return camouflage(16, 32, seed=3)


@pytest.mark.parametrize("name", ["none", "invertible:dot", "nonlocal"])
def test_training_lowers_the_loss_on_its_images(data, name):
    images, masks = data
    torch.manual_seed(0)
    net = SegmentationNet(name, width=4)
    with torch.no_grad():
        before = float(structure_loss(net.eval()(as_input(images)), masks))
    losses = train(net, images, masks, steps=40, batch_size=8, lr=3e-3)
    with torch.no_grad():
        after = float(structure_loss(net(as_input(images)), masks))
    assert len(losses) == 40 and not net.training
    assert after < before


def test_after_step_sees_every_step_and_stops_training(data):
    seen = []

    def after_step(step: int, loss: float) -> bool:
        seen.append((step, loss))
        return step == 3

    losses = train(SegmentationNet(width=4), *data, steps=10, batch_size=4, after_step=after_step)
    assert [s for s, _ in seen] == [1, 2, 3] and [loss for _, loss in seen] == losses


def test_predict_gives_probabilities_and_keeps_the_mode(data):
    images, _ = data
    net = SegmentationNet("sagan", width=4).train()
    p = predict(net, images, batch_size=5)
    assert p.shape == (16, 1, 32, 32) and 0 <= p.min() and p.max() <= 1
    assert net.training
    torch.testing.assert_close(predict(net, images.float() / 255), p)
    with pytest.raises(ValueError, match="uint8 images, or floating-point images in"):
        predict(net, images.float())


def test_save_and_load_give_the_same_network(data, tmp_path):
    images, masks = data
    net = SegmentationNet("invertible:external", width=4)
    train(net, images, masks, steps=2, batch_size=4)
    save_segmenter(net, tmp_path / "s.pt", dataset="camouflage", image_size=32)
    loaded, meta = load_segmenter(tmp_path / "s.pt")
    assert meta == {"dataset": "camouflage", "image_size": 32}
    assert loaded.settings() == net.settings() and not loaded.training
    torch.testing.assert_close(predict(loaded, images), predict(net, images))
    assert evaluate(loaded, images, masks) == evaluate(net, images, masks)


def test_a_file_that_is_not_a_segmenter_is_refused(tmp_path):
    save_checkpoint({"step": 3}, tmp_path / "density.pt")
    with pytest.raises(CheckpointError, match="not a segmenter checkpoint"):
        load_segmenter(tmp_path / "density.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint file"):
        load_segmenter(tmp_path / "junk.pt")


def test_train_errors(data):
    images, masks = data
    with pytest.raises(ValueError, match="do not match"):
        train(SegmentationNet(width=4), images, masks[:3], steps=1)
    with pytest.raises(ValueError, match="must be positive"):
        train(SegmentationNet(width=4), images, masks, steps=0)
