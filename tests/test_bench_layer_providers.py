"""Every provider of the layer benchmark (``personamoe.bench.layer``) computes the same layer as
``personamoe.reference`` (small shapes; the benchmark's own shapes run in ``benchmarks/``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personamoe import reference
from personamoe.bench import layer as bl

SMALL = [
    bl.LayerCase("tiny1", tokens=1, d_in=40, d_out=36, experts=8, rank=16, top_k=2),
    bl.LayerCase("tiny7", tokens=7, d_in=37, d_out=45, experts=3, rank=4, top_k=1),
    bl.LayerCase("tiny33", tokens=33, d_in=64, d_out=48, experts=8, rank=8, top_k=3),
]


@pytest.mark.parametrize("provider", list(bl.PROVIDERS))
@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
def test_provider_matches_reference(case, provider):
    w = bl.make_weight_sets(case, 1, seed=3)[0]
    x = bl.make_input(case, seed=4)
    expected = reference.persona_moe_linear(
        x, w.weight, w.bias, w.lora_a, w.lora_b, w.scaling, top_k=case.top_k
    )
    if provider == "base_onednn":
        if bl.onednn_unavailable("cpu", case.dtype):
            pytest.skip(bl.onednn_unavailable("cpu", case.dtype))  # a property of this torch build
        bl.prepare_providers([provider], [w], case.tokens)
    got = bl.PROVIDERS[provider](x, w, case.top_k)
    if provider in ("base", "base_onednn"):
        got_base = torch.nn.functional.linear(x, w.weight, w.bias)
        torch.testing.assert_close(got, got_base)
        assert not torch.allclose(got, expected, atol=1e-3), "the adapters must change the output"
    else:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_cases_are_the_design_cases():
    for name, tokens in (("L1", 1), ("L16", 16), ("L256", 256)):
        c = bl.CASES[name]
        assert (c.tokens, c.d_in, c.d_out, c.experts, c.rank, c.top_k) == (
            tokens,
            2048,
            2048,
            8,
            16,
            2,
        )
        assert c.dtype == torch.float32


def test_weight_sets_rotate_and_measure_interleaves():
    case = dataclasses.replace(SMALL[1], name="m")
    n = bl.sets_for_bytes(case, 4 * case.set_bytes() + 1)
    assert n == 5
    sets = bl.make_weight_sets(case, n)
    assert not torch.equal(sets[0].weight, sets[1].weight)
    samples = bl.measure(case, ["base", "masked", "personamoe"], sets, rounds=6, warmup=1)
    assert {k: len(v) for k, v in samples.items()} == {"base": 6, "masked": 6, "personamoe": 6}
    assert all(t > 0 for v in samples.values() for t in v)
    assert "torch" in bl.machine_info()


def test_onednn_base_is_prepacked_outside_the_timed_calls_and_reported_when_missing():
    case = dataclasses.replace(SMALL[2], name="m")
    sets = bl.make_weight_sets(case, 3)
    res = bl.measure_results(case, ["base", "base_onednn", "personamoe"], sets, rounds=4, warmup=1)
    assert len(res["base_onednn"].samples) == 4
    assert not bl._PACKED, "prepacked weights are dropped after the run"
    assert bl.fastest_base(res) in ("base", "base_onednn")
    # A dtype this CPU's oneDNN lacks (or no oneDNN at all) gives a note, never a crash.
    half = dataclasses.replace(case, dtype=torch.float16)
    why = bl.onednn_unavailable("cpu", torch.float16)
    res = bl.measure_results(half, ["base", "base_onednn"], bl.make_weight_sets(half, 2), rounds=2)
    if why:
        assert res["base_onednn"].samples == [] and why in res["base_onednn"].note
        assert bl.fastest_base(res) == "base"
    else:
        assert len(res["base_onednn"].samples) == 2
    assert bl.onednn_unavailable("meta", torch.float32) == "oneDNN prepacking is a CPU path"


def test_roofline_counts_each_byte_the_layer_must_move_once():
    c = bl.CASES["L1"]
    # W + bias, all of A, B of the k = 2 experts one token can use, x and y: fp32.
    assert bl.roofline_bytes(c) == 4 * (
        2048 * 2048 + 2048 + 8 * 16 * 2048 + 2 * 2048 * 16 + 2 * 2048
    )
    big = bl.CASES["L256"]
    assert bl.roofline_bytes(big) - bl.roofline_bytes(c) == 4 * (
        6 * 2048 * 16 + 255 * (2048 + 2048)
    )
    bw = bl.stream_bandwidth(mib=8, repeats=3)
    assert 1e8 < bw < 1e13  # bytes/s: a real measurement, neither zero nor absurd
