"""flowattn.errors: every error the package raises on purpose is one family."""

import importlib
import inspect
import pkgutil

import pytest

import flowattn
from flowattn import errors

ERRORS = [
    getattr(errors, name) for name in errors.__all__ if isinstance(getattr(errors, name), type)
]


def _package_modules():
    for info in pkgutil.walk_packages(flowattn.__path__, "flowattn."):
        if info.name.endswith("__main__"):
            continue
        yield importlib.import_module(info.name)


def test_every_exception_class_in_the_package_is_of_the_family():
    """Any exception class a module defines (warnings and the SIGTERM interrupt aside)
    derives from FlowattnError, so one ``except FlowattnError`` catches them all."""
    defined = []
    for module in _package_modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or not issubclass(cls, BaseException):
                continue
            if issubclass(cls, (Warning, KeyboardInterrupt)):
                continue
            defined.append(cls)
            assert issubclass(cls, errors.FlowattnError), cls
    assert len(defined) >= len(ERRORS) - 1  # the errors module's own, and the CLI's


@pytest.mark.parametrize(
    "error, builtin, user",
    [
        (errors.ConfigError, ValueError, True),
        (errors.DataError, ValueError, True),
        (errors.DatasetNotFoundError, FileNotFoundError, True),
        (errors.CheckpointError, ValueError, True),
        (errors.RunLockedError, ValueError, True),
        (errors.NonFiniteLossError, RuntimeError, False),
        (errors.NonFiniteDensityError, ValueError, False),
        (errors.ConvergenceError, RuntimeError, False),
    ],
)
def test_each_error_refines_its_builtin_and_says_whether_the_user_fixes_it(error, builtin, user):
    assert issubclass(error, builtin) and issubclass(error, errors.FlowattnError)
    assert issubclass(error, errors.UserError) is user


def test_the_command_prints_a_user_error_as_one_line(capsys, tmp_path):
    from flowattn.cli import main

    missing = tmp_path / "no-such-run"
    assert main(["eval", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowattn: error:") and "\n" not in err
