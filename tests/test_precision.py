import pytest
import torch
from conftest import stress_weights

from flowattn.nn.conv_branch import ConvResidualBranch
from flowattn.precision import ieee_float32
from flowattn.transforms import ResidualTransform


@pytest.fixture
def tf32_allowed():
    """TF32 allowed for convolutions and matrix products, as a speed-minded user sets it."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = True
    yield
    cudnn.allow_tf32, matmul.allow_tf32 = before


@pytest.mark.usefixtures("tf32_allowed")
def test_tf32_is_off_inside_and_restored_after_even_on_errors():
    with ieee_float32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(KeyError), ieee_float32():
        raise KeyError
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


def test_settings_that_are_already_off_stay_off():
    cudnn = torch.backends.cudnn
    before = cudnn.allow_tf32
    cudnn.allow_tf32 = False
    try:
        with ieee_float32():
            assert not cudnn.allow_tf32
        assert not cudnn.allow_tf32
    finally:
        cudnn.allow_tf32 = before


@pytest.mark.usefixtures("tf32_allowed")
def test_a_float32_convolution_step_inverts_to_its_tolerance_with_tf32_allowed(device):
    """Near its bound, with TF32 allowed, the fixed-point inverse of a convolutional
    residual step converges to its float32 tolerance (with TF32 it stalls near 1e-4 on
    an H100), and the forward's output does not depend on the TF32 setting."""
    branch = ConvResidualBranch(12, hidden=64, coeff=0.97)
    stress_weights(branch)  # every rescaling active: the branch sits at its bound
    step = ResidualTransform(branch, strict=True, input_shape=(12, 16, 16)).to(device).eval()
    x = torch.randn(16, 12, 16, 16, device=device)
    with torch.no_grad():
        y, _ = step(x)
        x_back, _ = step.inverse(y)
        torch.backends.cudnn.allow_tf32 = False
        y_ieee, _ = step(x)
    assert step.last_inverse.converged
    torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ieee, rtol=0, atol=0)
