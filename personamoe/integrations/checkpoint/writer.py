"""Write a servable checkpoint (:func:`export`): the base weights, the persona bank and the
``personamoe`` section of ``config.json``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from personamoe.integrations.bank_format import BANK_WEIGHTS
from personamoe.integrations.checkpoint.section import FORMAT, SECTION, read_section

__all__ = ["export"]

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _section(model: nn.Module, top_k: int, normalize: str, temperature: float,
             calibration: str) -> dict[str, Any]:  # fmt: skip
    """What the bank does not hold: the experts and targets to serve and the routing options."""
    from personamoe.integrations.layers import persona_layers
    from personamoe.integrations.model_personas import state_of

    return {
        "format": FORMAT,
        "bank": BANK_WEIGHTS,
        "experts": list(state_of(model).experts),
        "targets": [name for name, _ in persona_layers(model)],
        "top_k": top_k,
        "normalize": normalize,
        "temperature": float(temperature),
        "calibration": calibration,
        "routing": "token",
    }


def _write_index(out: Path) -> None:
    """Name the base weight files in ``model.safetensors.index.json`` (when transformers wrote a
    single file without one): loaders that glob ``*.safetensors`` (vLLM) then leave the bank out."""
    from safetensors import safe_open

    index = out / "model.safetensors.index.json"
    if index.is_file():
        return
    weight_map: dict[str, str] = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            weight_map.update({k: file.name for k in f.keys()})  # noqa: SIM118
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")


def export(
    base: str | Path,
    adapters: Mapping[str, str | Path],
    out: str | Path,
    *,
    top_k: int = 2,
    normalize: str = "topk",
    temperature: float = 1.0,
    calibration: str = "none",
    target_modules: str | Sequence[str] | None = None,
) -> Path:
    """Write the servable checkpoint of ``base`` (a transformers causal-LM folder) with one expert
    per PEFT adapter folder of ``adapters`` (``name -> folder``) to the folder ``out``."""
    from transformers import AutoModelForCausalLM

    from personamoe.integrations.bank import save_bank
    from personamoe.integrations.hf import inject

    base, out = Path(base), Path(out)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"{base / 'config.json'}: not found (expected a transformers model folder)"
        )
    if out.resolve() == base.resolve():
        raise ValueError(f"out: {out} is the base folder; choose another folder")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)  # the base weights, before injecting
    _write_index(out)
    for name in _TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    inject(model, dict(adapters), target_modules=target_modules, top_k=top_k, temperature=temperature,
           normalize=normalize, calibration=calibration)  # fmt: skip
    save_bank(model, out)
    cfg_file = out / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[SECTION] = _section(model, top_k, normalize, temperature, calibration)
    read_section(cfg, cfg_file)  # what we write must read back
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    return out
