"""The Triton backend's whole layer: shrink, route, base and mix, as three to five launches.

Flow (token mode):

1. ``shrink_parts(x, A)``: ``[S, T, E*r]`` fp32 split-K partials (``S = 1`` above about 2k
   tokens; below, splits fill two waves of the SMs with partials bounded by the bytes of ``x``).
2. ``route``: sums the partials in split order into ``h`` (deterministic, no atomics), then scores,
   top-k, gates and ``coef [T, E]`` (gate * scaling per expert), in one kernel.
3. base + mix, one of two ways (``BASE_MODE``):
   - ``"torch"``: ``y = F.linear(x, W, b)`` by cuBLAS, then the mix kernel adds into ``y`` in place
     (reads and writes ``y`` once more);
   - ``"fused"``: one Triton GEMM writes ``y = x @ W^T + b + mix`` (the mix as extra K steps, ``y``
     written once).
   ``auto`` takes ``fused`` for T >= ``FUSED_MIN_TOKENS`` (large T, where re-reading ``y`` costs
   most) and ``torch`` below (where cuBLAS's GEMV-like kernels stream ``W`` best). The fused
   GEMM's tile is the largest whose grid covers the SMs (``mix._mix_tiles``: 64x128 at T=512,
   d_out=2048, 128 programs), walked in a GROUP_M swizzle for L2 reuse; the crossover stays
   ``FUSED_MIN_TOKENS`` until ``benchmarks/gpu_check.py`` measures T=512/1024/2048.
4. the mix regime (``MIX_REGIME``): ``dense`` (masked over ``E*r``, experts with zero coefficient
   in a tile skipped) or ``grouped`` (pairs sorted by expert, then summed in the epilogue).
   ``auto`` takes ``grouped`` when T > ``DENSE_MAX_TOKENS`` and ``E*r > DENSE_MAX_ER_PER_K * k``.
   Why: dense costs ``E*r/d_in`` of the base GEMM's FLOPs, grouped costs the pair outputs' bytes,
   about ``2k * F/BW / d_in`` of the base time (F/BW ~ 200-300 FLOP/byte on H100/H200 bf16), so
   dense wins while ``E*r < ~2k * F/BW``; below ``DENSE_MAX_TOKENS`` tokens a tile holds every
   token and the skip already reads only the chosen experts.

Why not one pass of ``x`` against ``[W; A]`` stacked (base output and ``h`` together)? The mix
needs the routing, which needs all of ``h``, so a stacked pass must write ``y`` and the mix must
then read and write it again (``2*T*d_out`` elements), while it saves one read of ``x``
(``T*d_in``); folding the mix into the base GEMM (``fused``) instead saves the ``y`` round trip and
pays one extra read of ``x`` in the shrink. With ``d_in ~ d_out`` the fused form moves fewer bytes,
so it is the one implemented; ``benchmarks/gpu_check.py`` measures it against the cuBLAS base.

The thresholds are module constants (tests and ``benchmarks/gpu_check.py`` set ``MIX_REGIME`` and
``BASE_MODE`` to force a path); they are functions of shapes only, so each CUDA-graph capture fixes
one path. Not measured on a GPU yet: ``benchmarks/gpu_check.py`` reports every variant.

fp64 inputs (gradcheck) never reach here: the backend sends them to the reference
(``personamoe.backends.base.Backend.forward``); the kernels are for fp32/fp16/bf16.
"""

from __future__ import annotations

import os

import torch
from personamoe.kernels.mix import grouped_expand, linear_mix
from personamoe.kernels.shrink_route import route, shrink_parts

from personamoe.layer_args import LayerArgs, LayerOutputs

__all__ = ["BASE_MODE", "MIX_REGIME", "choose_paths", "persona_moe_linear"]

MIX_REGIME = "auto"  # "auto" | "dense" | "grouped"
BASE_MODE = "auto"  # "auto" | "torch" | "fused"
DENSE_MAX_TOKENS = 64
DENSE_MAX_ER_PER_K = 256
FUSED_MIN_TOKENS = 512

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def choose_paths(T: int, E: int, r: int, k: int, fixed: bool) -> tuple[str, str]:
    """``(mix regime, base mode)`` for a call: a function of the shapes and the module settings."""
    regime = MIX_REGIME
    if regime == "auto":
        large_bank = E * r > DENSE_MAX_ER_PER_K * k
        regime = "grouped" if (large_bank and T > DENSE_MAX_TOKENS) else "dense"
    if fixed:
        regime = "dense"  # every expert with a non-zero weight is used: no top-k to group by
    base = BASE_MODE
    if base == "auto":
        base = "fused" if T >= FUSED_MIN_TOKENS else "torch"
    return regime, base


def persona_moe_linear(
    a: LayerArgs, y_given: torch.Tensor | None = None, h_given: torch.Tensor | None = None
) -> LayerOutputs:
    """The layer of docs/design.md §1 on 2-D ``x``: ``(y, topk_idx, topk_gates, scores)``.

    With ``y_given`` (``[T, d_out]``, unit inner stride, holding the base output the caller
    computed) the adapters' term is added into it in place; ``a.weight``/``a.bias`` are not read.
    With ``h_given`` (fp32 ``[T, E*r]``: a shrink the caller computed) no shrink runs; the route
    kernel reads a copy (it writes its sum of the split partials into its first input).
    """
    x = a.x
    T = x.shape[0]
    E, r, _ = a.lora_a.shape
    d_out = a.weight.shape[0]
    k = min(a.top_k, E)
    fixed = a.persona_weights is not None
    regime, base_mode = choose_paths(T, E, r, k, fixed)
    if y_given is not None:
        base_mode = "given"

    if h_given is not None:
        h_parts = h_given.reshape(1, T, E * r).to(torch.float32, copy=True).contiguous()
    else:
        h_parts = shrink_parts(x, a.lora_a)
    # The route kernel sums the split partials in split order into h_parts[0] (deterministic h).
    idx, gates, n, coef = route(
        h_parts, num_tokens=T, num_experts=E, rank=r, top_k=k, temperature=a.temperature,
        normalize=a.normalize, scaling=a.scaling, calibration=a.calibration,
        persona_bias=a.persona_bias, persona_ids=a.persona_ids,
        persona_weights=a.persona_weights, device=x.device,
    )  # fmt: skip
    h = h_parts[0]
    parts = None
    if regime == "grouped":
        parts = grouped_expand(h, idx, gates, a.scaling, a.lora_b, x.dtype)
    dense_coef = coef if regime == "dense" else None
    if base_mode == "fused":
        y = torch.empty(T, d_out, device=x.device, dtype=x.dtype)
        linear_mix(
            y, x=x, weight=a.weight, bias=a.bias, base=None, h=h, coef=dense_coef,
            lora_b=a.lora_b, parts=parts, interpret=_INTERPRET,
        )  # fmt: skip
    else:
        y = torch.nn.functional.linear(x, a.weight, a.bias) if y_given is None else y_given
        linear_mix(
            y, x=None, weight=None, bias=None, base=y, h=h, coef=dense_coef,
            lora_b=a.lora_b, parts=parts, interpret=_INTERPRET,
        )  # fmt: skip
    return y, idx, gates, n
