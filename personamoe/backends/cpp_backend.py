"""The ``cpp`` backend: the fused CPU kernel of ``personamoe._C`` (``csrc/layer.cpp``).

One C++ call per layer, GIL released, OpenMP over ``torch.get_num_threads()`` threads, AVX-512 /
AVX2 / generic paths chosen at run time. Up to ``BASE_IN_KERNEL_MAX_TOKENS`` tokens the kernel
computes the whole layer (base GEMM included); above, oneDNN (fp32, on the plain weight) or torch's
BLAS computes ``x W^T + b`` into ``y`` and the kernel adds the mix in place (the measurements behind this: ``csrc/layer.h``,
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
from personamoe.backends.kernel_codes import KernelCodes, kernel_codes

# Up to this many tokens the kernel computes x W^T + b itself (measured crossover against oneDNN +
# the kernel's shrink and mix: 24-28 tokens on the 2-core AVX2 dev VM; benchmarks/README.md).
BASE_IN_KERNEL_MAX_TOKENS = 28
# From this many tokens an fp32 layer's shrink h = x A^T runs as one oneDNN GEMM over [E*r, d_in]
# and the kernel only routes and mixes (h stays fp32; bf16/fp16 keep the kernel's fp32-accumulated
# shrink, since oneDNN would round h to the input dtype). 0 disables it.
SHRINK_GEMM_MIN_TOKENS = 256
_ID_DTYPES = (torch.int32, torch.int64)  # the kernel reads persona ids of these dtypes in place
_linear = torch.nn.functional.linear
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


@functools.cache
def _onednn_linear() -> Any:
    """oneDNN's fp32 linear (what inductor's CPU freezing and vLLM's CPU build call) on the layer's
    own plain weight, or ``None`` where this torch has no working oneDNN. On the plain layout it
    needs no prepacked copy of ``W``, so the layer's memory stays the weight plus the bank.

    fp32 only: bf16/fp16 through this op need a CPU with native support (it raises "could not
    create a primitive descriptor" on AVX2), and where they have it, ``F.linear`` already goes
    through oneDNN for them."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    fn = op.default
    try:  # one tiny call: a build whose oneDNN cannot run here falls back to BLAS for good
        fn(torch.ones(1, 8), torch.ones(4, 8), None, "none", [], "")
    except RuntimeError:
        return None

    def linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return fn(x, w, b, "none", [], "")

    return linear


def base_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x W^T + b`` on the fastest plain path here: oneDNN for contiguous fp32 CPU tensors when
    torch has it (measured faster than ``F.linear``'s MKL GEMM at every T on the dev machines,
    ``benchmarks/README.md``), else ``F.linear``."""
    if (
        x.dtype is _f32
        and w.dtype is _f32
        and (b is None or (b.dtype is _f32 and b.is_contiguous()))
        and x.is_contiguous()
        and w.is_contiguous()
    ):
        dnn = _onednn_linear()
        if dnn is not None:
            return dnn(x, w, b)
    return _linear(x, w, b)


@functools.cache
def _codes() -> KernelCodes:
    return kernel_codes(_ext())


def active_isa() -> str:
    """The vectorised path the extension runs here: ``avx512``, ``avx2`` or ``generic``."""
    return str(_ext().active_isa())


def _f32c(t: Tensor) -> Tensor:
    """fp32 and contiguous, without a copy when it already is."""
    if t.dtype is not _f32:
        t = t.float()
    return t if t.is_contiguous() else t.contiguous()


def fused_forward(
    a: LayerArgs, y_given: Tensor | None = None, h_given: Tensor | None = None
) -> LayerOutputs:
    """The whole layer through the fused kernel (fp32, bf16 or fp16 CPU tensors; 2-D ``x``).

    With ``y_given`` (``[T, d_out]``, dtype of ``x``, unit inner stride, any row stride: e.g. the
    columns of one part of a fused layer's output) the base is not computed: the mix is added into
    ``y_given`` in place and ``a.weight``/``a.bias`` are not read. With ``h_given`` (fp32
    ``[T, E*r]``, unit inner stride, any row stride: a shrink the caller computed, e.g.
    all-reduced over tensor-parallel ranks) the kernel ranks and mixes from it and never writes it.

    The caller has validated shapes, dtypes and devices; everything the kernel reads is made
    contiguous here (a no-op for the usual layouts). Persona ids of any value are safe: the kernel
    treats ids outside ``[0, P)`` as "no persona".
    """
    x = a.x
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
    in_kernel = y_given is None and 0 < T <= BASE_IN_KERNEL_MAX_TOKENS and w.is_contiguous()
    if y_given is not None:  # the caller computed the base: the kernel adds the mix into it
        y = y_given
    elif in_kernel:
        if b is not None and not b.is_contiguous():
            b = b.contiguous()
        y = _empty((T, w.shape[0]), dtype=x.dtype)
    else:
        y = base_linear(x, w, b)
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
    ids = a.persona_ids if tab is not None else None
    if ids is not None:
        if ids.dtype not in _ID_DTYPES:
            ids = ids.long()
        if not ids.is_contiguous():
            ids = ids.contiguous()
    # Many fp32 tokens: the shrink is a GEMM of its own (oneDNN's cache blocking beats the kernel's
    # GEMV-like tiles there), and the kernel routes and mixes from that h.
    h = h_given
    if h is not None and h.shape[0] > 1 and h.stride(0) < E * r:
        h = h.contiguous()
    if (
        h is None
        and SHRINK_GEMM_MIN_TOKENS
        and T >= SHRINK_GEMM_MIN_TOKENS
        and x.dtype is _f32
        and not fixed
    ):
        h = base_linear(x, lora_a.view(E * r, d_in), None)
    C = _ext()
    codes = _codes()
    # One call with the fields of LayerArgs (csrc/layer.h) as keywords: read straight from the
    # call (csrc/common/bind_struct.h), as cheap as positional arguments.
    C.layer_forward(
        T=T, d_in=d_in, d_out=d_out, E=E, r=r, k=k, dtype=codes.dtype[x.dtype],
        x=x.data_ptr(), x_stride=x.stride(0), lora_a=lora_a.data_ptr(),
        lora_b=lora_b.data_ptr(), scaling=scaling.data_ptr(),
        calibration=cal.data_ptr() if cal is not None else 0,
        table=tab.data_ptr() if tab is not None else 0,
        P=tab.shape[0] if tab is not None else 0,
        persona_ids=ids.data_ptr() if ids is not None else 0,
        ids_dtype=codes.dtype[ids.dtype if ids is not None else torch.int64],
        mode=codes.fixed if fixed else codes.token, temperature=float(a.temperature),
        normalize=codes.normalize[a.normalize],
        weight=w.data_ptr() if in_kernel else 0,
        bias=b.data_ptr() if in_kernel and b is not None else 0,
        y=y.data_ptr(), y_stride=y.stride(0),
        h=h.data_ptr() if h is not None else 0, h_stride=h.stride(0) if h is not None else 0,
        topk_idx=idx.data_ptr(),
        topk_gates=gates.data_ptr(), scores=n.data_ptr(), num_threads=torch.get_num_threads(),
    )  # fmt: skip
    return y, idx, gates, n


class CppBackend(Backend):
    name = "cpp"
    device_types = ("cpu",)

    def available(self) -> tuple[bool, str]:
        return _ext_status()

    def run(self, a: LayerArgs) -> LayerOutputs:
        return fused_forward(a)

    def mix_run(
        self, a: LayerArgs, y: Tensor, h: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        _, idx, gates, n = fused_forward(a, y_given=y, h_given=h)
        return idx, gates, n
