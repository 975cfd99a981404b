"""Shrink and route: ``h = x @ A^T`` over all experts, then norms, calibration, bias, top-k, gates.

Two kernels, each with a thin host launcher:

- ``_shrink_kernel``: one GEMM of ``x [T, d_in]`` against ``A`` viewed as ``[E*r, d_in]`` with fp32
  accumulation into ``h [T, E*r]`` fp32. Split-K whenever the tiles alone give too few programs to
  fill the chip (decode, and prefill up to about 2k tokens; ``shrink_config`` says how the tiles and
  splits are chosen, from the shapes and the device's ``configs.TileConfig``). Each K split stores its own partial ``[S, T, E*r]``
  (never atomics: fp32 atomic adds land in arrival order, so the last bits of ``h`` and with them
  near-tie routing would change from run to run, and exact ties would not reliably go to the lower
  index); the route kernel, which reads all of ``h`` anyway, sums the partials in split order and
  writes the sum back into partial 0, which the mix kernels read as ``h``.
- ``_route_kernel``: one program per token. Token mode: ``n = ||h_e|| / c_e + bias[p, e]`` (ids
  outside ``[0, P)`` mean "no persona" and are never read), top-k with ties to the lower index and
  disallowed (``-inf``) experts only filling empty slots, gates ``topk``/``full`` with temperature.
  Fixed mode: the token's weight row instead of ``n``, every expert used with its weight.
  Besides the op's outputs it writes ``coef [T, E]`` fp32 = ``gate * scaling`` scattered per expert
  (zero for experts not used), which the dense mix consumes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from personamoe.kernels import configs
from personamoe.kernels.configs import TileConfig

__all__ = ["route", "shrink", "shrink_config", "shrink_parts"]


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    T,
    N,
    K,
    stride_xt,
    stride_xk,
    K_PER_SPLIT,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    IS_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = offs_m < T
    n_mask = offs_n < N
    k_lo = pid_k * K_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        offs_k = k_lo + rk
        k_mask = (offs_k < K) & (rk < K_PER_SPLIT)
        xt = tl.load(
            x_ptr + offs_m[:, None] * stride_xt + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        at = tl.load(
            a_ptr + offs_n[None, :] * K + offs_k[:, None],
            mask=n_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        if IS_FP32:
            acc = tl.dot(xt, at, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, at, acc)
    # Split k's partial lives at h + k * T * N: plain stores, reduced in fixed order later.
    h_ptrs = h_ptr + pid_k.to(tl.int64) * T * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(h_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


def _effective_split(K: int, bk: int, split: int) -> tuple[int, int]:
    """``(K_PER_SPLIT, splits)``: each split a whole number of ``bk`` steps, none empty."""
    k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
    return k_per_split, triton.cdiv(K, k_per_split)


@functools.lru_cache(maxsize=4096)
def shrink_config(
    T: int, N: int, K: int, *, elsize: int = 2, cfg: TileConfig | None = None
) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)`` for a shrink of ``T`` tokens, ``N = E*r``, ``K = d_in``
    with ``elsize``-byte inputs, on the device of ``cfg`` (default: ``configs.DEFAULT``, 132 SMs).

    Decode (T <= 64): 16x32 tiles and split-K until about ``shrink_decode_programs`` programs
    stream ``A`` (the tuned vLLM shrink for K=4096, r=16 at small M uses BM16/BN16/BK64-128,
    split-K 32).

    Prefill (T > 64): the shrink is a thin GEMM (N = E*r << K) bound by memory traffic and, at
    moderate T, by latency: a 64x64 tile grid gives 8 programs at T=256, N=128 on 132 SMs, each
    streaming all of K. So the tiles and splits are searched (all candidates of ``cfg``) for:

    1. enough programs: ``shrink_fill_waves * num_sms`` (two waves) up to
       ``shrink_fill_max_tokens`` tokens, reached with split-K; above it, where every program
       already streams a long K loop, ``0.9 * num_sms`` (one wave) without split-K, because the
       split partials' extra traffic grows with T while the fill gain does not;
    2. bounded partials: ``SPLIT_K * T * N * 4 <= T * K * elsize`` (the split partials, written
       here and summed by the route kernel, never outweigh ``x``), and each split at least
       ``shrink_min_k_steps`` K steps;
    3. among those, the least traffic: ``x`` once per N tile (``BLOCK_N`` covering N up to
       ``shrink_block_n_max`` reads it once), ``A`` once per M tile, partials written and read
       (``2 * SPLIT_K * T * N * 4``); ties to the wider ``BLOCK_N``, then the larger ``BLOCK_M``.

    If nothing reaches the program target, the most programs win (ties by traffic). A function of
    shapes and ``cfg`` only, fixed per CUDA-graph capture. Unmeasured: gpu_check times it.
    """
    cfg = cfg or configs.DEFAULT
    if T <= 64:
        bm, bn, bk = cfg.shrink_decode_tile
        tiles = triton.cdiv(T, bm) * triton.cdiv(N, bn)
        split = 1
        while tiles * split < cfg.shrink_decode_programs and split * 2 * bk <= K:
            split *= 2
        return bm, bn, bk, split
    bk = cfg.shrink_block_k if elsize < 4 else cfg.shrink_block_k // 2
    bk = max(16, min(bk, triton.next_power_of_2(K)))
    bn_max = min(max(triton.next_power_of_2(N), 16), cfg.shrink_block_n_max)
    if cfg.shrink_fill_max_tokens >= T:
        target = cfg.shrink_fill_waves * cfg.num_sms
        s_cap = min(K * elsize // (4 * N), K // (cfg.shrink_min_k_steps * bk))
        s_cap = max(1, s_cap)
    else:
        target = triton.cdiv(9 * cfg.num_sms, 10)
        s_cap = 1
    x_bytes, a_bytes, part_bytes = T * K * elsize, N * K * elsize, T * N * 4
    best: tuple[tuple[int, ...], tuple[int, int, int, int]] | None = None
    bn = bn_max
    while bn >= 16:
        for bm in cfg.shrink_block_m:
            tiles = triton.cdiv(T, bm) * triton.cdiv(N, bn)
            split = 1
            for s in range(min(triton.cdiv(target, tiles), s_cap), s_cap + 1):
                split = _effective_split(K, bk, s)[1]  # the fewest splits reaching the target
                if tiles * split >= target:
                    break
            programs = tiles * split
            traffic = (triton.cdiv(N, bn) * x_bytes + triton.cdiv(T, bm) * a_bytes
                       + 2 * split * part_bytes)  # fmt: skip
            # Sort key: filled first, then least traffic, wider BN, larger BM (more programs
            # when nothing fills).
            filled = programs >= target
            key = (0 if filled else 1, traffic if filled else -programs,
                   traffic, -bn, -bm)  # fmt: skip
            if best is None or key < best[0]:
                best = (key, (bm, bn, bk, split))
        bn //= 2
    assert best is not None
    return best[1]


def shrink_parts(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """Per-split partials ``[S, T, E*r]`` fp32 of ``x [T, d_in] @ A[E, r, d_in]^T`` (``S = 1`` when
    K is not split); their sum in split order is ``h``. ``x`` may be strided."""
    T, K = x.shape
    E, r, _ = lora_a.shape
    N = E * r
    a = lora_a.contiguous()
    cfg = configs.device_config(x.device)
    bm, bn, bk, split = shrink_config(T, N, K, elsize=x.element_size(), cfg=cfg)
    k_per_split, split = _effective_split(K, bk, split)
    parts = torch.empty(split, T, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(T, bm), triton.cdiv(N, bn), split)
    # 128x128 fp32 accumulators take 128 registers a thread at 4 warps: 8 warps halve that.
    _shrink_kernel[grid](
        x, a, parts, T, N, K, x.stride(0), x.stride(1), k_per_split,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
        IS_FP32=x.dtype == torch.float32, num_warps=8 if bm * bn >= 128 * 128 else 4,
    )  # fmt: skip
    return parts


def shrink(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """``h [T, E*r]`` fp32 = ``x [T, d_in] @ A[E, r, d_in]^T``: the partials summed in split order
    (the layer's launcher lets the route kernel do this sum instead, saving a launch)."""
    parts = shrink_parts(x, lora_a)
    h = parts[0]
    for k in range(1, parts.shape[0]):
        h = h + parts[k]
    return h


@triton.jit
def _route_kernel(
    h_ptr,
    cal_ptr,
    table_ptr,
    ids_ptr,
    scale_ptr,
    idx_ptr,
    gates_ptr,
    scores_ptr,
    coef_ptr,
    E,
    R,
    P,
    temperature,
    part_stride,
    NUM_PARTS: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
    HAS_CAL: tl.constexpr,
    HAS_TABLE: tl.constexpr,
    FIXED: tl.constexpr,
    FULL_NORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    if HAS_TABLE:
        pid = tl.load(ids_ptr + t + offs_e * 0).to(tl.int64)  # the id, broadcast over experts
        valid = (pid >= 0) & (pid < P)
        row = tl.where(valid, pid, 0)
        trow = tl.load(table_ptr + row * E + offs_e, mask=e_mask & valid, other=0.0).to(tl.float32)
    else:
        trow = tl.zeros((BLOCK_E,), dtype=tl.float32)
    ss = tl.zeros((BLOCK_E,), dtype=tl.float32)
    if NUM_PARTS > 1 or not FIXED:
        # h's split-K partials summed in split order (the same bits on every run), the sum stored
        # into partial 0 for the mix; then (token mode) the norms.
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r
            hm = e_mask[:, None] & (rr < R)[None, :]
            h_row = h_ptr + t * E * R + offs_e[:, None] * R + rr[None, :]
            hv = tl.load(h_row, mask=hm, other=0.0)
            for part in tl.static_range(1, NUM_PARTS):
                hv += tl.load(h_row + part * part_stride, mask=hm, other=0.0)
            if NUM_PARTS > 1:
                tl.store(h_row, hv, mask=hm)
            ss += tl.sum(hv * hv, axis=1)
    if FIXED:
        n = trow
    else:
        n = tl.sqrt(ss)
        if HAS_CAL:
            n = n / tl.load(cal_ptr + offs_e, mask=e_mask, other=1.0).to(tl.float32)
        n = n + trow
    tl.store(scores_ptr + t * E + offs_e, n, mask=e_mask)

    neg_inf = float("-inf")
    # Top-k: the largest remaining score, ties to the lower index; once only -inf remain, the
    # lowest-index disallowed experts fill the slots. NaN ranks last (below -inf, as in the
    # reference): a NaN expert is taken, lowest index first, only when nothing else is left.
    taken = offs_e >= E
    is_nan = n != n
    offs_j = tl.arange(0, BLOCK_TOPK)
    sel_vec = tl.zeros((BLOCK_TOPK,), dtype=tl.int32)
    val_vec = tl.full((BLOCK_TOPK,), neg_inf, dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        m = tl.max(tl.where(taken | is_nan, neg_inf, n), axis=0)
        cand = (~taken) & (~is_nan) & (n == m)
        sel = tl.min(tl.where(cand, offs_e, BLOCK_E), axis=0)
        free_lo = tl.min(tl.where(taken, BLOCK_E, offs_e), axis=0)
        sel = tl.where(sel >= BLOCK_E, free_lo, sel)
        sel = tl.minimum(sel, E - 1)
        hit = offs_e == sel
        taken = taken | hit
        val = tl.sum(tl.where(hit, n, 0.0), axis=0)
        sel_vec = tl.where(offs_j == j, sel, sel_vec)
        val_vec = tl.where(offs_j == j, val, val_vec)
    j_mask = offs_j < TOP_K

    if FIXED:
        gates = val_vec
        coef = n
    else:
        if FULL_NORM:
            z = n / temperature
            allowed = e_mask & (n != neg_inf)
            mz = tl.max(tl.where(allowed, z, neg_inf), axis=0)
            mz = tl.where(mz == neg_inf, 0.0, mz)
            ez = tl.where(allowed, tl.exp(z - mz), 0.0)
            den = tl.sum(ez, axis=0)
            den = tl.where(den == 0.0, 1.0, den)
            zk = val_vec / temperature
            gates = tl.where(j_mask & (val_vec != neg_inf), tl.exp(zk - mz), 0.0) / den
        else:
            zk = val_vec / temperature
            allowed_k = j_mask & (val_vec != neg_inf)
            mk = tl.max(tl.where(allowed_k, zk, neg_inf), axis=0)
            mk = tl.where(mk == neg_inf, 0.0, mk)
            ek = tl.where(allowed_k, tl.exp(zk - mk), 0.0)
            den = tl.sum(ek, axis=0)
            den = tl.where(den == 0.0, 1.0, den)
            gates = ek / den
        coef = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            g_j = tl.sum(tl.where(offs_j == j, gates, 0.0), axis=0)
            s_j = tl.sum(tl.where(offs_j == j, sel_vec, 0), axis=0)
            coef = coef + tl.where(offs_e == s_j, g_j, 0.0)
    scale = tl.load(scale_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)
    tl.store(coef_ptr + t * E + offs_e, coef * scale, mask=e_mask)
    tl.store(idx_ptr + t * TOP_K + offs_j, sel_vec, mask=j_mask)
    tl.store(gates_ptr + t * TOP_K + offs_j, gates, mask=j_mask)


def route(
    h: torch.Tensor | None,
    *,
    num_tokens: int,
    num_experts: int,
    rank: int,
    top_k: int,
    temperature: float,
    normalize: str,
    scaling: torch.Tensor,
    calibration: torch.Tensor | None,
    persona_bias: torch.Tensor | None,
    persona_ids: torch.Tensor | None,
    persona_weights: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(topk_idx int32 [T,k], gates fp32 [T,k], scores fp32 [T,E], coef fp32 [T,E])``.

    ``h`` fp32: ``[T, E*r]``, or the shrink's split partials ``[S, T, E*r]``, which are summed in
    split order into ``h[0]`` (the mix then reads ``h[0]``). In fixed mode an unsplit ``h`` is not
    read and may be None. ``coef[t, e]`` is the factor of expert ``e``'s output in token ``t``:
    gate times scaling, or weight times scaling.
    """
    T, E = num_tokens, num_experts
    fixed = persona_weights is not None
    table = persona_weights if fixed else persona_bias
    idx = torch.empty(T, top_k, device=device, dtype=torch.int32)
    gates = torch.empty(T, top_k, device=device, dtype=torch.float32)
    n = torch.empty(T, E, device=device, dtype=torch.float32)
    coef = torch.empty(T, E, device=device, dtype=torch.float32)
    if T == 0:
        return idx, gates, n, coef
    has_table = table is not None and persona_ids is not None
    table_c = table.contiguous() if has_table else n  # type: ignore[union-attr]
    ids_c = persona_ids.contiguous() if has_table else idx  # type: ignore[union-attr]
    cal = calibration.contiguous() if calibration is not None else n
    scale = scaling.contiguous()
    num_parts = h.shape[0] if h is not None and h.dim() == 3 else 1
    part_stride = T * E * rank
    block_e = max(triton.next_power_of_2(E), 2)
    block_r = min(max(triton.next_power_of_2(rank), 2), max(4096 // block_e, 2))
    _route_kernel[(T,)](
        h if h is not None else n, cal, table_c, ids_c, scale, idx, gates, n, coef,
        E, rank, table.shape[0] if has_table else 0, float(temperature),  # type: ignore[union-attr]
        part_stride, NUM_PARTS=num_parts, TOP_K=top_k, BLOCK_E=block_e, BLOCK_R=block_r,
        BLOCK_TOPK=max(triton.next_power_of_2(top_k), 2),
        HAS_CAL=calibration is not None and not fixed, HAS_TABLE=has_table, FIXED=fixed,
        FULL_NORM=normalize == "full", num_warps=4 if block_e * block_r >= 2048 else 1,
    )  # fmt: skip
    return idx, gates, n, coef
