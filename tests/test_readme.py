"""The README's python blocks run as written, and CI runs exactly the README's commands."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert BLOCKS, "README.md: expected at least one ```python block"


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[i], f"README.md:python-block-{i}", "exec"), {"__name__": "__readme__"})


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "## Set up and test" in ci and "README.md" in ci
    section = (ROOT / "README.md").read_text().split("## Set up and test", 1)[1]
    setup, test = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[:2]
    assert "torch==2.13.0" in setup and "pip install" in setup
    assert "pytest" in test
