"""An older flowattn, imported beside this one, for same-process comparisons.

A benchmark that compares with "the code before" must run both in one process,
interleaved: this machine's speed drifts by tens of percent over minutes, so a figure
measured at another time is not a baseline. :func:`import_baseline` copies the
``flowattn`` package of another checkout (for instance ``git worktree add /tmp/filed
8e6ace6``) to a temporary directory under another name, rewriting its absolute
``flowattn`` imports, and imports it from there.
"""

from __future__ import annotations

import atexit
import importlib
import re
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

_ABSOLUTE_IMPORT = re.compile(r"^(\s*)(from|import)(\s+)flowattn(?=[.\s])", re.MULTILINE)


def import_baseline(checkout: str | Path, name: str = "flowattn_baseline") -> ModuleType:
    """Imports ``checkout/flowattn`` as the package ``name`` and returns it (its copy
    stays on ``sys.path`` until the process exits, so its submodules import as
    ``name.models`` and so on; the copy is removed at exit).

    Raises:
        FileNotFoundError: If the checkout has no ``flowattn`` package.
    """
    source = Path(checkout) / "flowattn"
    if not (source / "__init__.py").is_file():
        raise FileNotFoundError(f"no flowattn package in {checkout} (expected {source})")
    root = Path(tempfile.mkdtemp(prefix="flowattn-baseline-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for module in (root / name).rglob("*.py"):
        text = module.read_text()
        module.write_text(_ABSOLUTE_IMPORT.sub(rf"\1\2\3{name}", text))
    sys.path.insert(0, str(root))
    return importlib.import_module(name)
