"""Plain text for calibration and evaluation: read a file or a folder of files
(:func:`read_texts`) and cut its tokens into fixed-size chunks (:func:`token_chunks`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["read_texts", "token_chunks"]


def read_texts(path: str | Path, what: str = "path") -> list[str]:
    """The text of ``path`` (a file), or of every file under it (a folder, sorted by path;
    hidden files and files that are not UTF-8 text are skipped). ``ValueError`` naming ``what``
    when there is nothing to read."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(
            f for f in p.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )  # fmt: skip
    else:
        raise ValueError(f"{what}: expected a text file or a folder of text files, got {str(p)!r}")
    texts = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            if len(files) == 1:
                raise ValueError(f"{what}: {f} is not readable UTF-8 text") from None
            continue
        if text.strip():
            texts.append(text)
    if not texts:
        raise ValueError(f"{what}: no non-empty UTF-8 text found in {str(p)!r}")
    return texts


def token_chunks(
    tokenizer: Any, texts: Sequence[str], chunk_tokens: int, *, max_tokens: int | None = None
) -> list[Tensor]:
    """Each text tokenized (no special tokens) and cut into ``[1, chunk_tokens]`` chunks (the last
    chunk of a text may be shorter, but keeps at least 2 tokens), at most ``max_tokens`` tokens in
    all."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 2:
        raise ValueError(f"chunk_tokens: expected an int >= 2, got {chunk_tokens!r}")
    out: list[Tensor] = []
    total = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), chunk_tokens):
            piece = ids[start : start + chunk_tokens]
            if max_tokens is not None:
                piece = piece[: max(0, max_tokens - total)]
            if len(piece) < 2:
                continue
            out.append(torch.tensor([piece], dtype=torch.long))
            total += len(piece)
        if max_tokens is not None and total >= max_tokens:
            break
    return out
