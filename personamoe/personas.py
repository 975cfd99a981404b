"""Personas: named constraints on the expert bank, chosen per request.

A :class:`Persona` either *routes* (``allow``: the experts it may rank among; ``bias``: score
offsets) or is a *fixed mixture* (``weights``: every expert with a non-zero weight is used with that
weight, DESIGN.md §1 "fixed"). An injected model holds one :class:`PersonaState` shared by all its
persona layers: the persona table (row 0 is "no persona", then the registered personas, then the
ad-hoc ones of the current :func:`use_personas` block) and the current per-request row ids. The
layers read the ids and their own ``[P, E]`` tables from it, so a batch of requests with different
personas runs as one op call per layer, without a Python loop over requests or adapters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from personamoe.integrations.layers import PersonaLayer

__all__ = ["Persona", "PersonaState", "add_persona", "remove_persona", "use_personas"]

ROUTING_MODES = ("token", "sequence", "fixed", "merged")


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
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing: expected one of {ROUTING_MODES}, got {routing!r}")
        self.routing = routing

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

    def update_flags(self) -> None:
        """``has_route`` / ``has_fixed``: which kinds of rows the current batch holds (host side)."""
        all_rows = self.rows
        self.row_names = self._row_names()  # kept with each forward's routing record
        current = self.current_rows if self.current_rows is not None else (0,)
        kinds = [self.row_fixed(all_rows[r]) for r in current]
        self.has_fixed = any(kinds)
        self.has_route = not all(kinds)


# -- model-level functions -----------------------------------------------------------------------
def _layers(model: nn.Module) -> list[PersonaLayer]:
    from personamoe.integrations.layers import persona_layers

    layers = [m for _, m in persona_layers(model)]
    if not layers:
        raise ValueError(
            "model: expected a model prepared by personamoe.inject, found no persona layers"
        )
    return layers


def state_of(model: nn.Module) -> PersonaState:
    """The :class:`PersonaState` shared by the persona layers of ``model``."""
    return _layers(model)[0].pm_state


def refresh(model: nn.Module) -> None:
    """Rebuild every layer's persona tables after the persona rows changed."""
    layers = _layers(model)
    st = layers[0].pm_state
    bias, weights, fixed = st.tables()
    for layer in layers:
        layer.pm_refresh(bias, weights, fixed)
    st.update_flags()
    st.version += 1


def add_persona(model: nn.Module, persona: Persona) -> Persona:
    """Register ``persona`` on an injected model (replacing one of the same name)."""
    if not isinstance(persona, Persona):
        raise TypeError(f"persona: expected a personamoe.Persona, got {type(persona).__name__}")
    st = state_of(model)
    st.check(persona)
    st.registered[persona.name] = persona
    refresh(model)
    return persona


def remove_persona(model: nn.Module, name: str) -> None:
    """Unregister the persona ``name``."""
    st = state_of(model)
    if name not in st.registered:
        raise KeyError(f"persona {name!r} is not registered; registered: {list(st.registered)}")
    del st.registered[name]
    refresh(model)


PersonaSpec = str | Persona | None


@contextlib.contextmanager
def use_personas(
    model: nn.Module, personas: PersonaSpec | Sequence[PersonaSpec]
) -> Iterator[PersonaState]:
    """Run the block with one persona per request (batch row).

    ``personas`` is a list with one entry per batch row — a registered name, a :class:`Persona`
    (used for this block only) or ``None`` (no persona) — or a single entry applied to every row.
    Rows are repeated over the tokens of each request and over the steps of ``generate``; a batch
    that ``generate`` expands (``num_return_sequences``, beams) repeats each row in place.
    """
    st = state_of(model)
    if any(getattr(layer, "pm_merged", False) for layer in _layers(model)):
        raise ValueError(
            "use_personas: the model is merged (personamoe.merge); call unmerge() first"
        )
    specs: list[PersonaSpec] = (
        list(personas) if isinstance(personas, (list, tuple)) else [personas]  # type: ignore[list-item]
    )
    if not specs:
        raise ValueError("personas: expected at least one entry (one per batch row), got none")
    registered = list(st.registered.values())
    adhoc: list[Persona] = []
    rows: list[int] = []
    for i, p in enumerate(specs):
        if p is None:
            rows.append(0)
        elif isinstance(p, str):
            if p not in st.registered:
                raise ValueError(
                    f"personas[{i}]: {p!r} is not a registered persona; registered: "
                    f"{list(st.registered)} (add it with personamoe.add_persona)"
                )
            rows.append(1 + list(st.registered).index(p))
        elif isinstance(p, Persona):
            if any(p is r for r in registered):
                rows.append(1 + next(j for j, r in enumerate(registered) if r is p))
                continue
            if not any(p is a for a in adhoc):
                st.check(p)
                adhoc.append(p)
            rows.append(1 + len(registered) + next(j for j, a in enumerate(adhoc) if a is p))
        else:
            raise TypeError(
                f"personas[{i}]: expected a persona name, a personamoe.Persona or None, got "
                f"{type(p).__name__}"
            )
    saved = (st.adhoc, st.ids, st.current_rows)
    st.adhoc = tuple(adhoc)
    st.current_rows = None
    if saved[0] != st.adhoc:
        refresh(model)
    device = _layers(model)[0].weight.device
    st.set_ids(rows, device)
    try:
        yield st
    finally:
        changed = st.adhoc != saved[0]
        st.adhoc, st.ids, st.current_rows = saved
        if changed:
            refresh(model)
        st.update_flags()
