"""Putting persona layers into a model: swap the target modules (:func:`install_layers`), say what
trains (:func:`train_only_the_bank`), and follow sequences for ``routing="sequence"``.

Shared by :func:`~personamoe.integrations.hf.inject` (adapters or a fresh bank) and
:func:`~personamoe.integrations.bank.load_bank` (a saved bank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from personamoe.integrations.layers import PersonaLayer, layer_class_for
from personamoe.personas import PersonaState

__all__ = ["install_layers", "restore_on_error", "train_only_the_bank"]


@contextlib.contextmanager
def restore_on_error(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """If the block raises, put back the modules ``names`` of ``model``, its forward pre-hooks and
    its parameters' ``requires_grad``: a failed load leaves the model as it was (and a retry is
    not refused as "already applied")."""
    originals = {name: model.get_submodule(name) for name in names}
    hooks = dict(model._forward_pre_hooks)
    hooks_kw = dict(model._forward_pre_hooks_with_kwargs)
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for name, module in originals.items():
            _replace(model, name, module)
        model._forward_pre_hooks.clear()
        model._forward_pre_hooks.update(hooks)
        model._forward_pre_hooks_with_kwargs.clear()
        model._forward_pre_hooks_with_kwargs.update(hooks_kw)
        for p, flag in grads:
            p.requires_grad_(flag)
        raise


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
        # A module no class wraps gets PersonaLayer, whose constructor names the expected type.
        cls = layer_class_for(module) or PersonaLayer
        layer = cls.wrap(module, state, rank=r, top_k=top_k, temperature=temperature,
                         normalize=normalize)  # fmt: skip
        _replace(model, name, layer)
        layers[name] = layer
    model.register_forward_pre_hook(_SequenceHook(state), with_kwargs=True)
    return layers


def train_only_the_bank(
    model: nn.Module, layers: Iterable[PersonaLayer], *, freeze_base: bool
) -> None:
    """The banks' ``lora_A``/``lora_B`` require grad; with ``freeze_base`` nothing else does."""
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for layer in layers:
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
