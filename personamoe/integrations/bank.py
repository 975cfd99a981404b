"""A whole persona bank on disk (:func:`save_bank` / :func:`load_bank`) and one expert back out as a
plain PEFT adapter (:func:`export_expert`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from personamoe._atomic import write_files
from personamoe._json_file import read_json_object
from personamoe.adapters import check_finite, load_tensors, write_adapter
from personamoe.integrations.bank_format import (
    AVAILABLE,
    BANK_CONFIG,
    BANK_FORMAT,
    BANK_TENSORS,
    BANK_WEIGHTS,
    CALIBRATION,
    DATA_SCALE,
    LORA_A,
    LORA_B,
    OPTIONAL_TENSORS,
    RANK,
    SCALING,
    SCORE_SHIFT,
    tensor_key,
)
from personamoe.integrations.install import (
    install_layers,
    restore_on_error,
    train_only_the_bank,
)
from personamoe.integrations.layers import layer_class_for, persona_layers
from personamoe.integrations.model_personas import refresh, state_of
from personamoe.integrations.modes import merge
from personamoe.options import CALIBRATIONS, ROUTING_MODES, check_choice, check_routing_options
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
                        "calibrated": layer.pm_calibrated,
                        "data_calibrated": layer.pm_data_calibrated}  # fmt: skip
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
    """Read the bank in the folder ``path`` once (``weights``: the safetensors file's name).

    The JSON is checked in full here (:func:`_check_meta`), the tensors against a model by
    :func:`install_bank`; every error is a ``ValueError`` naming the file and the key."""
    path = Path(path)
    cfg_file, w_file = path / BANK_CONFIG, path / weights
    if not cfg_file.is_file() or not w_file.is_file():
        raise FileNotFoundError(f"{path}: expected {BANK_CONFIG} and {weights} (save_bank)")
    meta = read_json_object(cfg_file)
    if meta.get("format") != BANK_FORMAT:
        raise ValueError(
            f"{cfg_file}: key 'format': expected {BANK_FORMAT!r}, got {meta.get('format')!r}"
        )
    _check_meta(cfg_file, meta)
    return BankFiles(cfg_file, w_file, meta, load_tensors(w_file, ValueError))


def _err(file: Path, key: str, msg: str) -> ValueError:
    return ValueError(f"{file}: key {key!r}: {msg}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_meta(file: Path, meta: dict[str, Any]) -> None:
    """Every key of ``personamoe_bank.json`` that loading reads, before anything is built."""
    for key in ("experts", "routing", "options", "layers"):
        if key not in meta:
            raise _err(file, key, "missing")
    experts = meta["experts"]
    if (
        not isinstance(experts, list)
        or not experts
        or not all(isinstance(e, str) and e for e in experts)
        or len(set(experts)) != len(experts)
    ):
        raise _err(file, "experts", f"expected a non-empty list of unique names, got {experts!r}")
    if meta["routing"] not in ROUTING_MODES:
        raise _err(file, "routing", f"expected one of {ROUTING_MODES}, got {meta['routing']!r}")
    opts = meta["options"]
    if not isinstance(opts, dict):
        raise _err(file, "options", f"expected an object, got {opts!r}")
    for key in ("top_k", "temperature", "normalize"):
        if key not in opts:
            raise _err(file, f"options.{key}", "missing")
    try:
        check_routing_options(opts["top_k"], len(experts), opts["temperature"], opts["normalize"],
                              experts="the number of experts")  # fmt: skip
        check_choice("calibration", opts.get("calibration", "none"), CALIBRATIONS)
    except ValueError as e:  # "<option>: <what is wrong>"
        option, _, msg = str(e).partition(": ")
        raise _err(file, f"options.{option}", msg) from None
    weights = meta.get("default_weights")
    ok = isinstance(weights, dict) and all(
        k in experts and _is_number(v) for k, v in weights.items()
    )
    if weights is not None and not ok:
        raise _err(
            file, "default_weights", f"expected expert name -> finite number, got {weights!r}"
        )
    personas = meta.get("personas") or []
    if not isinstance(personas, list):
        raise _err(file, "personas", f"expected a list, got {personas!r}")
    probe = PersonaState(experts, "token", None)
    for i, d in enumerate(personas):
        try:
            if not isinstance(d, dict):
                raise TypeError(f"expected an object, got {d!r}")
            probe.check(Persona.from_dict(d))
        except (ValueError, TypeError, KeyError) as e:
            raise _err(file, f"personas[{i}]", str(e)) from None
    configs = meta.get("adapter_configs")
    if configs is not None and not isinstance(configs, dict):
        raise _err(file, "adapter_configs", f"expected an object, got {configs!r}")
    layers = meta["layers"]
    if not isinstance(layers, dict) or not layers:
        raise _err(file, "layers", f"expected a non-empty object module -> info, got {layers!r}")
    for name, info in layers.items():
        if not isinstance(info, dict):
            raise _err(file, f"layers.{name}", f"expected an object, got {info!r}")
        r = info.get("rank")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise _err(file, f"layers.{name}.rank", f"expected an int >= 1, got {r!r}")
        for flag in ("conv1d", "calibrated", "data_calibrated"):
            if not isinstance(info.get(flag, False), bool):
                raise _err(
                    file, f"layers.{name}.{flag}", f"expected true/false, got {info[flag]!r}"
                )
        if opts.get("calibration") == "data" and not info.get("data_calibrated", False):
            raise _err(file, f"layers.{name}.data_calibrated", "expected true (options.calibration "
                       "is 'data': every layer needs its statistics), got false")  # fmt: skip


def _check_tensors(model: nn.Module, bank: BankFiles) -> None:
    """Each layer's bank tensors against the JSON and the model's module: present, of the right
    shape and dtype, finite; ranks in range; calibration > 0. Nothing is allocated before."""
    meta, tensors, file = bank.meta, bank.tensors, bank.weights_file
    E = len(meta["experts"])
    for name, info in meta["layers"].items():
        r = info["rank"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise _err(
                file, tensor_key(name, LORA_A), f"the model has no module {name!r}"
            ) from None
        cls = layer_class_for(module)
        if cls is None:
            raise _err(file, tensor_key(name, LORA_A), f"module {name!r} is a "
                       f"{type(module).__name__}, which cannot hold persona experts")  # fmt: skip
        d_in, d_out, _ = cls.base_of(module)
        want = {LORA_A: (E, r, d_in), LORA_B: (E, d_out, r), SCALING: (E,), CALIBRATION: (E,),
                AVAILABLE: (E,), RANK: (E,), SCORE_SHIFT: (E,), DATA_SCALE: (E,)}  # fmt: skip
        got: dict[str, Tensor] = {}
        for t in BANK_TENSORS:
            key = tensor_key(name, t)
            if key not in tensors and t in OPTIONAL_TENSORS:
                if info.get("data_calibrated", False):
                    raise ValueError(f"{file}: missing key {key!r} (layers.{name}.data_calibrated)")
                continue
            if key not in tensors:
                raise ValueError(f"{file}: missing key {key!r}")
            if tuple(tensors[key].shape) != want[t]:
                raise _err(file, key, f"expected shape {list(want[t])} (E={E}, rank {r} from "
                           f"{BANK_CONFIG}, the model's layer), got {list(tensors[key].shape)}")  # fmt: skip
            got[t] = tensors[key]
        for t in (LORA_A, LORA_B, SCALING, CALIBRATION, SCORE_SHIFT, DATA_SCALE):
            if t in got:
                check_finite(file, tensor_key(name, t), got[t], ValueError)
        for t in (CALIBRATION, DATA_SCALE):
            if t in got and not bool((got[t] > 0).all()):
                raise _err(file, tensor_key(name, t),
                           f"expected values > 0, got {got[t].tolist()}")  # fmt: skip
        avail, ranks = got[AVAILABLE], got[RANK]
        if avail.dtype != torch.bool or ranks.is_floating_point() or ranks.dtype == torch.bool:
            raise _err(file, tensor_key(name, AVAILABLE), "expected a bool mask and int ranks, got "
                       f"{avail.dtype} and {ranks.dtype}")  # fmt: skip
        if not bool(avail.any()) or bool(((ranks[avail] < 1) | (ranks[avail] > r)).any()):
            raise _err(file, tensor_key(name, RANK), f"expected ranks in 1..{r} for the available "
                       f"experts {avail.tolist()} (at least one), got {ranks.tolist()}")  # fmt: skip


def load_bank(model: M, path: str | Path, *, freeze_base: bool = True) -> M:
    """Inject the bank saved by :func:`save_bank` into the base ``model`` (in place; returned)."""
    return install_bank(model, read_bank(path), freeze_base=freeze_base)


def install_bank(model: M, bank: BankFiles, *, freeze_base: bool = True) -> M:
    """Inject a bank already read by :func:`read_bank` into the base ``model`` (in place).

    Everything is checked first; a failure leaves the model as it was (so a retry can succeed)."""
    meta, tensors = bank.meta, bank.tensors
    if any(True for _ in persona_layers(model)):
        raise ValueError("model: personamoe.inject was already applied to this model")
    _check_meta(bank.config_file, meta)  # again: callers may have edited the meta (load_exported)
    _check_tensors(model, bank)
    opts = meta["options"]
    ranks = {name: int(info["rank"]) for name, info in meta["layers"].items()}
    with restore_on_error(model, ranks):
        state = PersonaState(meta["experts"], meta["routing"], meta.get("default_weights"))
        state.options = dict(opts)
        state.configs = dict(meta.get("adapter_configs") or {})
        layers = install_layers(model, state, ranks, top_k=opts["top_k"],
                                temperature=opts["temperature"], normalize=opts["normalize"])  # fmt: skip
        with torch.no_grad():
            for name, layer in layers.items():
                for t in BANK_TENSORS:
                    key = tensor_key(name, t)
                    if key in tensors:
                        getattr(layer, t).copy_(tensors[key])
                    else:  # a bank written before this optional tensor existed
                        getattr(layer, t).fill_(OPTIONAL_TENSORS[t])
                info = meta["layers"][name]
                layer.pm_calibrated = bool(info.get("calibrated", False))
                layer.pm_data_calibrated = bool(info.get("data_calibrated", False))
                if opts.get("calibration") == "data":  # the divisor is sigma, the shift joins
                    layer.pm_set_calibration("data")
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
