"""The mixture alone, added into a base output the caller computed: ``personamoe::persona_moe_mix_``.

For callers that own the base GEMM: vLLM's linear method (a prepacked oneDNN weight on CPU, its
own GEMMs on GPU), a fused projection whose parts each carry a bank (the mixture goes into each
part's columns of the one fused output, no ``torch.cat``), or a row-parallel layer whose ``y`` is
all-reduced. The math is docs/design.md §1 without the base term: ``y += sum_j g_j s_e B_e h_e``.

Inference only (no autograd formula: train through :func:`personamoe.persona_moe_linear`). The op
mutates ``y`` (schema ``Tensor(a!) y``), so ``torch.compile`` functionalises it, and has a fake
implementation for tracing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from personamoe._validation import check_layer_args
from personamoe.backends import resolve_backend
from personamoe.layer_args import LayerArgs

__all__ = ["persona_moe_mix_", "persona_moe_mix_op"]

_lib = torch.library.Library("personamoe", "FRAGMENT")
_lib.define(
    "persona_moe_mix_(Tensor x, Tensor(a!) y, Tensor lora_a, Tensor lora_b, Tensor scaling, "
    "int top_k, float temperature, str normalize, Tensor? calibration, Tensor? persona_bias, "
    "Tensor? persona_ids, Tensor? persona_weights, Tensor? h=None) -> (Tensor, Tensor, Tensor)"
)


def _args(x: Tensor, y: Tensor, lora_a: Tensor, *rest: Any) -> LayerArgs:
    """The layer's arguments with a stand-in weight of the right shape, dtype and device (one
    element, zero strides: never read by a mix) so the shared checks apply unchanged."""
    d_in = lora_a.shape[-1] if lora_a.dim() == 3 else 0
    d_out = y.shape[-1] if y.dim() >= 1 else 0
    weight = x.new_zeros(1).expand(d_out, d_in)
    lora_b, scaling, top_k, temperature, normalize, cal, pb, ids, pw = rest[:9]
    return LayerArgs(x, weight, None, lora_a, lora_b, scaling, top_k, temperature, normalize,
                     cal, pb, ids, pw)  # fmt: skip


def _check_h(x: Tensor, lora_a: Tensor, h: Tensor | None) -> Tensor | None:
    """``h`` as the kernels read it (``[T, E*r]``, unit inner stride), or ``ValueError`` naming it.

    A shrink the caller computed: fp32 (fp64 beside fp64 ``x``), on ``x``'s device, ``[T, E, r]``
    or ``[T, E*r]`` with ``E, r`` those of ``lora_a``."""
    if h is None:
        return None
    if not isinstance(h, Tensor):
        raise TypeError(f"h: expected a torch.Tensor or None, got {type(h).__name__}")
    T = x.shape[0]
    E, r = (lora_a.shape[0], lora_a.shape[1]) if lora_a.dim() == 3 else (0, 0)
    if tuple(h.shape) not in ((T, E, r), (T, E * r)):
        raise ValueError(
            f"h: expected shape [T={T}, E={E}, r={r}] or [T, E*r={E * r}] (the shrink A x), got "
            f"{list(h.shape)}"
        )
    want = torch.float64 if x.dtype == torch.float64 else torch.float32
    if h.dtype != want or h.device != x.device:
        raise ValueError(f"h: expected dtype {want} on {x.device}, got {h.dtype} on {h.device}")
    h2 = h.reshape(T, E * r)  # a view when the (E, r) block of each token is dense, else a copy
    return h2 if h2.stride(-1) == 1 or E * r <= 1 else h2.contiguous()


def _check_y(x: Tensor, y: Tensor) -> None:
    if not isinstance(y, Tensor):
        raise TypeError(f"y: expected a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y: expected 2 dims [T={x.shape[0]}, d_out] (the base output), got shape "
            f"{list(y.shape)}"
        )
    if y.dtype != x.dtype or y.device != x.device:
        raise ValueError(
            f"y: expected dtype {x.dtype} on {x.device} (those of x), got {y.dtype} on {y.device}"
        )
    if y.shape[1] > 1 and y.stride(1) != 1:
        raise ValueError(
            f"y: expected unit stride along d_out (rows may be apart, e.g. one part of a fused "
            f"output), got strides {list(y.stride())}"
        )


def _impl(x: Tensor, y: Tensor, *rest: Any) -> tuple[Tensor, Tensor, Tensor]:
    if x.dim() != 2:
        raise ValueError(f"x: expected 2 dims [T, d_in] at the op, got shape {list(x.shape)}")
    _check_y(x, y)
    args = _args(x, y, *rest)
    check_layer_args(args, values=False)
    h = _check_h(x, rest[0], rest[10] if len(rest) > 10 else None)
    return resolve_backend(x.device, args).mix_into(args, y, h)


_lib.impl("persona_moe_mix_", _impl, "CPU")
_lib.impl("persona_moe_mix_", _impl, "CUDA")


@torch.library.register_fake("personamoe::persona_moe_mix_")
def _fake(
    x: Tensor,
    y: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: Tensor,
    top_k: int,
    temperature: float,
    normalize: str,
    calibration: Tensor | None,
    persona_bias: Tensor | None,
    persona_ids: Tensor | None,
    persona_weights: Tensor | None,
    h: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    T, E = x.shape[0], lora_a.shape[0]
    k = min(top_k, E)
    return (
        x.new_empty(T, k, dtype=torch.int32),
        x.new_empty(T, k, dtype=torch.float32),
        x.new_empty(T, E, dtype=torch.float32),
    )


persona_moe_mix_op = torch.ops.personamoe.persona_moe_mix_
"""The raw op on 2-D ``x``/``y``: returns ``(topk_idx, topk_gates, scores)``; structural checks
only."""


def persona_moe_mix_(
    x: Tensor,
    y: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: Tensor,
    *,
    top_k: int,
    temperature: float = 1.0,
    normalize: str = "topk",
    calibration: Tensor | None = None,
    persona_bias: Tensor | None = None,
    persona_ids: Tensor | None = None,
    persona_weights: Tensor | None = None,
    h: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Add the persona mixture of ``x [T, d_in]`` into ``y [T, d_out]`` in place and return
    ``(topk_idx, topk_gates, scores)``: ``y`` holds the base output the caller computed (any row
    stride, unit stride along ``d_out``). Same routing options as
    :func:`personamoe.persona_moe_linear`; every argument is checked (values too, in eager mode).

    ``h`` (fp32 ``[T, E, r]`` or ``[T, E*r]``, never written): the shrink ``A x`` computed by the
    caller, ranked and mixed from instead of computing it (``lora_a`` is then read for its shape
    only). A row-parallel layer passes its all-reduced ``h`` with its ``B`` shard zero-padded to
    the full rank: every rank ranks on the whole ``h`` and adds only its own columns' share.
    Inference only: ``y`` gets no gradient through this function."""
    _check_y(x, y)
    rest = (lora_b, scaling, top_k, temperature, normalize, calibration, persona_bias,
            persona_ids, persona_weights)  # fmt: skip
    args = _args(x, y, lora_a, *rest)
    check_layer_args(args)
    if x.dim() != 2:
        raise ValueError(f"x: expected 2 dims [T, d_in], got shape {list(x.shape)}")
    h2 = _check_h(x, lora_a, h)
    if torch.compiler.is_compiling():
        idx, gates, n = persona_moe_mix_op(x, y, lora_a, *rest, h)
        return idx, gates, n
    # Eager: straight to the backend (the op would do the same work after a dispatcher round trip).
    return resolve_backend(x.device, args).mix_into(args, y, h2)
