"""Crash-safe file writes: every file personamoe writes goes through :func:`write_files`.

A reader must never see a truncated file, nor a new config beside old weights: each file is first
written in full to a temporary file in its own folder (same file system, so the final
``os.replace`` is atomic), flushed and fsynced, and only then renamed over the old one. A save of
several files is all-or-nothing: all temporaries are written before the first rename, and a rename
that fails puts back the files already replaced (kept as hard links until the save is complete).
On any failure the temporaries are removed and the exception propagates.

:func:`replace_dir` swaps a fully written folder in for an old one (the export).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["Content", "fsync_tree", "replace_dir", "temp_sibling", "write_files", "write_text"]

Content = str | bytes | Callable[[Path], None]
"""What to write: text (UTF-8), bytes, or a function that writes the file at the path it gets
(e.g. ``lambda p: safetensors.torch.save_file(tensors, str(p))``)."""


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (not supported everywhere, e.g. Windows: best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_sibling(path: Path, suffix: str, *, folder: bool = False) -> Path:
    """A new empty file (or ``folder``) next to ``path``, hidden so that globs over the folder
    skip it. Created with the default mode (``tempfile``'s would be private, 0600/0700, and the
    rename would keep that)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            if folder:
                tmp.mkdir()
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


def _write_one(tmp: Path, content: Content) -> None:
    if callable(content):
        mode = tmp.stat().st_mode & 0o777  # 0666 less the umask (created by temp_sibling)
        content(tmp)
        # A writer may replace the file by its own private one (safetensors renames a 0600
        # temporary onto it): give the result the default mode, like a plain write.
        if tmp.stat().st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
    else:
        data = content.encode() if isinstance(content, str) else content
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
    _fsync_file(tmp)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def write_files(files: Mapping[Path | str, Content]) -> None:
    """Write every file of ``files`` (path -> content) or none of them (see the module doc)."""
    items = [(Path(p), c) for p, c in files.items()]
    temps: list[Path] = []
    backups: dict[Path, Path | None] = {}  # replaced file -> hard link to its old version
    done: list[Path] = []
    try:
        for path, content in items:
            tmp = temp_sibling(path, ".tmp")
            temps.append(tmp)
            _write_one(tmp, content)
        for (path, _), tmp in zip(items, temps, strict=True):
            backups[path] = _backup(path)
            os.replace(tmp, path)
            done.append(path)
    except BaseException:
        for path in reversed(done):  # put the old files back (or remove a file that was new)
            old = backups.get(path)
            with contextlib.suppress(OSError):
                if old is not None:
                    os.replace(old, path)
                else:
                    _remove(path)
        for p in [*temps, *(b for b in backups.values() if b is not None)]:
            with contextlib.suppress(OSError):
                _remove(p)
        raise
    for old in backups.values():
        if old is not None:
            _remove(old)
    for parent in {p.parent for p, _ in items}:
        _fsync_dir(parent)


def _backup(path: Path) -> Path | None:
    """A hard link to ``path``'s current version (None when it does not exist), so a later failed
    rename of the same save can put it back."""
    if not path.exists():
        return None
    link = temp_sibling(path, ".old")
    _remove(link)
    try:
        os.link(path, link)
    except OSError:  # no hard links on this file system: a copy does the same job
        shutil.copy2(path, link)
    return link


def write_text(path: Path | str, text: str) -> None:
    """Write one text file atomically."""
    write_files({path: text})


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (before it is renamed into place)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def replace_dir(new: Path, dst: Path) -> None:
    """Put the complete folder ``new`` at ``dst``, replacing the old ``dst`` (if any) only once
    ``new`` is in place: the old one is moved aside first and moved back if the swap fails."""
    fsync_tree(new)
    old: Path | None = None
    if dst.exists():
        old = temp_sibling(dst, ".old", folder=True)
        os.rmdir(old)  # only its unused name is wanted
        os.replace(dst, old)
    try:
        os.replace(new, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
