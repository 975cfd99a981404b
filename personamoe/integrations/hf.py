"""Drop-in persona experts for Hugging Face ``transformers`` models (and any ``nn.Module``).

:func:`inject` swaps the target linear layers (``nn.Linear``, GPT-2's ``Conv1D``) for persona layers
that share the base Parameters under the same names, and loads each PEFT adapter as one expert of
every layer it targets. transformers itself is only imported to recognise ``Conv1D``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from personamoe import reference
from personamoe.adapters import AdapterError, LoraAdapter, read_adapter
from personamoe.integrations.layers import PersonaConv1DLayer, PersonaLayer, persona_layers
from personamoe.nn import lora_scaling
from personamoe.integrations.model_personas import refresh
from personamoe.personas import PersonaState

__all__ = ["inject", "install_layers"]

CALIBRATIONS = ("none", "frobenius")
M = TypeVar("M", bound=nn.Module)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is an optional extra
        return None
    return Conv1D


def _is_conv1d(m: nn.Module) -> bool:
    c = _conv1d_type()
    return c is not None and isinstance(m, c) and not isinstance(m, PersonaLayer)


def _is_target_type(m: nn.Module) -> bool:
    return (isinstance(m, nn.Linear) and not isinstance(m, PersonaLayer)) or _is_conv1d(m)


def _shape(m: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear or Conv1D module."""
    w = m.weight
    assert isinstance(w, Tensor)
    if _is_conv1d(m):
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])


def _output_embedding_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is None:
        return set()
    return {name for name, m in model.named_modules() if m is out}


def _select_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """PEFT's matching: a list matches a module name exactly or as a ``.``-suffix, a string is a
    full-match regex, ``"all-linear"`` takes every linear/Conv1D layer but the output head."""
    linear = [n for n, m in model.named_modules() if n and _is_target_type(m)]
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            skip = _output_embedding_names(model)
            return [n for n in linear if n not in skip]
        return [n for n in linear if re.fullmatch(target_modules, n)]
    keys = list(target_modules)
    return [n for n in linear if any(n == k or n.endswith("." + k) for k in keys)]


def _resolve(model_names: Sequence[str], module: str, adapter: LoraAdapter) -> str:
    """The model's module name for an adapter's module path (exact, or one ``.``-suffix of the other:
    adapters trained on ``XForCausalLM`` load into ``XModel`` and back)."""
    key = adapter.modules[module].key_A
    if module in model_names:
        return module
    hits = [n for n in model_names if n and (module.endswith("." + n) or n.endswith("." + module))]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise AdapterError(
            f"{adapter.weights_file}: key {key!r}: the model has no module {module!r} "
            "(was the adapter trained on another base model?)"
        )
    raise AdapterError(
        f"{adapter.weights_file}: key {key!r}: module {module!r} matches several modules of the "
        f"model: {hits}"
    )


def _check_base_model(model: nn.Module, adapter: LoraAdapter) -> None:
    cfg = getattr(model, "config", None)
    mine = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None) or ""
    theirs = adapter.base_model or ""
    if mine and theirs and Path(str(mine)).name != Path(str(theirs)).name:
        warnings.warn(
            f"{adapter.config_file}: key 'base_model_name_or_path' = {theirs!r}, but the model is "
            f"{mine!r}; shapes match, so the adapter is loaded anyway",
            stacklevel=3,
        )


class _SequenceHook:
    """Forward pre-hook on the root model, for ``routing="sequence"``: which prompt tokens to pool
    over and whether this forward starts new sequences (no KV cache yet).

    The pooling mask is the ``attention_mask`` when the call passes one; ``generate`` in recent
    transformers passes ``position_ids`` instead (padding restarts at 0, so a left-padded row's
    prompt is its last run that starts at position 0).
    """

    def __init__(self, state: PersonaState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        st = self.state
        if st.routing != "sequence":
            return None
        mask = kwargs.get("attention_mask")
        if not (isinstance(mask, Tensor) and mask.dim() == 2):
            mask = _prompt_mask(kwargs.get("position_ids"))
        st.attention_mask = mask
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        length = 0
        if past is not None and hasattr(past, "get_seq_length"):
            length = int(past.get_seq_length())
        st.new_sequence = length == 0
        return None


def _prompt_mask(position_ids: Any) -> Tensor | None:
    """``[B, S]`` bool: the tokens from each row's last position 0 on (None when not 2-D)."""
    if not (isinstance(position_ids, Tensor) and position_ids.dim() == 2):
        return None
    S = position_ids.shape[1]
    zero = position_ids == 0
    last = (S - 1) - zero.flip(1).int().argmax(1)
    last = torch.where(zero.any(1), last, torch.zeros_like(last))
    return torch.arange(S, device=position_ids.device)[None, :] >= last[:, None]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def install_layers(
    model: nn.Module,
    state: PersonaState,
    ranks: Mapping[str, int],
    *,
    top_k: int,
    temperature: float,
    normalize: str,
) -> dict[str, PersonaLayer]:
    """Replace the modules ``ranks`` names by persona layers of those bank ranks (empty banks)."""
    layers: dict[str, PersonaLayer] = {}
    for name, r in ranks.items():
        module = model.get_submodule(name)
        cls = PersonaConv1DLayer if _is_conv1d(module) else PersonaLayer
        layer = cls.wrap(module, state, rank=r, top_k=top_k, temperature=temperature,
                         normalize=normalize)  # fmt: skip
        _replace(model, name, layer)
        layers[name] = layer
    model.register_forward_pre_hook(_SequenceHook(state), with_kwargs=True)
    return layers


def _check_options(
    top_k: int, E: int, temperature: float, normalize: str, calibration: str
) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(
            f"top_k: expected an int in 1..{E} (the number of adapters), got {top_k!r}"
        )
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature: expected a finite float > 0, got {temperature!r}")
    if normalize not in reference.NORMALIZE_MODES:
        raise ValueError(
            f"normalize: expected one of {reference.NORMALIZE_MODES}, got {normalize!r}"
        )
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration: expected one of {CALIBRATIONS}, got {calibration!r}")


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
        top_k, temperature, normalize: the routing of DESIGN.md §1.
        calibration: ``"frobenius"`` divides each expert's score by ``||A_e||_F`` (per layer, at
            load time) so that adapters trained apart compete on one scale.
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
    loaded: dict[str, LoraAdapter] = {}
    if fresh:
        assert isinstance(adapters, int)
        if adapters < 1:
            raise ValueError(f"adapters: expected a number of experts >= 1, got {adapters}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: expected an int >= 1 for a fresh bank, got {rank!r}")
        experts = [f"expert_{i}" for i in range(adapters)]
    elif isinstance(adapters, Mapping):
        if not adapters:
            raise ValueError("adapters: expected at least one adapter, got an empty mapping")
        if rank is not None or lora_alpha is not None or use_rslora:
            raise ValueError("rank, lora_alpha, use_rslora: only for a fresh bank (adapters=int)")
        experts = [str(k) for k in adapters]
        loaded = {str(k): read_adapter(v) for k, v in adapters.items()}
    else:
        raise TypeError(
            f"adapters: expected a mapping name -> PEFT adapter folder or an int, got "
            f"{type(adapters).__name__}"
        )
    E = len(experts)
    _check_options(top_k, E, temperature, normalize, calibration)
    state = PersonaState(experts, routing, weights)
    state.options = {"top_k": top_k, "temperature": float(temperature), "normalize": normalize,
                     "calibration": calibration}  # fmt: skip

    names = [n for n, _ in model.named_modules()]
    # where[module name][expert index] = (A, B, scaling, rank)
    where: dict[str, dict[int, tuple[Tensor, Tensor, float, int]]] = {}
    for e, (ename, ad) in enumerate(loaded.items()):
        _check_base_model(model, ad)
        state.configs[ename] = dict(ad.config)
        for module, lm in ad.modules.items():
            target = _resolve(names, module, ad)
            m = model.get_submodule(target)
            if not _is_target_type(m):
                raise AdapterError(
                    f"{ad.weights_file}: key {lm.key_A!r}: module {target!r} is a "
                    f"{type(m).__name__}; only nn.Linear and Conv1D layers can hold persona experts"
                )
            d_in, d_out = _shape(m)
            if lm.lora_A.shape[1] != d_in:
                raise AdapterError(
                    f"{ad.weights_file}: key {lm.key_A!r}: expected shape [r, d_in={d_in}] for "
                    f"module {target!r}, got {list(lm.lora_A.shape)} (another base model?)"
                )
            if lm.lora_B.shape[0] != d_out:
                raise AdapterError(
                    f"{ad.weights_file}: key {lm.key_B!r}: expected shape [d_out={d_out}, r] for "
                    f"module {target!r}, got {list(lm.lora_B.shape)} (another base model?)"
                )
            where.setdefault(target, {})[e] = (lm.lora_A, lm.lora_B, lm.scaling, lm.rank)

    if target_modules is None:
        targets = list(where) if not fresh else _select_targets(model, "all-linear")
    else:
        targets = _select_targets(model, target_modules)
        chosen = set(targets)
        for target, per in where.items():
            if target not in chosen:
                ename = experts[next(iter(per))]
                raise AdapterError(
                    f"{loaded[ename].weights_file}: adapter {ename!r} targets module {target!r}, "
                    f"which target_modules={target_modules!r} leaves out"
                )
        if not fresh:
            targets = [t for t in targets if t in where]
    if not targets:
        raise ValueError(f"target_modules: no linear layer of the model matches {target_modules!r}")

    if fresh:
        assert rank is not None
        ranks = {t: rank for t in targets}
    else:
        ranks = {t: max(v[3] for v in where[t].values()) for t in targets}
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
            if calibration == "frobenius":
                norms = torch.linalg.vector_norm(layer.lora_A.float(), dim=(1, 2))
                layer.calibration.copy_(torch.where(norms > 0, norms, torch.ones_like(norms)))
                layer.pm_calibrated = True
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for layer in layers.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    refresh(model)
    if routing == "merged":
        from personamoe.integrations.modes import merge

        merge(model, state.default_weights)
    return model


def _fill(layer: PersonaLayer, per: Mapping[int, tuple[Tensor, Tensor, float, int]]) -> None:
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
