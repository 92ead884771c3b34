"""flowattn's errors: one family, :class:`FlowattnError`.

:class:`UserError` and its subclasses are what a user fixes by changing a setting, a
path or a file (a config key, model option or flag value; a dataset; a checkpoint; a
run directory another process holds); the ``flowattn`` command prints them as one line
and exits with status 2. The others report a numerical failure (a diverged run, an
inverse that did not converge, non-finite densities). Each also derives from the
built-in exception it refines (``ValueError``, ``FileNotFoundError``, ``RuntimeError``),
so code that catches those keeps working. Other ``ValueError``\\ s are programming
errors and keep their tracebacks.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConvergenceError",
    "DataError",
    "DatasetNotFoundError",
    "FlowattnError",
    "NonFiniteDensityError",
    "NonFiniteLossError",
    "RunLockedError",
    "UserError",
    "first_line",
]


class FlowattnError(Exception):
    """The base of every error flowattn raises on purpose."""


class UserError(FlowattnError):
    """Something the user fixes (a setting, a path, a file): printed as one line."""


class ConfigError(UserError, ValueError):
    """A setting (config key, model option, flag value) is invalid; the message names it."""


class DataError(UserError, ValueError):
    """The dataset's files exist but are corrupted, of the wrong shape or dtype."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset's files are not where they were looked for."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, unreadable, unsafe or not a flowattn checkpoint."""


class RunLockedError(UserError, ValueError):
    """Another live process holds the run directory's lock."""


class NonFiniteLossError(FlowattnError, RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradient."""


class NonFiniteDensityError(FlowattnError, ValueError):
    """A model's log-density is infinite or NaN on some images (it diverged, or an
    uncertified step is not invertible there)."""


class ConvergenceError(FlowattnError, RuntimeError):
    """The fixed-point inverse did not reach its tolerance (strict mode)."""


def first_line(error: BaseException, default: str | None = None) -> str:
    """An exception's message as one line: its first line, or ``default`` (the type's
    name if None) when it has no message."""
    text = str(error)
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if default is None else default
