"""Checking given names (config keys, options) against the valid ones.

An unknown name raises a :class:`~flowattn.errors.ConfigError` that suggests the closest
valid one, so that a
typo in a config file or a keyword says what was meant.
"""

from __future__ import annotations

__all__ = ["check_names", "closest"]

import difflib
from collections.abc import Iterable, Sequence

from .errors import ConfigError


def check_names(names: Iterable[str], valid: Sequence[str], what: str) -> None:
    """Raises a :class:`~flowattn.errors.ConfigError` for the first of ``names`` not in ``valid``.

    Arguments:
        names: The names given.
        valid: The names allowed.
        what: What a name is, for the message (``"config key"``, ``"model option"``).

    Examples:
        >>> check_names(["steps"], ["steps", "lr"], "config key")
        >>> check_names(["stepz"], ["steps", "lr"], "config key")
        Traceback (most recent call last):
        ...
        flowattn.errors.ConfigError: unknown config key 'stepz'; did you mean 'steps'?
    """
    for name in names:
        if name not in valid:
            close = closest(name, valid)
            hint = f"; did you mean {close!r}?" if close else ""
            raise ConfigError(f"unknown {what} {name!r}{hint}")


def closest(name: str, valid: Sequence[str]) -> str | None:
    """The valid name closest to ``name``, or None when none is close.

    Examples:
        >>> closest("stepz", ["steps", "lr"]), closest("xyz", ["steps", "lr"])
        ('steps', None)
    """
    close = difflib.get_close_matches(name, valid, n=1)
    return close[0] if close else None
