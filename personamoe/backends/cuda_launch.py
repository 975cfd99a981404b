"""Host side of the ``cuda`` backend: the decode kernel of ``personamoe._C_cuda`` for T <= 16.

One launch does the whole layer (csrc/cuda/decode.cu): shrink, route, mix, and with ``FUSE_BASE``
(default) the base output ``x @ W^T + b`` too, computed by the mix blocks while they wait for the
routing, so ``y`` is written once. ``FUSE_BASE = False`` runs the base through torch (cuBLAS)
beside the kernel, which then adds the adapters' term into it (benchmarks/gpu_check.py times both).
Calls the kernel does not cover (T > 16, E > 64, r > 64, fp64, T = 0) go to the Triton backend,
or to the reference where Triton is missing.

CUDA-graph safe: no host sync, no value-dependent branching. The kernel's four counters must be
zero at launch and the kernel leaves them zero, so one persistent zeroed buffer per device serves
every launch: each stream (a capture stream included) gets its own slot of four counters in it, so
launches on two streams at once never share counters, and a captured graph records its slot's
address with no memset node per layer. The buffer is allocated (and zeroed) outside any capture; a
capture that comes before any eager launch on its device (no warm-up) gets a fresh zeroed buffer
inside the graph instead, as a buffer first allocated during capture is never zeroed outside it.
Two graphs captured on the same stream share a slot, so they must not be replayed concurrently.
"""

from __future__ import annotations

import torch

from personamoe import reference
from personamoe.backends.kernel_codes import kernel_codes
from personamoe.layer_args import LayerArgs, LayerOutputs

__all__ = ["covers", "persona_moe_linear"]

MAX_TOKENS, MAX_EXPERTS, MAX_RANK = 16, 64, 64  # csrc/cuda/decode.h
FUSE_BASE = True  # the base layer inside the decode kernel (else cuBLAS beside it)

# Per device: one zeroed int32 buffer of COUNTER_SLOTS * 4 counters, and which stream has which
# slot. Streams beyond COUNTER_SLOTS get a buffer of their own (allocated outside capture only).
COUNTER_SLOTS = 64
_counters: dict[int, torch.Tensor] = {}
_slots: dict[tuple[int, int], torch.Tensor] = {}


def covers(a: LayerArgs) -> bool:
    """Whether the decode kernel handles this call (shapes and dtype only: no data is read)."""
    E, r, _ = a.lora_a.shape
    return (
        a.x.is_cuda
        and 1 <= a.x.shape[0] <= MAX_TOKENS
        and E <= MAX_EXPERTS
        and r <= MAX_RANK
        and a.x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    )


def _fallback(a: LayerArgs) -> LayerOutputs:
    """Calls the decode kernel does not cover: the Triton backend (which sends fp64 on to the
    reference), or the reference where Triton is missing."""
    from personamoe.backends.triton_backend import TritonBackend

    triton = TritonBackend()
    if triton.available()[0]:
        return triton.forward(a)
    return reference.forward(a)


def _get_counters(device: torch.device, stream: int) -> torch.Tensor:
    """The four zeroed counters of ``stream`` on ``device`` (see the module docstring)."""
    dev = device.index if device.index is not None else -1  # a tensor's index is set
    key = (dev, stream)
    c = _slots.get(key)
    if c is not None:
        return c
    capturing = torch.cuda.is_current_stream_capturing()
    pool = _counters.get(dev)
    if pool is None and not capturing:
        pool = _counters[dev] = torch.zeros(COUNTER_SLOTS, 4, dtype=torch.int32, device=device)
    used = sum(1 for d, _ in _slots if d == dev)
    if pool is not None and used < COUNTER_SLOTS:
        c = _slots[key] = pool[used]
    elif capturing:  # nothing zeroed outside this capture to take: a memset node in the graph
        return torch.zeros(4, dtype=torch.int32, device=device)
    else:
        c = _slots[key] = torch.zeros(4, dtype=torch.int32, device=device)
    return c


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def persona_moe_linear(a: LayerArgs) -> LayerOutputs:
    """``(y, topk_idx, topk_gates, scores)`` for 2-D ``x`` on a CUDA device."""
    if not covers(a):
        return _fallback(a)
    from personamoe import _C_cuda  # type: ignore[attr-defined]

    x = a.x if a.x.stride(1) == 1 else a.x.contiguous()
    T, d_in = x.shape
    E, r, _ = a.lora_a.shape
    d_out = a.weight.shape[0]
    k = min(a.top_k, E)
    lora_a = a.lora_a.contiguous()
    lora_b = a.lora_b.contiguous()
    dev = x.device
    fuse = FUSE_BASE
    if fuse:
        w = a.weight if a.weight.stride(1) == 1 else a.weight.contiguous()
        bias = a.bias.contiguous() if a.bias is not None else None
        y = torch.empty(T, d_out, dtype=x.dtype, device=x.device)
    else:
        w, bias = None, None
        y = torch.nn.functional.linear(x, a.weight, a.bias)
    idx = torch.empty(T, k, dtype=torch.int32, device=dev)
    gates = torch.empty(T, k, dtype=torch.float32, device=dev)
    n = torch.empty(T, E, dtype=torch.float32, device=dev)
    h_ws = torch.empty(T * E * r, dtype=torch.float32, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    counters = _get_counters(dev, stream)

    fixed = a.persona_weights is not None
    table = a.persona_weights if fixed else a.persona_bias
    ids = a.persona_ids
    if table is not None and ids is not None:
        table = table.contiguous()
        ids = ids.contiguous()
    else:
        table, ids = None, None
    scaling = a.scaling.contiguous()
    cal = a.calibration.contiguous() if a.calibration is not None else None
    vlen = 16 // x.element_size()
    if d_in % vlen == 0 and not (x.stride(0) % vlen == 0 and _aligned(x)):
        x = x.contiguous() if not x.is_contiguous() else x.clone()  # T rows: cheap, and aligned
    # Two flags: the input side (x, A, W rows; d_in) and B (r). A rank that is not a multiple of
    # the vector width must not cost the base GEMV its 16-byte loads.
    vec = (
        d_in % vlen == 0
        and x.stride(0) % vlen == 0
        and _aligned(x)
        and _aligned(lora_a)
        and (w is None or (w.stride(0) % vlen == 0 and _aligned(w)))
    )
    vec_b = r % vlen == 0 and _aligned(lora_b)
    codes = kernel_codes(_C_cuda)
    dt = codes.dtype
    # One call with the fields of DecodeParams (csrc/cuda/decode.h) as keywords, read straight
    # from the call by the binding (csrc/common/bind_struct.h): no per-call Python object.
    _C_cuda.decode(
        stream,
        x=x.data_ptr(), x_stride=x.stride(0), a=lora_a.data_ptr(), b=lora_b.data_ptr(),
        scaling=scaling.data_ptr(), scaling_dtype=dt[scaling.dtype],
        calibration=cal.data_ptr() if cal is not None else 0,
        calibration_dtype=dt[cal.dtype if cal is not None else torch.float32],
        table=table.data_ptr() if table is not None else 0,
        table_dtype=dt[table.dtype if table is not None else torch.float32],
        ids=ids.data_ptr() if ids is not None else 0,
        ids_dtype=dt[ids.dtype if ids is not None else torch.int64],
        P=table.shape[0] if table is not None else 0,
        weight=w.data_ptr() if w is not None else 0, w_stride=w.stride(0) if w is not None else 0,
        bias=bias.data_ptr() if bias is not None else 0,
        y=y.data_ptr(), topk_idx=idx.data_ptr(), topk_gates=gates.data_ptr(), scores=n.data_ptr(),
        h_ws=h_ws.data_ptr(), counters=counters.data_ptr(), T=T, d_in=d_in, d_out=d_out, E=E, r=r, k=k,
        temperature=float(a.temperature), normalize=codes.normalize[a.normalize],
        mode=codes.fixed if fixed else codes.token, dtype=dt[x.dtype], vec=int(vec),
        vec_b=int(vec_b),
    )  # fmt: skip
    return y, idx, gates, n
