"""Which vLLM layer carries which persona bank: the served model's ``personamoe`` section, read
from vLLM's current config, and the layer-prefix -> checkpoint-module mapping of Llama-family
models (vLLM fuses ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from personamoe.integrations.checkpoint.section import (
    SECTION,
    ExportError,
    PersonaSection,
    read_section,
)

__all__ = [
    "PACKED",
    "SUPPORTED_ARCHITECTURES",
    "current_section",
    "part_targets",
    "section_of",
]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
# vLLM's packed_modules_mapping of these models: fused layer -> the checkpoint's modules, in order.
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

_cache: dict[int, tuple[Any, PersonaSection]] = {}


def current_section() -> PersonaSection | None:
    """The validated ``personamoe`` section of the model vLLM is building (``None``: the model has
    none, so every layer stays vLLM's own). Raises :class:`ExportError` when it is malformed."""
    from vllm.config import get_current_vllm_config_or_none

    return section_of(getattr(get_current_vllm_config_or_none(), "model_config", None))


def section_of(model_config: Any) -> PersonaSection | None:
    """The validated ``personamoe`` section of the model a vLLM ``ModelConfig`` describes (``None``
    when there is no model config or the model has no section)."""
    if model_config is None:
        return None
    hf = model_config.hf_config
    raw = getattr(hf, SECTION, None)
    if raw is None:
        return None
    hit = _cache.get(id(raw))
    if hit is not None and hit[0] is raw:
        return hit[1]
    folder = Path(str(model_config.model))
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ExportError(
            f"{model_config.model}: the personamoe vLLM plugin serves exported checkpoints from a "
            "local folder (python -m personamoe export --out DIR; then LLM(model=DIR))"
        )
    archs = tuple(getattr(hf, "architectures", None) or ())
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ExportError(
            f"{cfg_file}: key 'architectures' = {list(archs)}: the personamoe vLLM plugin supports "
            f"{list(SUPPORTED_ARCHITECTURES)}"
        )
    section = read_section(hf, cfg_file)
    if not section.bank_file().is_file():
        raise ExportError(f"{cfg_file}: key '{SECTION}.bank': {section.bank_file()} not found")
    _cache[id(raw)] = (raw, section)
    return section


def part_targets(prefix: str, section: PersonaSection, fused: bool) -> tuple[str | None, ...]:
    """The checkpoint module of each output part of the vLLM layer ``prefix`` (``None``: that part
    is not a target). ``fused`` layers map through :data:`PACKED`."""
    parent, _, leaf = prefix.rpartition(".")
    join = (lambda m: f"{parent}.{m}") if parent else (lambda m: m)
    names = tuple(join(m) for m in PACKED[leaf]) if fused and leaf in PACKED else (prefix,)
    targets = set(section.targets)
    return tuple(n if n in targets else None for n in names)
