"""Evaluation (flowattn.evaluation): bits/dim figures, their estimators and the
guarantees the estimators state, checked against the exact log-det."""

import math

import pytest
import torch
from conftest import dense_jacobian_of, train_one_step

from flowattn import evaluation
from flowattn.evaluation import default_estimator, estimator_description
from flowattn.logdet import series_truncation_bound
from flowattn.metrics import paired_difference
from flowattn.models import build_model

SHAPE = (3, 8, 8)


def _model(preset, attention=None, **config):
    options = {"attention": attention} if attention else {}
    return build_model(preset, image_shape=SHAPE, blocks=1, hidden=8, **options, **config)


def _images(n=4, shape=SHAPE):
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8)


def test_bits_per_dim_names_estimator_and_override():
    model = train_one_step(_model("iresnet", None))
    x = _images(8)
    default = model.bits_per_dim(x)  # 192 values per image: exact by default
    assert default.estimator == "exact (dense Jacobian)" and default.unbiased
    assert default.images == 8 and default.stderr > 0 and default.seconds > 0
    exact = model.bits_per_dim(x, estimator="exact")
    assert exact.mean == pytest.approx(default.mean, abs=1e-9)  # same seed, same noise
    roulette = model.bits_per_dim(x, estimator="roulette", n_terms=3, repeats=2)
    assert "unbiased" in roulette.estimator and roulette.repeats == 2
    assert roulette.error_bar_certified and roulette.bias_bound == 0
    series = model.bits_per_dim(x, estimator="series")
    assert "power series" in series.estimator and series.bias_bound > 0
    assert "BIASED" in str(series) and f"{series.bias_bound:.4g}" in str(series)
    assert "Russian roulette" in estimator_description(model)  # restored afterwards
    assert model.training is False


def test_bits_per_dim_defaults_to_unbiased_roulette_for_large_images():
    model = build_model("iresnet", image_shape=(3, 16, 16), blocks=1, hidden=8)
    assert default_estimator(model) == "roulette"
    result = model.bits_per_dim(_images(4, (3, 16, 16)))
    assert "per-sample draws" in result.estimator and result.unbiased
    assert result.error_bar_certified
    glow = build_model("glow", image_shape=(3, 16, 16), blocks=1, hidden=8)
    assert default_estimator(glow) == "exact"


def test_dequantisation_noise_depends_on_seed_only():
    model = train_one_step(_model("glow", None))
    x = _images(10)
    a = model.bits_per_dim(x, batch_size=3, seed=5)
    b = model.bits_per_dim(x, batch_size=10, seed=5)
    c = model.bits_per_dim(x, seed=6)
    torch.testing.assert_close(a.values, b.values)
    assert not torch.allclose(a.values, c.values)


def _model_near_its_bound():
    """An i-ResNet on 8x8 images whose conv branches sit at their bound 0.9 with
    eigenvalues near -0.9 (the regime where the truncated series is optimistic and
    training exploited it): g(x) = -0.9 ELU(x), up to small random taps."""
    torch.manual_seed(3)
    model = build_model("iresnet", image_shape=(1, 8, 8), blocks=1, hidden=8)
    model.eval()
    with torch.no_grad():
        for _, step in model.residual_steps():
            for conv, sign in zip(step.branch.convs, (1.0, 1.0, -1.0), strict=True):
                conv.weight.mul_(0.003)
                k = conv.weight.shape[-1] // 2
                n = min(conv.weight.shape[:2])
                conv.weight[:n, :n, k, k] += sign * torch.eye(n)
                conv.bias.zero_()
            conv = step.branch.convs[0]
            conv.bias.fill_(20.0)  # hidden units in ELU's linear part
            step.branch.convs[2].bias.fill_(20.0 * 0.9 ** (2 / 3))  # cancels the offset
    return model


def test_model_near_its_bound_has_negative_eigenvalues_at_radius_near_09():
    model = _model_near_its_bound()
    x = _images(2, (1, 8, 8))
    inputs = {}
    hooks = [
        step.register_forward_pre_hook(lambda m, a, name=name: inputs.setdefault(name, a[0]))
        for name, step in model.residual_steps()
    ]
    model.log_prob(model.dequantize(x)[0])
    for h in hooks:
        h.remove()
    for name, step in model.residual_steps():
        jac = dense_jacobian_of(step.branch, inputs[name].double().float())
        eig = torch.linalg.eigvals(jac.double())
        assert eig.abs().max() >= 0.85 and eig.real.min() <= -0.85, name


def test_estimates_against_exact_on_a_model_near_its_bound():
    """Default figure exact; roulette within 3 SE of exact (paired, same images and
    noise); the 5-term series optimistic and within its certified bias bound."""
    model = _model_near_its_bound()
    torch.manual_seed(0)
    x = _images(300, (1, 8, 8))
    exact = model.bits_per_dim(x, estimator="exact")
    default = model.bits_per_dim(x)
    assert default.mean == pytest.approx(exact.mean, abs=1e-9)
    roulette = model.bits_per_dim(x, estimator="roulette")
    diff = paired_difference(roulette, exact)
    assert abs(diff.mean) <= 3 * diff.stderr, diff
    series = model.bits_per_dim(x, estimator="series", n_terms=5)
    bias = paired_difference(series, exact)
    assert bias.mean < -5 * bias.stderr  # optimistic: fewer bits than the truth
    assert abs(bias.mean) <= series.bias_bound + 3 * bias.stderr


def test_series_bias_bound_is_the_sum_of_each_steps_truncation_bound():
    """The bound in bits/dim: each step's tail bound D L^k / k summed from its own
    certified L and input size, over D_image ln 2 (hand-assembled here)."""
    model = _model("iresnet-attn", "gaussian")
    by_hand = sum(
        series_truncation_bound(step.lipschitz_bound(), 4, math.prod(step.input_shape))
        for _, step in model.residual_steps()
    ) / (math.prod(SHAPE) * math.log(2))
    assert evaluation.series_bias_bound(model, 4) == pytest.approx(by_hand, rel=1e-12)
    assert "Russian roulette" in estimator_description(model)  # restored afterwards


def test_uncertified_steps_get_no_bias_bound_and_no_certified_error_bar():
    faithful = _model("iresnet-attn", "dot", attention_certified=False)
    x = _images(3)
    series = faithful.bits_per_dim(x, estimator="series", n_terms=3)
    assert series.bias_bound == math.inf and "BIASED" in str(series)
    roulette = faithful.bits_per_dim(x, estimator="roulette")
    assert roulette.bias_bound == math.inf and not roulette.error_bar_certified


def test_shared_draws_per_batch_do_not_certify_an_error_bar():
    model = _model("iresnet")
    result = model.bits_per_dim(_images(4), estimator="roulette", per_sample=False)
    assert result.bias_bound == 0 and not result.error_bar_certified


def test_unknown_estimator_names_raise_even_without_residual_steps():
    for preset in ("iresnet", "glow"):
        with pytest.raises(ValueError, match="roulette"):
            _model(preset).bits_per_dim(_images(2), estimator="rulette")
