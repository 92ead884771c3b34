"""Typed configs as dataclasses: flags, TOML files and help text from jsonargparse.

A config is a dataclass whose fields are typed (``Literal`` for enum-like options) and
documented in an ``Attributes:`` section. :func:`config_parser` turns it into a command
line: ``--config FILE.toml`` (flags after it override the file) and one flag per field
(``--batch_size 64``; dict fields also per key, ``--model.hidden 32``), with the field's
docstring, type and default as help. :func:`parse_values` checks a dict of values
(from Python or a file) against the same types, so a config is validated the same way
wherever it comes from. Type errors are :class:`~flowattn.errors.ConfigError`\\ s that
name the key.

Flags may be spelled with dashes, as the ``flowattn`` command's other flags are
(:func:`dashed_flags`: ``--batch-size`` is ``--batch_size``). A list is a flow-style list
(``--models '[a, b]'``), a key of a dict field its own flag (``--model.hidden 16``).

jsonargparse is used rather than tyro because it is built on argparse: its errors are
exceptions that the ``flowattn`` command prints as one line (tyro prints boxed
multi-line messages itself), and the same parser validates configs that do not come
from a command line (``parse_object``).
"""

from __future__ import annotations

__all__ = [
    "checked_types",
    "config_parser",
    "dashed_flags",
    "load_toml",
    "one_line",
    "parse_values",
    "to_toml",
]

import dataclasses
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonargparse
import tomli_w
from jsonargparse import ActionConfigFile, ArgumentParser

from .errors import ConfigError
from .names import check_names


def load_toml(text: str) -> dict[str, Any]:
    """The values of a TOML config, with the changes of its ``[[resumed]]`` tables (what
    each resume of a run changed) applied in order."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"not valid TOML: {error}") from None
    resumed = data.pop("resumed", [])
    for entry in resumed:
        for key, value in entry.get("changes", {}).items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                value = {**data[key], **value}  # a changed table changes only its keys
            data[key] = value
    return data


def _load_document_or_value(text: str) -> Any:
    """jsonargparse's loader in flowattn's parser mode (:data:`PARSER_MODE`): it reads
    ``--config`` files and also every flag value that is not a plain string. A TOML
    document (several lines, or ``key = value``) is read with :func:`load_toml`; a
    one-line value (``16``, ``["a", "b"]``, ``{hidden: 16}``) as YAML, jsonargparse's own
    syntax for values."""
    import yaml

    if "\n" in text.strip() or re.match(r"\s*[\w.\"'-]+\s*=", text):
        return load_toml(text)
    return yaml.safe_load(text)


def _dump(data: dict[str, Any]) -> str:
    """Values as TOML (tomli-w writes the scalar keys first, then dicts as tables), unset
    (None) values left out: :func:`to_toml`, and jsonargparse's dumper for
    ``--print_config``."""

    def drop_none(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: drop_none(v) for k, v in value.items() if v is not None}
        return value

    return tomli_w.dumps(drop_none(data))


#: flowattn's jsonargparse parser mode: ``--config`` files and ``--print_config`` in TOML.
PARSER_MODE = "flowattn_toml"


def parser_mode() -> str:
    """Registers :data:`PARSER_MODE` (its loader and dumper) with jsonargparse and returns
    it; every parser flowattn builds calls this. Under its own name, so that no other
    user of jsonargparse in the process sees its ``toml`` mode changed, and when a parser
    is built, not on import."""
    jsonargparse.set_loader(PARSER_MODE, _load_document_or_value, exceptions=(ConfigError,))
    jsonargparse.set_dumper(PARSER_MODE, _dump)
    return PARSER_MODE


def to_toml(config: Any) -> str:
    """A dataclass config as TOML: scalar keys first, dict fields as tables; None values
    (unset) are left out."""
    return _dump(dataclasses.asdict(config))


def config_parser(cls: type, **options: Any) -> ArgumentParser:
    """An argument parser for the dataclass ``cls``: ``--config FILE.toml`` and one flag
    per field. ``options`` go to jsonargparse's ``ArgumentParser`` (``prog``,
    ``description``...). It raises ``argparse.ArgumentError`` instead of exiting."""
    parser = ArgumentParser(exit_on_error=False, parser_mode=parser_mode(), **options)
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help="a TOML file of the settings below (flags after it override it)",
    )
    parser.add_class_arguments(cls, nested_key=None, as_group=False)
    return parser


def parse_values(cls: type, values: dict[str, Any], parser: ArgumentParser | None = None):
    """An instance of the dataclass ``cls`` from ``values``, type-checked as the command
    line is (unknown keys and wrong types raise a ConfigError naming the key). ``parser``:
    one from :func:`config_parser` for ``cls`` already built, to reuse."""
    fields = [f.name for f in dataclasses.fields(cls)]
    check_names(values, fields, "config key")
    parser = config_parser(cls) if parser is None else parser
    try:
        namespace = parser.parse_object(values, defaults=True)
    except jsonargparse.ArgumentError as error:
        raise ConfigError(one_line(error)) from None
    return cls(**{name: namespace[name] for name in fields})


def checked_types(config: Any) -> Any:
    """The dataclass instance ``config`` with every value type-checked as the command line
    reads it (:func:`parse_values`): the one type check of every config, whether it comes
    from flags, a file or Python. A value must already have its field's type, except that
    an int is widened where a float is asked for and a list is read as a tuple; otherwise
    a ConfigError names the key (``"5"`` is not an int here, as it is on a command line).
    """
    typed = parse_values(type(config), dataclasses.asdict(config))
    for f in dataclasses.fields(config):
        mine, read = getattr(config, f.name), getattr(typed, f.name)
        widened = isinstance(mine, int) and not isinstance(mine, bool) and isinstance(read, float)
        as_tuple = isinstance(mine, list) and isinstance(read, tuple)
        if type(mine) is not type(read) and not widened and not as_tuple:
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", f.type)
            raise ConfigError(f"config key {f.name!r} must be of type {kind}, got {mine!r}")
    return typed


def one_line(error: BaseException, valid: Sequence[str] = ()) -> str:
    """A parser error as one plain line (jsonargparse spreads type errors over several
    and names types as Python does); an unknown key of a config file gets the closest of
    ``valid`` as a suggestion."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    unknown = re.search(r"Option '([^']+)' is not accepted", text)
    if unknown and valid:
        try:
            check_names([unknown[1]], valid, "config key")
        except ConfigError as suggestion:
            return str(suggestion)
    text = re.sub(r'Parser key "([^"]+)":', r"config key '\1':", text)
    text = re.sub(
        r"Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)",
        lambda m: f"must be one of {m[1].replace(chr(39), '')}, got {m[2]!r}",
        text,
    )
    union = re.search(r"Union subtypes Subtypes: \[(.*?)\].*Given value: (.*)", text)
    if union:
        types = " or ".join(re.findall(r"<class '(\w+)'>", union[1])).replace("NoneType", "none")
        text = f"{text.partition(':')[0]}: must be {types}, got {union[2]}"
    text = re.sub(r"Expected a <class '(\w+)'>\. Got value: (.*)", r"must be a \1, got '\2'", text)
    if "must be a list, got" in text:
        text += " (a list is written [a, b])"
    return text


def dashed_flags(argv: list[str], cls: type) -> list[str]:
    """``argv`` with the flags of ``cls``'s fields spelled as the rest of the ``flowattn``
    command spells its flags, with dashes (``--batch-size``), rewritten to the field names
    the parser knows (``--batch_size``); other arguments are left as they are."""
    names = {f.name for f in dataclasses.fields(cls)}
    out: list[str] = []
    for arg in argv:
        flag, equals, value = arg.partition("=")
        name = flag[2:].replace("-", "_")
        if arg.startswith("--") and name in names:
            arg = f"--{name}{equals}{value}"
        out.append(arg)
    return out


def read_file(path: str | Path) -> dict[str, Any]:
    """The values of a TOML config file (see :func:`load_toml`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such config file: {path}") from None
    try:
        return load_toml(text)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
