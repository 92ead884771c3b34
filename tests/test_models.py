import io
import math
import pickle

import pytest
import torch
from conftest import count_host_reads, dense_jacobian_of, train_one_step
from nflows.distributions import Distribution, StandardNormal
from nflows.transforms import IdentityTransform, PointwiseAffineTransform

from flowattn.errors import ConfigError
from flowattn.evaluation import estimator_description, using_estimator
from flowattn.logdet import LogDetEstimator
from flowattn.models import PRESETS, DensityModel, ModelConfig, build_model
from flowattn.transforms import KINDS

VARIANTS = [
    ("iresnet", None),
    *[("iresnet-attn", kind) for kind in KINDS],
    ("resflow", None),
    ("glow", None),
    ("glow-attn", None),
]
CERTIFIED = VARIANTS  # the paper's kinds are certified by default
SHAPE = (3, 8, 8)


def _model(preset, attention, **config):
    options = {"attention": attention} if attention else {}
    return build_model(preset, image_shape=SHAPE, blocks=1, hidden=8, **options, **config)


def _images(n=4, shape=SHAPE):
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8)


class _OutputsOnly(LogDetEstimator):
    """Computes g(x) and a zero log-det (for Jacobians of the outputs alone)."""

    def forward(self, branch, x):
        return branch(x), x.new_zeros(x.shape[0])


class _UnitCube(Distribution):
    """Uniform density on [0, 1)^D: log-density 0 inside."""

    def _log_prob(self, inputs, context):
        inside = ((inputs >= 0) & (inputs < 1)).flatten(1).all(dim=1)
        return torch.where(inside, 0.0, -math.inf).to(inputs.dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_uniform_density_is_exactly_8_bits(dtype, tol):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = DensityModel(IdentityTransform(), IdentityTransform(), SHAPE, _UnitCube())
        result = model.bits_per_dim(_images(10), repeats=3)
    finally:
        torch.set_default_dtype(previous)
    assert abs(result.mean - 8.0) < tol
    assert result.stderr < tol
    assert result.estimator == "exact (no residual steps)"


def test_factorised_gaussian_matches_closed_form():
    torch.set_default_dtype(torch.float64)
    try:
        mu = torch.rand(SHAPE) * 0.5 + 0.25
        sigma = torch.rand(SHAPE) * 0.1 + 0.05
        body = PointwiseAffineTransform(shift=-mu / sigma, scale=1 / sigma)
        model = DensityModel(IdentityTransform(), body, SHAPE, StandardNormal(list(SHAPE)))
        x = (torch.randn(32, *SHAPE) * sigma * 256 + mu * 256).round().clamp(0, 255)
        x = x.to(torch.uint8)
        result = model.bits_per_dim(x, repeats=100)
        # E_u[log N((x + u)/256; mu, sigma)] in closed form, with c the bin centre:
        # E[(y - mu)^2] = (c - mu)^2 + 1/(12 * 256^2)
        c = (x.double() + 0.5) / 256
        second_moment = (c - mu) ** 2 + 1 / (12 * 256**2)
        log_density = -0.5 * torch.log(2 * math.pi * sigma**2) - second_moment / (2 * sigma**2)
        d = math.prod(SHAPE)
        expected = (-(log_density.flatten(1).sum(1) - d * math.log(256)) / (d * math.log(2))).mean()
    finally:
        torch.set_default_dtype(torch.float32)
    assert abs(result.mean - float(expected)) < 1e-3
    assert abs(result.mean - float(expected)) < 4 * result.stderr + 1e-4


@pytest.mark.parametrize("preset, attention", [("iresnet-attn", "l2"), ("glow-attn", None)])
def test_model_logdet_equals_dense_jacobian(preset, attention, device):
    """Whole model in float64 with exact log-dets against jacrev of data -> latent."""
    options = {"attention": attention} if attention else {}
    model = build_model(preset, image_shape=(1, 8, 8), blocks=1, hidden=4, **options)
    train_one_step(model.to(device=device, dtype=torch.float64))
    y = torch.rand(2, 1, 8, 8, dtype=torch.float64, device=device) * 0.9 + 0.05
    with using_estimator(model, "exact"):
        z, logabsdet = model._transform(y)
        log_prob = model.log_prob(y)
    with using_estimator(model, _OutputsOnly()):  # the Jacobian needs outputs only
        jac = dense_jacobian_of(lambda t: model._transform(t)[0], y)
    assert torch.allclose(logabsdet, torch.linalg.slogdet(jac).logabsdet, atol=1e-8)
    base = StandardNormal([64]).to(device=device, dtype=torch.float64).log_prob(z)
    assert torch.allclose(log_prob, base + logabsdet, atol=1e-10)


@pytest.mark.parametrize("preset, attention", VARIANTS)
def test_log_prob_finite_and_gradients_reach_every_parameter(preset, attention):
    model = _model(preset, attention)
    y, _ = model.dequantize(_images())
    log_prob = model.log_prob(y)
    assert log_prob.shape == (4,) and torch.isfinite(log_prob).all()
    log_prob.mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("preset, attention", CERTIFIED)
def test_reconstruct_certified_presets(preset, attention, device):
    model = train_one_step(_model(preset, attention).to(device))
    y, _ = model.dequantize(_images(6).to(device))
    assert (model.reconstruct(y) - y).abs().max() < 1e-4
    x = _images(6).to(device)
    assert torch.equal(model.reconstruct(x), x)
    bounds = model.lipschitz_bounds()
    residual = not preset.startswith("glow")
    assert len(bounds) == (2 + (attention is not None)) * residual  # 2 scales x 1 block
    assert all(b is not None and b < 1 for b in bounds.values())


# The uncertified dot and concat kinds need not converge: warnings expected there.
@pytest.mark.filterwarnings("ignore::flowattn.transforms.ConvergenceWarning")
@pytest.mark.parametrize("preset, attention", VARIANTS)
def test_sample_shapes_and_ranges(preset, attention, device):
    model = train_one_step(_model(preset, attention).to(device))
    samples = model.sample(5, temperature=0.7)
    assert samples.shape == (5, *SHAPE) and samples.dtype == torch.float32
    assert samples.device.type == device.type
    assert samples.min() >= 0 and samples.max() <= 1
    as_uint8 = model.sample(3, as_uint8=True, batch_size=2)
    assert as_uint8.shape == (3, *SHAPE) and as_uint8.dtype == torch.uint8
    cold = model.sample(2, temperature=0.0)
    assert torch.allclose(cold[0], cold[1])
    z = model.encode(model.dequantize(_images(2).to(device))[0])
    assert z.shape == (2, math.prod(SHAPE))


@pytest.mark.parametrize("preset, attention", VARIANTS)
def test_state_dict_and_pickle_round_trips(preset, attention):
    model = train_one_step(_model(preset, attention))
    y, _ = model.dequantize(_images())

    def log_prob(m):
        torch.manual_seed(1)  # same probes and roulette draws
        with torch.no_grad():
            return m.log_prob(y)

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = build_model(model.config)
    fresh.load_state_dict(torch.load(buffer))
    fresh.eval()
    assert torch.equal(log_prob(fresh), log_prob(model))
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(log_prob(clone), log_prob(model))
    # ActNorm's initialised flag is state: a reloaded model does not re-initialise
    fresh.train()
    before = [p.clone() for p in fresh.parameters()]
    fresh.log_prob(y)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters(), strict=True))


def test_bad_inputs_raise_clear_errors():
    model = _model("glow", None)
    with pytest.raises(ValueError, match=r"expects images \(B, 3, 8, 8\)"):
        model.bits_per_dim(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        model.bits_per_dim(torch.zeros(2, *SHAPE))
    with pytest.raises(TypeError, match="float images"):
        model.log_prob(torch.zeros(2, *SHAPE, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.log_prob(torch.full((2, *SHAPE), 3.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.log_prob(torch.full((2, *SHAPE), -0.5))
    # the range check reads one value back to the host (each read stalls an accelerator)
    assert count_host_reads(lambda: model.check_images(torch.rand(2, *SHAPE), uint8=False)) == 1
    with pytest.raises(ValueError, match="latents"):
        model.decode(torch.zeros(2, 5))


def test_config_errors_suggest_and_explain(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'iresnet-attn'"):
        build_model("iresnet_attn")
    with pytest.raises(ValueError, match="did you mean 'hidden'"):
        build_model("iresnet", hiden=8)
    with pytest.raises(ValueError, match="divisible by 16"):
        build_model("glow", image_shape=(1, 8, 8), scales=4)
    with pytest.raises(ValueError, match="ordinary attention"):
        build_model("glow-attn", attention="l2")
    with pytest.raises(ValueError, match="unknown attention kind .sagan.; valid: gaussian"):
        build_model("iresnet-attn", attention="sagan")
    with pytest.raises(ValueError, match="size"):
        build_model("glow", size="huge")


def test_config_file_and_sizes(tmp_path):
    path = tmp_path / "model.toml"
    path.write_text(
        '[model]\npreset = "iresnet-attn"\nimage_shape = [1, 8, 8]\nattention = "l2"\n'
        "blocks = 1\nhidden = 4\n"
    )
    model = build_model(path, scales=1)
    assert model.config.attention == "l2" and model.config.scales == 1
    assert model.config.image_shape == (1, 8, 8)
    paper = ModelConfig.from_dict({"preset": "iresnet", "size": "paper"})
    assert (paper.scales, paper.blocks, paper.hidden) == (3, 16, 512)
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        build_model(bad)
    with pytest.raises(FileNotFoundError, match="no such config"):
        build_model(tmp_path / "missing.toml")
    assert set(PRESETS) == {"iresnet", "iresnet-attn", "resflow", "glow", "glow-attn"}


def test_attention_certified_switch_reaches_the_model():
    certified = _model("iresnet-attn", "dot")
    faithful = _model("iresnet-attn", "dot", attention_certified=False)
    bounds = [b for name, b in certified.lipschitz_bounds().items() if "Attention" in name]
    assert len(bounds) == 1 and bounds[0] <= 0.9 * (1 + 1e-9)
    assert [b for n, b in faithful.lipschitz_bounds().items() if "Attention" in n] == [None]
    assert "power series" in estimator_description(faithful)  # the faithful kind's series
    with pytest.raises(ValueError, match="'attention_certified' must be of type bool, got 'no'"):
        _model("iresnet-attn", "dot", attention_certified="no")


@pytest.mark.parametrize(
    ("estimator", "options", "recorded"),
    [
        ("series", {}, {"gradient": "neumann"}),
        ("series", {"gradient": "backprop"}, {"gradient": "backprop"}),
        ("roulette", {"memory_efficient": True}, {"memory_efficient": True, "gradient": "neumann"}),
        ("exact", {}, {}),
    ],
)
def test_the_resolved_config_records_the_log_det_gradient(estimator, options, recorded):
    """The series estimators' gradient is written into the resolved config (so a saved
    config keeps it if the default changes), and the built estimator uses it."""
    config = ModelConfig.from_dict(
        {"preset": "iresnet", "estimator": estimator, "estimator_options": options}
    )
    assert config.estimator_options == recorded
    model = build_model(config)
    step = next(step for _, step in model.residual_steps())
    assert getattr(step.estimator, "gradient", None) == recorded.get("gradient")


def _assert_trained_exact_logdet_is_dense(model, device):
    """After one training step in float64, the model's exact log-det equals the slogdet
    of the dense Jacobian of data -> latent."""
    train_one_step(model.to(device=device, dtype=torch.float64))
    y = torch.rand(2, 1, 8, 8, dtype=torch.float64, device=device) * 0.9 + 0.05
    with using_estimator(model, "exact"):
        _, logabsdet = model._transform(y)
    with using_estimator(model, _OutputsOnly()):
        jac = dense_jacobian_of(lambda t: model._transform(t)[0], y)
    torch.testing.assert_close(logabsdet, torch.linalg.slogdet(jac).logabsdet, atol=1e-8, rtol=0)


@pytest.mark.parametrize("extra, residuals", [("actnorm", 0), ("conv", 1)])
def test_extra_step_controls_add_one_step_where_attention_goes(extra, residuals, device):
    """``extra_step`` adds, at the end of the first scale, the attention step's ActNorm
    (and a convolutional residual block for ``conv``): the flow has the same steps as
    ``iresnet-attn`` there, and its exact log-det is that of the dense Jacobian."""
    plain = build_model("iresnet", image_shape=(1, 8, 8), blocks=1, hidden=4)
    model = build_model("iresnet", image_shape=(1, 8, 8), blocks=1, hidden=4, extra_step=extra)
    attn = build_model("iresnet-attn", image_shape=(1, 8, 8), blocks=1, hidden=4)

    def actnorms(m):
        return sum(type(t).__name__ == "ActNorm" for t in m._transform.modules())

    assert actnorms(model) == actnorms(plain) + 1 == actnorms(attn)
    assert len(list(model.residual_steps())) == len(list(plain.residual_steps())) + residuals
    _assert_trained_exact_logdet_is_dense(model, device)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"extra_step": "mlp"}, "extra_step must be one of actnorm, conv"),
        ({"extra_step": "conv", "attention": "l2"}, "takes attention = none"),
    ],
)
def test_extra_step_errors(options, message):
    preset = "iresnet-attn" if "attention" in options else "iresnet"
    with pytest.raises(ConfigError, match=message):
        build_model(preset, image_shape=(1, 8, 8), **options)
    with pytest.raises(ConfigError, match="for residual presets"):
        build_model("glow", image_shape=(1, 8, 8), extra_step="actnorm")


@pytest.mark.parametrize("preset, extra", [("iresnet-attn", None), ("iresnet", "conv")])
def test_attention_scale_moves_the_step_to_fewer_tokens(preset, extra, device):
    """``attention_scale=1`` puts the attention step (or the control) at the end of the
    second scale: its inputs have 2x the channels and 1/4 of the tokens, the model's
    log-det is still that of its dense Jacobian, and decoding inverts encoding."""
    options = {"image_shape": (1, 8, 8), "blocks": 1, "hidden": 4, "scales": 2}
    if extra is None:
        options["attention"] = "dot"
    else:
        options["extra_step"] = extra
    model = build_model(preset, attention_scale=1, **options)
    names = [name for name, _ in model.residual_steps()]
    assert names[0].startswith("scale0.step2") and names[-1].startswith("scale1.step4")
    # scale 1: squeezed twice, half the channels factored out after scale 0
    last = list(model.residual_steps())[-1][1]
    assert last.input_shape == (8, 2, 2)
    _assert_trained_exact_logdet_is_dense(model, device)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64, device=device)
    torch.testing.assert_close(model.reconstruct(x), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "scale, message",
    [(-1, r"attention_scale must be an integer in \[0, 1\]"),
     (2, r"attention_scale must be an integer in \[0, 1\]"),
     (1.0, r"'attention_scale': must be int or none, got 1.0$"),
     (True, r"'attention_scale': must be int or none, got True$")],
)  # fmt: skip
def test_attention_scale_errors(scale, message):
    with pytest.raises(ConfigError, match=message):
        build_model("iresnet-attn", image_shape=(1, 8, 8), scales=2, attention_scale=scale)


@pytest.mark.parametrize(
    "shape, scales, expected",
    [((1, 8, 8), 2, 0), ((3, 32, 32), 2, 1), ((3, 64, 64), 3, 2), ((3, 64, 64), 2, 1)],
)
def test_the_default_attention_scale_is_the_first_with_at_most_64_tokens(shape, scales, expected):
    """Residual presets put the step at the first scale where it sees <= 64 tokens (the
    last one when none does: 64x64 images with 2 scales give 256 tokens at scale 1);
    Glow presets keep scale 0; a given scale is kept."""
    _, h, w = shape
    for options in ({"preset": "iresnet-attn"}, {"preset": "iresnet", "extra_step": "actnorm"}):
        config = ModelConfig.from_dict({**options, "image_shape": shape, "scales": scales})
        assert config.attention_scale == expected
        tokens = (h >> (expected + 1)) * (w >> (expected + 1))
        assert tokens <= 64 or expected == scales - 1
    glow = ModelConfig.from_dict({"preset": "glow-attn", "image_shape": shape, "scales": scales})
    assert glow.attention_scale == 0
    given = ModelConfig.from_dict({"image_shape": shape, "scales": scales, "attention_scale": 0})
    assert given.attention_scale == 0


@pytest.mark.parametrize("estimator", ["roulette", "series"])
def test_draws_come_from_the_given_generator_and_leave_the_global_one_alone(estimator):
    from flowattn.models import draw_from

    model = build_model(
        "iresnet-attn", image_shape=(1, 8, 8), scales=1, blocks=1, hidden=4, estimator=estimator
    )
    model.train()  # per-batch draws, dequantisation noise
    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    dequantized = model.check_images(x.float() / 255)
    model.log_prob(dequantized)  # initialises the ActNorms from the data
    assert draw_from(model, torch.Generator().manual_seed(5)) >= 3  # steps + dequantisation
    before = torch.get_rng_state()
    first = model.bits_per_dim(x, estimator="roulette")
    again = model.log_prob(dequantized)
    assert torch.equal(torch.get_rng_state(), before)  # nothing drawn from the global one
    draw_from(model, torch.Generator().manual_seed(5))
    assert model.bits_per_dim(x, estimator="roulette").values.equal(first.values)
    torch.testing.assert_close(model.log_prob(dequantized), again, rtol=0, atol=0)
    draw_from(model, torch.Generator().manual_seed(6))
    assert not torch.equal(model.log_prob(dequantized), again)  # the draws do change it
    assert draw_from(model, None) >= 3
