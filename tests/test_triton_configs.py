"""Design properties of the Triton kernels' tile choices (kernels/configs.py and the launchers).

The speeds these choices aim at are measured only on a GPU (``benchmarks/gpu_check.py``); here
the properties that make them right by construction are checked on CPU: the prefill shrink fills
the machine with bounded split partials, the fused GEMM's grid covers the SMs, the L2 swizzle
visits every tile once, the dense mix iterates only the used experts and still equals the
reference, the one-launch alignment equals the former torch alignment with bounded padding, and
the tile table is data looked up per device, with nothing autotuned.
"""

from __future__ import annotations

import pathlib
import re
import types

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl
from personamoe.kernels import configs, launchers, mix, shrink_route

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
SMS = configs.DEFAULT_NUM_SMS
KERNELS = pathlib.Path(__file__).resolve().parent.parent / "kernels"


# -- finding 5: the prefill shrink ---------------------------------------------------------------


def _programs(T: int, N: int, cfg: tuple[int, int, int, int]) -> int:
    bm, bn, _, split = cfg
    return triton.cdiv(T, bm) * triton.cdiv(N, bn) * split


@pytest.mark.parametrize("T", [65, 100, 256, 512, 1000, 1024, 2048])
def test_prefill_shrink_fills_two_waves(T):
    """d=2048, E*r=128, bf16: at least 2 x 132 programs up to T=2k (the 64x64 tiles gave 8)."""
    cfg = shrink_route.shrink_config(T, 128, 2048)
    assert _programs(T, 128, cfg) >= 2 * SMS, cfg


@pytest.mark.parametrize("elsize", [2, 4])
@pytest.mark.parametrize("N", [15, 64, 128, 256, 512, 4096])
@pytest.mark.parametrize("K", [130, 1024, 2048, 4096])
@pytest.mark.parametrize("T", [65, 256, 1024, 2048, 2049, 4096, 16384])
def test_shrink_partials_bounded_by_x_and_splits_not_empty(T, N, K, elsize):
    bm, bn, bk, split = shrink_route.shrink_config(T, N, K, elsize=elsize)
    if split > 1:
        assert split * T * N * 4 <= T * K * elsize  # the route kernel's sum never outweighs x
        k_per_split, eff = shrink_route._effective_split(K, bk, split)
        assert eff == split and k_per_split >= 2 * bk  # every split runs >= 2 K steps
    if configs.DEFAULT.shrink_fill_max_tokens < T:
        assert split == 1  # bulk: no split partials, whose traffic grows with T
    assert bn >= 16 and bm >= 16 and bk >= 16


def test_shrink_reads_x_once_at_large_T_and_keeps_bulk_unsplit():
    assert shrink_route.shrink_config(4096, 128, 2048)[3] == 1
    for T in (8192, 16384):
        bm, bn, _, split = shrink_route.shrink_config(T, 128, 2048)
        assert bn >= 128 and split == 1  # one N tile: x read once
        assert _programs(T, 128, (bm, bn, 0, split)) >= 0.9 * SMS


def test_shrink_config_follows_the_device_sm_count():
    small = configs.dataclasses.replace(configs.DEFAULT, num_sms=16)
    a = shrink_route.shrink_config(256, 128, 2048, cfg=small)
    b = shrink_route.shrink_config(256, 128, 2048)
    assert _programs(256, 128, a) >= 32 and _programs(256, 128, a) < _programs(256, 128, b)


# -- finding 7: fused GEMM tiles and the L2 swizzle -----------------------------------------------


@pytest.mark.parametrize("T", [512, 1024, 2048, 4096])
def test_fused_tiles_cover_the_sms(T):
    bm, bn, _, warps, _ = mix._mix_tiles(T, 2048, True)
    assert triton.cdiv(T, bm) * triton.cdiv(2048, bn) >= 0.9 * SMS
    assert (bm, bn) != (64, 128) or warps == 8  # 4 warps spill there (see the compile test)
    assert launchers.FUSED_MIN_TOKENS == 512  # crossover stays a module constant


@triton.jit
def _tile_ids_probe(out_ptr, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = mix._tile_ids(pid, num_pid_m, num_pid_n, GROUP_M)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


@pytest.mark.parametrize(("m", "n", "g"), [(1, 1, 8), (4, 16, 8), (13, 5, 8), (9, 3, 4), (5, 7, 1)])
def test_swizzle_visits_every_tile_once(m, n, g):
    out = torch.full((m * n, 2), -1, dtype=torch.int32, device=DEV)
    _tile_ids_probe[(m * n,)](out, m, n, GROUP_M=g)
    tiles = {tuple(t) for t in out.cpu().tolist()}
    assert tiles == {(i, j) for i in range(m) for j in range(n)}
    if g > 1 and m >= g:  # the first programs share GROUP_M row tiles, not one row of tiles
        assert {t[0] for t in out[:g].cpu().tolist()} == set(range(g))


# -- finding 6: the dense mix over used experts only ----------------------------------------------


@pytest.mark.parametrize("compute_base", [False, True])
@pytest.mark.parametrize(("E", "R"), [(40, 4), (5, 20)])
def test_dense_mix_with_used_and_unused_experts_per_tile(compute_base, E, R):
    """Three 16-row tiles: a few experts (across the 32-expert chunks), none, and all; a NaN
    coefficient keeps its expert used. R=20 runs two rank chunks of 16 per expert."""
    g = torch.Generator().manual_seed(E)
    T, N, K = 48, 24, 40
    h = torch.randn(T, E * R, generator=g)
    b = torch.randn(E, N, R, generator=g)
    coef = torch.zeros(T, E)
    for t, e in ((0, 0), (3, E - 1), (7, 2), (15, E // 2)):
        coef[t, e] = torch.rand(1, generator=g).item() + 0.1
    coef[32:] = torch.rand(16, E, generator=g)
    coef[40, 1] = 0.0
    x = torch.randn(T, K, generator=g)
    w = torch.randn(N, K, generator=g)
    bias = torch.randn(N, generator=g)
    base = x @ w.T + bias
    want = base + torch.einsum("te,ter,enr->tn", coef, h.view(T, E, R), b)
    dev = [t.to(DEV) for t in (h, b, coef, x, w, bias, base)]
    hd, bd, cd, xd, wd, biasd, based = dev
    y = torch.empty(T, N, device=DEV)
    if compute_base:
        mix.linear_mix(y, x=xd, weight=wd, bias=biasd, base=None, h=hd, coef=cd, lora_b=bd,
                       parts=None, interpret=not HAS_CUDA)  # fmt: skip
    else:
        y.copy_(based)
        mix.linear_mix(y, x=None, weight=None, bias=None, base=y, h=hd, coef=cd, lora_b=bd,
                       parts=None, interpret=not HAS_CUDA)  # fmt: skip
    torch.testing.assert_close(y.cpu(), want, atol=1e-4, rtol=1e-4)
    coef[5, 3] = float("nan")
    y = based.clone()
    mix.linear_mix(y, x=None, weight=None, bias=None, base=y, h=hd, coef=coef.to(DEV), lora_b=bd,
                   parts=None, interpret=not HAS_CUDA)  # fmt: skip
    assert torch.isnan(y[5]).all() and torch.isfinite(y[torch.arange(T) != 5]).all()


# -- finding 8: the one-launch alignment ----------------------------------------------------------


def _align_torch(topk_idx: torch.Tensor, num_experts: int, block_m: int):
    """The former alignment (about 20 torch launches), kept as the reference."""
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


@pytest.mark.parametrize(("T", "k", "E", "bm"), [(1, 1, 1, 16), (7, 2, 3, 16), (256, 2, 64, 16),
                                                 (300, 3, 8, 64), (1500, 2, 8, 32),
                                                 (100, 4, 130, 16)])  # fmt: skip
def test_alignment_kernel_equals_torch_alignment(T, k, E, bm):
    g = torch.Generator().manual_seed(T + E)
    # k distinct experts per token, some experts unused (skewed routing)
    scores = torch.rand(T, E, generator=g) ** 3
    scores[:, : max(1, E // 4)] += 0.5
    idx = scores.topk(min(k, E), dim=1).indices.to(torch.int32).to(DEV)
    pairs, block_expert = mix.align_by_expert(idx, E, bm)
    want_pairs, want_be = _align_torch(idx, E, bm)
    assert torch.equal(pairs.cpu(), want_pairs.cpu())
    assert torch.equal(block_expert.cpu(), want_be.cpu())
    # padding: at most bm-1 empty slots per expert before the last used block
    counts = torch.bincount(idx.reshape(-1).long().cpu(), minlength=E)
    used_blocks = int((block_expert < E).sum())
    assert used_blocks * bm - int(counts.sum()) <= int((counts > 0).sum()) * (bm - 1)


def test_grouped_block_m_follows_pairs_per_expert():
    assert mix.grouped_block_m(256, 2, 64) == 16  # 8 pairs an expert: 64-row blocks were 87% empty
    assert mix.grouped_block_m(1024, 2, 64) == 32
    assert mix.grouped_block_m(4096, 2, 64) == 64
    assert mix.grouped_block_m(1, 1, 1) == 16


# -- finding 11: configs as data ------------------------------------------------------------------


def test_configs_are_data_looked_up_once_per_device(monkeypatch):
    assert configs.device_config("cpu") is configs.DEFAULT and configs.DEFAULT.num_sms == 132
    for key, cfg in configs.DEVICE_CONFIGS.items():
        assert not cfg.measured and "unmeasured" in cfg.name, key
    calls = []

    def props(index):
        calls.append(index)
        return types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=114)

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(configs, "_CACHE", {})
    first = configs.device_config("cuda:3")
    assert first.name.startswith("H100") and first.num_sms == 114
    assert configs.device_config("cuda:3") is first and calls == [3]
    monkeypatch.setattr(
        torch.cuda, "get_device_properties",
        lambda i: types.SimpleNamespace(name="Some Future GPU", multi_processor_count=200),
    )  # fmt: skip
    other = configs.device_config("cuda:4")
    assert other.name == "default" and other.num_sms == 200


def test_nothing_is_autotuned():
    """Autotuning fails in the interpreter and must never run inside a CUDA-graph capture."""
    for path in KERNELS.glob("*.py"):
        assert not re.search(r"^\s*@triton\.autotune", path.read_text(), re.MULTILINE), path
