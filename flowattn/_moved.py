"""Deprecation aliases for modules that moved, kept for one release."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

REMOVED_IN = "0.3"


def moved_names(old: str, *new: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the old module ``old``: every name is looked up in the
    modules ``new`` (in order) and returned with a :class:`DeprecationWarning` that says
    where it lives now."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for target in new:
            module = importlib.import_module(target)
            if hasattr(module, name):
                warnings.warn(
                    f"{old}.{name} moved to {target}.{name}; the old path is removed in "
                    f"flowattn {REMOVED_IN}",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__
