import math

import pytest
import torch
from conftest import stress_weights

from flowattn import invertible_attention
from flowattn.capacity import (
    LOW_SHARE,
    BudgetUse,
    budget_use,
    local_jacobian_norm,
    worst_case_norm,
)
from flowattn.models import build_model
from flowattn.nn.conv_branch import ConvResidualBranch
from flowattn.transforms import KINDS


def _branch(variant: str) -> torch.nn.Module:
    if variant == "conv":
        return ConvResidualBranch(3, hidden=6, coeff=0.9).double()
    return invertible_attention(variant, 3).branch.double()


def _reference(branch: torch.nn.Module, x: torch.Tensor, ord: float) -> torch.Tensor:
    """Each sample's Jacobian by torch.func.jacrev in float64, and its induced norm."""
    norms = []
    for sample in x:
        jac = torch.func.jacrev(lambda v: branch(v[None])[0])(sample)
        jac = jac.reshape(sample.numel(), sample.numel())
        if ord == math.inf:
            norms.append(jac.abs().sum(dim=1).max())
        else:
            norms.append(torch.linalg.matrix_norm(jac, 2))
    return torch.stack(norms)


@pytest.mark.parametrize("variant", [*KINDS, "conv"])
@pytest.mark.parametrize("ord", [math.inf, 2])
def test_dense_local_norms_are_the_jacobians_norms(variant, ord):
    torch.manual_seed(0)
    branch = _branch(variant)
    stress_weights(branch, 2.0)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    norms, exact = local_jacobian_norm(branch, x, ord)
    assert exact
    torch.testing.assert_close(norms, _reference(branch, x, ord), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["dot", "l2", "conv"])
@pytest.mark.parametrize("ord", [math.inf, 2])
def test_estimates_above_the_dense_size_are_lower_bounds(variant, ord):
    """Sampled rows (l-inf) and power iteration (l2) never exceed the exact norm; with
    every row sampled the l-inf estimate is exact, and power iteration comes close."""
    torch.manual_seed(1)
    branch = _branch(variant)
    stress_weights(branch, 2.0)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    exact = _reference(branch, x, ord)
    generator = torch.Generator().manual_seed(0)
    few, is_exact = local_jacobian_norm(branch, x, ord, max_dense=0, n_rows=5, generator=generator)
    assert not is_exact and (few <= exact * (1 + 1e-12)).all()
    every, _ = local_jacobian_norm(branch, x, ord, max_dense=0, n_rows=27, n_iter=200)
    torch.testing.assert_close(every, exact, rtol=1e-6, atol=1e-12)


def test_every_step_stays_within_its_certificate_and_names_it():
    """At images, each residual step's local norm (in its certificate's norm) is at most
    its certified bound; the shares are local / bound, in the flow's order."""
    torch.manual_seed(0)
    model = build_model("iresnet-attn", image_shape=(1, 8, 8), size="tiny").double()
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    uses = budget_use(model, x)
    assert [u.name for u in uses] == [name for name, _ in model.residual_steps()]
    assert any(u.attention for u in uses) and any(not u.attention for u in uses)
    for use in uses:
        assert use.exact and use.bound is not None
        assert use.local <= use.bound * (1 + 1e-9)
        assert use.share == pytest.approx(use.local / use.bound)
        assert use.norm == ("inf" if use.attention else "2")


def test_a_low_share_is_flagged_for_attention_steps_only():
    attention = BudgetUse("a", True, 0.9, "inf", 0.9 * LOW_SHARE / 2, 0.01, True)
    conv = BudgetUse("c", False, 0.9, "2", 0.9 * LOW_SHARE / 2, 0.01, True)
    used = BudgetUse("u", True, 0.9, "inf", 0.5, 0.4, True)
    uncertified = BudgetUse("f", True, None, "2", 1e-6, 1e-6, True)
    assert attention.low and not conv.low and not used.low and not uncertified.low
    assert uncertified.share is None
    with pytest.raises(ValueError, match="ord must be inf or 2"):
        local_jacobian_norm(_branch("dot"), torch.randn(1, 3, 2, 2, dtype=torch.float64), 1)


def test_worst_case_norm_finds_a_linear_maps_norm_and_stays_below_certificates():
    """For a linear map the Jacobian is constant: the ascent returns its exact l-inf norm
    (the largest absolute row sum, computed here by hand)."""
    conv = torch.nn.Conv2d(3, 3, 1, bias=False).double()
    starts = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    expected = float(conv.weight[:, :, 0, 0].abs().sum(1).max())
    assert worst_case_norm(conv, starts, steps=3) == pytest.approx(expected, rel=1e-12)
    for kind in KINDS:
        branch = invertible_attention(kind, 4).branch.double()
        x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
        local, _ = local_jacobian_norm(branch, x)
        found = worst_case_norm(branch, x, steps=20)
        assert float(local.max()) <= found <= branch.lipschitz_bound((4, 4, 4))
