import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    commands = [line for line in lines[:6] if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2
    assert commands[0].endswith("flowattn train")
    assert commands[1].endswith("-m pytest -q")
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci
