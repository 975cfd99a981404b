"""A whole persona bank on disk (:func:`save_bank` / :func:`load_bank`) and one expert back out as a
plain PEFT adapter (:func:`export_expert`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from personamoe._atomic import write_files
from personamoe.adapters import write_adapter
from personamoe.integrations.bank_format import (
    BANK_CONFIG,
    BANK_FORMAT,
    BANK_TENSORS,
    BANK_WEIGHTS,
    LORA_A,
    tensor_key,
)
from personamoe.integrations.install import install_layers, train_only_the_bank
from personamoe.integrations.layers import persona_layers
from personamoe.integrations.model_personas import refresh, state_of
from personamoe.integrations.modes import merge
from personamoe.personas import Persona, PersonaState

__all__ = ["BankFiles", "export_expert", "install_bank", "load_bank", "read_bank", "save_bank"]

M = TypeVar("M", bound=nn.Module)


def _model_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def save_bank(model: nn.Module, path: str | Path) -> Path:
    """Write the bank of an injected model (every layer's experts, the routing options, the
    registered personas) to the folder ``path``; :func:`load_bank` reads it back."""
    from safetensors.torch import save_file

    st = state_of(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, layer in persona_layers(model):
        if layer.pm_merged:
            raise ValueError("save_bank: the model is merged; call personamoe.unmerge first")
        layers[name] = {"rank": layer.rank, "conv1d": layer.fan_in_fan_out,
                        "calibrated": layer.pm_calibrated}  # fmt: skip
        for t in BANK_TENSORS:
            tensors[tensor_key(name, t)] = getattr(layer, t).detach().to("cpu").contiguous()
    meta = {
        "format": BANK_FORMAT,
        "experts": list(st.experts),
        "routing": st.routing if st.routing != "merged" else "token",
        "options": st.options,
        "default_weights": {
            e: float(w) for e, w in zip(st.experts, st.default_weights, strict=True)
        },
        "personas": [p.to_dict() for p in st.registered.values()],
        "adapter_configs": st.configs,
        "base_model_name_or_path": _model_name(model),
        "layers": layers,
    }
    text = json.dumps(meta, indent=2) + "\n"  # fails (unserializable config) before any write
    # Both files or neither: a reader never sees new weights beside an old or truncated config.
    write_files({
        path / BANK_WEIGHTS: lambda p: save_file(tensors, str(p), metadata={"format": BANK_FORMAT}),
        path / BANK_CONFIG: text,
    })  # fmt: skip
    return path


@dataclass(frozen=True)
class BankFiles:
    """A bank read from disk: ``personamoe_bank.json``'s metadata and every tensor of the
    safetensors file, on the CPU."""

    config_file: Path
    weights_file: Path
    meta: dict[str, Any]
    tensors: dict[str, Tensor]


def read_bank(path: str | Path, weights: str = BANK_WEIGHTS) -> BankFiles:
    """Read the bank in the folder ``path`` once (``weights``: the safetensors file's name)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, w_file = path / BANK_CONFIG, path / weights
    if not cfg_file.is_file() or not w_file.is_file():
        raise FileNotFoundError(f"{path}: expected {BANK_CONFIG} and {weights} (save_bank)")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != BANK_FORMAT:
        raise ValueError(
            f"{cfg_file}: key 'format': expected {BANK_FORMAT!r}, got {meta.get('format')!r}"
        )
    return BankFiles(cfg_file, w_file, meta, load_file(str(w_file)))


def load_bank(model: M, path: str | Path, *, freeze_base: bool = True) -> M:
    """Inject the bank saved by :func:`save_bank` into the base ``model`` (in place; returned)."""
    return install_bank(model, read_bank(path), freeze_base=freeze_base)


def install_bank(model: M, bank: BankFiles, *, freeze_base: bool = True) -> M:
    """Inject a bank already read by :func:`read_bank` into the base ``model`` (in place)."""
    meta, tensors, w_file = bank.meta, bank.tensors, bank.weights_file
    if any(True for _ in persona_layers(model)):
        raise ValueError("model: personamoe.inject was already applied to this model")
    opts = meta["options"]
    state = PersonaState(meta["experts"], meta["routing"], meta["default_weights"])
    state.options = dict(opts)
    state.configs = dict(meta.get("adapter_configs") or {})
    names = {n for n, _ in model.named_modules()}
    for name in meta["layers"]:
        if name not in names:
            raise ValueError(
                f"{w_file}: key {tensor_key(name, LORA_A)!r}: the model has no module {name!r}"
            )
    ranks = {name: int(info["rank"]) for name, info in meta["layers"].items()}
    layers = install_layers(model, state, ranks, top_k=opts["top_k"],
                            temperature=opts["temperature"], normalize=opts["normalize"])  # fmt: skip
    with torch.no_grad():
        for name, layer in layers.items():
            for t in BANK_TENSORS:
                key = tensor_key(name, t)
                if key not in tensors:
                    raise ValueError(f"{w_file}: missing key {key!r}")
                dst = getattr(layer, t)
                if tuple(tensors[key].shape) != tuple(dst.shape):
                    raise ValueError(
                        f"{w_file}: key {key!r}: expected shape {list(dst.shape)} (the model's "
                        f"layer), got {list(tensors[key].shape)}"
                    )
                dst.copy_(tensors[key])
            layer.pm_calibrated = bool(meta["layers"][name].get("calibrated", False))
    train_only_the_bank(model, layers.values(), freeze_base=freeze_base)
    for d in meta.get("personas") or []:
        persona = Persona.from_dict(d)
        state.check(persona)
        state.registered[persona.name] = persona
    refresh(model)
    if meta["routing"] == "merged":
        merge(model, state.default_weights)
    return model


def export_expert(model: nn.Module, name: str, path: str | Path) -> Path:
    """Write expert ``name`` of an injected model as a plain PEFT LoRA adapter folder (its own rank
    per layer, exact scaling via ``alpha_pattern``), loadable by ``PeftModel.from_pretrained``."""
    st = state_of(model)
    e = st.expert_index(name, "name")
    modules: dict[str, tuple[Tensor, Tensor, float]] = {}
    conv1d = False
    for lname, layer in persona_layers(model):
        if not bool(layer.pm_available[e]):
            continue
        r = int(layer.pm_rank[e])
        a = layer.lora_A[e, :r].detach()
        b = layer.lora_B[e, :, :r].detach()
        modules[lname] = (a, b, float(layer.scaling[e]))
        conv1d = conv1d or layer.fan_in_fan_out
    if not modules:
        raise ValueError(f"name: expert {name!r} targets no layer of this model")
    return write_adapter(path, modules, base_config=st.configs.get(name), fan_in_fan_out=conv1d,
                         base_model_name_or_path=_model_name(model))  # fmt: skip
