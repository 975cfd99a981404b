"""The package's layers, checked on the source: the core never reaches into the integrations, and
the Triton kernels never into the backends or the integrations.

The core (op, reference, validation, ``nn``, personas, adapters, backends) is what every
integration builds on; an import the other way round (even a lazy one inside a function) makes the
core depend on Hugging Face plumbing and brings import cycles back. Exempt by design:

- ``personamoe/integrations/``: the integrations themselves;
- ``personamoe/__init__.py``: the public facade re-exports ``inject``, ``use_personas``, ...;
- ``personamoe/__main__.py``: the command line dispatches to the export tool;
- ``personamoe/bench/``: benchmarks drive whole models, as a user would.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "personamoe"
KERNELS = ROOT / "kernels"

INTEGRATIONS = "personamoe.integrations"
BACKENDS = "personamoe.backends"
EXEMPT = ("integrations/", "bench/", "__init__.py", "__main__.py")


def _imported_modules(source: str, package: str) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every import in ``source`` (a module of ``package``), at any depth:
    lazy imports inside functions count too."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against the file's package
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield node.lineno, base
            # ``from personamoe import integrations`` names the subpackage as an attribute.
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])


def _violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in files:
        for line, module in _imported_modules(path.read_text(), _package_of(path)):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    return bad


def _core_files() -> list[Path]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in EXEMPT or any(rel.startswith(e) for e in EXEMPT if e.endswith("/")):
            continue
        files.append(path)
    return files


def test_the_core_never_imports_the_integrations() -> None:
    files = _core_files()
    names = {p.relative_to(PACKAGE).as_posix() for p in files}
    assert {"personas.py", "nn.py", "ops.py", "reference.py"} <= names  # the scan sees the core
    assert _violations(files, (INTEGRATIONS,)) == []


@pytest.mark.skipif(not KERNELS.is_dir(), reason="kernels/ ships only in a source checkout")
def test_the_kernels_import_neither_backends_nor_integrations() -> None:
    files = sorted(KERNELS.rglob("*.py"))
    assert files
    assert _violations(files, (BACKENDS, INTEGRATIONS)) == []


def test_the_scan_sees_lazy_and_relative_imports() -> None:
    source = "def f():\n    from personamoe.integrations import hf\nfrom .integrations import x\n"
    found = {m for _, m in _imported_modules(source, "personamoe")}
    assert {"personamoe.integrations", "personamoe.integrations.hf"} <= found
    assert "personamoe.integrations.x" in found
