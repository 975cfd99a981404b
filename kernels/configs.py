"""Tile configurations of the Triton kernels, as data: one entry per device name, no autotuning.

Why data and not ``@triton.autotune``: autotuning benchmarks candidate configs on first call, which
fails under the interpreter (no timer, no GPU), makes the first call of every new shape slow and
non-deterministic in its choice, and must never run inside a CUDA-graph capture (it launches and
synchronizes). Here every launcher derives its tiles from the shapes and one ``TileConfig``,
looked up once per device (``device_config``) and cached, so a capture only ever sees fixed
launches.

Entries are matched by a substring of ``torch.cuda.get_device_name``; a device with no entry (and
the CPU interpreter) gets ``DEFAULT``. The SM count always comes from the device itself
(``multi_processor_count``), 132 (an H100 SXM) when there is no CUDA device, so grids scale with
the real chip even under a borrowed entry. The H100 and H200 entries are best guesses from the
chips' shape (132 SMs, 227 KiB shared memory per SM, wgmma), all **unmeasured**:
``benchmarks/gpu_check.py`` times the paths they choose, and its numbers are what should replace
them (set ``measured=True`` then).
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["DEFAULT", "DEFAULT_NUM_SMS", "DEVICE_CONFIGS", "TileConfig", "device_config"]

DEFAULT_NUM_SMS = 132  # H100 SXM / H200: the target the defaults are sized for


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Every tile parameter the launchers use. Tuples of tiles are candidates in preference order;
    the launchers pick among them with rules stated in their docstrings (functions of shapes and
    ``num_sms`` only)."""

    name: str
    measured: bool
    num_sms: int = DEFAULT_NUM_SMS
    # Shrink, decode (T <= 64): small tiles, split-K until about this many programs stream A.
    shrink_decode_tile: tuple[int, int, int] = (16, 32, 64)  # BLOCK_M, BLOCK_N, BLOCK_K
    shrink_decode_programs: int = 128
    # Shrink, prefill (T > 64): BLOCK_M candidates, largest first (A is re-read once per M tile).
    shrink_block_m: tuple[int, ...] = (128, 64, 32, 16)
    # Widest BLOCK_N: N = E*r up to this is one tile, so x is read once.
    shrink_block_n_max: int = 128
    shrink_block_k: int = 64  # fp16/bf16; fp32 (ieee dot, twice the bytes) uses half
    # Programs wanted = waves * num_sms, reached with split-K up to this many tokens.
    shrink_fill_waves: int = 2
    shrink_fill_max_tokens: int = 2048
    shrink_min_k_steps: int = 2  # each K split runs at least this many BLOCK_K steps
    # Mix into a base output computed beside it (cuBLAS): (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
    mix_tile: tuple[int, int, int, int, int] = (16, 64, 64, 4, 2)
    # Fused base + mix GEMM: candidates, largest first; the first whose grid fills
    # ``fused_min_wave * num_sms`` programs is taken, else the last (most programs).
    fused_tiles: tuple[tuple[int, int, int, int, int], ...] = (
        (128, 128, 64, 8, 3),
        (64, 128, 64, 8, 3),
        (64, 64, 64, 4, 3),
    )
    fused_min_wave: float = 0.9
    group_m: int = 8  # L2 swizzle: GROUP_M row tiles walk the N tiles together
    # Grouped expand: BLOCK_M from the mean pairs per expert T*k/E (as vLLM's fused_moe):
    # the first (limit, block_m) with mean <= limit, else the last block_m.
    grouped_block_m: tuple[tuple[int, int], ...] = ((16, 16), (32, 32), (1 << 62, 64))
    grouped_block_n: int = 64


DEFAULT = TileConfig(name="default", measured=False)

# Matched in order by substring of the device name. Unmeasured guesses (see the module docstring).
DEVICE_CONFIGS: dict[str, TileConfig] = {
    "H200": dataclasses.replace(DEFAULT, name="H200 (unmeasured)"),
    "H100": dataclasses.replace(DEFAULT, name="H100 (unmeasured)"),
}

_CACHE: dict[tuple[str, int], TileConfig] = {}


def device_config(device: torch.device | str | None = None) -> TileConfig:
    """The ``TileConfig`` of ``device`` (``None``: the current CUDA device if any), cached per
    device: the name and SM count are read once, never inside the hot path afterwards."""
    dev = torch.device(device) if device is not None else None
    if dev is None:
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if dev.type != "cuda":
        return DEFAULT
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    key = (dev.type, index)
    cfg = _CACHE.get(key)
    if cfg is None:
        props = torch.cuda.get_device_properties(index)
        base = next((c for k, c in DEVICE_CONFIGS.items() if k in props.name), DEFAULT)
        cfg = dataclasses.replace(base, num_sms=int(props.multi_processor_count))
        _CACHE[key] = cfg
    return cfg
