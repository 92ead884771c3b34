import subprocess
import sys
import warnings

import pytest
import torch
from conftest import stress_weights

from flowattn.nn.conv_branch import ConvResidualBranch
from flowattn.precision import TF32Warning, tf32_allowed, use_ieee_float32, warn_if_tf32
from flowattn.transforms import ResidualTransform


@pytest.fixture
def tf32_allowed_here():
    """TF32 allowed for convolutions and matrix products, as a speed-minded user sets it."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = True
    yield
    cudnn.allow_tf32, matmul.allow_tf32 = before


@pytest.mark.usefixtures("tf32_allowed_here")
def test_use_ieee_float32_turns_both_settings_off():
    assert tf32_allowed()
    use_ieee_float32()
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert not tf32_allowed()


@pytest.mark.usefixtures("tf32_allowed_here")
@pytest.mark.parametrize(
    "device, dtype, warns",
    [("cuda", torch.float32, True), ("cuda", torch.float64, False), ("cpu", torch.float32, False)],
)
def test_only_float32_cuda_work_with_tf32_allowed_warns(device, dtype, warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_tf32(torch.device(device), dtype)
        use_ieee_float32()
        warn_if_tf32(torch.device(device), dtype)  # off: never
    assert [type(w.message) for w in caught] == ([TF32Warning] if warns else [])
    if warns:
        assert "use_ieee_float32()" in str(caught[0].message)


def test_the_library_leaves_the_settings_alone():
    """Importing flowattn and running a residual step changes no TF32 setting (only an
    application does, with use_ieee_float32): checked in a fresh interpreter."""
    code = (
        "import torch\n"
        "before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32\n"
        "from flowattn.nn.conv_branch import ConvResidualBranch\n"
        "from flowattn.transforms import ResidualTransform\n"
        "step = ResidualTransform(ConvResidualBranch(4, hidden=8))\n"
        "y, _ = step(torch.randn(2, 4, 4, 4)); step.inverse(y)\n"
        "after = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32\n"
        "assert before == after, (before, after)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_float32_convolution_step_inverts_to_its_tolerance_in_ieee_float32(device):
    """Near its bound, in IEEE float32 (TF32 off, as the flowattn command sets it), the
    fixed-point inverse of a convolutional residual step converges to its float32
    tolerance (with TF32 it stalls near 1e-4 on an H100), with no TF32 warning."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    use_ieee_float32()
    try:
        branch = ConvResidualBranch(12, hidden=64, coeff=0.97)
        stress_weights(branch)  # every rescaling active: the branch sits at its bound
        step = ResidualTransform(branch, strict=True, input_shape=(12, 16, 16))
        step = step.to(device).eval()
        x = torch.randn(16, 12, 16, 16, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("error", TF32Warning)
            with torch.no_grad():
                y, _ = step(x)
                x_back, _ = step.inverse(y)
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before
    assert step.last_inverse.converged
    torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("tf32_allowed_here")
def test_a_float32_cuda_step_with_tf32_allowed_says_so(device):
    step = ResidualTransform(ConvResidualBranch(4, hidden=8)).to(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, _ = step(torch.randn(2, 4, 4, 4, device=device))
        step.inverse(y)
    tf32 = [w for w in caught if issubclass(w.category, TF32Warning)]
    assert len(tf32) == (2 if device.type == "cuda" else 0)
