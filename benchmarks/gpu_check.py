"""One-shot GPU check of personamoe's GPU kernels: correctness, CUDA graphs, torch.compile, timings.

Run by ``benchmarks/gpu_check.sh`` after it has built the package (``pip install -e .`` builds the
CUDA extension), after ``--canary`` (one CUDA decode and one Triton launch, in a process of its own
under a hard timeout; a backend whose launch did not come back ok is left out here). Sections;
``$OUT/gpu_check.json`` and ``gpu_check.md`` are rewritten atomically after every case (a hang or a
kill still leaves what was done):

1. ``device``: the machine description every benchmark records (``personamoe.bench.runner``) plus
   the card, the measured copy bandwidth (device-to-device copy, bytes read plus
   written) and bf16 GEMM rate (8192^3) used for every roofline below.
2. ``correctness``: Triton (every mix regime x base mode) and CUDA backends against the reference
   computed in fp64, for bf16/fp16/fp32 at decode, prefill, odd and large-bank shapes, with a
   persona bias (-inf rows, out-of-range ids), calibration, both gate normalisations and fixed mode.
   Checked by ``personamoe.testing.compare_to_reference``: the share of tokens whose top-k equals
   the reference's, and ``y``, gates and scores elementwise within the dtype's tolerance
   (``personamoe.testing.TOLERANCES``); ``||y - ref|| / ||ref||`` is reported alongside. fp32:
   100% top-k agreement on the tokens away from near-ties. Then duplicated experts run twice and
   compared bitwise (d=2048, T in 1/16/17/64), expanded/strided scaling and NaN locality.
3. ``graphs``: CUDA-graph capture + replay with new inputs equals eager (T = 1, 16, 256), and
   ``torch.compile(fullgraph=True)`` equals eager.
4. ``stress``: 2,000 back-to-back eager decode calls (T=1, d=2048, persona table + ids; public
   entry, then the op without host validation; ``auto`` and each GPU backend), the last four
   checked against fp64 after one final synchronize (an asynchronous launch error surfaces
   there); then one CUDA graph holding four chained layers (each ``y`` the next ``x``, persona
   ids) per GPU backend at T = 1 and 16, replayed 200 times with new ``x`` and ids before every
   replay, every layer checked against fp64 and against an eager call on the graph's own input
   at replays 0, 1, 100 and 199. A top-k that differs from fp64 passes only on a near-tie
   (``check_routed``).
5. ``streams``: the same layer on two CUDA streams at once, different inputs and ids, 50 calls
   on each (T = 1/16, and 256 for Triton); every call's output against the same call made alone
   (top-k equal, ``y`` close), each stream's last output against fp64 (bitwise equality to the
   call alone recorded).
6. ``bench``: L1/L16/L256 (d=2048, E=8, r=16, k=2) and the G-sweep (d=4096, T in 1/16/256/4096,
   E in 8/64, r in 16/64, k=2), bf16, providers ``base``, ``naive``, ``dense``, ``masked``
   (personamoe.bench.layer) and personamoe (public entry ``pm``; the op without host validation
   ``pm_op``; each Triton path forced; the CUDA decode kernel). ``triton.testing.do_bench`` medians
   (it flushes L2 between calls), weight sets rotated, and for T <= 16 also CUDA-graph replays
   (one graph holding one call per weight set). Each case gets its roofline time
   ``max(bytes / BW, FLOPs / rate)`` from the measured BW and rate.
7. ``triton_compile``: for every Triton specialisation compiled in this process (``new_in_bench``:
   first compiled by the bench section), ``n_regs`` and ``n_spills`` of the loaded kernel, shared
   memory, warps, stages, constexprs.
8. ``bench_ids``: L1/L16/L256 eager, ``pm`` and ``pm_op`` without and with a persona table and
   ids (``pm_ids``, ``pm_op_ids``) beside ``base``; ``bench_prefill``: T = 512/1024/2048 at
   d=2048 eager, ``pm`` against ``base``, each with its roofline. After the bench cases, so the
   sections above run first.
9. ``train``: forward + backward (the backward replays the reference through autograd) of
   ``pm`` against ``base`` and ``masked`` at L256 and d=4096/T=4096.
10. ``pytest``: ``tests/test_triton_kernels.py`` and ``tests/test_cuda_decode.py`` on the GPU if
    time is left.

``stress``, ``streams``, ``bench_ids`` and ``bench_prefill`` stop before a case when too little of
``--budget`` is left and record ``{"case", "skipped": "out of time"}`` (``bench`` and ``train``
stop too); a section that raises is recorded as
``<section>_error`` and the next one runs. Stress and streams failures, and any section error,
make the exit status 1.

``--smoke`` runs every code path on CPU under the Triton interpreter at tiny shapes (no graphs,
compile or CUDA kernel; perf_counter timings): a check of this script, not of the GPU. What needs
a GPU is recorded as skipped with its reason: the graph stack and the two streams run their same
checks eagerly one after the other (``"skipped"`` says so), and ``triton_compile`` has no
compiled kernel to read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import personamoe  # noqa: E402
from personamoe import ops  # noqa: E402
from personamoe.bench import runner  # noqa: E402
from personamoe.layer_args import LayerArgs  # noqa: E402
from personamoe.testing import compare_to_reference, make_layer_args  # noqa: E402

T0 = time.monotonic()
DEV = "cpu" if SMOKE else "cuda"
RESULTS: dict[str, Any] = {}


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


OUT_DIR = Path("gpu_check_out")
# GPU backends checked; a backend whose canary launch (``--canary``, run first by gpu_check.sh in
# its own process with its own timeout) did not end is left out, so that one hang cannot eat the
# whole run.
GPU_BACKENDS = ["triton", "cuda"]


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(out: Path | None = None) -> None:
    """Rewrite ``gpu_check.json`` and ``gpu_check.md`` from ``RESULTS`` (after every case)."""
    out = out or OUT_DIR
    write_atomic(out / "gpu_check.json", json.dumps(RESULTS, indent=1, default=str))
    try:
        md = render_md()
    except Exception:  # the table must never cost the JSON
        md = "markdown failed:\n\n```\n" + traceback.format_exc() + "```\n"
    write_atomic(out / "gpu_check.md", md)


def time_left(budget: float) -> float:
    return budget - (time.monotonic() - T0)


def bench_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on a GPU (it flushes L2 between
    calls), the benchmarks' own timing loop in smoke mode (grad mode kept for the train section)."""
    if SMOKE:
        timed = runner.time_interleaved("smoke", {"fn": fn}, repeats=3, inference=False)
        return timed["fn"].median * 1e3
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


# ---- 1. device ------------------------------------------------------------------------------
def device_section() -> dict[str, Any]:
    info = runner.machine_info()
    info["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    if SMOKE:
        info.update(name="cpu (smoke)", copy_bw_Bps=20e9, gemm_flops=1e11)
        return info
    p = torch.cuda.get_device_properties(0)
    info.update(name=p.name, sms=p.multi_processor_count, mem_GiB=round(p.total_memory / 2**30, 1))
    try:
        from personamoe import _C_cuda  # type: ignore[attr-defined]

        info["cuda_ext_runtime"] = _C_cuda.runtime_version()
    except ImportError as e:
        info["cuda_ext_runtime"] = f"not importable: {e}"
    n = 1 << 28  # 512 MiB of bf16
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = bench_ms(lambda a=a, b=b: b.copy_(a))
    info["copy_bw_Bps"] = 2 * a.numel() * 2 / (ms * 1e-3)
    del a, b
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    m2 = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda m=m, m2=m2: m @ m2)
    info["gemm_flops"] = 2 * 8192**3 / (ms * 1e-3)
    del m, m2
    torch.cuda.empty_cache()
    return info


# ---- helpers: layer arguments ---------------------------------------------------------------
def make_layer(T, d_in, d_out, E, r, dtype, seed=0, **options) -> LayerArgs:
    """Random layer arguments drawn on the device (``personamoe.testing.make_layer_args``)."""
    return make_layer_args(T, d_in, d_out, E, r, dtype, DEV, seed, **options)


def weight_set(args: LayerArgs) -> Any:
    """The weights of ``args`` as a benchmark weight set (``personamoe.bench.layer.WeightSet``)."""
    from personamoe.bench import layer as bl

    return bl.WeightSet(args.weight, args.bias, args.lora_a, args.lora_b, args.scaling)


def run_backend(args: LayerArgs, backend, *, regime="auto", base="auto"):
    from personamoe.kernels import launchers

    # base="cublas" labels the CUDA backend with cuda_launch.FUSE_BASE off (set by the caller).
    launchers.MIX_REGIME = regime
    launchers.BASE_MODE = base if base in ("auto", "torch", "fused") else "auto"
    try:
        with personamoe.use_backend(backend):
            return ops.persona_moe_linear_scores(args)
    finally:
        launchers.MIX_REGIME, launchers.BASE_MODE = "auto", "auto"


# ---- 2. correctness -------------------------------------------------------------------------
# fp32: a token whose fp64 reference scores separate its top-k (in order) from each other and from
# the rest by more than this (relative to the score's size) must get the reference's top-k exactly.
TIE_MARGIN = 1e-3


def record(rows: list[dict[str, Any]], r: dict[str, Any]) -> None:
    """Append one result row, log it if it failed, and rewrite the results files."""
    rows.append(r)
    if not r.get("ok"):
        log(f"FAIL {r}")
    save()


def topk_far_from_ties(got, args: LayerArgs) -> dict[str, Any]:
    """Top-k agreement on the tokens away from near-ties of the fp64 reference's scores.

    Ties are judged on the reference's ``scores`` (the values the top-k ranks: ``n`` in token mode,
    the weight row in fixed mode), NaN ranked last: a token is away from ties when each of its
    first ``k + 1`` sorted scores exceeds the next by more than ``TIE_MARGIN * max(1, |score|)``.
    """
    from personamoe.testing import reference_fp64

    ref = reference_fp64(args)
    s, ref_idx = ref[3], ref[1]
    s = torch.nan_to_num(s.double(), nan=float("-inf"), posinf=float("inf"))
    k, E = args.top_k, s.shape[1]
    top = s.sort(dim=1, descending=True).values[:, : min(k + 1, E)]
    gaps = top[:, :-1] - top[:, 1:]
    margin = TIE_MARGIN * top[:, :-1].abs().clamp_min(1.0)
    far = (gaps > margin).all(dim=1) & torch.isfinite(top[:, k - 1])  # NaN gaps compare False
    same = (got[1].long() == ref_idx.long()).all(dim=1)
    n_far = int(far.sum())
    match = float(same[far].float().mean()) if n_far else 1.0
    return {"topk_far_tokens": n_far, "topk_far_match": match}


def correctness_section() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    dtypes = [torch.float32, torch.float16] if SMOKE else [torch.bfloat16, torch.float16,
                                                           torch.float32]  # fmt: skip
    shapes = (
        [(1, 40, 24, 3, 4, 2), (7, 40, 24, 8, 16, 2)]
        if SMOKE
        else [(1, 2048, 2048, 8, 16, 2), (16, 2048, 2048, 8, 16, 2), (256, 2048, 2048, 8, 16, 2),
              (33, 200, 150, 8, 16, 2), (7, 4096, 4096, 64, 64, 2), (300, 512, 384, 64, 64, 2),
              (5, 257, 130, 3, 4, 3)]
    )  # fmt: skip
    RESULTS["correctness"] = rows  # saved after every row
    backends = ["triton"] if SMOKE else list(GPU_BACKENDS)

    def one(name, args, backend, regime="auto", base="auto"):
        try:
            got = run_backend(args, backend, regime=regime, base=base)
            r = compare_to_reference(got, args)
            if args.x.dtype == torch.float32:
                r.update(topk_far_from_ties(got, args))
                r["ok"] = r["ok"] and r["topk_far_match"] == 1.0
        except Exception as e:  # record and go on: one failure must not hide the others
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        r.update(case=name, dtype=str(args.x.dtype).replace("torch.", ""), backend=backend,
                 regime=regime, base=base)  # fmt: skip
        record(rows, r)

    for dtype in dtypes:
        for T, d_in, d_out, E, r, k in shapes:
            layer = make_layer(T, d_in, d_out, E, r, dtype, top_k=k)
            name = f"T{T}_d{d_in}x{d_out}_E{E}_r{r}_k{k}"
            for be in backends:
                one(name, layer, be)
            if not SMOKE and T <= 16 and "cuda" in GPU_BACKENDS:
                from personamoe.backends import cuda_launch

                cuda_launch.FUSE_BASE = False
                try:
                    one(name, layer, "cuda", base="cublas")
                finally:
                    cuda_launch.FUSE_BASE = True
    fdt = [torch.float32] if SMOKE else [torch.bfloat16]
    for dtype in fdt:
        for T, d_in, d_out, E, r, k in ([(7, 40, 24, 8, 16, 2)] if SMOKE else
                                        [(33, 200, 150, 8, 16, 2), (300, 512, 384, 64, 64, 2),
                                         (1024, 1024, 1024, 64, 64, 2)]):  # fmt: skip
            layer = make_layer(T, d_in, d_out, E, r, dtype, top_k=k)
            name = f"T{T}_d{d_in}x{d_out}_E{E}_r{r}_k{k}"
            for regime in ("dense", "grouped"):
                for base in ("torch", "fused"):
                    one(name, layer, "triton", regime=regime, base=base)
    # persona bias (-inf rows, one allowed expert, ids out of range), calibration, temperature,
    # both normalisations; fixed mode.
    E = 8
    pb = torch.randn(4, E, device=DEV) * 0.1
    pb[1] = float("-inf")
    pb[2] = float("-inf")
    pb[2, 5] = 0.0
    ids = torch.tensor([0, 1, 2, 3, -1, 4, 1000], device=DEV)
    cal = torch.rand(E, device=DEV) + 0.5
    w = torch.rand(3, E, device=DEV)
    w[0, 1:] = 0.0
    for dtype in [torch.float32] if SMOKE else [torch.bfloat16, torch.float32]:
        layer = make_layer(7, 256, 192, E, 16, dtype)
        for be in backends:
            for norm in ("topk", "full"):
                one("bias_ids_cal", layer._replace(top_k=3, persona_bias=pb, persona_ids=ids,
                    calibration=cal, temperature=0.7, normalize=norm), be)  # fmt: skip
            one("fixed", layer._replace(persona_weights=w, persona_ids=ids), be)
        # ids and bias in every Triton regime x base mode
        for regime in ("dense", "grouped") if "triton" in backends else ():
            for base in ("torch", "fused"):
                one("bias_ids", layer._replace(top_k=2, persona_bias=pb, persona_ids=ids),
                    "triton", regime=regime, base=base)  # fmt: skip
    extra_cases(rows, backends)
    return rows


def extra_cases(rows: list[dict[str, Any]], backends: list[str]) -> None:
    """Duplicated experts (bitwise-deterministic, run twice), expanded/strided scaling, NaN locality.

    In ``--smoke`` they run at small shapes on the CPU backends (``cpp``, ``reference``) and the
    Triton interpreter, which checks this code, not a GPU.
    """
    from personamoe.backends import available_backends
    from personamoe.testing import TOLERANCES, reference_fp64

    if SMOKE:
        avail = available_backends()
        backends = [b for b in ("cpp", "reference", "triton") if avail.get(b) == "available"]
    d = 64 if SMOKE else 2048
    half = torch.float16 if SMOKE else torch.bfloat16  # no bf16 in the Triton interpreter

    def row(case, backend, dtype, fn):
        r: dict[str, Any] = {"case": case, "backend": backend,
                             "dtype": str(dtype).replace("torch.", "")}  # fmt: skip
        try:
            r.update(fn())
        except Exception as e:
            r.update(ok=False, error=f"{type(e).__name__}: {e}")
        record(rows, r)

    # Duplicated experts: experts 2j and 2j+1 identical, so every token's scores tie exactly; two
    # runs must agree bitwise (ties broken the same way every time) and y stay close to fp64.
    for dtype in (torch.float32, half):
        for T in (1, 16, 17, 64):
            lay = make_layer(T, d, d, 8, 16, dtype, seed=11 + T)
            lay = lay._replace(lora_a=lay.lora_a[0::2].repeat_interleave(2, 0).contiguous(),
                               lora_b=lay.lora_b[0::2].repeat_interleave(2, 0).contiguous(),
                               scaling=lay.scaling[0::2].repeat_interleave(2, 0).contiguous())  # fmt: skip
            for be in backends:
                if SMOKE and be == "triton" and T > 17:
                    continue

                def dup(lay=lay, be=be):
                    a, b = run_backend(lay, be), run_backend(lay, be)
                    bitwise = all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
                    ref_y = reference_fp64(lay)[0]
                    atol, rtol = TOLERANCES[lay.x.dtype]
                    y_ok = bool(torch.isclose(a[0].double(), ref_y, atol=atol, rtol=rtol).all())
                    return {"ok": bitwise and y_ok, "bitwise_repeat": bitwise, "y_ok": y_ok}

                row(f"dup_experts_T{T}_d{d}", be, dtype, dup)
    # Expanded (stride 0) and strided scaling, any backend must read them as given.
    for dtype in (torch.float32, half):
        lay = make_layer(17, d, d, 8, 16, dtype, seed=5)
        wide = torch.rand(16, device=DEV) + 0.5
        for sname, sc in (("expanded", torch.tensor(0.75, device=DEV).expand(8)),
                          ("strided", wide[::2])):  # fmt: skip
            case = lay._replace(scaling=sc)
            for be in backends:
                row(f"scaling_{sname}", be, dtype,
                    lambda case=case, be=be: compare_to_reference(run_backend(case, be), case))  # fmt: skip
    # NaN locality: a NaN in one token's x stays in that token's row; the others match fp64.
    for dtype in [torch.float32] if SMOKE else [torch.bfloat16, torch.float32]:
        lay = make_layer(16, d, d, 8, 16, dtype, seed=9)
        lay.x[5, 3] = float("nan")
        for be in backends:

            def nan_case(lay=lay, be=be):
                got = run_backend(lay, be)
                others = torch.ones(16, dtype=torch.bool, device=DEV)
                others[5] = False
                clean = bool(torch.isfinite(got[0][others]).all())
                r = compare_to_reference(tuple(t[others] for t in got),
                                         lay._replace(x=lay.x[others]))  # fmt: skip
                nan_row = bool(torch.isnan(got[0][5]).all())
                r.update(ok=r["ok"] and clean and nan_row, others_finite=clean, nan_row=nan_row)
                return r

            row("nan_locality", be, dtype, nan_case)


# ---- 3. CUDA graphs and torch.compile -------------------------------------------------------
def graphs_section() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for be in GPU_BACKENDS:
        for T in (1, 16, 256):
            name = f"graph_{be}_T{T}"
            try:
                layer = make_layer(T, 2048, 2048, 8, 16, torch.bfloat16, seed=T)

                def call(layer=layer, be=be):
                    return run_backend(layer, be)

                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    call()
                    call()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with personamoe.use_backend(be), torch.cuda.graph(g):
                    out = ops.persona_moe_linear_scores(layer)
                ok = True
                for _ in range(3):
                    layer.x.copy_(torch.randn_like(layer.x))
                    g.replay()
                    torch.cuda.synchronize()
                    eager = call()
                    ok &= bool(torch.equal(out[1], eager[1]))
                    ok &= bool(torch.allclose(out[0].float(), eager[0].float(), atol=1e-2,
                                              rtol=1e-2))  # fmt: skip
                rows.append({"case": name, "ok": ok})
            except Exception as e:
                rows.append({"case": name, "ok": False, "error": f"{type(e).__name__}: {e}"})
            if not rows[-1]["ok"]:
                log(f"FAIL {rows[-1]}")
    try:
        layer = make_layer(16, 512, 384, 8, 16, torch.bfloat16, seed=3)

        def f(x):
            return personamoe.persona_moe_linear(
                x, layer.weight, layer.bias, layer.lora_a, layer.lora_b, layer.scaling, top_k=2
            )

        cf = torch.compile(f, fullgraph=True)
        ok = True
        for _ in range(2):
            x = torch.randn_like(layer.x)
            ok &= bool(torch.allclose(cf(x).float(), f(x).float(), atol=1e-2, rtol=1e-2))
        rows.append({"case": "torch_compile_fullgraph", "ok": ok})
    except Exception as e:
        rows.append({"case": "torch_compile_fullgraph", "ok": False,
                     "error": f"{type(e).__name__}: {e}"})  # fmt: skip
    return rows


# ---- 4. stress: 2,000 eager decode launches, 200 replays of a 4-layer graph -------------------
GRAPHS_SKIP = "CUDA graphs need a GPU: --smoke ran the same chain eagerly, with the same checks"
STREAMS_SKIP = ("two CUDA streams need a GPU: --smoke ran both inputs one after the other on CPU, "
                "with the same checks")  # fmt: skip
# Persona rows of the stress, streams and ids sections: row 1 forbids every expert (-inf: its
# tokens get gates 0 and y = base), row 2 allows only expert 5.
N_PERSONAS = 6


def persona_table(E: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    pb = torch.randn(N_PERSONAS, E, generator=g, device=DEV) * 0.3
    pb[1] = float("-inf")
    pb[2] = float("-inf")
    pb[2, min(5, E - 1)] = 0.0
    return pb


def persona_ids_for(T: int, seed: int) -> torch.Tensor:
    """``T`` ids in ``[-1, N_PERSONAS)`` (``-1`` = no persona), int64 on the device."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randint(-1, N_PERSONAS, (T,), generator=g, device=DEV)


def public_call(a: LayerArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The public entry ``personamoe.persona_moe_linear`` (host validation included) on ``a``:
    ``(y, topk_idx, topk_gates)``."""
    out = personamoe.persona_moe_linear(
        a.x, a.weight, a.bias, a.lora_a, a.lora_b, a.scaling, top_k=a.top_k,
        temperature=a.temperature, normalize=a.normalize, calibration=a.calibration,
        persona_bias=a.persona_bias, persona_ids=a.persona_ids, return_routing=True,
    )  # fmt: skip
    assert isinstance(out, tuple)
    return out


def op_call(a: LayerArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op without host validation (no host read, so no synchronize): ``(y, idx, gates)``."""
    return ops.persona_moe_linear_scores(a)[:3]


def check_routed(y, idx, gates, a: LayerArgs) -> dict[str, Any]:
    """``(y, topk_idx, topk_gates)`` of one call against the fp64 reference of ``a``.

    A token whose top-k differs from the reference's is accepted only on a near-tie: the fp64
    reference scores of the experts it picked equal those of the reference's picks within the
    dtype's tolerance (``personamoe.testing.TOLERANCES``). ``y`` and the gates are checked
    elementwise on the tokens whose top-k matches exactly (at least one must), and ``y`` may have
    no NaN the reference lacks.
    """
    from personamoe.testing import TOLERANCES, reference_fp64

    ref_y, ref_idx, ref_gates, ref_s = reference_fp64(a)
    atol, rtol = TOLERANCES[a.x.dtype]
    idx, ref_idx = idx.long(), ref_idx.long()
    same = (idx == ref_idx).all(dim=1)
    tie = torch.isclose(ref_s.gather(1, idx), ref_s.gather(1, ref_idx), atol=atol, rtol=rtol)
    tie = tie.all(dim=1)
    rows = same.nonzero().flatten()
    y_ok = bool(torch.isclose(y[rows].double(), ref_y[rows], atol=atol, rtol=rtol).all())
    g_ok = bool(torch.isclose(gates[rows].double(), ref_gates[rows].double(), atol=atol,
                              rtol=rtol).all())  # fmt: skip
    nan = bool((torch.isnan(y) & ~torch.isnan(ref_y)).any())
    ok = bool((same | tie).all()) and rows.numel() > 0 and y_ok and g_ok and not nan
    return {"ok": ok, "tokens": int(same.numel()), "topk_exact": int(same.sum()),
            "topk_near_tie": int((~same & tie).sum()), "y_ok": y_ok, "gates_ok": g_ok,
            "nan": nan}  # fmt: skip


def sync() -> None:
    if not SMOKE:
        torch.cuda.synchronize()


def stress_section(budget: float) -> list[dict[str, Any]]:
    """2,000 back-to-back eager decode calls (T=1, d=2048) with a persona table and ids, through
    the public entry and then through the op without host validation, for ``auto`` and each GPU
    backend, the last four checked against fp64 after a final synchronize; then 200 replays
    of one CUDA graph holding four chained layers (each layer's ``y`` the next one's ``x``), ``x``
    and the ids changed before every replay, every layer checked against fp64 and against an eager
    call on the graph's own input at four of the replays."""
    from collections import deque

    rows: list[dict[str, Any]] = []
    RESULTS["stress"] = rows
    dtype = torch.float32 if SMOKE else torch.bfloat16
    d, E, r = (64, 8, 16) if SMOKE else (2048, 8, 16)
    n_calls = 20 if SMOKE else 2000
    table = persona_table(E, seed=20)

    def out_of_time(case: str) -> bool:
        if time_left(budget) > 60:
            return False
        record(rows, {"case": case, "skipped": "out of time"})
        return True

    # -- eager decode launches, back to back (no synchronize until the end)
    lay = make_layer(1, d, d, E, r, dtype, seed=21)
    xs = [torch.randn(1, d, device=DEV).to(dtype) for _ in range(8)]
    ids = [torch.tensor([i], device=DEV) for i in range(-1, N_PERSONAS)]
    # The public entry reads the ids on the host (range check: a synchronize per call); the op
    # (no host validation) then runs the same calls with no synchronize at all until the end.
    runs = [(be, entry) for be in (["auto", "triton"] if SMOKE else ["auto", *GPU_BACKENDS])
            for entry in ("public", "op")]  # fmt: skip
    for be, entry in runs:
        call = public_call if entry == "public" else op_call
        case = f"eager_decode_x{n_calls}_{entry}_{be}"
        if out_of_time(case):
            break
        r_: dict[str, Any] = {"case": case, "backend": be, "entry": entry, "calls": n_calls,
                              "T": 1, "d": d}  # fmt: skip
        try:
            keep: deque[tuple[LayerArgs, Any]] = deque(maxlen=4)
            sync()
            t = time.perf_counter()
            with torch.inference_mode(), personamoe.use_backend(be):
                for i in range(n_calls):
                    a = lay._replace(x=xs[i % len(xs)], persona_bias=table,
                                     persona_ids=ids[i % len(ids)])  # fmt: skip
                    keep.append((a, call(a)))
            sync()  # an asynchronous launch error surfaces here
            r_["us_per_call"] = (time.perf_counter() - t) / n_calls * 1e6
            checks = [check_routed(*o, a) for a, o in keep]
            r_.update(ok=all(c["ok"] for c in checks), last_checks=checks)
        except Exception as e:
            r_.update(ok=False, error=f"{type(e).__name__}: {e}")
        record(rows, r_)

    # -- one CUDA graph holding four chained layers, replayed with new inputs
    n_layers = 4
    n_replays, check_at = (4, {0, 1, 3}) if SMOKE else (200, {0, 1, 100, 199})
    for be in ["triton"] if SMOKE else list(GPU_BACKENDS):
        for T in (2,) if SMOKE else (1, 16):
            case = f"graph_stack{n_layers}_x{n_replays}_{be}_T{T}"
            if out_of_time(case):
                return rows
            r_ = {"case": case, "backend": be, "T": T, "layers": n_layers, "replays": n_replays}
            if SMOKE:
                r_["skipped"] = GRAPHS_SKIP
            try:
                r_.update(graph_stack(be, T, d, E, r, dtype, table, n_layers, n_replays, check_at))
            except Exception as e:
                r_.update(ok=False, error=f"{type(e).__name__}: {e}")
            record(rows, r_)
    return rows


def graph_stack(be, T, d, E, r, dtype, table, n_layers, n_replays, check_at) -> dict[str, Any]:
    layers = [make_layer(T, d, d, E, r, dtype, seed=31 + i) for i in range(n_layers)]
    x0 = torch.randn(T, d, device=DEV).to(dtype)  # static inputs: the graph reads these buffers
    ids = persona_ids_for(T, seed=30)

    def chain() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        outs, h = [], x0
        for lay in layers:
            o = public_call(lay._replace(x=h, persona_bias=table, persona_ids=ids))
            outs.append(o)
            h = o[0]
        return outs

    with personamoe.use_backend(be):
        if SMOKE:
            outs = chain()
        else:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                chain()
                chain()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                outs = chain()
        checks: list[dict[str, Any]] = []
        for i in range(n_replays):
            x0.copy_(torch.randn(T, d, device=DEV).to(dtype))
            ids.copy_(persona_ids_for(T, seed=1000 + i))
            if SMOKE:
                outs = chain()
            else:
                g.replay()
            if i not in check_at:
                continue
            sync()
            for li, lay in enumerate(layers):
                inp = x0 if li == 0 else outs[li - 1][0]
                a = lay._replace(x=inp.clone(), persona_bias=table, persona_ids=ids.clone())
                c = check_routed(*outs[li], a)
                eager = public_call(a)  # the same layer called eagerly on the graph's own input
                c["eager_idx_equal"] = bool(torch.equal(eager[1], outs[li][1]))
                c["eager_y_close"] = bool(torch.allclose(eager[0].float(), outs[li][0].float(),
                                                         atol=1e-2, rtol=1e-2))  # fmt: skip
                c.update(replay=i, layer=li,
                         ok=c["ok"] and c["eager_idx_equal"] and c["eager_y_close"])  # fmt: skip
                checks.append(c)
        sync()
    bad = [c for c in checks if not c["ok"]]
    return {"ok": not bad and len(checks) == len(check_at) * n_layers, "checks": len(checks),
            "failed_checks": bad}  # fmt: skip


# ---- 5. two streams at once -----------------------------------------------------------------
def streams_section(budget: float) -> list[dict[str, Any]]:
    """The same layer on two CUDA streams at once with different inputs and ids, 50 calls on each
    back to back through the op without host validation (no host read, so nothing synchronizes
    the streams); every call's output compared with the same call made alone on the default
    stream (top-k equal, ``y`` close: ``calls_differing_from_alone`` must be 0) and the last one
    of each stream checked against fp64 (bitwise equality to the call alone recorded)."""
    rows: list[dict[str, Any]] = []
    RESULTS["streams"] = rows
    dtype = torch.float32 if SMOKE else torch.bfloat16
    d, E, r = (64, 8, 16) if SMOKE else (2048, 8, 16)
    n_iter = 2 if SMOKE else 50
    table = persona_table(E, seed=40)
    if SMOKE:
        cases = [("triton", 2)]
    else:
        cases = [
            (be, T) for be in GPU_BACKENDS for T in ((1, 16) if be == "cuda" else (1, 16, 256))
        ]
    for be, T in cases:
        case = f"two_streams_{be}_T{T}"
        if time_left(budget) < 60:
            record(rows, {"case": case, "skipped": "out of time"})
            break
        r_: dict[str, Any] = {"case": case, "backend": be, "T": T, "iterations": n_iter}
        if SMOKE:
            r_["skipped"] = STREAMS_SKIP
        try:
            lay = make_layer(T, d, d, E, r, dtype, seed=41 + T)
            a1 = lay._replace(persona_bias=table, persona_ids=persona_ids_for(T, 1))
            a2 = lay._replace(x=torch.randn(T, d, device=DEV).to(dtype), persona_bias=table,
                              persona_ids=persona_ids_for(T, 2))  # fmt: skip
            with torch.inference_mode(), personamoe.use_backend(be):
                alone = [op_call(a1), op_call(a2)]
                sync()
                if SMOKE:
                    got = [op_call(a1), op_call(a2)]
                else:
                    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
                    for s in streams:
                        s.wait_stream(torch.cuda.current_stream())
                    every: list[list[Any]] = [[], []]
                    for _ in range(n_iter):
                        for j, (s, a) in enumerate(zip(streams, (a1, a2), strict=True)):
                            with torch.cuda.stream(s):
                                every[j].append(op_call(a))
                    torch.cuda.synchronize()
                    got = [every[0][-1], every[1][-1]]
                    # Every call of each stream, not only the last, against the call made alone.
                    r_["calls_differing_from_alone"] = sum(
                        not (torch.equal(o[1], alone[j][1]) and torch.allclose(
                            o[0].float(), alone[j][0].float(), atol=1e-2, rtol=1e-2))
                        for j in (0, 1) for o in every[j]
                    )  # fmt: skip
            for j, a in enumerate((a1, a2)):
                c = check_routed(*got[j], a)
                c["idx_equal_alone"] = bool(torch.equal(got[j][1], alone[j][1]))
                c["y_close_alone"] = bool(torch.allclose(got[j][0].float(), alone[j][0].float(),
                                                         atol=1e-2, rtol=1e-2))  # fmt: skip
                c["bitwise_alone"] = all(torch.equal(u, v) for u, v in
                                         zip(got[j], alone[j], strict=True))  # fmt: skip
                r_[f"stream{j + 1}"] = c
            r_["ok"] = r_.get("calls_differing_from_alone", 0) == 0 and all(
                r_[k]["ok"] and r_[k]["idx_equal_alone"] and r_[k]["y_close_alone"]
                for k in ("stream1", "stream2"))  # fmt: skip
        except Exception as e:
            r_.update(ok=False, error=f"{type(e).__name__}: {e}")
        record(rows, r_)
    return rows


# ---- 6. benchmarks --------------------------------------------------------------------------
def roofline(T, d_in, d_out, E, r, k, el, bw, rate) -> tuple[float, float]:
    """(layer seconds, base seconds): max(bytes/BW, FLOPs/rate) with each input read once."""
    base_bytes = el * (T * d_in + d_out * d_in + d_out + T * d_out)
    base_flops = 2 * T * d_in * d_out
    used = min(E, T * k)
    bytes_ = base_bytes + el * (E * r * d_in + used * r * d_out)
    flops = base_flops + 2 * T * E * r * d_in + 2 * T * k * r * d_out
    return max(bytes_ / bw, flops / rate), max(base_bytes / bw, base_flops / rate)


def pm_op(x, w, kk, backend, regime="auto", base="auto", table=None, ids=None):
    """The op without host validation (``ops.persona_moe_linear_scores``) on one weight set."""
    from personamoe.kernels import launchers

    launchers.MIX_REGIME, launchers.BASE_MODE = regime, base
    try:
        return ops.persona_moe_linear_scores(LayerArgs(x, w.weight, w.bias, w.lora_a, w.lora_b,
                                             w.scaling, kk, 1.0, "topk", None, table, ids,
                                             None))[0]  # fmt: skip
    finally:
        launchers.MIX_REGIME, launchers.BASE_MODE = "auto", "auto"


def pm_op_cublas(x, w, kk):
    from personamoe.backends import cuda_launch

    cuda_launch.FUSE_BASE = False
    try:
        return pm_op(x, w, kk, "cuda")
    finally:
        cuda_launch.FUSE_BASE = True


Providers = dict[str, tuple[Callable[..., Any], str]]


def bench_case(name, T, d_in, d_out, E, r, k, dtype, bw, rate,
               make_provs: Callable[[int, int, int], Providers], graphs: bool) -> dict[str, Any]:  # fmt: skip
    """One timed case: weight sets rotated, each provider's median (and, for T <= 16 when
    ``graphs``, its CUDA-graph replay time), the roofline, the summary ratios."""
    from personamoe.bench import layer as bl

    case = bl.LayerCase(name, tokens=T, d_in=d_in, d_out=d_out, experts=E, rank=r, top_k=k,
                        dtype=dtype)  # fmt: skip
    n_sets = 2 if SMOKE else bl.sets_for_bytes(case, 200 << 20, minimum=2)
    n_sets = min(n_sets, 8)
    sets = [weight_set(make_layer(0, d_in, d_out, E, r, dtype, seed=100 + i))
            for i in range(n_sets)]  # fmt: skip
    xs = [torch.randn(T, d_in, device=DEV).to(dtype) for _ in range(n_sets)]
    el = torch.empty((), dtype=dtype).element_size()
    t_roof, t_roof_base = roofline(T, d_in, d_out, E, r, k, el, bw, rate)
    row: dict[str, Any] = {"case": name, "T": T, "d": d_in, "E": E, "r": r, "k": k,
                           "sets": n_sets, "roofline_ms": t_roof * 1e3,
                           "roofline_base_ms": t_roof_base * 1e3, "ms": {}, "graph_ms": {}}  # fmt: skip

    def rot(p: Callable[..., Any]) -> Callable[[], Any]:
        it = [0]

        def fn():
            i = it[0] = (it[0] + 1) % len(sets)
            return p(xs[i], sets[i], k)

        return fn

    for pname, (p, backend) in make_provs(T, E, d_out * el).items():
        try:
            with torch.inference_mode(), personamoe.use_backend(backend):
                row["ms"][pname] = bench_ms(rot(p))
                if graphs and T <= 16 and not SMOKE and pname != "naive":
                    row["graph_ms"][pname] = graph_ms(p, sets, xs, k)
        except Exception as e:
            row.setdefault("errors", {})[pname] = f"{type(e).__name__}: {e}"
            log(f"bench {name} {pname}: {type(e).__name__}: {e}")
    summarize(row)
    sets.clear()  # free this case's weights before the next case
    xs.clear()
    if not SMOKE:
        torch.cuda.empty_cache()
    return row


def bench_section(info: dict[str, Any], out: Path, budget: float) -> list[dict[str, Any]]:
    from personamoe.bench import layer as bl

    dtype = torch.float32 if SMOKE else torch.bfloat16
    if SMOKE:
        cases = [("S1", 1, 64, 64, 4, 8, 2), ("S16", 16, 64, 64, 8, 16, 2)]
    else:
        cases = [("L1", 1, 2048, 2048, 8, 16, 2), ("L16", 16, 2048, 2048, 8, 16, 2),
                 ("L256", 256, 2048, 2048, 8, 16, 2)]  # fmt: skip
        for T in (1, 16, 256, 4096):
            for E in (8, 64):
                for r in (16, 64):
                    cases.append((f"G_T{T}_E{E}_r{r}", T, 4096, 4096, E, r, 2))
    bw, rate = info["copy_bw_Bps"], info["gemm_flops"]

    def make_provs(T: int, E: int, row_bytes: int) -> Providers:
        provs: Providers = {
            "base": (bl.provider_base, "auto"),
            "naive": (bl.provider_naive, "auto"),
            "masked": (bl.provider_masked, "auto"),
            "pm": (bl.provider_personamoe, "auto"),
            "pm_op": (lambda x, w, kk: pm_op(x, w, kk, "auto"), "auto"),
        }
        if T * E * row_bytes <= (1 << 31):
            provs["dense"] = (bl.provider_dense, "auto")
        provs["triton"] = (lambda x, w, kk: pm_op(x, w, kk, "triton"), "triton")
        if T >= 256 or SMOKE:
            for regime in ("dense", "grouped"):
                for base in ("torch", "fused"):
                    provs[f"triton_{regime}_{base}"] = (
                        lambda x, w, kk, rg=regime, bs=base: pm_op(x, w, kk, "triton", rg, bs),
                        "triton",
                    )
        if T <= 16 and not SMOKE and "cuda" in GPU_BACKENDS:
            provs["cuda"] = (lambda x, w, kk: pm_op(x, w, kk, "cuda"), "cuda")
            provs["cuda_cublas_base"] = (pm_op_cublas, "cuda")
        return provs

    rows: list[dict[str, Any]] = []
    for name, T, d_in, d_out, E, r, k in cases:
        if time_left(budget) < 20:
            log(f"bench: out of time before {name}")
            break
        row = bench_case(name, T, d_in, d_out, E, r, k, dtype, bw, rate, make_provs, graphs=True)
        rows.append(row)
        RESULTS["bench"] = rows
        save(out)
        log(f"bench {name}: " + ", ".join(f"{p}={v:.4f}" for p, v in row["ms"].items()))
    return rows


# ---- 7. Triton compile facts ----------------------------------------------------------------
INTERPRETER_SKIP = ("the Triton interpreter (TRITON_INTERPRET=1) compiles nothing: no compiled "
                    "kernel, no n_regs/n_spills")  # fmt: skip


def _jit_caches() -> list[tuple[str, Any, Any, dict[Any, Any]]]:
    """``(name, jit function, device, {key: compiled kernel})`` of every Triton kernel of
    personamoe (none under the interpreter, whose kernels are not ``JITFunction``s)."""
    from personamoe.kernels import mix, shrink_route
    from triton.runtime.jit import JITFunction

    out = []
    for mod in (shrink_route, mix):
        for name, fn in vars(mod).items():
            if not isinstance(fn, JITFunction):
                continue
            caches = getattr(fn, "device_caches", None)  # Triton >= 3.3: (kernel_cache, ...)
            if caches is not None:
                pairs = [(dev, entry[0]) for dev, entry in list(caches.items())]
            else:  # Triton 3.2: fn.cache[device] = {key: kernel}
                pairs = list(getattr(fn, "cache", {}).items())
            for dev, cache in pairs:
                out.append((f"{mod.__name__.rsplit('.', 1)[-1]}.{name}", fn, dev, cache))
    return out


def jit_keys() -> set[tuple[str, str, str]]:
    """The specialisations compiled so far (to tell those the bench section added)."""
    if SMOKE:
        return set()
    try:
        return {(n, str(dev), str(k)) for n, _, dev, cache in _jit_caches() for k in list(cache)}
    except Exception as e:  # no Triton here: the compile-facts section will say so
        log(f"jit_keys: {type(e).__name__}: {e}")
        return set()


def triton_compile_section(before_bench: set[tuple[str, str, str]]) -> dict[str, Any]:
    """``n_regs`` and ``n_spills`` (filled when the driver loads a kernel), shared memory, warps,
    stages and constexprs of every Triton specialisation compiled in this process: the bench
    section's (``new_in_bench``) and those the earlier sections compiled first."""
    if SMOKE:
        return {"skipped": INTERPRETER_SKIP, "kernels": [], "jit_functions": len(_jit_caches())}
    rows = []
    for name, fn, dev, cache in _jit_caches():
        for key, k in list(cache.items()):
            md = getattr(k, "metadata", None)
            if md is None:  # a compile still in flight (async mode)
                continue
            if getattr(k, "n_regs", None) is None:
                try:
                    k._init_handles()
                except Exception as e:
                    log(f"triton_compile: {name}: {type(e).__name__}: {e}")
            try:
                consts = getattr(k.src, "constants", {}) or {}
                cx = {(fn.arg_names[c[0]] if isinstance(c, tuple) else
                       (fn.arg_names[c] if isinstance(c, int) else str(c))): v
                      for c, v in consts.items()}  # fmt: skip
                cx = {n: v for n, v in cx.items() if n.isupper() or n.startswith(("BLOCK", "IS_"))}
            except Exception as e:
                cx = {"error": f"{type(e).__name__}: {e}"}
            rows.append({"kernel": name, "device": str(dev), "n_regs": getattr(k, "n_regs", None),
                         "n_spills": getattr(k, "n_spills", None),
                         "num_warps": getattr(md, "num_warps", None),
                         "num_stages": getattr(md, "num_stages", None),
                         "shared": getattr(md, "shared", None), "constexprs": cx,
                         "new_in_bench": (name, str(dev), str(key)) not in before_bench})  # fmt: skip
    spilled = [r for r in rows if r["n_spills"]]
    return {"kernels": rows, "with_spills": len(spilled),
            "max_regs": max((r["n_regs"] or 0 for r in rows), default=None)}  # fmt: skip


# ---- 8. eager timings with persona ids; prefill sweep ---------------------------------------
def bench_ids_section(info: dict[str, Any], out: Path, budget: float) -> list[dict[str, Any]]:
    """L1/L16/L256 eager, the public entry and the op each without and with a persona table
    (``[6, E]``, two ``-inf`` rows) and per-token ids in ``[-1, 6)``, beside ``base``."""
    from personamoe.bench import layer as bl

    dtype = torch.float32 if SMOKE else torch.bfloat16
    cases = ([("S1", 1, 64, 64, 8, 16, 2), ("S16", 16, 64, 64, 8, 16, 2)] if SMOKE else
             [(f"L{T}", T, 2048, 2048, 8, 16, 2) for T in (1, 16, 256)])  # fmt: skip
    bw, rate = info["copy_bw_Bps"], info["gemm_flops"]
    rows: list[dict[str, Any]] = []
    RESULTS["bench_ids"] = rows
    for name, T, d_in, d_out, E, r, k in cases:
        if time_left(budget) < 45:
            rows.append({"case": name, "skipped": "out of time"})
            save(out)
            break
        table, ids = persona_table(E, seed=50), persona_ids_for(T, seed=51)

        def pm_ids(x, w, kk, table=table, ids=ids):
            return personamoe.persona_moe_linear(x, w.weight, w.bias, w.lora_a, w.lora_b,
                                                 w.scaling, top_k=kk, persona_bias=table,
                                                 persona_ids=ids)  # fmt: skip

        def make_provs(T: int, E: int, row_bytes: int, pm_ids=pm_ids, table=table,
                       ids=ids) -> Providers:  # fmt: skip
            return {
                "base": (bl.provider_base, "auto"),
                "pm": (bl.provider_personamoe, "auto"),
                "pm_ids": (pm_ids, "auto"),
                "pm_op": (lambda x, w, kk: pm_op(x, w, kk, "auto"), "auto"),
                "pm_op_ids": (lambda x, w, kk: pm_op(x, w, kk, "auto", table=table, ids=ids),
                              "auto"),
            }  # fmt: skip

        row = bench_case(name, T, d_in, d_out, E, r, k, dtype, bw, rate, make_provs, graphs=False)
        ms = row["ms"]
        for p in ("pm", "pm_op"):
            if p in ms and f"{p}_ids" in ms:
                row[f"{p}_ids_over_{p}"] = ms[f"{p}_ids"] / ms[p]
        rows.append(row)
        save(out)
        log(f"bench_ids {name}: " + ", ".join(f"{p}={v:.4f}" for p, v in ms.items()))
    return rows


def bench_prefill_section(info: dict[str, Any], out: Path, budget: float) -> list[dict[str, Any]]:
    """Prefill sweep, eager: T = 512/1024/2048 at d=2048 (E=8, r=16, k=2), ``pm`` (public entry,
    backend ``auto``) against ``base``, each with its roofline (``roofline_ms``,
    ``roofline_base_ms``)."""
    from personamoe.bench import layer as bl

    dtype = torch.float32 if SMOKE else torch.bfloat16
    d = 64 if SMOKE else 2048
    tokens = (32, 64) if SMOKE else (512, 1024, 2048)
    bw, rate = info["copy_bw_Bps"], info["gemm_flops"]
    rows: list[dict[str, Any]] = []
    RESULTS["bench_prefill"] = rows

    def make_provs(T: int, E: int, row_bytes: int) -> Providers:
        return {"base": (bl.provider_base, "auto"), "pm": (bl.provider_personamoe, "auto")}

    for T in tokens:
        name = f"P{T}"
        if time_left(budget) < 45:
            rows.append({"case": name, "skipped": "out of time"})
            save(out)
            break
        row = bench_case(name, T, d, d, 8, 16, 2, dtype, bw, rate, make_provs, graphs=False)
        ms = row["ms"]
        if "base" in ms:
            row["base_over_roofline"] = ms["base"] / row["roofline_base_ms"]
        rows.append(row)
        save(out)
        log(f"bench_prefill {name}: " + ", ".join(f"{p}={v:.4f}" for p, v in ms.items()))
    return rows


def train_section(info: dict[str, Any]) -> list[dict[str, Any]]:
    """Forward + backward (grads of x, lora_a, lora_b; W frozen): the backward is the reference
    replayed by autograd (personamoe/ops.py), timed against ``base`` and ``masked``."""
    from personamoe.bench import layer as bl

    dtype = torch.float32 if SMOKE else torch.bfloat16
    cases = [("S16", 16, 64, 8, 16)] if SMOKE else [("L256", 256, 2048, 8, 16),
                                                    ("G_T4096_E8_r16", 4096, 4096, 8, 16)]  # fmt: skip
    rows = []
    for name, T, d, E, r in cases:
        lay = make_layer(T, d, d, E, r, dtype, seed=7)
        w = bl.WeightSet(lay.weight, lay.bias, lay.lora_a.requires_grad_(True),
                         lay.lora_b.requires_grad_(True), lay.scaling)  # fmt: skip
        x = lay.x.requires_grad_(True)
        gy = torch.randn(T, d, device=DEV, dtype=dtype)
        row: dict[str, Any] = {"case": name, "ms": {}}
        for pname, p in (("base", bl.provider_base), ("masked", bl.provider_masked),
                         ("pm", bl.provider_personamoe)):  # fmt: skip

            def step(p=p, x=x, w=w, gy=gy):
                for t in (x, w.lora_a, w.lora_b):
                    t.grad = None
                p(x, w, 2).backward(gy)

            try:
                row["ms"][pname] = bench_ms(step)
            except Exception as e:
                row.setdefault("errors", {})[pname] = f"{type(e).__name__}: {e}"
        rows.append(row)
        log(f"train {name}: {row}")
    return rows


def graph_ms(p, sets, xs, k) -> float:
    """Milliseconds per call from replays of one CUDA graph that calls ``p`` once per weight set."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for x, w in zip(xs, sets, strict=True):
            p(x, w, k)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for x, w in zip(xs, sets, strict=True):
            p(x, w, k)
    return bench_ms(g.replay) / len(sets)


def summarize(row: dict[str, Any]) -> None:
    """Ratios: personamoe / base, overhead vs the best other provider, time / roofline."""
    for key in ("ms", "graph_ms"):
        ms = row[key]
        if "base" not in ms:
            continue
        ours = {
            p: v for p, v in ms.items() if p in ("pm", "pm_op") or p.startswith(("tri", "cuda"))
        }
        if not ours:
            continue
        best_p = min(ours, key=lambda p: ours[p])
        best = ours[best_p]
        base = ms["base"]
        others = {p: ms[p] - base for p in ("naive", "dense", "masked") if p in ms}
        s = {"best_personamoe": best_p, "pm_over_base": best / base,
             "overhead_ms": best - base, "time_over_roofline": best / row["roofline_ms"]}  # fmt: skip
        if others:
            p_min = min(others, key=lambda p: others[p])
            s["best_other"] = p_min
            s["overhead_ratio_vs_best_other"] = (best - base) / max(others[p_min], 1e-9)
            s["fastest_overall"] = best <= min(ms[p] for p in others)
        row[f"summary_{key}"] = s


def markdown(info: dict[str, Any], corr, graphs, bench) -> str:
    lines = [f"# personamoe GPU check: {info.get('name')} ({info.get('date_utc')} UTC)", ""]
    lines.append(f"torch {info.get('torch')}, triton {info.get('triton')}, python "
                 f"{info.get('python')}; measured copy BW {info['copy_bw_Bps'] / 1e12:.2f} TB/s, "
                 f"bf16 GEMM {info['gemm_flops'] / 1e12:.0f} TFLOP/s")  # fmt: skip
    if corr is not None:
        bad = [c for c in corr if not c.get("ok")]
        lines += ["", f"Correctness: {len(corr) - len(bad)}/{len(corr)} checks pass."]
        lines += [f"- FAIL {c}" for c in bad]
    if graphs is not None:
        lines += ["", "Graphs/compile: " + ", ".join(f"{g['case']}={'ok' if g['ok'] else 'FAIL'}"
                                                    for g in graphs)]  # fmt: skip
    if bench:
        provs = [
            "base",
            "naive",
            "dense",
            "masked",
            "pm",
            "pm_op",
            "triton",
            "cuda",
            "cuda_cublas_base",
        ]
        lines += ["", "Medians in ms (do_bench, L2 flushed, weight sets rotated); graph = CUDA-graph "
                  "replay per call.", "",
                  "| case | " + " | ".join(provs) + " | best pm | pm/base | ovh vs best other | "
                  "t/roofline | roofline ms |",
                  "|---" * (len(provs) + 6) + "|"]  # fmt: skip
        for row in bench:
            for key, tag in (("ms", ""), ("graph_ms", " (graph)")):
                ms = row[key]
                if not ms:
                    continue
                s = row.get(f"summary_{key}", {})
                cells = [f"{ms[p]:.4f}" if p in ms else "-" for p in provs]
                lines.append(
                    f"| {row['case']}{tag} | " + " | ".join(cells)
                    + f" | {s.get('best_personamoe', '-')} | {s.get('pm_over_base', float('nan')):.3f}"
                    f" | {s.get('overhead_ratio_vs_best_other', float('nan')):.3f}"
                    f" | {s.get('time_over_roofline', float('nan')):.2f} | {row['roofline_ms']:.4f} |"
                )  # fmt: skip
        extra = sorted({p for row in bench for p in row["ms"] if p.startswith("triton_")})
        if extra:
            lines += ["", "Triton paths forced (ms): " + ", ".join(extra), ""]
            for row in bench:
                if any(p in row["ms"] for p in extra):
                    lines.append(f"- {row['case']}: " + ", ".join(
                        f"{p[7:]}={row['ms'][p]:.4f}" for p in extra if p in row["ms"]))  # fmt: skip
    return "\n".join(lines) + "\n"


def render_new_sections() -> str:
    """Markdown of the stress, streams, compile-facts, persona-ids and prefill sections."""
    md = ""
    for key, title in (("stress", "Stress"), ("streams", "Two streams at once")):
        rows = RESULTS.get(key)
        if not isinstance(rows, list) or not rows:
            continue
        md += f"\n{title}:\n\n"
        for r in rows:
            state = "FAIL" if r.get("ok") is False else ("ok" if r.get("ok") else "-")
            extra = f", {r['us_per_call']:.1f} us/call" if "us_per_call" in r else ""
            extra += f", skipped: {r['skipped']}" if "skipped" in r else ""
            extra += f", error: {r['error']}" if "error" in r else ""
            md += f"- {r['case']}: {state}{extra}\n"
    facts = RESULTS.get("triton_compile")
    if isinstance(facts, dict):
        if "skipped" in facts:
            md += f"\nTriton compile facts: skipped ({facts['skipped']})\n"
        else:
            md += ("\nTriton kernels compiled in this run (n_regs, n_spills from the loaded kernel):"
                   "\n\n| kernel | warps | stages | shared B | n_regs | n_spills | in bench | "
                   "constexprs |\n|---|---|---|---|---|---|---|---|\n")  # fmt: skip
            for k in facts.get("kernels", []):
                md += (f"| {k['kernel']} | {k['num_warps']} | {k['num_stages']} | {k['shared']} | "
                       f"{k['n_regs']} | {k['n_spills']} | {k['new_in_bench']} | "
                       f"{k['constexprs']} |\n")  # fmt: skip
    for key, title in (("bench_ids", "Eager with persona ids (ms)"),
                       ("bench_prefill", "Prefill sweep, eager (ms)")):  # fmt: skip
        rows = RESULTS.get(key)
        if not isinstance(rows, list) or not rows:
            continue
        md += f"\n{title}:\n\n"
        for r in rows:
            if "skipped" in r:
                md += f"- {r['case']}: skipped ({r['skipped']})\n"
                continue
            cells = ", ".join(f"{p}={v:.4f}" for p, v in r["ms"].items())
            s = r.get("summary_ms", {})
            md += (f"- {r['case']} (T={r['T']}, d={r['d']}): {cells}; roofline "
                   f"{r['roofline_ms']:.4f} (base {r['roofline_base_ms']:.4f}); pm/base "
                   f"{s.get('pm_over_base', float('nan')):.3f}, t/roofline "
                   f"{s.get('time_over_roofline', float('nan')):.2f}")  # fmt: skip
            for p in ("pm", "pm_op"):
                if f"{p}_ids_over_{p}" in r:
                    md += f", {p}_ids/{p} {r[f'{p}_ids_over_{p}']:.3f}"
            md += "\n"
    return md


def render_md() -> str:
    """The markdown summary of what ``RESULTS`` holds so far."""
    info = RESULTS.get("device")
    if info is None:
        return f"# personamoe GPU check: no device section yet\n\ncanary: {RESULTS.get('canary')}\n"
    md = markdown(info, RESULTS.get("correctness"), RESULTS.get("graphs"), RESULTS.get("bench"))
    if "canary" in RESULTS:
        md += f"\nCanary (own process, own timeout): {RESULTS['canary']}\n"
    md += render_new_sections()
    train = RESULTS.get("train")
    if train:
        md += "\nForward + backward, ms (grads of x, lora_a, lora_b; W frozen):\n\n"
        md += "\n".join(f"- {t['case']}: " + ", ".join(f"{p}={v:.4f}" for p, v in t["ms"].items())
                        for t in train) + "\n"  # fmt: skip
    if "pytest" in RESULTS:
        md += f"\npytest rc={RESULTS['pytest'].get('rc')}\n"
    return md


def canary(out: Path) -> int:
    """One small CUDA decode launch, then one Triton launch, each synchronized; ``canary.json`` is
    rewritten before and after each step, so after a hang (gpu_check.sh kills this process) it says
    which launch never came back. On ``--smoke``: the cpp backend and the Triton interpreter."""
    steps = [("cpp", "cpp"), ("triton", "triton")] if SMOKE else [("cuda", "cuda"),
                                                                  ("triton", "triton")]  # fmt: skip
    state: dict[str, Any] = {}
    path = out / "canary.json"
    for name, be in steps:
        state[name] = "started"
        write_atomic(path, json.dumps(state))
        t = time.monotonic()
        try:
            lay = make_layer(1, 256, 256, 8, 16, torch.float32, seed=1)
            r = compare_to_reference(run_backend(lay, be), lay)
            if not SMOKE:
                torch.cuda.synchronize()
            state[name] = "ok" if r["ok"] else f"wrong: {r}"
        except Exception as e:
            state[name] = f"error: {type(e).__name__}: {e}"
        state[f"{name}_s"] = round(time.monotonic() - t, 2)
        write_atomic(path, json.dumps(state))
        log(f"canary {name}: {state[name]}")
    return 0 if all(state[n] == "ok" for n, _ in steps) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--budget", type=float, default=270.0, help="seconds for everything")
    ap.add_argument("--smoke", action="store_true", help="CPU/interpreter check of this script")
    ap.add_argument("--skip", default="", help="comma list of sections to skip")
    ap.add_argument("--canary", action="store_true",
                    help="only the canary launches (gpu_check.sh runs this first, in its own process)")  # fmt: skip
    args = ap.parse_args()
    global OUT_DIR
    out = OUT_DIR = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    if not SMOKE and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU check of this script")
        return 2
    torch.manual_seed(0)
    if args.canary:
        return canary(out)
    if (out / "canary.json").exists():
        RESULTS["canary"] = json.loads((out / "canary.json").read_text())
        for be in ("cuda", "triton"):
            if not SMOKE and RESULTS["canary"].get(be, "ok") != "ok":
                GPU_BACKENDS.remove(be)
                log(f"canary: {be} left out of every section ({RESULTS['canary'][be]})")
        RESULTS["gpu_backends"] = list(GPU_BACKENDS)
    info = device_section()
    RESULTS["device"] = info
    log(f"device: {info}")
    save(out)
    corr = graphs = None
    if "correctness" not in skip:
        corr = correctness_section()
        save(out)
        log(f"correctness: {sum(c['ok'] for c in corr)}/{len(corr)} ok")
    if "graphs" not in skip and not SMOKE:
        graphs = graphs_section()
        RESULTS["graphs"] = graphs
        save(out)
        log(f"graphs: {graphs}")

    def guarded(name: str, fn: Callable[[], Any]) -> Any:
        """Run one section; a crash is recorded (``<name>_error``) and the next section runs."""
        if name in skip:
            RESULTS[name] = {"skipped": "--skip"}
            save(out)
            return None
        try:
            return fn()
        except Exception:
            RESULTS[f"{name}_error"] = traceback.format_exc()
            log(RESULTS[f"{name}_error"])
        finally:
            save(out)

    stress = guarded("stress", lambda: stress_section(args.budget))
    streams = guarded("streams", lambda: streams_section(args.budget))
    before_bench = jit_keys()
    if "bench" not in skip:
        try:
            bench_section(info, out, args.budget - 40)
        except Exception:
            RESULTS["bench_error"] = traceback.format_exc()
            log(RESULTS["bench_error"])
    facts = guarded("triton_compile", lambda: triton_compile_section(before_bench))
    if facts is not None:
        RESULTS["triton_compile"] = facts
        save(out)
    guarded("bench_ids", lambda: bench_ids_section(info, out, args.budget))
    guarded("bench_prefill", lambda: bench_prefill_section(info, out, args.budget))
    train = None
    if "train" not in skip and time_left(args.budget) > 60:
        try:
            train = train_section(info)
        except Exception:
            RESULTS["train_error"] = traceback.format_exc()
        RESULTS["train"] = train
        save(out)
    save(out)
    left = time_left(args.budget)
    if "pytest" not in skip and not SMOKE and left > 45:
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "tests/test_cuda_decode.py",
               "tests/test_triton_kernels.py", "-p", "no:cacheprovider"]  # fmt: skip
        try:
            pr = subprocess.run(cmd, capture_output=True, text=True, timeout=left - 10)
            RESULTS["pytest"] = {"rc": pr.returncode, "tail": pr.stdout[-3000:]}
        except subprocess.TimeoutExpired:
            RESULTS["pytest"] = {"rc": None, "tail": "timed out"}
        save(out)
        log(f"pytest rc={RESULTS['pytest']['rc']}")
    print(render_md())
    ok = all(c.get("ok") for c in (corr or [])) and all(g.get("ok") for g in (graphs or []))
    # Stress and streams rows fail the run too; a row skipped (out of time) does not.
    ok = ok and all(r.get("ok", "skipped" in r) for r in [*(stress or []), *(streams or [])])
    ok = ok and not any(k.endswith("_error") for k in RESULTS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
