"""PEFT LoRA adapters on disk, read and written with safetensors alone (no PEFT import).

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (``[r, d_in]``) and ``...lora_B.weight``
(``[d_out, r]``). The rank and alpha of a module come from ``rank_pattern`` / ``alpha_pattern``
(PEFT's matching: the first pattern key ``k``, in the file's order, with
``re.match(rf"(.*\\.)?({k})$", module)``), else ``r`` / ``lora_alpha`` (PEFT's default alpha 8
when the key is absent); the scaling is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
The modules are the ones the weights file holds (PEFT saves exactly its targeted modules, so
``target_modules`` needs no matching here). ``fan_in_fan_out`` only concerns the base layer
(GPT-2's ``Conv1D``): LoRA factors keep this layout.

Why not let PEFT parse the config (a decision, kept deliberately): loading needs only a JSON file
and a safetensors file, so ``inject``, ``python -m personamoe export`` and the vLLM tests' adapter
writer work with transformers (or nothing) installed, not PEFT; and importing PEFT costs. On the
development machine ``python -c "import peft"`` took 6.4-8.2 s and 425 MB peak RSS, against
2.3-2.5 s and 225 MB for ``python -c "import personamoe.adapters"`` (mostly torch): PEFT pulls in
transformers and accelerate. The rules copied here are few (pattern keys, the alpha default,
rsLoRA) and tests/test_adapters_vs_peft.py holds them to PEFT itself: PEFT models built
with rank/alpha patterns (plain and regex keys), ``target_modules`` lists and regex strings,
rsLoRA and the default alpha are saved, read back here and compared, module by module, with
PEFT's own ``module.r`` / ``module.scaling``.

Anything this library cannot reproduce exactly raises :class:`AdapterError` naming the file and key.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterError",
    "LoraAdapter",
    "LoraModule",
    "pattern_key",
    "read_adapter",
    "write_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")

# Config entries that change the math in ways this library does not reproduce: key -> what it is.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "target_parameters": "LoRA on nn.Parameter targets",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable tokens",
}


class AdapterError(ValueError):
    """An adapter this library cannot load exactly; the message names the file and key."""


@dataclass
class LoraModule:
    """One module's LoRA factors as stored by PEFT."""

    lora_A: Tensor  # [r, d_in]
    lora_B: Tensor  # [d_out, r]
    rank: int
    alpha: float
    scaling: float
    key_A: str
    key_B: str


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read from ``path``: module name (as in the file, without the
    ``base_model.model.`` prefix) -> factors."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern key matching the end of ``module``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _check_config(cfg: dict[str, Any], cfg_file: Path) -> None:
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(
            f"{cfg_file}: key 'peft_type': expected 'LORA', got {peft_type!r} (only LoRA adapters "
            "can be persona experts)"
        )
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise AdapterError(
                f"{cfg_file}: key {key!r} = {cfg[key]!r}: {what} is not supported by personamoe "
                "(plain LoRA only)"
            )
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{cfg_file}: key 'r': expected an int >= 1, got {r!r}")


def read_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder (config and safetensors weights) onto the CPU."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise AdapterError(f"{cfg_file}: not found (expected a PEFT adapter folder)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
    _check_config(cfg, cfg_file)
    w_file = path / WEIGHTS_NAME
    if not w_file.is_file():
        other = " (found adapter_model.bin: only safetensors is supported)" if (
            path / "adapter_model.bin").is_file() else ""  # fmt: skip
        raise AdapterError(f"{w_file}: not found{other}")
    tensors = load_file(str(w_file))
    adapter = LoraAdapter(path=path, config=cfg)
    halves: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key in tensors:  # the specific unsupported features first, then anything unknown
        if "lora_magnitude_vector" in key:
            raise AdapterError(f"{w_file}: key {key!r}: DoRA magnitude vectors are not supported")
        if "lora_embedding_" in key:
            raise AdapterError(f"{w_file}: key {key!r}: LoRA on embedding layers is not supported")
    for key, t in tensors.items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        m = _KEY.match(name)
        if m is None:
            raise AdapterError(
                f"{w_file}: key {key!r}: not a LoRA factor (expected '<module>.lora_A.weight' or "
                "'<module>.lora_B.weight'; extra saved modules and lora biases are not supported)"
            )
        if t.dim() != 2:
            raise AdapterError(
                f"{w_file}: key {key!r}: expected a 2-D matrix, got shape {list(t.shape)}"
            )
        halves.setdefault(m["module"], {})[m["ab"]] = (key, t)
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))
    for module, ab in sorted(halves.items()):
        for half in ("A", "B"):
            if half not in ab:
                there = "B" if half == "A" else "A"
                other = ab[there][0]
                missing = other.replace(f".lora_{there}", f".lora_{half}")
                raise AdapterError(f"{w_file}: missing key {missing!r} (the pair of {other!r})")
        (key_a, a), (key_b, b) = ab["A"], ab["B"]
        rk = pattern_key(rank_pattern, module)
        ak = pattern_key(alpha_pattern, module)
        r = int(rank_pattern[rk]) if rk is not None else int(cfg["r"])
        alpha = float(alpha_pattern[ak]) if ak is not None else float(cfg.get("lora_alpha", 8))
        if a.shape[0] != r:
            src = f"rank_pattern[{rk!r}]" if rk is not None else "r"
            raise AdapterError(
                f"{w_file}: key {key_a!r}: expected shape [r={r}, d_in] (r from {CONFIG_NAME} "
                f"{src}), got {list(a.shape)}"
            )
        if b.shape[1] != r:
            raise AdapterError(
                f"{w_file}: key {key_b!r}: expected shape [d_out, r={r}], got {list(b.shape)}"
            )
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        adapter.modules[module] = LoraModule(a, b, r, alpha, scaling, key_a, key_b)
    if not adapter.modules:
        raise AdapterError(f"{w_file}: holds no LoRA factors")
    return adapter


def write_adapter(
    path: str | Path,
    modules: Mapping[str, tuple[Tensor, Tensor, float]],
    *,
    base_config: Mapping[str, Any] | None = None,
    fan_in_fan_out: bool = False,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a plain PEFT LoRA adapter: ``modules`` maps a full module name to
    ``(lora_A [r, d_in], lora_B [d_out, r], scaling)``; ranks may differ per module.

    The config uses the most common rank and scaling as ``r`` / ``lora_alpha`` and exact
    ``rank_pattern`` / ``alpha_pattern`` entries for the other modules (``use_rslora`` off).
    """
    from safetensors.torch import save_file

    if not modules:
        raise ValueError("modules: expected at least one module to write, got none")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ranks = {name: int(a.shape[0]) for name, (a, _, _) in modules.items()}
    alphas = {name: float(s) * ranks[name] for name, (_, _, s) in modules.items()}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a_values = [alphas[n] for n in modules if ranks[n] == r0]
    alpha0 = max(set(a_values), key=a_values.count)
    cfg: dict[str, Any] = dict(base_config or {})
    for key in _UNSUPPORTED:
        cfg.pop(key, None)
    cfg.update(
        peft_type="LORA",
        r=r0,
        lora_alpha=alpha0,
        use_rslora=False,
        use_dora=False,
        target_modules=sorted(modules),
        rank_pattern={re.escape(n): ranks[n] for n in sorted(modules) if ranks[n] != r0},
        alpha_pattern={re.escape(n): alphas[n] for n in sorted(modules) if alphas[n] != alpha0},
        fan_in_fan_out=fan_in_fan_out,
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        inference_mode=True,
    )
    cfg.setdefault("lora_dropout", 0.0)
    cfg.setdefault("bias", "none")
    cfg.setdefault("init_lora_weights", True)
    cfg.setdefault("task_type", None)
    if base_model_name_or_path is not None or "base_model_name_or_path" not in cfg:
        cfg["base_model_name_or_path"] = base_model_name_or_path
    tensors = {}
    for name, (a, b, _) in modules.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.detach().to("cpu").contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.detach().to("cpu").contiguous()
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path
