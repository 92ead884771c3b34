"""The modules moved in 0.2 keep working from their old paths, with a warning."""

import importlib

import pytest

import flowattn.nn
import flowattn.transforms

MOVED = [
    ("flowattn.attention", "SelfAttention2d", "flowattn.nn.baselines"),
    ("flowattn.transforms.attention", "ExternalAttention", "flowattn.nn.lipschitz_attention"),
    ("flowattn.transforms.attention", "invertible_attention", "flowattn.transforms.attention_step"),
    ("flowattn.transforms.iresnet", "ConvResidualBranch", "flowattn.nn.conv_branch"),
    ("flowattn.transforms.coupling", "glow_step", "flowattn.transforms.glow"),
    ("flowattn.transforms.coupling", "CouplingConditioner", "flowattn.nn.coupling_nets"),
    (
        "flowattn.transforms.certified_paper_attention",
        "CertifiedPaperAttention",
        "flowattn.nn.certified_paper_attention",
    ),
]


@pytest.mark.parametrize("old, name, new", MOVED, ids=[f"{m[0]}.{m[1]}" for m in MOVED])
def test_old_paths_warn_and_give_the_same_object(old, name, new):
    with pytest.warns(DeprecationWarning, match=f"moved to {new}.{name}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = importlib.import_module("flowattn.attention").Nope


def test_package_exports_need_no_deprecated_module():
    assert flowattn.transforms.ExternalAttention is flowattn.nn.ExternalAttention
    assert flowattn.nn.ConvResidualBranch.__module__ == "flowattn.nn.conv_branch"
