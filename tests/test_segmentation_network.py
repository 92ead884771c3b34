import pickle

import pytest
import torch

from flowattn.segmentation.camouflage import camouflage
from flowattn.segmentation.loss import structure_loss
from flowattn.segmentation.network import AttentionSlot, SegmentationNet, slot_names
from flowattn.transforms import KINDS

INVERTIBLE = [f"invertible:{k}" for k in KINDS]


def _trained(name: str, steps: int = 3) -> SegmentationNet:
    torch.manual_seed(0)
    net = SegmentationNet(name, width=8)
    images, masks = camouflage(8, 32, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = structure_loss(net(images.float() / 255), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@pytest.mark.parametrize("name", slot_names())
def test_every_slot_trains_and_pickles(name):
    net = _trained(name, steps=1)
    images, masks = camouflage(2, 32, seed=1)
    x = images.float() / 255
    loss = structure_loss(net(x), masks)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    clone = pickle.loads(pickle.dumps(net))
    net.eval(), clone.eval()
    torch.testing.assert_close(clone(x), net(x))


@pytest.mark.parametrize("name", INVERTIBLE)
def test_the_invertible_step_keeps_its_certificate_and_inverts(name):
    """After training inside the network, the step's branch is still within its bound on
    the bottleneck features (random pairs, in the certificate's l-inf norm), and its
    fixed-point inverse recovers the features."""
    net = _trained(name).eval().double()
    images, _ = camouflage(4, 32, seed=2)
    with torch.no_grad():
        h, _ = net.bottleneck(images.double() / 255)
        bound = net.attention.lipschitz_bound(tuple(h.shape[1:]))
        assert bound is not None and bound <= 0.9 + 1e-9
        g = net.attention.step.branch
        d = 1e-3 * torch.randn_like(h)
        ratio = (g(h + d) - g(h)).flatten(1).abs().amax(1) / d.flatten(1).abs().amax(1)
        assert (ratio <= bound * (1 + 1e-6)).all()
        y = net.attention(h)
        torch.testing.assert_close(net.attention.invert(y), h, atol=1e-8, rtol=0)


def test_ordinary_slots_are_not_invertible_steps():
    slot = AttentionSlot("sagan", 16)
    assert not slot.invertible and slot.lipschitz_bound((16, 4, 4)) is None
    with pytest.raises(ValueError, match="not an invertible step"):
        slot.invert(torch.zeros(1, 16, 4, 4))


def test_loss_is_small_for_the_truth_and_large_for_its_opposite():
    _, masks = camouflage(4, 32, seed=0)
    m = masks.float()
    good, bad = structure_loss(20 * (2 * m - 1), masks), structure_loss(-20 * (2 * m - 1), masks)
    assert good < 1e-6 and bad > 10


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: AttentionSlot("transformer", 8), "unknown attention slot"),
        (lambda: SegmentationNet()(torch.zeros(1, 3, 30, 30)), "divisible by 8"),
        (lambda: structure_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 8, 8)), "one shape"),
    ],
)
def test_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()
