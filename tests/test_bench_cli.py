"""Smoke tests of ``python -m personamoe bench`` and ``demo`` (tiny settings: these time nothing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from personamoe.bench import layer as bl
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
    # The memory floor of the case, at the bandwidth measured in the same run, printed and kept.
    roof = payload["rooflines"]["L1"]
    assert roof["bytes"] == bl.roofline_bytes(bl.CASES["L1"]) and roof["bandwidth_Bps"] > 1e8
    assert abs(roof["seconds"] - roof["bytes"] / roof["bandwidth_Bps"]) < 1e-12
    assert "L1: roofline " in out.stdout and "x of it" in out.stdout


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


def test_base_onednn_model_gives_the_plain_models_logits():
    from personamoe.bench.layer import onednn_unavailable
    from personamoe.bench.model import TARGETS, OneDNNLinear, build_base, onednn_model

    why = onednn_unavailable("cpu", torch.float32)
    if why:
        pytest.skip(why)
    base = build_base(TINY)
    packed = onednn_model(base, batch_size_hint=TINY.batch)
    swapped = [n for n, m in packed.named_modules() if isinstance(m, OneDNNLinear)]
    assert len(swapped) == len(TARGETS) * TINY.num_hidden_layers
    assert not any(isinstance(m, OneDNNLinear) for m in base.modules())  # base left as it was
    ids = torch.randint(1, TINY.vocab_size, (TINY.batch, TINY.prompt_len))
    with torch.inference_mode():
        want = base(input_ids=ids).logits
        got = packed(input_ids=ids).logits
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_base_onednn_is_a_model_provider_and_skipped_with_a_note_when_unavailable(monkeypatch):
    import personamoe.bench.layer as bl

    assert "base_onednn" in MODEL_PROVIDERS
    bench = ModelBench.__new__(ModelBench)  # no model or adapters: only the availability check
    bench.device, bench.dtype, bench.adapters = "cpu", torch.float32, {}
    monkeypatch.setattr(bl, "onednn_unavailable", lambda device, dtype: "no oneDNN here")
    assert bench.unavailable("base_onednn") == "no oneDNN here"
    assert bench.unavailable("base") == ""
    with pytest.raises(RuntimeError, match="no oneDNN here"):
        bench.provider("base_onednn")


def test_target_lines_report_the_fastest_base_and_the_train_ratios():
    from personamoe.bench.cli import target_lines

    rs = [
        Result("M", "base", [2.0, 2.0, 2.0]),
        Result("M", "base_onednn", [1.0, 1.0, 1.0]),
        Result("M", "personamoe", [1.5, 1.5, 1.5]),
        Result("M", "peft_lora", [3.0, 3.0, 3.0]),
        Result("L1", "base", [1.0, 1.0]),
        Result("L1", "base_onednn", [2.0, 2.0]),
        Result("L1", "personamoe", [1.1, 1.1]),
        Result("train", "personamoe", [1.1, 1.1]),
        Result("train", "peft_lora", [1.0, 1.0]),
        Result("train", "naive", [3.3, 3.3]),
        Result("train", "xlora", [], note="skipped: x"),
    ]
    lines = {ln.split(":", 1)[0]: ln for ln in target_lines(rs)}
    assert "personamoe / base = 0.750" in lines["M"]
    assert "personamoe / base_onednn = 1.500 (paired 1.500) (fastest base)" in lines["M"]
    # The smallest other overhead is peft_lora's, never a base's.
    assert "smallest other peft_lora 1000.000 ms" in lines["M"]
    assert "personamoe / base = 1.100" in lines["L1"] and "base is the fastest base" in lines["L1"]
    assert "personamoe / peft_lora = 1.100" in lines["train"]
    assert "naive / personamoe = 3.000" in lines["train"] and "xlora" not in lines["train"]
