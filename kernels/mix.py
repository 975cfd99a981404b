"""Mix: ``y = base + sum_j g_j * s_e * (B_e @ h_e)``, in two regimes.

- ``_linear_mix_kernel`` (dense-masked, small banks): one GEMM tile ``[BLOCK_M, BLOCK_N]`` of ``y``
  whose K loop runs over the experts, the A operand being ``h_e * coef[:, e]`` (gate times scaling,
  zero for experts not chosen) and the B operand ``B_e^T``. An expert whose coefficient is zero for
  every token of the tile is skipped, so at small T only the chosen experts' ``B`` is read. The same
  kernel can compute the base output itself (``COMPUTE_BASE``: ``x @ W^T + b`` as the first K steps,
  the mix as extra K steps, so ``y`` is written once and never re-read), or start from a base output
  computed beside it (cuBLAS through torch) and add into it in place. It also sums ``NUM_PARTS``
  per-(token, slot) partial outputs in its epilogue (the grouped regime's results).
- ``_grouped_expand_kernel`` (sorted by expert, large banks such as E=64, r=64): the (token, slot)
  pairs are sorted by expert and each expert's list padded to ``BLOCK_M`` (fused-MoE
  ``moe_align_block_size``); a program multiplies ``BLOCK_M`` rows of gathered ``h_e`` (gate and
  scaling applied) by one ``B_e`` tile, so each tile of ``B_e`` is read once per block of its tokens
  and the FLOPs are ``k/E`` of the dense regime. Results go to ``parts [T, k, d_out]`` (one row per
  pair, no atomics, deterministic), summed by ``_linear_mix_kernel``'s epilogue.

Every grid is sized from upper bounds known from the shapes; blocks past the real work exit early,
so the launches are CUDA-graph safe (no host sync anywhere).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["align_by_expert", "grouped_expand", "linear_mix"]


@triton.jit
def _linear_mix_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    base_ptr,
    h_ptr,
    coef_ptr,
    b_ptr,
    parts_ptr,
    y_ptr,
    T,
    N,
    K,
    E,
    R,
    stride_xt,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_base,
    stride_y,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    COMPUTE_BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MIX_DENSE: tl.constexpr,
    NUM_PARTS: tl.constexpr,
    IS_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = offs_m < T
    n_mask = offs_n < N
    mn_mask = m_mask[:, None] & n_mask[None, :]
    if COMPUTE_BASE:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xt = tl.load(
                x_ptr + offs_m[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            wt = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                mask=n_mask[None, :] & k_mask[:, None],
                other=0.0,
            )
            if IS_FP32:
                acc = tl.dot(xt, wt, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, wt, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    else:
        acc = tl.load(
            base_ptr + offs_m[:, None] * stride_base + offs_n[None, :], mask=mn_mask, other=0.0
        ).to(tl.float32)
    if MIX_DENSE:
        offs_r = tl.arange(0, BLOCK_R)
        for e in range(E):
            c = tl.load(coef_ptr + offs_m * E + e, mask=m_mask, other=0.0)
            # NaN != 0 holds, so a token with a NaN coefficient is never skipped.
            if tl.sum((c != 0.0).to(tl.int32), axis=0) > 0:
                for r0 in range(0, R, BLOCK_R):
                    rr = r0 + offs_r
                    r_mask = rr < R
                    hv = tl.load(
                        h_ptr + offs_m[:, None] * (E * R) + e * R + rr[None, :],
                        mask=m_mask[:, None] & r_mask[None, :],
                        other=0.0,
                    )
                    bv = tl.load(
                        b_ptr + e * N * R + offs_n[None, :] * R + rr[:, None],
                        mask=n_mask[None, :] & r_mask[:, None],
                        other=0.0,
                    )
                    hc = (hv * c[:, None]).to(bv.dtype)
                    if IS_FP32:
                        acc = tl.dot(hc, bv, acc, input_precision="ieee")
                    else:
                        acc = tl.dot(hc, bv, acc)
    for j in tl.static_range(NUM_PARTS):
        acc += tl.load(
            parts_ptr + (offs_m[:, None] * NUM_PARTS + j) * N + offs_n[None, :],
            mask=mn_mask,
            other=0.0,
        ).to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], acc, mask=mn_mask)


def _mix_tiles(T: int, N: int, compute_base: bool) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` chosen from the shapes alone."""
    if not compute_base or T <= 16:
        return 16, 64, 64, 4, 2
    if T <= 512:
        return 64, 128, 64, 4, 3
    return 128, 128, 64, 8, 3


def linear_mix(
    y: torch.Tensor,
    *,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    base: torch.Tensor | None,
    h: torch.Tensor,
    coef: torch.Tensor | None,
    lora_b: torch.Tensor,
    parts: torch.Tensor | None,
    interpret: bool = False,
) -> torch.Tensor:
    """Write ``y [T, d_out]``: base (``x @ W^T + b`` when ``x`` is given, else ``base``, which may
    be ``y`` itself) plus the dense mix over ``coef [T, E]`` (when given) plus ``parts.sum(1)``."""
    T, N = y.shape
    E, _, R = lora_b.shape
    if T == 0:
        return y
    compute_base = x is not None
    bm, bn, bk, warps, stages = _mix_tiles(T, N, compute_base)
    K = x.shape[1] if x is not None else 0
    block_r = min(max(triton.next_power_of_2(R), 16), 64)
    b = lora_b.contiguous()
    dummy = h
    grid = (triton.cdiv(T, bm), triton.cdiv(N, bn))
    extra = {} if interpret else {"num_stages": stages}
    _linear_mix_kernel[grid](
        x if x is not None else dummy,
        weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        base if base is not None else dummy,
        h, coef if coef is not None else dummy, b,
        parts if parts is not None else dummy, y,
        T, N, K, E, R,
        x.stride(0) if x is not None else 0, x.stride(1) if x is not None else 0,
        weight.stride(0) if weight is not None else 0,
        weight.stride(1) if weight is not None else 0,
        base.stride(0) if base is not None else 0, y.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r,
        COMPUTE_BASE=compute_base, HAS_BIAS=compute_base and bias is not None,
        MIX_DENSE=coef is not None, NUM_PARTS=parts.shape[1] if parts is not None else 0,
        IS_FP32=y.dtype == torch.float32, num_warps=warps, **extra,
    )  # fmt: skip
    return y


@triton.jit
def _grouped_expand_kernel(
    h_ptr,
    gates_ptr,
    scale_ptr,
    b_ptr,
    pairs_ptr,
    block_expert_ptr,
    parts_ptr,
    N,
    E,
    R,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IS_FP32: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_b)
    if e < E:
        e64 = e.to(tl.int64)
        pairs = tl.load(pairs_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        p_mask = pairs >= 0
        pairs = tl.where(p_mask, pairs, 0)
        tok = pairs // TOP_K
        g = tl.load(gates_ptr + pairs, mask=p_mask, other=0.0) * tl.load(scale_ptr + e64).to(
            tl.float32
        )
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_mask = offs_n < N
        offs_r = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r
            r_mask = rr < R
            hv = tl.load(
                h_ptr + tok[:, None] * (E * R) + e64 * R + rr[None, :],
                mask=p_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            bv = tl.load(
                b_ptr + e64 * N * R + offs_n[None, :] * R + rr[:, None],
                mask=n_mask[None, :] & r_mask[:, None],
                other=0.0,
            )
            hc = (hv * g[:, None]).to(bv.dtype)
            if IS_FP32:
                acc = tl.dot(hc, bv, acc, input_precision="ieee")
            else:
                acc = tl.dot(hc, bv, acc)
        tl.store(
            parts_ptr + pairs[:, None] * N + offs_n[None, :],
            acc,
            mask=p_mask[:, None] & n_mask[None, :],
        )


GROUPED_BLOCK_M = 64


def align_by_expert(
    topk_idx: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pairs, block_expert)``: pair ids ``t*k + j`` sorted by expert, each expert's list padded
    to ``block_m`` with ``-1``; ``block_expert[b]`` the expert of block ``b`` (``>= E``: no work).

    Sizes are upper bounds (``cdiv(T*k, block_m) + E`` blocks), computed with device ops only.
    """
    flat = topk_idx.reshape(-1).long()
    n = flat.numel()
    dev = flat.device
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    start = torch.cumsum(counts, 0) - counts
    sorted_e = flat[order]
    dest = pad_start[sorted_e] + torch.arange(n, device=dev) - start[sorted_e]
    max_blocks = triton.cdiv(n, block_m) + num_experts
    pairs = torch.full((max_blocks * block_m,), -1, dtype=torch.int32, device=dev)
    pairs.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(max_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(pad_end, block_start, right=True).to(torch.int32)
    return pairs, block_expert


def grouped_expand(
    h: torch.Tensor,
    topk_idx: torch.Tensor,
    gates: torch.Tensor,
    scaling: torch.Tensor,
    lora_b: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``parts [T, k, d_out]``: ``g_tj * s_e * (B_e @ h_te)`` for each token ``t`` and slot ``j``."""
    T, k = topk_idx.shape
    E, N, R = lora_b.shape
    parts = torch.empty(T, k, N, device=h.device, dtype=out_dtype)
    if T == 0:
        return parts
    bm = GROUPED_BLOCK_M
    pairs, block_expert = align_by_expert(topk_idx, E, bm)
    bn = 64
    block_r = min(max(triton.next_power_of_2(R), 16), 64)
    grid = (block_expert.numel(), triton.cdiv(N, bn))
    _grouped_expand_kernel[grid](
        h, gates, scaling, lora_b.contiguous(), pairs, block_expert, parts, N, E, R,
        TOP_K=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=block_r,
        IS_FP32=out_dtype == torch.float32, num_warps=4,
    )  # fmt: skip
    return parts
