import pickle

import pytest
import torch

from flowattn.errors import ConfigError
from flowattn.models import ModelConfig
from flowattn.nn.attention_kinds import (
    KINDS,
    PAPER_KINDS,
    REGISTRY,
    VARIANTS,
    attention_kind,
    parse_variant,
)
from flowattn.segmentation.network import slot_names


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_builds_a_branch_that_pickles_and_keeps_its_shape(variant):
    kind, certified = parse_variant(variant)
    branch = kind.build(8, certified=certified)
    x = torch.randn(2, 8, 4, 4)
    restored = pickle.loads(pickle.dumps(branch))
    torch.testing.assert_close(restored(x), branch(x))
    assert branch(x).shape == x.shape
    bound = branch.lipschitz_bound((8, 4, 4))
    assert (bound is not None) == certified
    if certified:
        assert bound <= 0.9 * (1 + 1e-6)


def test_variants_are_the_kinds_then_the_faithful_forms_of_the_papers_kinds():
    assert set(KINDS) == set(REGISTRY) and set(PAPER_KINDS) < set(KINDS)
    assert VARIANTS == (*KINDS, *(f"faithful:{k}" for k in PAPER_KINDS))
    assert [parse_variant(v)[0].name for v in VARIANTS[len(KINDS) :]] == list(PAPER_KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_every_registered_kind_reaches_the_models_the_cli_and_the_segmentation_slot(kind):
    config = ModelConfig.from_dict({"preset": "iresnet-attn", "attention": kind})
    assert config.attention == kind
    assert f"invertible:{kind}" in slot_names()
    assert (f"faithful:{kind}" in slot_names()) == (kind in PAPER_KINDS)


def test_unknown_names_and_missing_forms_raise_config_errors_that_suggest():
    with pytest.raises(ConfigError, match="did you mean 'concat'"):
        attention_kind("concatt")
    with pytest.raises(ConfigError, match="no faithful"):
        parse_variant("faithful:external")
    with pytest.raises(ConfigError, match="'l2' has no faithful"):
        ModelConfig.from_dict(
            {"preset": "iresnet-attn", "attention": "l2", "attention_certified": False}
        )


def test_options_are_the_branch_classes_own_and_unknown_ones_are_named():
    assert attention_kind("external").option_names() == {"slots", "hidden", "similarity_init"}
    assert attention_kind("dot").option_names(certified=False) == {"reduction"}
    assert attention_kind("external").build(8, slots=4).slots == 4
    with pytest.raises(ValueError, match="unknown option.*slots.*valid: reduction, similarity"):
        attention_kind("dot").build(8, slots=4)
