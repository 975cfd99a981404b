"""Smoke tests of ``python -m personamoe bench`` and ``demo`` (tiny settings: these time nothing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from personamoe.bench.model import MODEL_PROVIDERS, TINY, ModelBench
from personamoe.bench.runner import Result, ratio_table


def test_bench_layer_case_writes_table_json_and_plot(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "personamoe",
        "bench",
        "--cases",
        "L1",
        "--repeats",
        "3",
        "--rotate-mib",
        "1",
        "--out",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "machine:" in out.stdout and "| L1 | personamoe |" in out.stdout
    assert "L1: personamoe / base =" in out.stdout
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["machine"]["cores"] >= 1
    providers = {r["provider"] for r in payload["results"]}
    assert {"base", "naive", "dense", "masked", "reference", "personamoe"} <= providers
    assert all(len(r["samples_s"]) == 3 for r in payload["results"])
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_bench_rejects_unknown_case(tmp_path):
    cmd = [sys.executable, "-m", "personamoe", "bench", "--cases", "L3", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--cases" in out.stderr


@pytest.mark.slow
def test_model_providers_all_generate_the_same_shapes():
    bench = ModelBench(TINY)
    try:
        outs = {p: bench.provider(p)() for p in MODEL_PROVIDERS}
    finally:
        bench.close()
    want = (TINY.batch, TINY.prompt_len + TINY.new_tokens)
    for p, o in outs.items():
        assert isinstance(o, torch.Tensor) and tuple(o.shape) == want, p
    # Same prompt everywhere; the adapters change what is generated.
    assert torch.equal(outs["base"][:, : TINY.prompt_len], outs["personamoe"][:, : TINY.prompt_len])


def test_ratio_table_reports_ratios_against_base():
    rs = [Result("C", "base", [1.0, 1.0, 1.0]), Result("C", "x", [2.0, 2.0, 4.0], work=10)]
    table = ratio_table(rs)
    assert "| C | x | 2.000 s |" in table and "| 2.000 |" in table and "5.0" in table


@pytest.mark.slow
def test_demo_tiny_runs_and_reports_each_persona():
    out = subprocess.run(
        [sys.executable, "-m", "personamoe", "demo", "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    for label in ("counselor", "critic", "storyteller", "free routing", "tokens/s"):
        assert label in out.stdout
    line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith("counselor"))
    # The counselor persona may only route among the first four adapters.
    assert all(f"persona{i}" not in line for i in range(4, 8))
