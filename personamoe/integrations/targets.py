"""Which modules of a model get persona layers: PEFT's ``target_modules`` matching
(:func:`select_targets`), and where each loaded adapter's factors go (:func:`locate_adapters`),
with every mismatch reported against the adapter file and key that caused it."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from torch import Tensor, nn

from personamoe.adapters import AdapterError, LoraAdapter
from personamoe.integrations.layers import layer_class_for

__all__ = ["ExpertFactors", "check_target_modules", "locate_adapters", "select_targets"]


class ExpertFactors(NamedTuple):
    """One expert's LoRA factors for one module."""

    lora_A: Tensor  # [r, d_in]
    lora_B: Tensor  # [d_out, r]
    scaling: float
    rank: int


Placement = dict[str, dict[int, ExpertFactors]]
"""module name -> expert index -> that expert's factors there."""


def is_target_type(m: nn.Module) -> bool:
    """Whether ``m`` can hold persona experts (a type of :func:`~.layers.layer_classes`)."""
    return layer_class_for(m) is not None


def _shape(m: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a module that can hold experts."""
    cls = layer_class_for(m)
    assert cls is not None
    d_in, d_out, _ = cls.base_of(m)
    return d_in, d_out


def _output_embedding_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is None:
        return set()
    return {name for name, m in model.named_modules() if m is out}


def select_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """PEFT's matching: a list matches a module name exactly or as a ``.``-suffix, a string is a
    full-match regex, ``"all-linear"`` takes every linear/Conv1D layer but the output head."""
    linear = [n for n, m in model.named_modules() if n and is_target_type(m)]
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
            stacklevel=4,  # the caller of inject
        )


def locate_adapters(model: nn.Module, adapters: Sequence[LoraAdapter]) -> Placement:
    """Where each adapter (expert ``e`` = its position) puts its factors, shapes checked."""
    names = [n for n, _ in model.named_modules()]
    where: Placement = {}
    for e, ad in enumerate(adapters):
        _check_base_model(model, ad)
        for module, lm in ad.modules.items():
            target = _resolve(names, module, ad)
            m = model.get_submodule(target)
            if not is_target_type(m):
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
            where.setdefault(target, {})[e] = ExpertFactors(
                lm.lora_A, lm.lora_B, lm.scaling, lm.rank
            )
    return where


def check_target_modules(
    where: Placement,
    chosen: Sequence[str],
    target_modules: str | Sequence[str],
    adapters: Mapping[str, LoraAdapter],
) -> None:
    """``AdapterError`` when ``target_modules`` leaves out a module some adapter targets."""
    names = list(adapters)
    keep = set(chosen)
    for target, per in where.items():
        if target not in keep:
            ename = names[next(iter(per))]
            raise AdapterError(
                f"{adapters[ename].weights_file}: adapter {ename!r} targets module {target!r}, "
                f"which target_modules={target_modules!r} leaves out"
            )
