"""Personas on an injected model: register (:func:`add_persona`), remove, and choose one per request
(:func:`use_personas`).

The persona data (:class:`~personamoe.personas.Persona`, the shared
:class:`~personamoe.personas.PersonaState`) lives in the core; what needs the model's persona
layers (finding them, rebuilding their tables) lives here, so the core never imports the
integrations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from personamoe.integrations.layers import PersonaLayer, persona_layers
from personamoe.personas import Persona, PersonaSpec, PersonaState

__all__ = ["add_persona", "model_layers", "refresh", "remove_persona", "state_of", "use_personas"]


def model_layers(model: nn.Module) -> list[PersonaLayer]:
    """The persona layers of ``model``; ``ValueError`` when it was not injected."""
    layers = [m for _, m in persona_layers(model)]
    if not layers:
        raise ValueError(
            "model: expected a model prepared by personamoe.inject, found no persona layers"
        )
    return layers


def state_of(model: nn.Module) -> PersonaState:
    """The :class:`PersonaState` shared by the persona layers of ``model``."""
    return model_layers(model)[0].pm_state


def refresh(model: nn.Module) -> None:
    """Rebuild every layer's persona tables after the persona rows changed."""
    layers = model_layers(model)
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
    layers = model_layers(model)
    st = layers[0].pm_state
    if any(layer.pm_merged for layer in layers):
        raise ValueError(
            "use_personas: the model is merged (personamoe.merge); call unmerge() first"
        )
    specs: list[PersonaSpec] = (
        list(personas) if isinstance(personas, (list, tuple)) else [personas]  # type: ignore[list-item]
    )
    if not specs:
        raise ValueError("personas: expected at least one entry (one per batch row), got none")
    adhoc, rows = st.resolve(specs)
    saved = (st.adhoc, st.ids, st.current_rows)
    st.adhoc = adhoc
    st.current_rows = None
    if saved[0] != st.adhoc:
        refresh(model)
    st.set_ids(rows, layers[0].weight.device)
    try:
        yield st
    finally:
        changed = st.adhoc != saved[0]
        st.adhoc, st.ids, st.current_rows = saved
        if changed:
            refresh(model)
        st.update_flags()
