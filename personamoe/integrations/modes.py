"""Routing modes of an injected model: switch between ``token`` / ``sequence`` / ``fixed``
(:func:`set_routing`), or fold a fixed mixture into the base weights (:func:`merge`, ``merged``)
and restore them bitwise (:func:`unmerge`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from personamoe.integrations.layers import persona_layers
from personamoe.integrations.model_personas import refresh, state_of
from personamoe.options import CALIBRATIONS, check_choice
from personamoe.personas import Persona, PersonaState

__all__ = ["merge", "set_routing", "unmerge"]

M = TypeVar("M", bound=nn.Module)


def set_routing(
    model: nn.Module, routing: str | None = None, *, calibration: str | None = None
) -> None:
    """Switch an injected model between ``"token"``, ``"sequence"`` and ``"fixed"`` routing, and/or
    its ``calibration`` (``"none"``, ``"frobenius"``, or ``"data"`` once :func:`personamoe.calibrate`
    has measured statistics); ``None`` keeps the current one."""
    if routing == "merged":
        raise ValueError("routing: use personamoe.merge(model, weights) for the merged mode")
    st = state_of(model)
    layers = [m for _, m in persona_layers(model)]
    if calibration is not None:
        check_choice("calibration", calibration, CALIBRATIONS)
        if calibration == "data" and not all(layer.pm_data_calibrated for layer in layers):
            raise ValueError(
                "calibration: 'data' needs statistics measured on text; run "
                "personamoe.calibrate(model, batches) first"
            )
        if any(layer.pm_merged for layer in layers):
            raise ValueError("calibration: the model is merged; call personamoe.unmerge first")
    if routing is not None:
        st.set_routing(routing)
    if calibration is not None:
        for layer in layers:
            layer.pm_set_calibration(calibration)
        st.options["calibration"] = calibration
    refresh(model)


def _weight_vector(st: PersonaState, weights: Any) -> Tensor:
    if isinstance(weights, Tensor):
        if weights.shape != (len(st.experts),):
            raise ValueError(
                f"weights: expected shape [E={len(st.experts)}], got {list(weights.shape)}"
            )
        return weights.detach().float().cpu()
    if isinstance(weights, str):
        if weights not in st.registered:
            raise ValueError(f"weights: {weights!r} is not a registered persona")
        weights = st.registered[weights]
    if isinstance(weights, Persona):
        if weights.weights is None:
            raise ValueError(
                f"weights: Persona {weights.name!r} routes; merge needs a fixed mixture"
            )
        weights = weights.weights
    if isinstance(weights, Mapping):
        row = torch.zeros(len(st.experts))
        for k, v in weights.items():
            row[st.expert_index(str(k), "weights")] = float(v)
        return row
    raise TypeError(
        "weights: expected a mapping expert -> weight, a fixed Persona, a registered persona name "
        f"or an [E] tensor, got {type(weights).__name__}"
    )


def merge(model: M, weights: Any) -> M:
    """Fold the fixed mixture ``sum_e w_e s_e B_e A_e`` into every base weight (merged mode: the
    layers then run as plain linear layers). The original weights are kept; :func:`unmerge`
    restores them bitwise."""
    st = state_of(model)
    w = _weight_vector(st, weights)
    layers = [m for _, m in persona_layers(model)]
    if any(layer.pm_merged for layer in layers):
        raise ValueError("merge: the model is already merged; call personamoe.unmerge first")
    for layer in layers:
        layer.pm_merge(w)
    return model


def unmerge(model: M) -> M:
    """Restore the base weights saved by :func:`merge` (bitwise) and route again."""
    for _, layer in persona_layers(model):
        layer.pm_unmerge()
    st = state_of(model)
    if st.routing == "merged":
        st.set_routing("token")
        refresh(model)
    return model
