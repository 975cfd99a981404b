"""Drop-in persona experts for Hugging Face ``transformers`` models (and any ``nn.Module``).

:func:`inject` swaps the target linear layers (``nn.Linear``, GPT-2's ``Conv1D``) for persona layers
that share the base Parameters under the same names, and loads each PEFT adapter as one expert of
every layer it targets. Each step has its own function: the arguments (:func:`_read_experts`), the
targets and where each adapter goes (:mod:`.targets`), the layers (:mod:`.install`), the banks
(:func:`_fill`, ``PersonaLayer.pm_set_calibration``), the personas (:mod:`.model_personas`), the mode
(:mod:`.modes`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from personamoe.adapters import LoraAdapter, read_adapter
from personamoe.integrations.install import install_layers, train_only_the_bank
from personamoe.integrations.layers import PersonaLayer, persona_layers
from personamoe.integrations.model_personas import refresh
from personamoe.integrations.modes import merge
from personamoe.integrations.targets import (
    ExpertFactors,
    Placement,
    check_target_modules,
    locate_adapters,
    select_targets,
)
from personamoe.lora_bank import lora_scaling
from personamoe.options import CALIBRATIONS, check_choice, check_routing_options
from personamoe.personas import PersonaState

__all__ = ["inject", "install_layers"]

M = TypeVar("M", bound=nn.Module)


def inject(
    model: M,
    adapters: Mapping[str, str | Path] | int,
    *,
    target_modules: str | Sequence[str] | None = None,
    top_k: int = 2,
    temperature: float = 1.0,
    normalize: str = "topk",
    calibration: str = "none",
    routing: str = "token",
    rank: int | None = None,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    weights: Mapping[str, float] | None = None,
    freeze_base: bool = True,
    init_lora_weights: bool = True,
) -> M:
    """Turn the target linear layers of ``model`` into persona-MoE layers, in place; returns ``model``.

    Args:
        adapters: ``name -> PEFT adapter folder`` (one expert each), or an int ``E`` for a fresh
            trainable bank ``expert_0 .. expert_{E-1}`` (needs ``rank``; ``lora_alpha`` defaults to
            ``rank``).
        target_modules: ``None`` = every module some adapter targets (``"all-linear"`` for a fresh
            bank); ``"all-linear"``, a list of names/suffixes, or a full-match regex as in PEFT.
            An adapter that does not target a layer is absent from that layer's ranking.
        top_k, temperature, normalize: the routing of docs/design.md §1.
        calibration: ``"frobenius"`` divides each expert's score by ``||A_e||_F`` (per layer, at
            load time) so that adapters trained apart compete on one scale. ``"data"`` needs
            statistics measured on text: inject with ``"none"``, then call
            :func:`personamoe.calibrate` (docs/design.md §1.9).
        routing: ``"token"``, ``"sequence"`` (prompt-pooled choice kept while decoding), ``"fixed"``
            (requests without a persona use ``weights``) or ``"merged"`` (``weights`` folded into the
            base weights, see :func:`merge`).
        weights: expert name -> weight, the default mixture for ``"fixed"``/``"merged"`` (uniform
            ``1/E`` when omitted).
        freeze_base: every parameter but ``lora_A``/``lora_B`` stops requiring grad.
        init_lora_weights: fresh banks only: ``True`` starts with ``lora_B = 0`` like PEFT.
    """
    if any(True for _ in persona_layers(model)):
        raise ValueError("model: personamoe.inject was already applied to this model")
    fresh = isinstance(adapters, int) and not isinstance(adapters, bool)
    experts, loaded = _read_experts(adapters, rank, lora_alpha, use_rslora)
    check_routing_options(top_k, len(experts), temperature, normalize,
                          experts="the number of adapters")  # fmt: skip
    check_choice("calibration", calibration, CALIBRATIONS)
    if calibration == "data":
        raise ValueError(
            "calibration: 'data' needs statistics measured on text, which inject does not have; "
            "inject with calibration='none', then call personamoe.calibrate(model, batches)"
        )
    state = PersonaState(experts, routing, weights)
    state.options = {"top_k": top_k, "temperature": float(temperature), "normalize": normalize,
                     "calibration": calibration}  # fmt: skip
    state.configs = {name: dict(ad.config) for name, ad in loaded.items()}

    where = locate_adapters(model, list(loaded.values()))
    targets = _targets(model, where, target_modules, loaded, fresh=fresh)
    if fresh:
        assert rank is not None
        ranks = {t: rank for t in targets}
    else:
        ranks = {t: max(f.rank for f in where[t].values()) for t in targets}
    layers = install_layers(model, state, ranks, top_k=top_k, temperature=temperature,
                            normalize=normalize)  # fmt: skip
    with torch.no_grad():
        for name, layer in layers.items():
            if fresh:
                assert rank is not None
                layer.reset_lora_parameters(init_lora_weights)
                layer.scaling.fill_(lora_scaling(rank, lora_alpha, use_rslora))
            else:
                _fill(layer, where[name])
            if calibration != "none":
                layer.pm_set_calibration(calibration)
    train_only_the_bank(model, layers.values(), freeze_base=freeze_base)
    refresh(model)
    if routing == "merged":
        merge(model, state.default_weights)
    return model


def _read_experts(
    adapters: Mapping[str, str | Path] | int,
    rank: int | None,
    lora_alpha: float | None,
    use_rslora: bool,
) -> tuple[list[str], dict[str, LoraAdapter]]:
    """``(expert names, name -> adapter read from its folder)``; no adapters for a fresh bank."""
    if isinstance(adapters, int) and not isinstance(adapters, bool):
        if adapters < 1:
            raise ValueError(f"adapters: expected a number of experts >= 1, got {adapters}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: expected an int >= 1 for a fresh bank, got {rank!r}")
        ok = isinstance(lora_alpha, (int, float)) and not isinstance(lora_alpha, bool)
        if lora_alpha is not None and not (ok and math.isfinite(lora_alpha)):
            raise ValueError(f"lora_alpha: expected a finite number, got {lora_alpha!r}")
        return [f"expert_{i}" for i in range(adapters)], {}
    if isinstance(adapters, Mapping):
        if not adapters:
            raise ValueError("adapters: expected at least one adapter, got an empty mapping")
        if rank is not None or lora_alpha is not None or use_rslora:
            raise ValueError("rank, lora_alpha, use_rslora: only for a fresh bank (adapters=int)")
        return [str(k) for k in adapters], {str(k): read_adapter(v) for k, v in adapters.items()}
    raise TypeError(
        f"adapters: expected a mapping name -> PEFT adapter folder or an int, got "
        f"{type(adapters).__name__}"
    )


def _targets(
    model: nn.Module,
    where: Placement,
    target_modules: str | Sequence[str] | None,
    loaded: Mapping[str, LoraAdapter],
    *,
    fresh: bool,
) -> list[str]:
    """The modules that get persona layers: those the adapters target (every linear layer for a
    fresh bank), narrowed by ``target_modules`` when given."""
    if target_modules is None:
        targets = list(where) if not fresh else select_targets(model, "all-linear")
    else:
        targets = select_targets(model, target_modules)
        check_target_modules(where, targets, target_modules, loaded)
        if not fresh:
            targets = [t for t in targets if t in where]
    if not targets:
        raise ValueError(f"target_modules: no linear layer of the model matches {target_modules!r}")
    return targets


def _fill(layer: PersonaLayer, per: Mapping[int, ExpertFactors]) -> None:
    """Copy each expert's factors into the zero-padded bank; experts not in ``per`` are absent."""
    layer.lora_A.zero_()
    layer.lora_B.zero_()
    layer.scaling.zero_()
    layer.pm_available.zero_()
    layer.pm_rank.zero_()
    for e, (a, b, s, r) in per.items():
        # Zero rows of A (and columns of B) past an expert's own rank change neither ||A x|| nor B A x.
        layer.lora_A[e, :r].copy_(a)
        layer.lora_B[e, :, :r].copy_(b)
        layer.scaling[e] = s
        layer.pm_available[e] = True
        layer.pm_rank[e] = r
