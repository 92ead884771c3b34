"""The config layer: dataclass configs from flags, TOML files and Python dicts."""

import dataclasses
from typing import Any, Literal

import pytest

from flowattn.configs import config_parser, dashed_flags, load_toml, parse_values, to_toml
from flowattn.errors import ConfigError


@dataclasses.dataclass
class Settings:
    """Settings of a test.

    Attributes:
        kind: The kind.
        steps: Steps to take.
        rate: A rate.
        names: Some names.
        table: Options.
        where: A place, or unset.
    """

    kind: Literal["a", "b"] = "a"
    steps: int = 3
    rate: float = 0.5
    names: list[str] = dataclasses.field(default_factory=lambda: ["x"])
    table: dict[str, Any] = dataclasses.field(default_factory=dict)
    where: str | None = None


def _parse(argv):
    parser = config_parser(Settings)
    args = parser.parse_args(dashed_flags(argv, Settings))
    return parse_values(Settings, {f.name: args[f.name] for f in dataclasses.fields(Settings)})


def test_flags_files_and_overrides(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('kind = "b"\nsteps = 7\nnames = ["p", "q:r"]\n[table]\nhidden = 4\n')
    assert _parse(["--config", str(path), "--steps", "9", "--table.depth", "2"]) == Settings(
        kind="b", steps=9, names=["p", "q:r"], table={"hidden": 4, "depth": 2}
    )
    # dashed flags, flow-style lists, dict keys as flags, flag=value
    assert _parse(["--names", "[u, 'v:w']", "--table.hidden", "8", "--rate=2"]) == Settings(
        names=["u", "v:w"], table={"hidden": 8}, rate=2.0
    )


@pytest.mark.parametrize(
    "values, message",
    [
        ({"kind": "c"}, "'kind': must be one of a, b, got 'c'"),
        ({"steps": "many"}, "'steps': must be a int"),
        ({"stepz": 3}, "did you mean 'steps'"),
        ({"table": 3}, "'table'"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        parse_values(Settings, values)


def test_toml_round_trip_and_resumed_history():
    settings = Settings(kind="b", table={"hidden": 4}, names=["p"])
    text = to_toml(settings)
    assert "where" not in text  # unset values are left out
    assert parse_values(Settings, load_toml(text)) == settings
    history = "\n[[resumed]]\nstep = 3\nchanges = { steps = 9, table = { depth = 1 } }\n"
    assert load_toml(text + history) == {
        "kind": "b", "steps": 9, "rate": 0.5, "names": ["p"], "table": {"hidden": 4, "depth": 1},
    }  # fmt: skip
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml("steps = = 3")


def test_help_shows_the_docstrings():
    text = config_parser(Settings).format_help()
    assert "Steps to take." in text and "--kind {a,b}" in text


def test_importing_flowattn_leaves_jsonargparse_toml_mode_alone():
    """flowattn registers its own parser mode, by its own name, when it builds a parser:
    a fresh interpreter that imports flowattn sees jsonargparse's loaders unchanged."""
    import subprocess
    import sys

    code = (
        "from jsonargparse import _loaders_dumpers as m; before = dict(m.loaders);"
        "import flowattn, flowattn.cli, flowattn.configs;"
        "assert dict(m.loaders) == before, set(m.loaders) ^ set(before);"
        "flowattn.configs.config_parser(flowattn.ModelConfig);"
        "assert m.loaders['toml'] is before.get('toml'); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_checked_types_holds_python_values_to_their_fields_types():
    from flowattn.configs import checked_types

    assert checked_types(Settings(rate=2)).rate == 2.0  # an int is widened to a float
    with pytest.raises(ConfigError, match="'steps' must be of type int, got '5'"):
        checked_types(Settings(steps="5"))  # a command line would read "5"; Python may not
    with pytest.raises(ConfigError, match="'kind': must be one of a, b, got 'c'"):
        checked_types(Settings(kind="c"))
    with pytest.raises(ConfigError, match="'where': must be str or none, got 3"):
        checked_types(Settings(where=3))
