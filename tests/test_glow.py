import pickle

import pytest
import torch
from conftest import check_bijection

from flowattn.nn.coupling_nets import CouplingConditioner
from flowattn.transforms.glow import glow_step


def _trained_like(step):
    """Initialise ActNorm on data and move every parameter off its initial value."""
    step(torch.randn(8, *SHAPE, dtype=torch.float64))
    with torch.no_grad():
        for p in step.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return step.eval()


SHAPE = (4, 3, 3)


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("flip", [False, True])
def test_glow_step_logdet_and_inverse(attention, flip):
    step = _trained_like(glow_step(4, hidden=8, attention=attention, flip=flip).double())
    check_bijection(step, torch.randn(2, *SHAPE, dtype=torch.float64))


def test_conditioner_starts_at_zero_and_pickles():
    net = CouplingConditioner(2, 4, hidden=8, attention=True)
    assert torch.equal(net(torch.randn(2, 2, 4, 4)), torch.zeros(2, 4, 4, 4))
    step = glow_step(4, hidden=8, attention=True)
    clone = pickle.loads(pickle.dumps(step))
    x = torch.randn(2, *SHAPE)
    step.eval(), clone.eval()
    assert torch.equal(step(x)[0], clone(x)[0])


def test_glow_step_needs_two_channels():
    with pytest.raises(ValueError, match="at least 2 channels"):
        glow_step(1, hidden=4)
