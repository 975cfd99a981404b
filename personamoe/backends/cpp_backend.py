"""The ``cpp`` backend: the fused CPU kernel of ``personamoe._C`` (``csrc/layer.cpp``).

One C++ call per layer, GIL released, OpenMP over ``torch.get_num_threads()`` threads, AVX-512 /
AVX2 / generic paths chosen at run time. Up to ``BASE_IN_KERNEL_MAX_TOKENS`` tokens the kernel
computes the whole layer (base GEMM included); above, torch's BLAS computes ``x W^T + b`` into
``y`` and the kernel adds the mix in place (the measurements behind this: ``csrc/layer.h``,
``benchmarks/README.md``). fp64 (gradcheck) stays on the reference path; fp32, bf16 and fp16 run
compiled with fp32 accumulation. The backward is the op's (``personamoe/ops.py``).

This sits on the decode hot path (~0.6-1 ms per layer at T = 1), so it avoids every torch op it can:
no conversions of already-fp32 contiguous tensors, outputs allocated with ``torch.empty``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from personamoe.backends.base import Backend, LayerArgs, LayerOutputs

_NORMALIZE_CODE = {"topk": 0, "full": 1}
# Up to this many tokens the kernel computes x W^T + b itself (measured: benchmarks/README.md).
BASE_IN_KERNEL_MAX_TOKENS = 32
# Above that, fp32 shrinks may run through BLAS (torch.mm) instead of the kernel: measured slower
# at T = 64 and 256 (benchmarks/README.md), so off; kept as a switch for re-measuring.
SHRINK_IN_BLAS = False
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_IDS_CODE = {torch.int32: 1, torch.int64: 2}
_linear = torch.nn.functional.linear
_mm = torch.mm
_empty = torch.empty
_f32 = torch.float32
_i32 = torch.int32


@functools.cache
def _ext_status() -> tuple[bool, str]:
    try:
        from personamoe import _C  # noqa: F401
    except ImportError as e:
        return False, f"the CPU extension personamoe._C failed to import ({e})"
    return True, ""


@functools.cache
def _ext() -> Any:
    from personamoe import _C

    return _C


def active_isa() -> str:
    """The vectorised path the extension runs here: ``avx512``, ``avx2`` or ``generic``."""
    return str(_ext().active_isa())


def _f32c(t: Tensor) -> Tensor:
    """fp32 and contiguous, without a copy when it already is."""
    if t.dtype is not _f32:
        t = t.float()
    return t if t.is_contiguous() else t.contiguous()


def route_from_h(
    h: torch.Tensor,
    *,
    top_k: int,
    temperature: float,
    normalize: str,
    calibration: torch.Tensor | None,
    persona_bias: torch.Tensor | None,
    persona_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(topk_idx int32, topk_gates fp32, scores fp32)`` from ``h [T, E, r]`` by the C++ kernel."""
    _C = _ext()
    T, E, r = h.shape
    h = h.float().contiguous()
    cal = calibration.float().contiguous() if calibration is not None else None
    pb = persona_bias.float().contiguous() if persona_bias is not None else None
    ids = persona_ids.reshape(-1).long().contiguous() if persona_ids is not None else None
    idx = torch.empty(T, top_k, dtype=torch.int32)
    gates = torch.empty(T, top_k, dtype=torch.float32)
    n = torch.empty(T, E, dtype=torch.float32)
    _C.route_tokens(
        h.data_ptr(),
        T,
        E,
        r,
        cal.data_ptr() if cal is not None else 0,
        pb.data_ptr() if pb is not None else 0,
        ids.data_ptr() if (ids is not None and pb is not None) else 0,
        pb.shape[0] if pb is not None else 0,
        top_k,
        float(temperature),
        _NORMALIZE_CODE[normalize],
        idx.data_ptr(),
        gates.data_ptr(),
        n.data_ptr(),
        torch.get_num_threads(),
    )
    return idx, gates, n


def fused_forward(a: LayerArgs) -> LayerOutputs:
    """The whole layer through the fused kernel (fp32, bf16 or fp16 CPU tensors; 2-D ``x``).

    The caller has validated shapes, dtypes and devices; everything the kernel reads is made
    contiguous here (a no-op for the usual layouts). Persona ids of any value are safe: the kernel
    treats ids outside ``[0, P)`` as "no persona".
    """
    x = a.x
    dcode = _DTYPE_CODE[x.dtype]
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        x = x.contiguous()
    T, d_in = x.shape
    lora_a = a.lora_a if a.lora_a.is_contiguous() else a.lora_a.contiguous()
    lora_b = a.lora_b if a.lora_b.is_contiguous() else a.lora_b.contiguous()
    E, r, _ = lora_a.shape
    d_out = lora_b.shape[1]
    k = min(a.top_k, E)
    # The base GEMM: in the kernel for few tokens (its memory-bound GEMV streams W faster than
    # BLAS there and y is written once), through BLAS beside it for more (see csrc/layer.h).
    w = a.weight
    b = a.bias
    in_kernel = 0 < T <= BASE_IN_KERNEL_MAX_TOKENS and w.is_contiguous()
    if in_kernel:
        if b is not None and not b.is_contiguous():
            b = b.contiguous()
        y = _empty((T, w.shape[0]), dtype=x.dtype)
    else:
        y = _linear(x, w, b)
    # Many fp32 tokens: the shrink h = x A^T through BLAS too (a real GEMM there, ~1.5-2x the
    # kernel's own tiles at T = 256); half types keep the kernel's (BLAS would round h to bf16/fp16).
    h = None
    if SHRINK_IN_BLAS and T > BASE_IN_KERNEL_MAX_TOKENS and dcode == 0:
        h = _mm(x, lora_a.view(E * r, d_in).t())
    idx = _empty((T, k), dtype=_i32)
    gates = _empty((T, k), dtype=_f32)
    n = _empty((T, E), dtype=_f32)
    if T == 0:
        return y, idx, gates, n
    scaling = _f32c(a.scaling)
    cal = _f32c(a.calibration) if a.calibration is not None else None
    fixed = a.persona_weights is not None
    table = a.persona_weights if fixed else a.persona_bias
    tab = _f32c(table) if table is not None else None
    ids = a.persona_ids
    ids_code = 0
    if tab is not None and ids is not None:
        if ids.dtype not in _IDS_CODE:
            ids = ids.long()
        if not ids.is_contiguous():
            ids = ids.contiguous()
        ids_code = _IDS_CODE[ids.dtype]
    _ext().layer_forward(
        T, d_in, d_out, E, r, k, dcode,
        x.data_ptr(), x.stride(0), lora_a.data_ptr(), lora_b.data_ptr(), scaling.data_ptr(),
        cal.data_ptr() if cal is not None else 0,
        tab.data_ptr() if tab is not None else 0,
        tab.shape[0] if tab is not None else 0,
        ids.data_ptr() if ids is not None and ids_code else 0, ids_code,
        1 if fixed else 0, float(a.temperature), _NORMALIZE_CODE[a.normalize],
        y.data_ptr(), y.stride(0), idx.data_ptr(), gates.data_ptr(), n.data_ptr(),
        torch.get_num_threads(),
        w.data_ptr() if in_kernel else 0,
        b.data_ptr() if in_kernel and b is not None else 0,
        h.data_ptr() if h is not None else 0,
    )  # fmt: skip
    return y, idx, gates, n


class CppBackend(Backend):
    name = "cpp"
    device_types = ("cpu",)

    def available(self) -> tuple[bool, str]:
        return _ext_status()

    def run(self, a: LayerArgs) -> LayerOutputs:
        return fused_forward(a)
