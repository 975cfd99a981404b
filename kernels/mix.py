"""Mix: ``y = base + sum_j g_j * s_e * (B_e @ h_e)``, in two regimes.

- ``_linear_mix_kernel`` (dense-masked, small banks): one GEMM tile ``[BLOCK_M, BLOCK_N]`` of ``y``
  whose K loop runs over the experts, the A operand being ``h_e * coef[:, e]`` (gate times scaling,
  zero for experts not chosen) and the B operand ``B_e^T``. The tile's ``[BLOCK_M, BLOCK_E]``
  coefficients are loaded once; the experts with a non-zero coefficient for some token of the tile
  are ranked in index order and the loop runs over (used expert, rank chunk) steps only, each step
  taking its expert and coefficients from registers. Why: the former loop over all E experts loaded
  each expert's coefficients and branched on them before loading ``h_e`` and ``B_e``, a dependent
  load and a branch per expert that the compiler cannot pipeline; now the steps' loads are
  independent (the compile test checks: no branch, async copies), and at small T only the chosen
  experts' ``B`` is read. The same kernel can compute the base output itself (``COMPUTE_BASE``:
  ``x @ W^T + b`` as the first K steps, the mix as extra K steps, so ``y`` is written once and never
  re-read), or start from a base output computed beside it (cuBLAS through torch) and add into it in
  place. It also sums ``NUM_PARTS`` per-(token, slot) partial outputs in its epilogue (the grouped
  regime's results). Its 1-D grid is walked in ``GROUP_M`` swizzled order (``_tile_ids``) so that
  programs running together share rows of ``x`` and columns of ``W`` in L2; the fused GEMM's tile
  is the largest of the device table's candidates whose grid still covers the SMs (``_mix_tiles``).
- ``_grouped_expand_kernel`` (sorted by expert, large banks such as E=64, r=64): the (token, slot)
  pairs are sorted by expert and each expert's list padded to ``BLOCK_M`` (fused-MoE
  ``moe_align_block_size``); a program multiplies ``BLOCK_M`` rows of gathered ``h_e`` (gate and
  scaling applied) by one ``B_e`` tile, so each tile of ``B_e`` is read once per block of its tokens
  and the FLOPs are ``k/E`` of the dense regime. Results go to ``parts [T, k, d_out]`` (one row per
  pair, no atomics, deterministic), summed by ``_linear_mix_kernel``'s epilogue. The sort is one
  launch of ``_align_kernel`` (counts, padded offsets, scatter in token order, in one program)
  instead of about twenty small torch launches, and ``BLOCK_M`` follows the mean pairs per expert
  (16/32/64, ``grouped_block_m``) so the padding (up to ``BLOCK_M - 1`` rows per expert) stays small
  when experts get few tokens.

Every grid is sized from upper bounds known from the shapes; blocks past the real work exit early,
so the launches are CUDA-graph safe (no host sync anywhere). Tiles come from ``configs.py`` (a
table per device, nothing autotuned).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from personamoe.kernels import configs
from personamoe.kernels.configs import TileConfig

__all__ = ["align_by_expert", "grouped_block_m", "grouped_expand", "linear_mix"]


@triton.jit
def _tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` in a 1-D grid of ``num_pid_m * num_pid_n``: groups of
    ``GROUP_M`` row tiles sweep the column tiles together, column-major inside a group, so the
    programs running at once share ``GROUP_M`` rows of ``x`` and a few column tiles of ``W`` in L2
    instead of one row of tiles against all of ``W`` (the grouped ordering of Triton's matmul
    tutorial). A bijection onto the tiles (tests/test_triton_configs.py checks it)."""
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


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
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    COMPUTE_BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MIX_DENSE: tl.constexpr,
    NUM_PARTS: tl.constexpr,
    IS_FP32: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
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
        offs_e = tl.arange(0, BLOCK_E)
        r_steps = tl.cdiv(R, BLOCK_R)
        for e0 in range(0, E, BLOCK_E):
            # The tile's coefficients for BLOCK_E experts, loaded once. An expert is used when
            # any token of the tile has a non-zero coefficient (NaN != 0 holds, so a token with a
            # NaN coefficient is never skipped); the used experts are ranked in index order, and
            # the loop below runs over (used expert, rank chunk) steps only. Every step's expert
            # and coefficients come from registers, so its loads of h_e and B_e depend on no
            # earlier load or branch and the steps can be pipelined.
            ee = e0 + offs_e
            ct = tl.load(
                coef_ptr + offs_m[:, None] * E + ee[None, :],
                mask=m_mask[:, None] & (ee < E)[None, :],
                other=0.0,
            )
            used = (tl.sum((ct != 0.0).to(tl.int32), axis=0) > 0).to(tl.int32)
            rank = tl.cumsum(used, axis=0) - 1
            n_steps = tl.sum(used, axis=0) * r_steps
            for step in range(0, n_steps):
                slot = step // r_steps
                pick = (used > 0) & (rank == slot)
                e_local = tl.sum(tl.where(pick, offs_e, 0), axis=0)
                c = tl.sum(tl.where(pick[None, :], ct, 0.0), axis=1)
                e = (e0 + e_local).to(tl.int64)
                rr = (step % r_steps) * BLOCK_R + offs_r
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


def _mix_tiles(
    T: int, N: int, compute_base: bool, cfg: TileConfig | None = None
) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` from the shapes and ``cfg`` alone.

    Mix into a given base (or T <= 16): ``cfg.mix_tile``, small rows. The fused base+mix GEMM: the
    largest of ``cfg.fused_tiles`` whose grid has at least ``fused_min_wave * num_sms`` programs
    (a 128x128 tile gives 64 programs at T=512, d_out=2048 on 132 SMs: half the chip idle; 64x128
    gives 128), else the last, smallest tile (most programs). 64x128 runs 8 warps: 4 warps need
    255 registers there (the compile test bounds spills). Unmeasured.
    """
    cfg = cfg or configs.DEFAULT
    if not compute_base or T <= 16:
        return cfg.mix_tile
    want = cfg.fused_min_wave * cfg.num_sms
    for tile in cfg.fused_tiles:
        if triton.cdiv(T, tile[0]) * triton.cdiv(N, tile[1]) >= want:
            return tile
    return cfg.fused_tiles[-1]


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
    cfg = configs.device_config(y.device)
    bm, bn, bk, warps, stages = _mix_tiles(T, N, compute_base, cfg)
    K = x.shape[1] if x is not None else 0
    block_r = min(max(triton.next_power_of_2(R), 16), 64)
    b = lora_b.contiguous()
    dummy = h
    grid = (triton.cdiv(T, bm) * triton.cdiv(N, bn),)
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
        BLOCK_E=min(max(triton.next_power_of_2(E), 2), 32), GROUP_M=cfg.group_m,
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


@triton.jit
def _align_kernel(
    idx_ptr,
    pairs_ptr,
    block_expert_ptr,
    n_pairs,
    E,
    max_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # One program: the routing is small (T*k expert ids), and one program needs no cross-program
    # prefix sums (so one launch, no atomics, deterministic).
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    offs_c = tl.arange(0, CHUNK)
    # 1. pairs per expert
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, n_pairs, CHUNK):
        p = c0 + offs_c
        ex = tl.load(idx_ptr + p, mask=p < n_pairs, other=-1)
        counts += tl.sum((ex[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    # 2. each expert's slots padded to BLOCK_M, laid out in expert order
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    # 3. scatter pair ids in pair (= token) order: a pair's slot is its expert's start plus the
    # number of earlier pairs of that expert (earlier chunks in `seen`, this chunk by a cumsum)
    seen = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, n_pairs, CHUNK):
        p = c0 + offs_c
        valid = p < n_pairs
        ex = tl.load(idx_ptr + p, mask=valid, other=-1)
        onehot = (ex[:, None] == offs_e[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, axis=0) - onehot
        dest = tl.sum(onehot * ((pad_start + seen)[None, :] + before), axis=1)
        tl.store(pairs_ptr + dest, p, mask=valid)
        seen += tl.sum(onehot, axis=0)
    # 4. -1 in every slot no pair took (disjoint from step 3's slots, so no barrier is needed),
    # and each block's expert: the number of experts ending at or before its first slot (E when
    # the block is past the last expert: no work)
    fill_end = pad_start + counts
    for q0 in range(0, max_blocks * BLOCK_M, CHUNK):
        q = q0 + offs_c
        q_mask = q < max_blocks * BLOCK_M
        ends_before = (pad_end[None, :] <= q[:, None]) & e_mask[None, :]
        e_of = tl.sum(ends_before.to(tl.int32), axis=1)
        own = offs_e[None, :] == e_of[:, None]
        q_fill_end = tl.sum(tl.where(own, fill_end[None, :], 0), axis=1)
        tl.store(pairs_ptr + q, tl.full((CHUNK,), -1, tl.int32), mask=q_mask & (q >= q_fill_end))
        first = q_mask & (q % BLOCK_M == 0)
        tl.store(block_expert_ptr + q // BLOCK_M, e_of, mask=first)


def grouped_block_m(T: int, k: int, E: int, cfg: TileConfig | None = None) -> int:
    """Rows per grouped block from the mean pairs per expert ``T*k/E`` (vLLM's fused_moe does the
    same: 16/32/64): each expert pads its list to a multiple of BLOCK_M, up to BLOCK_M-1 empty rows
    per expert, so 64-row blocks at T=256, k=2, E=64 (8 pairs an expert) would be 87% padding."""
    cfg = cfg or configs.DEFAULT
    mean = T * k / max(E, 1)
    return next(bm for limit, bm in cfg.grouped_block_m if mean <= limit)


def align_by_expert(
    topk_idx: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pairs, block_expert)``: pair ids ``t*k + j`` sorted by expert (token order within an
    expert), each expert's list padded to ``block_m`` with ``-1``; ``block_expert[b]`` the expert of
    block ``b`` (``>= E``: no work). One launch of ``_align_kernel``.

    Sizes are upper bounds known from the shapes (``cdiv(T*k, block_m) + E`` blocks: each expert
    adds at most one partly filled block), so the call is CUDA-graph safe (no host sync).
    """
    flat = topk_idx.reshape(-1).to(torch.int32)
    n = flat.numel()
    max_blocks = triton.cdiv(n, block_m) + num_experts
    pairs = torch.empty(max_blocks * block_m, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=flat.device)
    block_e = max(triton.next_power_of_2(num_experts), 2)
    # The one-hot chunk [CHUNK, BLOCK_E] stays at 8K elements; CHUNK a multiple of block_m.
    chunk = max(block_m, min(1024, 8192 // block_e))
    _align_kernel[(1,)](
        flat, pairs, block_expert, n, num_experts, max_blocks,
        BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=chunk, num_warps=4,
    )  # fmt: skip
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
    cfg = configs.device_config(h.device)
    bm = grouped_block_m(T, k, E, cfg)
    pairs, block_expert = align_by_expert(topk_idx, E, bm)
    bn = cfg.grouped_block_n
    block_r = min(max(triton.next_power_of_2(R), 16), 64)
    grid = (block_expert.numel(), triton.cdiv(N, bn))
    _grouped_expand_kernel[grid](
        h, gates, scaling, lora_b.contiguous(), pairs, block_expert, parts, N, E, R,
        TOP_K=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=block_r,
        IS_FP32=out_dtype == torch.float32, num_warps=4,
    )  # fmt: skip
    return parts
