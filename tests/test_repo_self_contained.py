"""The repository documents itself: no pointer leads outside a clone.

The design lives in ``docs/design.md``, with numbered headings (``## §N ...``, ``### §N.M ...``)
that code cites as ``docs/design.md §N``. These tests keep it that way: no file names the design
files that once lived outside the repository, every citation names a section that exists, and the
markdown links to local files resolve.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"

# Spelled in pieces so that this file does not match itself.
FORBIDDEN = ("../" + "shared", "DESIGN" + ".md", "ANCHORS" + ".md")

SECTION_HEADING = re.compile(r"^#{2,4} §(\d+(?:\.\d+)*)\s", re.MULTILINE)
# "docs/design.md §5", "docs/design.md`](docs/design.md) §1", or a comment wrapped between the two.
CITATION = re.compile(r"docs/design\.md[\s`)\]#/*]*§(\d+(?:\.\d+)*)")
BARE_SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _repo_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore (so a straggler fails before commit)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (or git is missing)")
    names = sorted({n for n in out.decode().split("\0") if n})
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def _text(path: Path) -> str | None:
    """The file as text, or None for binary files (images, result plots)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _sections() -> set[str]:
    return set(SECTION_HEADING.findall(DESIGN.read_text(encoding="utf-8")))


def test_design_doc_has_numbered_sections() -> None:
    sections = _sections()
    assert {"1", "2", "3", "4", "5", "6"} <= sections, sorted(sections)


def test_no_file_points_outside_the_repository() -> None:
    hits = []
    for path in _repo_files():
        text = _text(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for needle in FORBIDDEN:
                if needle in line:
                    hits.append(f"{path.relative_to(ROOT)}:{lineno}: {needle}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_every_design_citation_names_an_existing_section() -> None:
    sections = _sections()
    bad = []
    for path in _repo_files():
        text = _text(path)
        if text is None:
            continue
        cited = CITATION.findall(text)
        if path == DESIGN:  # inside the document, sections are cited as a bare "§N"
            cited = BARE_SECTION.findall(text)
        bad += [f"{path.relative_to(ROOT)}: §{n}" for n in cited if n not in sections]
    assert not bad, "citations of missing docs/design.md sections:\n" + "\n".join(bad)


def test_markdown_links_to_local_files_resolve() -> None:
    broken = []
    for path in _repo_files():
        if path.suffix != ".md":
            continue
        text = _text(path) or ""
        for target in MARKDOWN_LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same file
            local = target.split("#", 1)[0]
            if not (path.parent / local).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "markdown links to missing files:\n" + "\n".join(broken)
