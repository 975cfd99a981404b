"""Tensor-parallel persona math (personamoe/integrations/tp.py) on 2 simulated ranks.

Two CPU processes joined by torch.distributed (gloo) each run their shard of a column-parallel and a
row-parallel persona layer; the gathered / all-reduced outputs must equal the unsharded reference,
and both ranks must choose the same experts.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from personamoe import reference
from personamoe.integrations import tp

WORLD = 2


def _case(seed: int, dtype: torch.dtype, r: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T, d_in, d_out, E = 7, 12, 10, 4

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return {
        "x": rnd(T, d_in),
        "w": rnd(d_out, d_in),
        "b": rnd(d_out),
        "a": rnd(E, r, d_in),
        "lb": rnd(E, d_out, r),
        "s": torch.rand(E, generator=g, dtype=torch.float64).to(dtype) + 0.5,
        "cal": torch.rand(E, generator=g, dtype=torch.float64).to(dtype) + 0.5,
        "bias": torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, float("-inf"), 0.5, 0.0]]),
        "ids": torch.tensor([0, 1, -1, 1, 0, 1, 1]),
        "weights": torch.tensor([[0.5, 0.0, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0]]),
    }


OPTIONS: list[dict[str, Any]] = [
    {"top_k": 2, "normalize": "topk", "temperature": 1.0},
    {"top_k": 2, "normalize": "full", "temperature": 0.7, "calibration": True},
    {"top_k": 1, "normalize": "topk", "temperature": 1.0, "persona_bias": True},
    {"top_k": 2, "normalize": "topk", "temperature": 1.0, "persona_weights": True},
]


def _kwargs(c: dict[str, torch.Tensor], opt: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "top_k": opt["top_k"],
        "normalize": opt["normalize"],
        "temperature": opt["temperature"],
    }
    if opt.get("calibration"):
        kw["calibration"] = c["cal"]
    if opt.get("persona_bias"):
        kw["persona_bias"], kw["persona_ids"] = c["bias"], c["ids"]
    if opt.get("persona_weights"):
        kw["persona_weights"], kw["persona_ids"] = c["weights"], c["ids"]
    return kw


def _worker(rank: int, init_file: str, errors: mp.Queue) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=WORLD)  # fmt: skip
        torch.set_num_threads(1)
        # fp64 with an even rank; fp32 with an odd rank (padded to 4 for the row split).
        for dtype, r in ((torch.float64, 4), (torch.float32, 3)):
            _check_rank(rank, dtype, r)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def _same_on_all_ranks(t: torch.Tensor) -> None:
    got = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(got, t.contiguous())
    for other in got[1:]:
        assert torch.equal(got[0], other), "ranks chose different experts"


def _check_rank(rank: int, dtype: torch.dtype, r: int) -> None:
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for seed, opt in enumerate(OPTIONS):
        c = _case(seed, dtype, r)
        kw = _kwargs(c, opt)
        want, want_idx, _ = reference.persona_moe_linear(
            c["x"], c["w"], c["b"], c["a"], c["lb"], c["s"], return_routing=True, **kw
        )

        # Column-parallel: each rank's output rows; gathered they are the whole layer.
        col = tp.shard_column(c["w"], c["b"], c["a"], c["lb"], rank, WORLD)
        y_col = tp.column_parallel_forward(c["x"], col, c["s"], **kw)
        parts = [torch.empty_like(y_col) for _ in range(WORLD)]
        dist.all_gather(parts, y_col.contiguous())
        torch.testing.assert_close(torch.cat(parts, dim=-1), want, atol=tol, rtol=tol)

        # Fused column layer (two parts of 6 and 4 rows, e.g. q and kv), each part split apart.
        fused = tp.shard_column(c["w"], c["b"], c["a"], c["lb"], rank, WORLD, parts=(6, 4))
        y_f = tp.column_parallel_forward(c["x"], fused, c["s"], **kw)
        got = [torch.empty_like(y_f) for _ in range(WORLD)]
        dist.all_gather(got, y_f.contiguous())
        rows = [torch.cat([g[:, :3] for g in got], -1), torch.cat([g[:, 3:] for g in got], -1)]
        torch.testing.assert_close(torch.cat(rows, dim=-1), want, atol=tol, rtol=tol)

        # Row-parallel: x sharded by columns; h all-reduced; partial outputs all-reduced.
        row = tp.shard_row(c["w"], c["b"], c["a"], c["lb"], rank, WORLD)
        cols = tp.split_range(c["x"].shape[-1], rank, WORLD)
        y_row, idx, _ = tp.row_parallel_forward(
            c["x"][:, cols], row, c["s"], rank=rank, world_size=WORLD, all_reduce=_all_reduce,
            **kw,
        )  # fmt: skip
        dist.all_reduce(y_row)
        torch.testing.assert_close(y_row, want, atol=tol, rtol=tol)
        _same_on_all_ranks(idx)
        if "persona_weights" not in kw:
            assert torch.equal(idx, want_idx)


def test_two_ranks_match_unsharded() -> None:
    """One spawn of 2 gloo ranks (spawning costs seconds); every case runs inside."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        init = os.path.join(d, "init")
        procs = [ctx.Process(target=_worker, args=(i, init, errors)) for i in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not msgs and codes == [0] * WORLD, f"exit codes {codes}\n" + "\n".join(msgs)


def test_pad_rank_is_exact() -> None:
    c = _case(0, torch.float64, 3)
    a, b = tp.pad_rank(c["a"], c["lb"], 2)
    assert a.shape[1] == b.shape[2] == 4
    want = reference.persona_moe_linear(c["x"], c["w"], c["b"], c["a"], c["lb"], c["s"], top_k=2)
    got = reference.persona_moe_linear(c["x"], c["w"], c["b"], a, b, c["s"], top_k=2)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_split_range_rejects_uneven() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        tp.split_range(5, 0, 2)
