"""The docs: every page's Python examples run, TOML examples load, and the site builds
with ``mkdocs build --strict`` (no warnings: broken links, bad docstrings)."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flowattn.runs import RunConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))


def _blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace: dict = {}
    for block in _blocks(page, "python"):  # one page is one script
        exec(compile(block, str(page), "exec"), namespace)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_toml_examples_are_valid_run_configs(page):
    for block in _blocks(page, "toml"):
        RunConfig.from_dict(tomllib.loads(block))


def test_pages_have_examples():
    assert _blocks(ROOT / "docs/guide.md", "python")
    assert _blocks(ROOT / "docs/getting-started.md", "python")


def test_getting_started_shows_the_readme_commands():
    readme = (ROOT / "README.md").read_text().splitlines()[:6]
    commands = [line for line in readme if line.startswith("python3 -m venv")]
    page = (ROOT / "docs/getting-started.md").read_text()
    assert commands and all(command in page for command in commands)


def test_site_builds_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "results" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "index.html").is_file()
