"""The invariants every flow step must hold, table-driven over every registered step:
each attention kind of the registry (certified, and the paper's faithful forms), the
convolutional residual branch with each activation, and the Glow step. A kind added to
``flowattn.nn.attention_kinds.REGISTRY`` is tested here by being registered.

* the log-det (exact estimator) against log|det(I + J_g)| with J_g from
  ``torch.func.jacrev`` in float64;
* the inverse gives the input back;
* the certificate holds at random inputs of several scales and, for l-inf certificates,
  at the points gradient ascent on the input finds, with the weights inflated so that
  every rescaling is active;
* pickling keeps the outputs; float32 and float64 agree; CUDA where there is one.
"""

import io
import pickle

import pytest
import torch
from conftest import dense_jacobian_of, stress_weights

from flowattn.capacity import worst_case_norm
from flowattn.logdet import ExactLogDet
from flowattn.nn.attention_kinds import PAPER_KINDS, REGISTRY
from flowattn.nn.conv_branch import ACTIVATIONS, ConvResidualBranch
from flowattn.transforms import ResidualTransform, invertible_attention
from flowattn.transforms.glow import glow_step

SHAPE = (4, 4, 4)
STEPS = [
    *(f"attention:{kind}" for kind in REGISTRY),
    *(f"faithful:{kind}" for kind in PAPER_KINDS),
    *(f"conv:{activation}" for activation in ACTIVATIONS),
    "glow",
]
RESIDUAL = [name for name in STEPS if name != "glow"]
CERTIFIED = [name for name in RESIDUAL if not name.startswith("faithful:")]


def _step(name: str, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    family, _, variant = name.partition(":")
    if family == "glow":
        step = glow_step(SHAPE[0], hidden=8)
    elif family == "conv":
        branch = ConvResidualBranch(SHAPE[0], hidden=8, coeff=0.9, activation=variant)
        step = ResidualTransform(branch, ExactLogDet(), input_shape=SHAPE)
    else:
        certified = family == "attention"
        step = invertible_attention(
            variant, SHAPE[0], certified=certified, estimator=ExactLogDet(), input_shape=SHAPE
        )
    return step.to(dtype).eval()


def _inputs(n: int = 2, scale: float = 1.0, dtype: torch.dtype = torch.float64):
    return scale * torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _ready(step):
    """The step after a forward pass on data (Glow's ActNorm initialises on its first)."""
    with torch.no_grad():
        step(_inputs(8))
    return step


@pytest.mark.parametrize("name", RESIDUAL)
def test_log_det_matches_the_jacrev_jacobian(name):
    """With the weights inflated (rescalings active), so that the log-dets are not small."""
    step = _step(name)
    stress_weights(step.branch, 5.0)
    x = _inputs()
    _, logdet = step(x)
    jac = dense_jacobian_of(step.branch, x)
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype)
    expected = torch.stack([torch.linalg.slogdet(eye + j).logabsdet for j in jac])
    torch.testing.assert_close(logdet.detach(), expected, atol=1e-9, rtol=0)


def test_glow_log_det_matches_the_jacobian():
    step = _ready(_step("glow"))
    x = _inputs()
    _, logdet = step(x)
    jac = dense_jacobian_of(lambda v: step(v)[0], x)
    torch.testing.assert_close(
        logdet.detach(), torch.linalg.slogdet(jac).logabsdet, atol=1e-9, rtol=0
    )


@pytest.mark.parametrize("name", [*CERTIFIED, "glow"])
def test_inverse_gives_the_input_back(name, device):
    step = _ready(_step(name)).to(device)
    x = _inputs().to(device)
    y, logdet = step(x)
    x_back, inverse_logdet = step.inverse(y.detach())
    assert float((x_back - x).detach().abs().max()) < 1e-9
    torch.testing.assert_close(inverse_logdet, -logdet.detach(), atol=1e-8, rtol=0)


def _norm(jac: torch.Tensor, which: str) -> float:
    if which == "inf":
        return float(jac.abs().sum(-1).max())
    return float(torch.linalg.matrix_norm(jac, 2).max())


@pytest.mark.parametrize("name", CERTIFIED)
def test_the_certificate_holds_with_every_rescaling_active(name):
    step = _step(name)
    stress_weights(step.branch, 5.0)
    branch = step.branch
    bound = step.lipschitz_bound()
    assert bound is not None and 0 < bound <= 0.9 + 1e-9
    norm = branch.certified_norm
    reached = max(_norm(dense_jacobian_of(branch, _inputs(3, s)), norm) for s in (0.1, 1, 10))
    if norm == "inf":
        reached = max(reached, worst_case_norm(branch, _inputs(2), steps=15))
    assert reached <= bound * (1 + 1e-6), (reached, bound)


@pytest.mark.parametrize("name", STEPS)
def test_pickling_keeps_the_outputs(name):
    step = _ready(_step(name))
    buffer = io.BytesIO()
    pickle.dump(step, buffer)
    copy = pickle.loads(buffer.getvalue())
    x = _inputs()
    (y, logdet), (y_copy, logdet_copy) = step(x), copy(x)
    torch.testing.assert_close(y_copy, y, rtol=0, atol=0)
    torch.testing.assert_close(logdet_copy, logdet, rtol=0, atol=0)


@pytest.mark.parametrize("name", STEPS)
def test_float32_agrees_with_float64(name):
    step64 = _ready(_step(name))
    step32 = _step(name, torch.float32)
    step32.load_state_dict({k: v.float() for k, v in step64.state_dict().items()})
    x = _inputs()
    y64, logdet64 = step64(x)
    y32, logdet32 = step32(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logdet32.double(), logdet64, rtol=1e-3, atol=1e-3)
