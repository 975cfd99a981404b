"""The training-step case of ``python -m personamoe bench --cases train`` (tiny settings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")

from personamoe import reference
from personamoe.bench.train import (
    TRAIN_PROVIDERS,
    TRAIN_TINY,
    NaiveMoELoRALinear,
    TrainBench,
)


def test_naive_layer_equals_the_reference():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 20)
    layer = NaiveMoELoRALinear(base, num_experts=8, rank=4, alpha=8.0, top_k=2)
    assert float(layer.lora_B.detach().abs().min()) > 0  # random, non-zero B: the experts matter
    x = torch.randn(3, 7, 24)
    want = reference.persona_moe_linear(
        x,
        base.weight,
        base.bias,
        layer.lora_A,
        layer.lora_B,
        torch.full((8,), layer.scaling),
        top_k=2,
    )
    assert isinstance(want, torch.Tensor)
    got = layer(x)
    assert got.shape == (3, 7, 20)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The adapters change the output (a check that could fail if the loop added nothing).
    assert not torch.allclose(got, base(x), atol=1e-3)


def test_one_step_of_each_provider_moves_the_adapters_and_not_the_base():
    bench = TrainBench(TRAIN_TINY)
    try:
        for name in TRAIN_PROVIDERS:
            step = bench.provider(name)
            model = bench.models[name]
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            assert trainable and len(trainable) < len(before), name
            loss = step()
            assert isinstance(loss, torch.Tensor) and torch.isfinite(loss), name
            for n, p in model.named_parameters():
                moved = not torch.equal(p, before[n])
                assert moved == (n in trainable), (name, n)
                if n not in trainable:
                    assert p.grad is None, (name, n)
            grads = [p.grad for n, p in model.named_parameters() if n in trainable]
            assert any(g is not None and float(g.abs().sum()) > 0 for g in grads), name
            # Only adapter weights (and X-LoRA's classifier) train: embeddings, norms, the seven
            # projections' base weights and the LM head stay frozen.
            for n in trainable:
                assert "lora" in n.lower() or "xlora_classifier" in n, (name, n)
    finally:
        bench.close()


def test_bench_train_quick_runs_every_provider_through_the_cli(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "personamoe",
        "bench",
        "--cases",
        "train",
        "--quick",
        "--repeats",
        "2",
        # The quick mode's per-provider budget (20 s) is for people; the test checks that every
        # provider runs both rounds, also on a loaded machine (a round took 18 s under load).
        "--provider-budget",
        "240",
        "--time-budget",
        "0",
        "--out",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert "| train | personamoe |" in out.stdout
    assert "train: personamoe / peft_lora =" in out.stdout
    assert "naive / personamoe =" in out.stdout
    payload = json.loads((tmp_path / "results.json").read_text())
    rows = {r["provider"]: r for r in payload["results"]}
    assert set(rows) == set(TRAIN_PROVIDERS)
    for name, r in rows.items():
        assert r["case"] == "train"
        assert len(r["samples_s"]) == 2, (name, r["note"])
        assert r["tokens_per_s"] > 0
