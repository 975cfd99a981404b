"""A servable checkpoint: one folder with the base model, the persona bank and a ``personamoe``
section in ``config.json``, loaded by ``transformers`` + personamoe (:func:`load_exported`) and by
vLLM with the personamoe plugin (``personamoe.integrations.vllm``).

Layout of the folder (:func:`export`)::

    config.json                    the base model's config + a "personamoe" section (below)
    model.safetensors ...          the base weights, unchanged names (transformers' save_pretrained)
    tokenizer files                copied from the base folder
    personamoe_bank.safetensors    every target layer's bank: "<module>.lora_A" [E, r, d_in],
                                   ".lora_B" [E, d_out, r], ".scaling" [E], ".calibration" [E],
                                   ".pm_available" [E] bool, ".pm_rank" [E] (save_bank's format)
    personamoe_bank.json           save_bank's metadata (so personamoe.load_bank reads it too)

The ``personamoe`` section (``FORMAT`` below)::

    "personamoe": {
      "format": "personamoe-export/1",
      "bank": "personamoe_bank.safetensors",
      "experts": ["calm", "curious", ...],               E unique names
      "targets": ["model.layers.0.self_attn.q_proj", ...],
      "ranks": {"<target>": [r_0, ..., r_{E-1}]},        each expert's rank there, 0 = absent
      "scalings": {"<target>": [s_0, ..., s_{E-1}]},     alpha / r per expert (0 where absent)
      "top_k": 2, "normalize": "topk", "temperature": 1.0,
      "calibration": "none" | "frobenius",
      "routing": "token"
    }

The section is authoritative: both loaders read ``top_k``/``normalize``/``temperature`` from it
(editing it changes the routing of a served model) and check ranks and scalings against the bank.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from personamoe import reference

__all__ = [
    "BANK_WEIGHTS",
    "CLI_HELP",
    "FORMAT",
    "SECTION",
    "ExportError",
    "PersonaSection",
    "export",
    "load_exported",
    "read_bank_tensors",
    "read_section",
]

FORMAT = "personamoe-export/1"
SECTION = "personamoe"
BANK_WEIGHTS = "personamoe_bank.safetensors"
ROUTINGS = ("token",)
CALIBRATIONS = ("none", "frobenius")
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


CLI_HELP = "write a servable checkpoint (base weights + persona bank) for transformers and vLLM"


def add_arguments(p: Any) -> None:
    """The ``python -m personamoe export`` options."""
    p.add_argument("--base", required=True, help="the base model folder (transformers)")
    p.add_argument("--adapters", required=True, nargs="+", metavar="NAME=DIR",
                   help="one expert per PEFT LoRA adapter folder")  # fmt: skip
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--normalize", default="topk", choices=reference.NORMALIZE_MODES)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--calibration", default="none", choices=CALIBRATIONS)
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="restrict the targets (names or suffixes, as in PEFT)")  # fmt: skip


def main(args: Any) -> int:
    adapters: dict[str, str] = {}
    for item in args.adapters:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--adapters: expected NAME=DIR, got {item!r}")
        if name in adapters:
            raise SystemExit(f"--adapters: the name {name!r} is given twice")
        adapters[name] = folder
    out = export(args.base, adapters, args.out, top_k=args.top_k, normalize=args.normalize,
                 temperature=args.temperature, calibration=args.calibration,
                 target_modules=args.target_modules)  # fmt: skip
    print(f"wrote {out} ({len(adapters)} experts, top_k={args.top_k})")
    return 0


class ExportError(ValueError):
    """A malformed exported checkpoint; the message names the file and the key."""


@dataclass(frozen=True)
class PersonaSection:
    """The validated ``personamoe`` section of an exported checkpoint's ``config.json``."""

    path: Path  # the config.json it came from
    experts: tuple[str, ...]
    targets: tuple[str, ...]
    ranks: dict[str, tuple[int, ...]]
    scalings: dict[str, tuple[float, ...]]
    top_k: int
    normalize: str
    temperature: float
    calibration: str
    routing: str
    bank: str

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def bank_rank(self, target: str) -> int:
        """The padded rank of a target's bank (the largest expert rank there)."""
        return max(self.ranks[target])

    def bank_file(self) -> Path:
        return self.path.parent / self.bank


def _err(path: Path, key: str, msg: str) -> ExportError:
    return ExportError(f"{path}: key '{SECTION}.{key}': {msg}")


def read_section(config: Mapping[str, Any] | Any, path: str | Path) -> PersonaSection:
    """Validate the ``personamoe`` section of ``config`` (a dict or a transformers config object,
    read from ``path``); raises :class:`ExportError` naming the key that is wrong."""
    path = Path(path)
    raw = config.get(SECTION) if isinstance(config, Mapping) else getattr(config, SECTION, None)
    if raw is None:
        raise ExportError(
            f"{path}: no '{SECTION}' section (not a checkpoint written by `python -m personamoe "
            "export`)"
        )
    if not isinstance(raw, Mapping):
        raise ExportError(f"{path}: key '{SECTION}': expected an object, got {type(raw).__name__}")
    fmt = raw.get("format")
    if fmt != FORMAT:
        raise _err(path, "format", f"expected {FORMAT!r}, got {fmt!r}")
    missing = [k for k in ("experts", "targets", "ranks", "scalings", "top_k") if k not in raw]
    if missing:
        raise _err(path, missing[0], "missing")

    experts = raw["experts"]
    if not isinstance(experts, list) or not experts or not all(
        isinstance(e, str) and e for e in experts
    ):  # fmt: skip
        raise _err(path, "experts", f"expected a non-empty list of names, got {experts!r}")
    if len(set(experts)) != len(experts):
        raise _err(path, "experts", f"expected unique names, got {experts!r}")
    E = len(experts)

    targets = raw["targets"]
    if not isinstance(targets, list) or not targets or not all(
        isinstance(t, str) and t for t in targets
    ):  # fmt: skip
        raise _err(path, "targets", f"expected a non-empty list of module names, got {targets!r}")

    ranks: dict[str, tuple[int, ...]] = {}
    scalings: dict[str, tuple[float, ...]] = {}
    for what, table in (("ranks", raw["ranks"]), ("scalings", raw["scalings"])):
        if not isinstance(table, Mapping):
            raise _err(path, what, f"expected an object target -> [E values], got {table!r}")
        extra = sorted(set(table) - set(targets))
        if extra:
            raise _err(path, f"{what}.{extra[0]}", "not one of 'targets'")
        for t in targets:
            row = table.get(t)
            if not isinstance(row, list) or len(row) != E:
                raise _err(path, f"{what}.{t}", f"expected a list of E={E} numbers, got {row!r}")
            if what == "ranks":
                if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row):
                    raise _err(path, f"ranks.{t}", f"expected ints >= 0 (0 = absent), got {row!r}")
                if max(row) < 1:
                    raise _err(path, f"ranks.{t}", "no expert targets this module (all ranks 0)")
                ranks[t] = tuple(row)
            else:
                ok = all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in row
                )
                if not ok:
                    raise _err(path, f"scalings.{t}", f"expected finite numbers, got {row!r}")
                scalings[t] = tuple(float(v) for v in row)

    top_k = raw["top_k"]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise _err(
            path, "top_k", f"expected an int in 1..{E} (the number of experts), got {top_k!r}"
        )
    normalize = raw.get("normalize", "topk")
    if normalize not in reference.NORMALIZE_MODES:
        raise _err(
            path, "normalize", f"expected one of {reference.NORMALIZE_MODES}, got {normalize!r}"
        )
    temperature = raw.get("temperature", 1.0)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise _err(path, "temperature", f"expected a finite number > 0, got {temperature!r}")
    calibration = raw.get("calibration", "none")
    if calibration not in CALIBRATIONS:
        raise _err(path, "calibration", f"expected one of {CALIBRATIONS}, got {calibration!r}")
    routing = raw.get("routing", "token")
    if routing not in ROUTINGS:
        raise _err(path, "routing", f"expected one of {ROUTINGS} (servable modes), got {routing!r}")
    bank = raw.get("bank", BANK_WEIGHTS)
    if not isinstance(bank, str) or not bank or "/" in bank or "\\" in bank:
        raise _err(path, "bank", f"expected a file name in the checkpoint folder, got {bank!r}")
    return PersonaSection(
        path=path,
        experts=tuple(experts),
        targets=tuple(targets),
        ranks=ranks,
        scalings=scalings,
        top_k=top_k,
        normalize=normalize,
        temperature=float(temperature),
        calibration=calibration,
        routing=routing,
        bank=bank,
    )


def read_bank_tensors(
    section: PersonaSection, target: str, tensors: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """One target's bank tensors from the bank file, checked against the section:
    ``lora_A [E, r, d_in]``, ``lora_B [E, d_out, r]``, ``scaling [E]``, ``calibration [E]``
    (ones unless ``calibration == "frobenius"``) and ``available [E]`` (bool)."""
    file = section.bank_file()
    E, r = section.num_experts, section.bank_rank(target)
    out: dict[str, Tensor] = {}
    for t in ("lora_A", "lora_B", "scaling", "calibration", "pm_available", "pm_rank"):
        key = f"{target}.{t}"
        if key not in tensors:
            raise ExportError(f"{file}: missing key {key!r} ('{SECTION}.targets' lists {target!r})")
        out[t] = tensors[key]
    a, b = out["lora_A"], out["lora_B"]
    if a.dim() != 3 or a.shape[:2] != (E, r):
        raise ExportError(
            f"{file}: key {target + '.lora_A'!r}: expected shape [E={E}, r={r}, d_in] (from "
            f"'{SECTION}.ranks'), got {list(a.shape)}"
        )
    if b.dim() != 3 or b.shape[0] != E or b.shape[2] != r:
        raise ExportError(
            f"{file}: key {target + '.lora_B'!r}: expected shape [E={E}, d_out, r={r}], got "
            f"{list(b.shape)}"
        )
    ranks = torch.tensor(section.ranks[target])
    avail = ranks > 0
    if not torch.equal(out["pm_available"].bool(), avail) or not torch.equal(
        torch.where(avail, out["pm_rank"].long(), 0), ranks
    ):
        raise ExportError(
            f"{section.path}: key '{SECTION}.ranks.{target}': {list(section.ranks[target])} "
            f"disagrees with the bank {file.name} (ranks {out['pm_rank'].tolist()}, available "
            f"{out['pm_available'].tolist()})"
        )
    s = torch.tensor(section.scalings[target], dtype=torch.float32)
    if not torch.allclose(torch.where(avail, out["scaling"].float(), 0.0), torch.where(avail, s, 0.0),
                          rtol=1e-6, atol=0.0):  # fmt: skip
        raise ExportError(
            f"{section.path}: key '{SECTION}.scalings.{target}': {list(section.scalings[target])} "
            f"disagrees with the bank {file.name} ({out['scaling'].tolist()})"
        )
    if section.calibration == "none":
        out["calibration"] = torch.ones(E)
    return {
        "lora_A": a,
        "lora_B": b,
        "scaling": torch.where(avail, out["scaling"].float(), 0.0),
        "calibration": out["calibration"].float(),
        "available": avail,
    }


# -- writing ---------------------------------------------------------------------------------------
def _section(model: nn.Module, top_k: int, normalize: str, temperature: float,
             calibration: str) -> dict[str, Any]:  # fmt: skip
    from personamoe.integrations.layers import persona_layers
    from personamoe.integrations.model_personas import state_of

    st = state_of(model)
    ranks: dict[str, list[int]] = {}
    scalings: dict[str, list[float]] = {}
    for name, layer in persona_layers(model):
        avail = layer.pm_available.bool()
        ranks[name] = [
            int(r) if a else 0 for r, a in zip(layer.pm_rank.tolist(), avail.tolist(), strict=True)
        ]
        scalings[name] = [
            float(s) if a else 0.0
            for s, a in zip(layer.scaling.tolist(), avail.tolist(), strict=True)
        ]
    return {
        "format": FORMAT,
        "bank": BANK_WEIGHTS,
        "experts": list(st.experts),
        "targets": list(ranks),
        "ranks": ranks,
        "scalings": scalings,
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


# -- loading with transformers ---------------------------------------------------------------------
def load_exported(path: str | Path, **from_pretrained: Any) -> nn.Module:
    """The exported checkpoint as a ``transformers`` model with its persona bank injected
    (routing options from the ``personamoe`` section). Extra keyword arguments go to
    ``AutoModelForCausalLM.from_pretrained``."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from personamoe.integrations.bank import load_bank
    from personamoe.integrations.layers import persona_layers
    from personamoe.integrations.model_personas import state_of

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: not found")
    section = read_section(json.loads(cfg_file.read_text()), cfg_file)
    if not section.bank_file().is_file():
        raise ExportError(f"{cfg_file}: key '{SECTION}.bank': {section.bank_file()} not found")
    tensors = load_file(str(section.bank_file()))
    for t in section.targets:
        read_bank_tensors(section, t, tensors)
    model = AutoModelForCausalLM.from_pretrained(str(path), **from_pretrained)
    load_bank(model, path)
    names = {n for n, _ in persona_layers(model)}
    if names != set(section.targets):
        raise ExportError(
            f"{cfg_file}: key '{SECTION}.targets' disagrees with the bank's layers "
            f"({sorted(names ^ set(section.targets))[:3]} ...)"
        )
    st = state_of(model)
    st.options.update(top_k=section.top_k, temperature=section.temperature,
                      normalize=section.normalize, calibration=section.calibration)  # fmt: skip
    for _, layer in persona_layers(model):
        layer._set_routing(section.top_k, section.temperature, section.normalize)
        layer.pm_calibrated = section.calibration == "frobenius"
    return model
