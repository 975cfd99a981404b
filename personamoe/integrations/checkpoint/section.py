"""The ``personamoe`` section of an exported checkpoint's ``config.json``: its schema and the one
function that validates it (:func:`read_section`).

The section holds only what the bank does not: which experts and target modules to serve (the
vLLM plugin decides per layer, while vLLM builds the model, whether to swap it; it must not open
the bank for that) and how to route (``top_k``, ``normalize``, ``temperature``, ``calibration``,
``routing``). Ranks and scalings live in the bank file alone. ``personamoe-export/1`` sections
repeated them as ``ranks`` / ``scalings`` tables; those are still read, validated and checked
once against the bank when it is loaded (:func:`~personamoe.integrations.checkpoint.bank_view.read_bank_tensors`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from personamoe.integrations.bank_format import BANK_WEIGHTS
from personamoe.options import CALIBRATIONS, NORMALIZE_MODES, SERVABLE_ROUTINGS

__all__ = ["FORMAT", "LEGACY_FORMAT", "SECTION", "ExportError", "PersonaSection", "read_section"]

SECTION = "personamoe"
FORMAT = "personamoe-export/2"
LEGACY_FORMAT = "personamoe-export/1"  # also carried "ranks" and "scalings" (the bank's values)
_REQUIRED = ("experts", "targets", "top_k")
_LEGACY_TABLES = ("ranks", "scalings")


class ExportError(ValueError):
    """A malformed exported checkpoint; the message names the file and the key."""


@dataclass(frozen=True)
class PersonaSection:
    """The validated ``personamoe`` section of an exported checkpoint's ``config.json``."""

    path: Path  # the config.json it came from
    experts: tuple[str, ...]
    targets: tuple[str, ...]
    top_k: int
    normalize: str
    temperature: float
    calibration: str
    routing: str
    bank: str
    # What a personamoe-export/1 section repeated from the bank (None when absent): checked
    # against the bank once, when it is loaded; never used in its place.
    declared_ranks: dict[str, tuple[int, ...]] | None = None
    declared_scalings: dict[str, tuple[float, ...]] | None = None
    # The names of the personas saved with the bank (their definitions live in the bank's
    # metadata): what a request may name.
    personas: tuple[str, ...] = ()

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def bank_file(self) -> Path:
        return self.path.parent / self.bank

    @cached_property
    def ranks(self) -> dict[str, tuple[int, ...]]:
        """Each expert's rank per target (0 = absent), read from the bank file on first use."""
        return self._tables[0]

    @cached_property
    def scalings(self) -> dict[str, tuple[float, ...]]:
        """Each expert's scaling per target (0 where absent), read from the bank file on first use."""
        return self._tables[1]

    def bank_rank(self, target: str) -> int:
        """The largest expert rank of a target (the rank its bank is padded to)."""
        return max(self.ranks[target])

    @cached_property
    def _tables(self) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[float, ...]]]:
        from personamoe.integrations.checkpoint.bank_view import bank_tables

        return bank_tables(self)


def _err(path: Path, key: str, msg: str) -> ExportError:
    return ExportError(f"{path}: key '{SECTION}.{key}': {msg}")


def _names(path: Path, raw: Mapping[str, Any], key: str, what: str) -> tuple[str, ...]:
    value = raw[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _err(path, key, f"expected a non-empty list of {what}, got {value!r}")
    return tuple(value)


def _legacy_table(
    path: Path, raw: Mapping[str, Any], what: str, targets: tuple[str, ...], E: int
) -> dict[str, tuple[Any, ...]]:
    """One personamoe-export/1 table (``ranks`` or ``scalings``): target -> E numbers."""
    table = raw[what]
    if not isinstance(table, Mapping):
        raise _err(path, what, f"expected an object target -> [E values], got {table!r}")
    extra = sorted(set(table) - set(targets))
    if extra:
        raise _err(path, f"{what}.{extra[0]}", "not one of 'targets'")
    out: dict[str, tuple[Any, ...]] = {}
    for t in targets:
        row = table.get(t)
        if not isinstance(row, list) or len(row) != E:
            raise _err(path, f"{what}.{t}", f"expected a list of E={E} numbers, got {row!r}")
        if what == "ranks":
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row):
                raise _err(path, f"ranks.{t}", f"expected ints >= 0 (0 = absent), got {row!r}")
            if max(row) < 1:
                raise _err(path, f"ranks.{t}", "no expert targets this module (all ranks 0)")
            out[t] = tuple(row)
        else:
            ok = all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in row
            )
            if not ok:
                raise _err(path, f"scalings.{t}", f"expected finite numbers, got {row!r}")
            out[t] = tuple(float(v) for v in row)
    return out


def read_section(config: Mapping[str, Any] | Any, path: str | Path) -> PersonaSection:
    """Validate the ``personamoe`` section of ``config`` (a dict or a transformers config object,
    read from ``path``); raises :class:`ExportError` naming the key that is wrong."""
    path = Path(path)
    raw = config.get(SECTION) if isinstance(config, Mapping) else getattr(config, SECTION, None)
    if raw is None:
        raise ExportError(
            f"{path}: no '{SECTION}' section (not a checkpoint written by `python -m personamoe "
            "export`)"
        )
    if not isinstance(raw, Mapping):
        raise ExportError(f"{path}: key '{SECTION}': expected an object, got {type(raw).__name__}")
    fmt = raw.get("format")
    if fmt not in (FORMAT, LEGACY_FORMAT):
        raise _err(path, "format", f"expected {FORMAT!r} (or {LEGACY_FORMAT!r}), got {fmt!r}")
    required = _REQUIRED + (_LEGACY_TABLES if fmt == LEGACY_FORMAT else ())
    missing = [k for k in required if k not in raw]
    if missing:
        raise _err(path, missing[0], "missing")

    experts = _names(path, raw, "experts", "names")
    if len(set(experts)) != len(experts):
        raise _err(path, "experts", f"expected unique names, got {list(experts)!r}")
    E = len(experts)
    targets = _names(path, raw, "targets", "module names")
    # Any version may carry the old tables (a hand-edited config); they are checked, not used.
    declared = {w: _legacy_table(path, raw, w, targets, E) for w in _LEGACY_TABLES if w in raw}

    top_k = raw["top_k"]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise _err(
            path, "top_k", f"expected an int in 1..{E} (the number of experts), got {top_k!r}"
        )
    normalize = raw.get("normalize", "topk")
    if normalize not in NORMALIZE_MODES:
        raise _err(path, "normalize", f"expected one of {NORMALIZE_MODES}, got {normalize!r}")
    temperature = raw.get("temperature", 1.0)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise _err(path, "temperature", f"expected a finite number > 0, got {temperature!r}")
    calibration = raw.get("calibration", "none")
    if calibration not in CALIBRATIONS:
        raise _err(path, "calibration", f"expected one of {CALIBRATIONS}, got {calibration!r}")
    routing = raw.get("routing", "token")
    if routing not in SERVABLE_ROUTINGS:
        raise _err(
            path,
            "routing",
            f"expected one of {SERVABLE_ROUTINGS} (servable modes), got {routing!r}",
        )
    personas: tuple[str, ...] = ()
    if "personas" in raw:
        personas = _names(path, raw, "personas", "persona names")
        if len(set(personas)) != len(personas):
            raise _err(path, "personas", f"expected unique names, got {list(personas)!r}")
    bank = raw.get("bank", BANK_WEIGHTS)
    if not isinstance(bank, str) or not bank or "/" in bank or "\\" in bank:
        raise _err(path, "bank", f"expected a file name in the checkpoint folder, got {bank!r}")
    return PersonaSection(
        path=path,
        experts=experts,
        targets=targets,
        top_k=top_k,
        normalize=normalize,
        temperature=float(temperature),
        calibration=calibration,
        routing=routing,
        bank=bank,
        declared_ranks=declared.get("ranks"),
        declared_scalings=declared.get("scalings"),
        personas=personas,
    )
