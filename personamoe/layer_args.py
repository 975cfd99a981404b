"""The layer's call contract as one value: :class:`LayerArgs`, passed from the op to every kernel.

A leaf module (it imports only torch), so the op, the validation, the backends, the Triton
launchers and the integrations all share one definition without importing one another. The flat
13-argument form survives only where ``torch.library`` needs it: the op schema
(``personamoe/ops.py``) and the public :func:`personamoe.persona_moe_linear`.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["LayerArgs", "LayerOutputs"]


class LayerArgs(NamedTuple):
    """The op's arguments in schema order (docs/design.md §2).

    Inside the op, ``x`` is ``[T, d_in]`` and ``persona_ids`` ``[T]``; before it (validation, the
    public function) ``x`` may carry any leading dims and ``persona_ids`` has those dims.
    """

    x: Tensor
    weight: Tensor
    bias: Tensor | None
    lora_a: Tensor
    lora_b: Tensor
    scaling: Tensor
    top_k: int
    temperature: float
    normalize: str
    calibration: Tensor | None
    persona_bias: Tensor | None
    persona_ids: Tensor | None
    persona_weights: Tensor | None


LayerOutputs = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(y [T, d_out] dtype of x, topk_idx [T, k] int32, topk_gates [T, k] fp32, scores [T, E] fp32)``."""
