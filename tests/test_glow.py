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


def test_the_1x1_convolution_inverts_without_the_deprecated_solver(monkeypatch):
    """The step's 1x1 convolution inverts (and gives its inverse weight) as nflows'
    does, in float64 on non-trivial LU factors, without calling the deprecated
    ``torch.triangular_solve``; checkpoints of nflows' layer load into it."""
    from nflows.transforms import OneByOneConvolution

    torch.manual_seed(0)
    ours = glow_step(6, hidden=8)._transforms[1].double()
    reference = OneByOneConvolution(6).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    reference.load_state_dict(ours.state_dict())
    y = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    expected, expected_logdet = reference.inverse(y)
    # (nflows' own weight_inverse fails in float64: its identity is float32)
    expected_weight = torch.linalg.inv(reference.weight())

    def deprecated(*args, **kwargs):
        raise AssertionError("torch.triangular_solve called")

    monkeypatch.setattr(torch, "triangular_solve", deprecated)
    x, logdet = ours.inverse(y)
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, expected_logdet, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.weight_inverse(), expected_weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.weight_inverse() @ ours.weight(), torch.eye(6).double())
    back, _ = ours(x)
    torch.testing.assert_close(back, y, rtol=1e-12, atol=1e-12)
    lower, upper = ours.factors()  # W = L U, L unit lower triangular, U upper
    torch.testing.assert_close(lower @ upper, ours.weight(), rtol=1e-12, atol=1e-12)
    assert torch.equal(lower.diagonal(), torch.ones(6, dtype=torch.float64))
    assert torch.equal(lower.triu(1), torch.zeros_like(lower))
    assert torch.equal(upper.tril(-1), torch.zeros_like(upper))
