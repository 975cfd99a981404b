"""Write a servable checkpoint (:func:`export`): the base weights, the persona bank and the
``personamoe`` section of ``config.json``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from personamoe._atomic import replace_dir, temp_sibling, write_text
from personamoe.integrations.bank_format import BANK_WEIGHTS
from personamoe.integrations.checkpoint.section import FORMAT, SECTION, read_section
from personamoe.personas import Persona

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
    write_text(index, json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")


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
    personas: Sequence[Persona] = (),
    calibration_batches: Iterable[Any] | None = None,
    calibration_max_tokens: int | None = None,
) -> Path:
    """Write the servable checkpoint of ``base`` (a transformers causal-LM folder) with one expert
    per PEFT adapter folder of ``adapters`` (``name -> folder``) to the folder ``out``.

    ``personas`` (:class:`~personamoe.Persona` objects over the adapters' names) are registered on
    the served model: they are saved with the bank and listed by name in the ``personamoe``
    section, so :func:`load_exported` and a server know the same names.

    ``calibration="data"`` needs ``calibration_batches`` (token ids for the base model, as
    :func:`personamoe.calibrate` takes them; at most ``calibration_max_tokens`` real tokens): the
    statistics are measured here and saved with the bank.

    ``out`` must be new, empty or an earlier export: it is replaced as a whole, and only once the
    new checkpoint is complete (a failed export leaves the earlier one loadable)."""
    from transformers import AutoModelForCausalLM

    from personamoe.integrations.bank import save_bank
    from personamoe.integrations.hf import inject
    from personamoe.integrations.model_personas import add_persona

    base, out = Path(base), Path(out)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"{base / 'config.json'}: not found (expected a transformers model folder)"
        )
    if calibration == "data" and calibration_batches is None:
        raise ValueError(
            "calibration_batches: expected token-id batches to measure calibration 'data' on, "
            "got None"
        )
    if calibration != "data" and calibration_batches is not None:
        raise ValueError(
            f"calibration_batches: only used with calibration='data', got calibration="
            f"{calibration!r}"
        )
    _check_out(base, out)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto")
    # The base weights by name: inject keeps their Parameters and names, so they are saved below
    # from the injected model without its banks.
    base_state = model.state_dict()
    # Every adapter is read and checked before anything is written.
    inject(model, dict(adapters), target_modules=target_modules, top_k=top_k, temperature=temperature,
           normalize=normalize, calibration="none" if calibration == "data" else calibration)  # fmt: skip
    if calibration == "data":
        from personamoe.integrations.calibrate import calibrate

        assert calibration_batches is not None
        calibrate(model, calibration_batches, max_tokens=calibration_max_tokens)
    names: list[str] = []
    for p in personas:
        if not isinstance(p, Persona):
            raise TypeError(
                f"personas: expected personamoe.Persona objects, got {type(p).__name__}"
            )
        if p.name in names:
            raise ValueError(f"personas: the name {p.name!r} is given twice")
        add_persona(model, p)  # checks its expert names against the adapters
        names.append(p.name)
    section = _section(model, top_k, normalize, temperature, calibration)
    if names:
        section["personas"] = names
    # The whole checkpoint is built in a sibling folder and swapped in once complete: a failed
    # export (bad adapter, full disk) leaves an earlier export in ``out`` as it was.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out, ".tmp", folder=True)
    try:
        model.save_pretrained(str(tmp), state_dict=base_state, safe_serialization=True)
        _write_index(tmp)
        for name in _TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copyfile(base / name, tmp / name)
        save_bank(model, tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg[SECTION] = section
        read_section(cfg, out / "config.json")  # what we write must read back
        write_text(tmp / "config.json", json.dumps(cfg, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_out(base: Path, out: Path) -> None:
    """``out`` is replaced as a whole, so it must be new, empty, or an earlier export (never a
    folder holding anything else, nor the base model's)."""
    if out.resolve() == base.resolve() or out.resolve() in base.resolve().parents:
        raise ValueError(f"out: {out} holds the base folder {base}; choose another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"out: {out} is not a folder")
    if not any(out.iterdir()):
        return
    try:
        earlier = SECTION in json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        earlier = False
    if not earlier:
        raise ValueError(
            f"out: {out} is neither empty nor an earlier export (its config.json has no "
            f"'{SECTION}' section); the export replaces the whole folder, so choose another one"
        )
