"""Tensor parallelism for persona layers: which tensors are sharded and where ranks communicate.

A persona layer computes (docs/design.md §1) ``y = x W^T + b + sum_j g_j s_j B_j h_j`` with
``h = A x`` for all experts and the top-k and gates taken from ``n_e = ||h_e||``. The routing is a
*nonlinear* function of the whole ``h``, so every rank must see the same full ``h [T, E*r]`` and
rank the experts identically; everything else follows the base layer's own sharding.

**Column-parallel** (``ColumnParallelLinear``, ``QKVParallelLinear``, ``MergedColumnParallelLinear``;
``W`` split by output rows, ``x`` replicated on every rank, outputs gathered or kept sharded):

- ``A [E, r, d_in]`` is *replicated*: ``h = A x`` is then computed whole on each rank from the
  replicated ``x`` — no communication, and every rank ranks the experts identically;
- ``B [E, d_out, r]`` is *sharded by output rows* like ``W`` (rank p holds ``B[:, rows_p, :]``);
- each rank's output rows are exactly the unsharded layer's rows: one op call on the shards.
  For fused layers (QKV, gate/up) each fused part is its own persona layer (own ``A``, own routing)
  and is sharded the same way within its part.

**Row-parallel** (``RowParallelLinear``; ``W`` split by input columns, ``x`` arrives sharded by its
last dim, each rank's partial output is summed by the layer's all-reduce):

- ``A`` is *sharded by input columns* like ``W`` (rank p holds ``A[:, :, cols_p]``), so each rank
  has only a partial ``h_p = A_p x_p``;
- the small activation ``h = sum_p h_p`` (``[T, E*r]`` fp32, ``E*r`` is tens to hundreds of floats
  per token against ``d_out`` for the output) is **all-reduced before the norms**: then every rank
  holds the same ``h`` and takes the same top-k and gates;
- ``B`` is *sharded by rank columns* (rank p holds ``B[:, :, rcols_p]``, ``r`` zero-padded to a
  multiple of the world size — zero rows of ``A`` / columns of ``B`` change neither ``||h||`` nor
  ``B h``): rank p adds ``sum_j g_j s_j B_j[:, rcols_p] h_j[rcols_p]``, and the layer's existing
  all-reduce of ``y`` sums these parts into the full mix. The base bias is added on rank 0 only.

So a row-parallel persona layer costs one extra all-reduce of ``T x E*r`` floats; a column-parallel
one costs none. :func:`column_parallel_forward` / :func:`row_parallel_forward` are that math for one
rank; ``tests/test_tp_math.py`` checks them on 2 gloo ranks against the unsharded reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from personamoe import reference
from personamoe.layer_args import LayerArgs
from personamoe.ops import persona_moe_linear_scores

__all__ = [
    "ColumnShard",
    "RowShard",
    "column_parallel_forward",
    "pad_rank",
    "row_parallel_forward",
    "shard_column",
    "shard_row",
    "split_range",
]


def split_range(n: int, rank: int, world_size: int) -> slice:
    """The contiguous slice of ``range(n)`` that rank ``rank`` holds (``n`` divisible, as in vLLM)."""
    if n % world_size:
        raise ValueError(f"size {n} is not divisible by the tensor-parallel size {world_size}")
    per = n // world_size
    return slice(rank * per, (rank + 1) * per)


def pad_rank(lora_a: Tensor, lora_b: Tensor, multiple: int) -> tuple[Tensor, Tensor]:
    """Zero-pad the bank rank ``r`` up to a multiple of ``multiple`` (exact: see the module doc)."""
    E, r, d_in = lora_a.shape
    pad = (-r) % multiple
    if not pad:
        return lora_a, lora_b
    a = torch.cat([lora_a, lora_a.new_zeros(E, pad, d_in)], dim=1)
    b = torch.cat([lora_b, lora_b.new_zeros(E, lora_b.shape[1], pad)], dim=2)
    return a, b


class ColumnShard(NamedTuple):
    weight: Tensor  # [d_out/P, d_in]
    bias: Tensor | None  # [d_out/P]
    lora_a: Tensor  # [E, r, d_in] replicated
    lora_b: Tensor  # [E, d_out/P, r]


class RowShard(NamedTuple):
    weight: Tensor  # [d_out, d_in/P]
    bias: Tensor | None  # [d_out] on rank 0, None elsewhere
    lora_a: Tensor  # [E, r', d_in/P] (r' = r padded to a multiple of P)
    lora_b: Tensor  # [E, d_out, r'/P]


def shard_column(
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    rank: int,
    world_size: int,
    parts: tuple[int, ...] | None = None,
) -> ColumnShard:
    """Rank ``rank``'s shard of a column-parallel layer. ``parts`` = the output sizes of a fused
    layer (e.g. ``(q, k, v)``) when ``weight``/``lora_b`` hold several parts one after another; each
    part is split on its own (the layout of vLLM's fused column layers)."""
    parts = parts or (weight.shape[0],)
    rows: list[Tensor] = []
    start = 0
    for size in parts:
        sl = split_range(size, rank, world_size)
        rows.append(torch.arange(start + sl.start, start + sl.stop))
        start += size
    idx = torch.cat(rows).to(weight.device)
    return ColumnShard(
        weight.index_select(0, idx),
        bias.index_select(0, idx) if bias is not None else None,
        lora_a,
        lora_b.index_select(1, idx),
    )


def shard_row(
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    rank: int,
    world_size: int,
) -> RowShard:
    """Rank ``rank``'s shard of a row-parallel layer (see the module doc)."""
    cols = split_range(weight.shape[1], rank, world_size)
    a, b = pad_rank(lora_a, lora_b, world_size)
    rcols = split_range(a.shape[1], rank, world_size)
    return RowShard(
        weight[:, cols].contiguous(),
        bias if rank == 0 else None,
        a[:, :, cols].contiguous(),
        b[:, :, rcols].contiguous(),
    )


def column_parallel_forward(
    x: Tensor,
    shard: ColumnShard,
    scaling: Tensor,
    *,
    top_k: int,
    temperature: float = 1.0,
    normalize: str = "topk",
    calibration: Tensor | None = None,
    persona_bias: Tensor | None = None,
    persona_ids: Tensor | None = None,
    persona_weights: Tensor | None = None,
) -> Tensor:
    """This rank's output rows ``[T, d_out/P]``: the persona op on the shard, no communication
    (``x`` and ``A`` replicated give the same ``h`` and the same routing on every rank)."""
    y, _, _, _ = persona_moe_linear_scores(
        LayerArgs(x, shard.weight, shard.bias, shard.lora_a, shard.lora_b, scaling, top_k,
                  float(temperature), normalize, calibration, persona_bias, persona_ids,
                  persona_weights)
    )  # fmt: skip
    return y


def row_parallel_forward(
    x_shard: Tensor,
    shard: RowShard,
    scaling: Tensor,
    *,
    rank: int,
    world_size: int,
    all_reduce: Callable[[Tensor], Tensor],
    top_k: int,
    temperature: float = 1.0,
    normalize: str = "topk",
    calibration: Tensor | None = None,
    persona_bias: Tensor | None = None,
    persona_ids: Tensor | None = None,
    persona_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's *partial* output ``[T, d_out]`` (the caller's all-reduce of ``y`` sums the ranks'
    parts, as for the base row-parallel layer), and the routing ``(topk_idx, topk_gates)``.

    ``all_reduce(t)`` must return the sum of ``t`` over the ranks (in place or not); it is called
    once, on ``h [T, E*r']`` in fp32 (fp64 for fp64 inputs).
    """
    x2 = x_shard.reshape(-1, x_shard.shape[-1])
    T = x2.shape[0]
    E, r_pad, _ = shard.lora_a.shape
    k = min(top_k, E)
    h = reference.shrink(x2, shard.lora_a)  # partial [T, E, r'] from this rank's input columns
    h = all_reduce(h.reshape(T, E * r_pad).contiguous()).reshape(T, E, r_pad)
    cdt = h.dtype
    y = x2.to(cdt) @ shard.weight.to(cdt).t()
    if shard.bias is not None:
        y = y + shard.bias.to(cdt)
    rcols = split_range(r_pad, rank, world_size)
    h_mine = h[:, :, rcols]
    if persona_weights is not None and persona_bias is None:
        w = reference.persona_rows(persona_weights.to(cdt), persona_ids, T)
        idx, gates = reference.fixed_route(w, k)
        y = y + reference._mix(h_mine, shard.lora_b, w * scaling.to(cdt))
    elif persona_weights is not None:
        # A batch of routing and fixed rows (the vLLM plugin's per-request personas): routing
        # rows rank with their bias (a fixed row's bias is all -inf, so its gates are 0), fixed
        # rows add their mixture (a routing row's weights are 0). One all-reduce of h either way.
        n = reference.scores(h, calibration, persona_bias, persona_ids)
        idx, gates = reference.route(n, top_k=k, temperature=temperature, normalize=normalize)
        w = torch.zeros_like(n).scatter(1, idx.long(), gates.to(n.dtype))
        w = w + reference.persona_rows(persona_weights.to(cdt), persona_ids, T)
        y = y + reference._mix(h_mine, shard.lora_b, w * scaling.to(cdt))
    else:
        n = reference.scores(h, calibration, persona_bias, persona_ids)
        idx, gates = reference.route(n, top_k=k, temperature=temperature, normalize=normalize)
        y = y + reference.expand(h_mine, shard.lora_b, scaling.to(cdt), idx, gates)
    lead = x_shard.shape[:-1]
    return (
        y.to(x_shard.dtype).reshape(*lead, y.shape[-1]),
        idx.reshape(*lead, k),
        gates.to(torch.float32).reshape(*lead, k),
    )
