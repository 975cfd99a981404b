"""The ``cpp`` backend: the compiled CPU kernels of ``personamoe._C``.

Today the extension holds the routing step (scores, top-k, gates) on a precomputed ``h``; the
GEMMs around it run through torch's BLAS. The fused whole-layer kernel replaces this path.
"""

from __future__ import annotations

import functools

import torch

from personamoe import reference
from personamoe.backends.base import Backend, LayerArgs, LayerOutputs

_NORMALIZE_CODE = {"topk": 0, "full": 1}


@functools.cache
def _ext_status() -> tuple[bool, str]:
    try:
        from personamoe import _C  # noqa: F401
    except ImportError as e:
        return False, f"the CPU extension personamoe._C failed to import ({e})"
    return True, ""


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
    from personamoe import _C

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


class CppBackend(Backend):
    name = "cpp"
    device_types = ("cpu",)

    def available(self) -> tuple[bool, str]:
        return _ext_status()

    def forward(self, a: LayerArgs) -> LayerOutputs:
        if a.persona_weights is not None:
            # Fixed mode has no ranking to do: the reference path is already the whole work.
            return reference.persona_moe_linear_full(
                a.x,
                a.weight,
                a.bias,
                a.lora_a,
                a.lora_b,
                a.scaling,
                top_k=a.top_k,
                persona_ids=a.persona_ids,
                persona_weights=a.persona_weights,
            )
        cdt = reference.compute_dtype(a.x.dtype)
        h = reference.shrink(a.x, a.lora_a)
        if cdt == torch.float64:
            # The compiled kernel is fp32; fp64 (gradcheck) keeps full precision in torch.
            n = reference.scores(h, a.calibration, a.persona_bias, a.persona_ids)
            idx, gates = reference.route(
                n, top_k=a.top_k, temperature=a.temperature, normalize=a.normalize
            )
        else:
            idx, gates, n = route_from_h(
                h,
                top_k=a.top_k,
                temperature=a.temperature,
                normalize=a.normalize,
                calibration=a.calibration,
                persona_bias=a.persona_bias,
                persona_ids=a.persona_ids,
            )
        y = torch.nn.functional.linear(
            a.x.to(cdt), a.weight.to(cdt), None if a.bias is None else a.bias.to(cdt)
        )
        y = y + reference.expand(h, a.lora_b, a.scaling.to(cdt), idx, gates.to(cdt))
        return y.to(a.x.dtype), idx, gates.float(), n.float()
