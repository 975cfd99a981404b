"""Personas: named constraints on the expert bank, chosen per request.

A :class:`Persona` either *routes* (``allow``: the experts it may rank among; ``bias``: score
offsets) or is a *fixed mixture* (``weights``: every expert with a non-zero weight is used with that
weight, docs/design.md §1 "fixed"). An injected model holds one :class:`PersonaState` shared by all
its persona layers: the persona table (row 0 is "no persona", then the registered personas, then
the ad-hoc ones of the current ``use_personas`` block) and the current per-request row ids. The
layers read the ids and their own ``[P, E]`` tables from it, so a batch of requests with different
personas runs as one op call per layer, without a Python loop over requests or adapters.

This module is pure data (no layers, no model): the functions that act on an injected model
(``add_persona``, ``use_personas``, ...) live in :mod:`personamoe.integrations.model_personas`, so
the core never imports the integrations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from personamoe.options import ROUTING_MODES, check_choice

__all__ = ["Persona", "PersonaSpec", "PersonaState"]


class Persona:
    """A persona over the expert bank of an injected model.

    Args:
        name: the persona's name (the key for :func:`add_persona` / :func:`use_personas`).
        allow: names of the experts it may route among (``None``: all of them).
        bias: expert name -> offset added to that expert's score before the top-k.
        weights: expert name -> fixed mixture weight; such a persona does not route (experts
            left out get weight 0). Exclusive with ``allow`` and ``bias``.
    """

    __slots__ = ("allow", "bias", "name", "weights")

    def __init__(
        self,
        name: str,
        allow: Sequence[str] | None = None,
        bias: Mapping[str, float] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: expected a non-empty str, got {name!r}")
        if weights is not None and (allow is not None or bias is not None):
            raise ValueError(
                f"Persona {name!r}: expected either weights (a fixed mixture) or allow/bias "
                "(routing), got both"
            )
        if isinstance(allow, str):
            allow = [allow]
        self.name = name
        self.allow: tuple[str, ...] | None = tuple(allow) if allow is not None else None
        self.bias: dict[str, float] | None = _floats("bias", name, bias)
        self.weights: dict[str, float] | None = _floats("weights", name, weights)

    @property
    def fixed(self) -> bool:
        """True for a fixed mixture (``weights``), False for a routing persona."""
        return self.weights is not None

    def __repr__(self) -> str:
        parts = [repr(self.name)]
        for key in ("allow", "bias", "weights"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={value!r}")
        return f"Persona({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "allow": list(self.allow) if self.allow is not None else None,
                "bias": self.bias, "weights": self.weights}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Persona:
        return cls(d["name"], allow=d.get("allow"), bias=d.get("bias"), weights=d.get("weights"))


PersonaSpec = str | Persona | None
"""One request's persona: a registered name, a :class:`Persona` (ad hoc) or ``None`` (none)."""


def _floats(what: str, name: str, m: Mapping[str, float] | None) -> dict[str, float] | None:
    if m is None:
        return None
    if not isinstance(m, Mapping):
        raise TypeError(f"Persona {name!r}: {what}: expected a mapping name -> float, got {m!r}")
    out = {}
    for k, v in m.items():
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"Persona {name!r}: {what}[{k!r}]: expected a finite float, got {v}")
        out[str(k)] = v
    return out


class PersonaState:
    """What the persona layers of one injected model share (one object, referenced by each layer).

    Rows of the persona tables: row 0 = no persona (free routing, or the default mixture when the
    model's routing is ``"fixed"``), then registered personas, then the current block's ad-hoc ones.
    """

    def __init__(
        self, experts: Sequence[str], routing: str, default_weights: Mapping[str, float] | None
    ) -> None:
        self.experts: tuple[str, ...] = tuple(experts)
        if len(set(self.experts)) != len(self.experts):
            raise ValueError(f"adapters: expected unique names, got {list(self.experts)}")
        self.routing = "token"
        self.set_routing(routing)
        if default_weights is None:
            default_weights = {e: 1.0 / len(self.experts) for e in self.experts}
        self.default_weights = self._weight_row("default weights", dict(default_weights))
        self.registered: dict[str, Persona] = {}
        self.adhoc: tuple[Persona, ...] = ()
        self.ids: Tensor | None = None  # [B] row ids of the current requests (None: all row 0)
        self.current_rows: tuple[int, ...] | None = None
        self.row_names: tuple[str | None, ...] = (None,)
        self.has_route = True
        self.has_fixed = False
        self.update_flags()
        self.record = True
        self.version = 0
        # Sequence routing: the prompt's attention mask and whether this forward starts sequences.
        self.attention_mask: Tensor | None = None
        self.new_sequence = True
        self.configs: dict[str, dict[str, Any]] = {}  # original adapter_config.json per expert
        self.options: dict[str, Any] = {}  # inject's routing options (top_k, ...), for save_bank

    # -- configuration -------------------------------------------------------------------------
    def set_routing(self, routing: str) -> None:
        self.routing = check_choice("routing", routing, ROUTING_MODES)

    def expert_index(self, name: str, what: str) -> int:
        try:
            return self.experts.index(name)
        except ValueError:
            raise ValueError(
                f"{what}: unknown expert {name!r}; the bank holds {list(self.experts)}"
            ) from None

    def _weight_row(self, what: str, weights: Mapping[str, float]) -> Tensor:
        row = torch.zeros(len(self.experts))
        for k, v in weights.items():
            row[self.expert_index(k, what)] = float(v)
        return row

    def check(self, p: Persona) -> None:
        """Raise ``ValueError`` when the persona names an expert the bank does not hold."""
        what = f"Persona {p.name!r}"
        for k in p.allow or ():
            self.expert_index(k, f"{what}: allow")
        for k in p.bias or {}:
            self.expert_index(k, f"{what}: bias")
        for k in p.weights or {}:
            self.expert_index(k, f"{what}: weights")

    @property
    def rows(self) -> tuple[Persona | None, ...]:
        return (None, *self.registered.values(), *self.adhoc)

    def _row_names(self) -> tuple[str | None, ...]:
        return tuple(None if p is None else p.name for p in self.rows)

    def row_fixed(self, row: Persona | None) -> bool:
        return self.routing == "fixed" if row is None else row.fixed

    # -- tables --------------------------------------------------------------------------------
    def tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(bias [R, E], weights [R, E], fixed [R] bool)`` over all rows, on the CPU, fp32."""
        rows = self.rows
        E = len(self.experts)
        bias = torch.zeros(len(rows), E)
        weights = torch.zeros(len(rows), E)
        fixed = torch.zeros(len(rows), dtype=torch.bool)
        for i, p in enumerate(rows):
            fixed[i] = self.row_fixed(p)
            if p is None:
                weights[i] = self.default_weights
                continue
            if p.weights is not None:
                weights[i] = self._weight_row(f"Persona {p.name!r}: weights", p.weights)
                continue
            if p.allow is not None:
                bias[i] = float("-inf")
                for k in p.allow:
                    bias[i, self.expert_index(k, f"Persona {p.name!r}: allow")] = 0.0
            for k, v in (p.bias or {}).items():
                bias[i, self.expert_index(k, f"Persona {p.name!r}: bias")] += v
        return bias, weights, fixed

    def set_ids(self, rows: Sequence[int] | None, device: torch.device) -> None:
        """Set the current requests' rows (``None``: every request routes freely)."""
        self.current_rows = None if rows is None else tuple(rows)
        self.ids = (
            None if rows is None else torch.tensor(list(rows), dtype=torch.long, device=device)
        )
        self.update_flags()

    def ids_on(self, device: torch.device) -> Tensor | None:
        """The current rows on ``device``: copied once per rows tensor for each device of a model
        spread over several, not once per layer per step (a copy is kept with the tensor it was
        made from, so rows restored by ``use_personas`` never meet a stale copy)."""
        ids = self.ids
        if ids is None or ids.device == device:
            return ids
        copies: dict[torch.device, tuple[Tensor, Tensor]] = self.__dict__.setdefault(
            "_ids_copies", {}
        )
        got = copies.get(device)
        if got is None or got[0] is not ids:
            got = copies[device] = (ids, ids.to(device))
        return got[1]

    def update_flags(self) -> None:
        """``has_route`` / ``has_fixed``: which kinds of rows the current batch holds (host side)."""
        all_rows = self.rows
        self.row_names = self._row_names()  # kept with each forward's routing record
        current = self.current_rows if self.current_rows is not None else (0,)
        kinds = [self.row_fixed(all_rows[r]) for r in current]
        self.has_fixed = any(kinds)
        self.has_route = not all(kinds)

    # -- one persona per request -----------------------------------------------------------------
    def resolve(self, specs: Sequence[PersonaSpec]) -> tuple[tuple[Persona, ...], list[int]]:
        """``(ad-hoc personas, row id per request)`` for one ``use_personas`` entry per request.

        A registered name or a registered :class:`Persona` object gives its row; another
        :class:`Persona` becomes an ad-hoc row (once, however many requests use it); ``None`` is
        row 0.
        """
        registered = list(self.registered.values())
        names = list(self.registered)
        adhoc: list[Persona] = []
        rows: list[int] = []
        for i, p in enumerate(specs):
            if p is None:
                rows.append(0)
            elif isinstance(p, str):
                if p not in self.registered:
                    raise ValueError(
                        f"personas[{i}]: {p!r} is not a registered persona; registered: "
                        f"{names} (add it with personamoe.add_persona)"
                    )
                rows.append(1 + names.index(p))
            elif isinstance(p, Persona):
                if any(p is r for r in registered):
                    rows.append(1 + next(j for j, r in enumerate(registered) if r is p))
                    continue
                if not any(p is a for a in adhoc):
                    self.check(p)
                    adhoc.append(p)
                rows.append(1 + len(registered) + next(j for j, a in enumerate(adhoc) if a is p))
            else:
                raise TypeError(
                    f"personas[{i}]: expected a persona name, a personamoe.Persona or None, got "
                    f"{type(p).__name__}"
                )
        return tuple(adhoc), rows
