"""The one-shot GPU check's ``--smoke`` path on CPU (benchmarks/GPU.md).

The GPU check runs once, on a lent card, with no second chance: this runs its code paths here
(Triton interpreter, cpp and reference backends, tiny shapes) so that a broken script is found in
CI, not on the card. It checks the script, not any GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.slow
def test_gpu_check_smoke_writes_results_and_every_check_passes(tmp_path):
    canary = _run("--canary", out=tmp_path)
    assert canary.returncode == 0, canary.stdout[-3000:] + canary.stderr[-3000:]
    state = json.loads((tmp_path / "canary.json").read_text())
    assert state["cpp"] == "ok" and state["triton"] == "ok", state

    pr = _run(out=tmp_path)
    assert pr.returncode == 0, pr.stdout[-3000:] + pr.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["canary"] == state
    assert {"device", "correctness", "bench", "train"} <= results.keys()
    rows = results["correctness"]
    failed = [r for r in rows if not r.get("ok")]
    assert not failed, failed
    cases = {r["case"] for r in rows}
    for prefix in ("dup_experts_T1_", "dup_experts_T64_", "scaling_expanded", "scaling_strided",
                   "nan_locality", "bias_ids"):  # fmt: skip
        assert any(c.startswith(prefix) for c in cases), (prefix, sorted(cases))
    # fp32 rows carry the near-tie-aware top-k check, and it saw tokens.
    far = [r for r in rows if "topk_far_match" in r]
    assert far and all(r["topk_far_match"] == 1.0 for r in far)
    assert sum(r["topk_far_tokens"] for r in far) > 0
    assert all(r["bitwise_repeat"] for r in rows if r["case"].startswith("dup_experts"))
    assert results["bench"] and all(row["ms"] for row in results["bench"])
    _check_new_sections(results)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "Correctness:" in md and "FAIL" not in md
    for title in ("Stress:", "Two streams at once:", "Triton compile facts: skipped",
                  "Eager with persona ids", "Prefill sweep"):  # fmt: skip
        assert title in md, title
    # Written atomically: no temporaries left beside the results.
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def _check_new_sections(results: dict) -> None:
    """The sections of the GPU-hardening issue are in the JSON, each with results or a recorded
    reason for skipping what needs a GPU; in the run order of the module docstring."""
    order = [k for k in results if k in ("device", "stress", "streams", "bench", "triton_compile",
                                         "bench_ids", "bench_prefill", "train")]  # fmt: skip
    assert order == ["device", "stress", "streams", "bench", "triton_compile", "bench_ids",
                     "bench_prefill", "train"], order  # fmt: skip
    assert not [k for k in results if k.endswith("_error")], results

    stress = {r["case"]: r for r in results["stress"]}
    for entry in ("public", "op"):
        for be in ("auto", "triton"):
            r = stress[f"eager_decode_x20_{entry}_{be}"]
            assert r["ok"] and "skipped" not in r, r
            assert len(r["last_checks"]) == 4 and all(c["ok"] for c in r["last_checks"]), r
            assert sum(c["topk_exact"] for c in r["last_checks"]) >= 3, r
    graph = stress["graph_stack4_x4_triton_T2"]
    assert "CUDA graphs need a GPU" in graph["skipped"], graph
    assert graph["ok"] and graph["checks"] == 3 * 4 and not graph["failed_checks"], graph

    (streams,) = results["streams"]
    assert "two CUDA streams need a GPU" in streams["skipped"], streams
    assert streams["ok"] and streams["stream1"]["ok"] and streams["stream2"]["ok"], streams

    facts = results["triton_compile"]
    assert "interpreter" in facts["skipped"] and facts["kernels"] == [], facts

    ids = results["bench_ids"]
    assert [r["case"] for r in ids] == ["S1", "S16"], ids
    for r in ids:
        assert {"base", "pm", "pm_ids", "pm_op", "pm_op_ids"} <= r["ms"].keys(), r
        assert not r.get("errors") and r["pm_ids_over_pm"] > 0 and r["roofline_ms"] > 0, r
    pre = results["bench_prefill"]
    assert [r["case"] for r in pre] == ["P32", "P64"], pre
    for r in pre:
        assert {"base", "pm"} <= r["ms"].keys() and not r.get("errors"), r
        assert r["roofline_ms"] > r["roofline_base_ms"] > 0, r
        assert r["summary_ms"]["time_over_roofline"] > 0, r


def _gpu_check_module():
    """benchmarks/gpu_check.py imported as a module (not ``--smoke``: its helpers only)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_check_routed_fails_wrong_outputs_and_passes_right_ones():
    """The stress/streams checker: the reference's own outputs pass; a wrong ``y`` on one token, a
    wrong gate, a NaN, or a top-k swapped on a clear gap each fail."""
    import torch

    from personamoe import reference
    from personamoe.testing import make_layer_args

    gc = _gpu_check_module()
    pb = torch.zeros(3, 8)
    pb[1] = float("-inf")
    pb[1, 2] = 0.0
    a = make_layer_args(6, 32, 24, 8, 4, torch.float32, seed=3)._replace(
        persona_bias=pb, persona_ids=torch.tensor([0, 1, -1, 2, 1, 0])
    )
    y, idx, gates, scores = reference.forward(a)
    good = gc.check_routed(y, idx, gates, a)
    assert good["ok"] and good["topk_exact"] == 6, good

    y_bad = y.clone()
    y_bad[2, 5] += 1.0
    assert not gc.check_routed(y_bad, idx, gates, a)["ok"]
    g_bad = gates.clone()
    g_bad[0, 0] += 0.1
    assert not gc.check_routed(y, idx, g_bad, a)["ok"]
    y_nan = y.clone()
    y_nan[3, 0] = float("nan")
    assert not gc.check_routed(y_nan, idx, gates, a)["ok"]
    # Token 0: replace its second pick by its lowest-scoring expert (far from a tie).
    idx_bad = idx.clone()
    idx_bad[0, 1] = scores[0].argmin().to(idx.dtype)
    r = gc.check_routed(y, idx_bad, gates, a)
    assert not r["ok"] and r["topk_exact"] == 5 and r["topk_near_tie"] == 0, r


_FACTS_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import importlib.util
import triton
from triton.backends.compiler import GPUTarget
from personamoe.kernels import mix
from tests.test_triton_compile import CASES
from tests.test_triton_oldest import _source

name, kname, dtype, overrides, const, arch, options = next(c for c in CASES if c[0] == "align_E8_sm80")
k = triton.compile(_source(mix._align_kernel, kname, dtype, overrides, const),
                   target=GPUTarget("cuda", arch, 32), options=options)
spec = importlib.util.spec_from_file_location("gc", sys.argv[2])
gc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gc)
# A JIT cache as Triton >= 3.3 holds it: device -> (kernel_cache, ...), kernel_cache: key -> kernel.
mix._align_kernel.device_caches = {0: ({"spec-a": k}, {}, None, None, None)}
before = gc.jit_keys()
mix._align_kernel.device_caches[0][0]["spec-b"] = k
print(json.dumps({"before": sorted(map(list, before)),
                  "facts": gc.triton_compile_section(before)}, default=str))
"""


def test_triton_compile_facts_read_a_compiled_kernel():
    """The compile-facts section on a real compiled kernel (compiled ahead of time for sm_80 in a
    child without the interpreter; with no driver ``n_regs``/``n_spills`` stay None): kernel
    name, constexprs by argument name, warps, shared memory, and which specialisations are new."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _FACTS_CHILD, str(ROOT), str(SCRIPT)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)  # fmt: skip
    if res.returncode != 0 and "ptxas" in res.stderr.lower():
        pytest.skip("this Triton build has no ptxas to compile for a GPU")
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["before"] == [["mix._align_kernel", "0", "spec-a"]], got["before"]
    rows = got["facts"]["kernels"]
    assert [r["new_in_bench"] for r in rows] == [False, True], rows
    r = rows[0]
    assert r["kernel"] == "mix._align_kernel" and r["device"] == "0", r
    assert r["constexprs"] == {"BLOCK_M": 64, "BLOCK_E": 8, "CHUNK": 1024}, r
    assert r["num_warps"] == 4 and isinstance(r["shared"], int), r
    assert {"n_regs", "n_spills", "num_stages"} <= r.keys(), r


@pytest.mark.slow
def test_gpu_check_sections_stop_when_the_budget_is_spent(tmp_path):
    """With no time left each new section records the first case of each of its loops as skipped
    for time instead of running it, and the run still ends cleanly with its results written."""
    pr = _run("--budget", "1", "--skip", "correctness,train", out=tmp_path)
    assert pr.returncode == 0, pr.stdout[-3000:] + pr.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    # One row per loop: the stress section has two (eager calls, graph stack).
    for key, n in (("stress", 2), ("streams", 1), ("bench_ids", 1), ("bench_prefill", 1)):
        rows = results[key]
        assert len(rows) == n and all(r["skipped"] == "out of time" for r in rows), (key, rows)
    assert "bench" not in results and "train" not in results, results.keys()
    assert "Stress:" in (tmp_path / "gpu_check.md").read_text()
