"""Correctness checks against the contract, shared by the GPU check and any other harness.

:func:`make_layer_args` draws a random layer (never a zero weight: every expert changes the
output), :data:`TOLERANCES` says how close each dtype must come, and
:func:`compare_to_reference` checks a backend's four outputs against
:func:`personamoe.reference.forward` computed in fp64 from the same (already rounded) inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from personamoe import reference
from personamoe.layer_args import LayerArgs, LayerOutputs

__all__ = [
    "MIN_TOPK_MATCH",
    "TOLERANCES",
    "compare_to_reference",
    "make_layer_args",
    "reference_fp64",
]

# (atol, rtol) of an elementwise check ``|got - want| <= atol + rtol * |want|`` against the fp64
# reference. Accumulation is fp32 everywhere; what is left is the rounding of the output (and, for
# half types, of the base GEMM's output before the adapter term is added).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (1e-1, 5e-2),
}

# Half types can flip near-ties between two experts' scores: the share of tokens whose top-k must
# equal the reference's exactly. ``y`` and the gates are then compared on those tokens only.
MIN_TOPK_MATCH = 0.95


def make_layer_args(
    T: int,
    d_in: int,
    d_out: int,
    E: int,
    r: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    seed: int = 0,
    *,
    top_k: int = 2,
    temperature: float = 1.0,
    normalize: str = "topk",
    calibration: Tensor | None = None,
    persona_bias: Tensor | None = None,
    persona_ids: Tensor | None = None,
    persona_weights: Tensor | None = None,
) -> LayerArgs:
    """A random layer of these sizes, drawn on ``device`` (fast for d=4096 weight sets).

    Unit-variance ``x``; ``weight`` and ``lora_a`` scaled by ``d_in^-1/2`` and ``lora_b`` by
    ``r^-1/2`` so that ``y`` and the scores stay O(1) at any size; ``scaling`` in [0.5, 1.5).
    """
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape: int, std: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    # Drawn in this order so that a given seed gives the same weights for any T.
    x = rnd(T, d_in)
    weight = rnd(d_out, d_in, std=d_in**-0.5)
    bias = rnd(d_out, std=0.1)
    lora_a = rnd(E, r, d_in, std=d_in**-0.5)
    lora_b = rnd(E, d_out, r, std=r**-0.5)
    scaling = torch.rand(E, generator=g, device=device) + 0.5
    return LayerArgs(
        x, weight, bias, lora_a, lora_b, scaling, top_k, temperature, normalize,
        calibration, persona_bias, persona_ids, persona_weights,
    )  # fmt: skip


def reference_fp64(args: LayerArgs) -> LayerOutputs:
    """The contract's four outputs computed in fp64 from ``args`` (ids and options unchanged)."""
    wide = LayerArgs._make(
        a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args
    )
    return reference.forward(wide)


def _closeness(got: Tensor, want: Tensor, atol: float, rtol: float) -> tuple[bool, float]:
    """``(every element close, largest finite absolute error)``; equal infinities and NaNs match."""
    got, want = got.double(), want.double()
    close = torch.isclose(got, want, atol=atol, rtol=rtol, equal_nan=True)
    both_finite = torch.isfinite(got) & torch.isfinite(want)
    err = (got - want).abs()[both_finite]
    return bool(close.all()), float(err.max()) if err.numel() else 0.0


def compare_to_reference(
    got: LayerOutputs, args: LayerArgs, *, min_topk_match: float = MIN_TOPK_MATCH
) -> dict[str, Any]:
    """Check ``got = (y, topk_idx, topk_gates, scores)`` of ``args`` against the fp64 reference.

    - ``topk_match``: the share of tokens whose top-k indices equal the reference's exactly (in
      order); at least ``min_topk_match`` is required.
    - ``y`` and the gates, on the tokens whose top-k matches, and the scores, on every token:
      elementwise within :data:`TOLERANCES` of ``x``'s dtype.
    - ``nan``: ``y`` has a NaN where the reference has none.

    ``ok`` is all of these. ``rel_err`` (``||y - ref|| / ||ref||`` over the matching tokens) is
    reported alongside, a single figure to follow from one run to the next.
    """
    y, idx, gates, scores = got
    ref_y, ref_idx, ref_gates, ref_scores = reference_fp64(args)
    atol, rtol = TOLERANCES[args.x.dtype]
    T = y.shape[0]
    same = (idx.long() == ref_idx.long()).all(dim=1)
    rows = same.nonzero().flatten()
    topk_match = float(same.float().mean()) if T else 1.0
    y_ok, y_err = _closeness(y[rows], ref_y[rows], atol, rtol)
    gates_ok, gates_err = _closeness(gates[rows], ref_gates[rows], atol, rtol)
    scores_ok, scores_err = _closeness(scores, ref_scores, atol, rtol)
    rel_err = float("nan")
    if rows.numel():
        diff = (y[rows].double() - ref_y[rows]).norm()
        rel_err = float(diff / ref_y[rows].norm().clamp_min(1e-30))
    nan = bool((torch.isnan(y) & ~torch.isnan(ref_y)).any())
    ok = not nan and topk_match >= min_topk_match and y_ok and gates_ok and scores_ok
    return {
        "ok": ok,
        "topk_match": topk_match,
        "y_ok": y_ok,
        "y_max_abs_err": y_err,
        "rel_err": rel_err,
        "gates_ok": gates_ok,
        "gates_max_abs_err": gates_err,
        "scores_ok": scores_ok,
        "scores_max_abs_err": scores_err,
        "nan": nan,
        "atol": atol,
        "rtol": rtol,
    }
