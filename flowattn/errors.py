"""The error a user can fix by changing a setting.

:class:`ConfigError` is raised where a config key, model option or command-line value is
checked; the ``flowattn`` command prints it as one line and exits with status 2. Other
``ValueError``\\ s are programming errors and keep their tracebacks.
"""

from __future__ import annotations

__all__ = ["ConfigError", "first_line"]


class ConfigError(ValueError):
    """A setting (config key, model option, flag value) is invalid; the message names it."""


def first_line(error: BaseException, default: str | None = None) -> str:
    """An exception's message as one line: its first line, or ``default`` (the type's
    name if None) when it has no message."""
    text = str(error)
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if default is None else default
