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
    md = (tmp_path / "gpu_check.md").read_text()
    assert "Correctness:" in md and "FAIL" not in md
    # Written atomically: no temporaries left beside the results.
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
