"""The Triton kernels against the reference (docs/design.md §1) at small odd shapes.

On a machine without a GPU they run under ``TRITON_INTERPRET=1`` (set by conftest.py) on CPU
tensors; with a GPU, on the GPU. The interpreter computes bf16 wrongly, so bf16 runs only on a GPU.
Shapes stay small (<= 256) so the whole file finishes in well under a minute on two cores.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from personamoe.kernels import launchers, mix, shrink_route

from personamoe import reference
from personamoe.backends.base import LayerArgs

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
NO_BF16 = "bf16 runs only on a GPU: the Triton interpreter computes bf16 wrongly"

DTYPES = [
    pytest.param(torch.float32, 1e-4, 1e-4, id="fp32"),
    pytest.param(torch.float16, 2e-2, 2e-2, id="fp16"),
    pytest.param(
        torch.bfloat16,
        1e-1,
        5e-2,
        id="bf16",
        marks=pytest.mark.skipif(not HAS_CUDA, reason=NO_BF16),
    ),
]


@pytest.fixture(autouse=True)
def _restore_paths():
    saved = (launchers.MIX_REGIME, launchers.BASE_MODE)
    yield
    launchers.MIX_REGIME, launchers.BASE_MODE = saved


def _case(T, d_in, d_out, E, r, dtype, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEV, dtype=dtype)

    return dict(
        x=rnd(T, d_in),
        weight=rnd(d_out, d_in, scale=d_in**-0.5),
        bias=rnd(d_out) if bias else None,
        lora_a=rnd(E, r, d_in, scale=d_in**-0.5),
        lora_b=rnd(E, d_out, r, scale=r**-0.5),
        scaling=(torch.rand(E, generator=g) + 0.5).to(DEV),
    )


def _plain_args(c, top_k):
    return LayerArgs(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"],
                     top_k, 1.0, "topk", None, None, None, None)  # fmt: skip


def _run(c, *, top_k, temperature=1.0, normalize="topk", calibration=None, persona_bias=None,
         persona_ids=None, persona_weights=None):  # fmt: skip
    args = LayerArgs(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"],
                     top_k, temperature, normalize, calibration, persona_bias, persona_ids,
                     persona_weights)  # fmt: skip
    got = launchers.persona_moe_linear(args)
    f32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    ref = reference.persona_moe_linear_full(
        f32["x"], f32["weight"], f32["bias"], f32["lora_a"], f32["lora_b"], f32["scaling"],
        top_k=top_k, temperature=temperature, normalize=normalize, calibration=calibration,
        persona_bias=persona_bias, persona_ids=persona_ids, persona_weights=persona_weights,
    )  # fmt: skip
    return got, ref


def _check(got, ref, dtype, atol, rtol, *, check_idx=True):
    y, idx, gates, n = got
    ry, ridx, rgates, rn = ref
    assert y.dtype == dtype and y.shape == ry.shape
    assert idx.dtype == torch.int32 and gates.dtype == torch.float32 and n.dtype == torch.float32
    torch.testing.assert_close(n, rn, atol=atol, rtol=rtol, equal_nan=True)
    if check_idx:
        assert torch.equal(idx.cpu(), ridx.cpu())
        torch.testing.assert_close(gates, rgates, atol=atol, rtol=rtol)
    torch.testing.assert_close(y.float(), ry.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("regime", ["dense", "grouped"])
@pytest.mark.parametrize("base", ["torch", "fused"])
@pytest.mark.parametrize(("T", "E", "r", "k"), [(1, 1, 1, 1), (7, 3, 4, 2), (33, 8, 16, 8),
                                                (33, 3, 4, 1), (7, 8, 16, 2)])  # fmt: skip
def test_layer_matches_reference(dtype, atol, rtol, regime, base, T, E, r, k):
    launchers.MIX_REGIME, launchers.BASE_MODE = regime, base
    c = _case(T, 40, 24, E, r, dtype, bias=(T % 2 == 1 and E != 3))
    _check(*_run(c, top_k=k), dtype, atol, rtol)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("regime", ["dense", "grouped"])
def test_multi_tile_shapes_and_split_k(dtype, atol, rtol, regime):
    """d_in=200 splits K in the shrink and loops K in the fused GEMM; d_out=150 spans N tiles."""
    launchers.MIX_REGIME, launchers.BASE_MODE = regime, "fused"
    c = _case(33, 200, 150, 3, 16, dtype)
    _check(*_run(c, top_k=2), dtype, atol, rtol)
    launchers.BASE_MODE = "torch"
    c = _case(7, 200, 150, 8, 4, dtype, seed=1)
    _check(*_run(c, top_k=2), dtype, atol, rtol)


def test_shrink_split_k_and_tiles():
    for T, d_in in ((1, 200), (7, 250), (33, 40), (100, 130)):
        x = torch.randn(T, d_in, device=DEV)
        a = torch.randn(3, 5, d_in, device=DEV)
        h = shrink_route.shrink(x, a)
        torch.testing.assert_close(h, reference.shrink(x, a).reshape(T, 15), atol=1e-4, rtol=1e-4)
    assert shrink_route.shrink_config(1, 128, 2048)[3] > 1  # decode splits K
    assert shrink_route.shrink_config(256, 128, 2048)[3] > 1  # short prefill splits to fill SMs
    assert shrink_route.shrink_config(4096, 128, 2048)[3] == 1  # bulk prefill does not


@pytest.mark.parametrize("regime", ["dense", "grouped"])
@pytest.mark.parametrize("base", ["torch", "fused"])
def test_prefill_split_k_through_the_layer(regime, base):
    """T=100 > 64 splits K in the prefill shrink (the route kernel sums the partials in order),
    the mix spans several swizzled tiles, the grouped regime runs 32-row blocks (T*k/E = 25)."""
    launchers.MIX_REGIME, launchers.BASE_MODE = regime, base
    assert shrink_route.shrink_config(100, 32, 256, elsize=4)[3] > 1
    assert mix.grouped_block_m(100, 2, 8) == 32
    c = _case(100, 256, 72, 8, 4, torch.float32)
    _check(*_run(c, top_k=2), torch.float32, 1e-4, 1e-4)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("normalize", ["topk", "full"])
@pytest.mark.parametrize("regime", ["dense", "grouped"])
def test_bias_ids_calibration_temperature(dtype, atol, rtol, normalize, regime):
    """-inf rows, one allowed expert, fewer allowed than k, ids out of range and -1."""
    launchers.MIX_REGIME = regime
    E, T = 8, 7
    c = _case(T, 40, 24, E, 4, dtype)
    ninf = float("-inf")
    pb = torch.randn(4, E, device=DEV) * 0.1
    pb[1] = ninf  # nothing allowed: y is the base output
    pb[2, :] = ninf
    pb[2, 5] = 0.0  # one allowed expert, k = 3: two gate-0 slots filled in index order
    pb[3, ::2] = ninf
    ids = torch.tensor([0, 1, 2, 3, -1, 4, 1000], device=DEV, dtype=torch.int64)
    cal = (torch.rand(E) + 0.5).to(DEV)
    _check(*_run(c, top_k=3, temperature=0.7, normalize=normalize, calibration=cal,
                 persona_bias=pb, persona_ids=ids), dtype, atol, rtol)  # fmt: skip
    got, _ = _run(c, top_k=3, persona_bias=pb, persona_ids=ids)
    assert got[1][2].tolist() == [5, 0, 1] and got[2][2, 1:].abs().sum() == 0
    assert got[2][1].abs().sum() == 0
    ids32 = torch.tensor([3, 2, 1, 0, 7, -5, 2], device=DEV, dtype=torch.int32)
    _check(*_run(c, top_k=2, persona_bias=pb, persona_ids=ids32), dtype, atol, rtol)


def test_ties_go_to_lower_index():
    """Identical experts give equal norms: the chosen experts are the lowest indices."""
    E, r, d = 5, 4, 24
    x = torch.randn(3, d, device=DEV)
    a = torch.randn(1, r, d, device=DEV).expand(E, r, d).contiguous()
    b = torch.randn(E, 16, r, device=DEV)
    c = dict(x=x, weight=torch.randn(16, d, device=DEV), bias=None, lora_a=a, lora_b=b,
             scaling=torch.ones(E, device=DEV))  # fmt: skip
    (y, idx, gates, _), ref = _run(c, top_k=2)
    assert idx.tolist() == [[0, 1]] * 3
    torch.testing.assert_close(gates, torch.full_like(gates, 0.5))
    torch.testing.assert_close(y, ref[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("base", ["torch", "fused"])
def test_fixed_mode(dtype, atol, rtol, base):
    launchers.BASE_MODE = base
    E = 3
    c = _case(7, 40, 24, E, 4, dtype)
    w = torch.tensor([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], device=DEV)
    ids = torch.tensor([0, 1, 2, -1, 3, 2, 0], device=DEV)
    _check(*_run(c, top_k=2, persona_weights=w, persona_ids=ids), dtype, atol, rtol)


def test_noncontiguous_x_and_empty():
    c = _case(7, 40, 24, 3, 4, torch.float32)
    c["x"] = torch.randn(40, 7, device=DEV).t()  # strided view
    assert not c["x"].is_contiguous()
    for base in ("torch", "fused"):
        launchers.BASE_MODE = base
        _check(*_run(c, top_k=2), torch.float32, 1e-4, 1e-4)
    c0 = _case(0, 40, 24, 3, 4, torch.float32)
    y, idx, _, n = launchers.persona_moe_linear(_plain_args(c0, 2))
    assert y.shape == (0, 24) and idx.shape == (0, 2) and n.shape == (0, 3)


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_nan_token_stays_local():
    for regime in ("dense", "grouped"):
        launchers.MIX_REGIME = regime
        c = _case(7, 40, 24, 8, 4, torch.float32)
        c["x"][3, 5] = float("nan")
        y, idx, _, _ = launchers.persona_moe_linear(_plain_args(c, 2))
        assert ((idx >= 0) & (idx < 8)).all()
        keep = torch.arange(7, device=DEV) != 3
        assert torch.isfinite(y[keep]).all()


def test_align_by_expert():
    idx = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 0]], dtype=torch.int32, device=DEV)
    pairs, block_expert = mix.align_by_expert(idx, 4, 4)
    assert block_expert.tolist()[:3] == [0, 1, 2] and all(e >= 4 for e in block_expert[3:].tolist())
    assert pairs[:4].tolist() == [1, 4, 7, -1]  # expert 0: pairs (0,1), (2,0), (3,1)
    assert pairs[4:8].tolist() == [3, -1, -1, -1]
    assert pairs[8:12].tolist() == [0, 2, 5, 6]


def test_auto_paths():
    assert launchers.choose_paths(1, 64, 64, 2, False) == ("dense", "torch")
    assert launchers.choose_paths(4096, 64, 64, 2, False) == ("grouped", "fused")
    assert launchers.choose_paths(4096, 8, 16, 2, False)[0] == "dense"
    assert launchers.choose_paths(4096, 64, 64, 2, True)[0] == "dense"


def test_through_public_op_and_backend():
    import personamoe

    c = _case(7, 40, 24, 3, 4, torch.float32)
    with personamoe.use_backend("triton"):
        y, idx, _ = personamoe.persona_moe_linear(
            c["x"].reshape(7, 1, 40), c["weight"], c["bias"], c["lora_a"], c["lora_b"],
            c["scaling"], top_k=2, return_routing=True,
        )  # fmt: skip
    ry, ridx, _ = reference.persona_moe_linear(
        c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], top_k=2,
        return_routing=True,
    )  # fmt: skip
    assert y.shape == (7, 1, 24) and torch.equal(idx.reshape(7, 2), ridx)
    torch.testing.assert_close(y.reshape(7, 24), ry, atol=1e-4, rtol=1e-4)


def test_import_personamoe_does_not_import_triton():
    code = "import sys, personamoe; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_compile_fullgraph_with_triton_backend(monkeypatch):
    """The op is opaque to dynamo; the backend is chosen when it runs (aot_eager: no codegen)."""
    import personamoe

    calls = []
    real = launchers.persona_moe_linear
    monkeypatch.setattr(launchers, "persona_moe_linear", lambda a: calls.append(1) or real(a))
    c = _case(7, 40, 24, 3, 4, torch.float32)

    def f(x):
        return personamoe.persona_moe_linear(
            x, c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], top_k=2
        )

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    with personamoe.use_backend("triton"):
        got = cf(c["x"])
    ref = reference.persona_moe_linear(
        c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], top_k=2
    )
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert calls, "the compiled function did not run the Triton launcher"


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(("T", "regime", "base"), [(1, "dense", "torch"), (33, "grouped", "fused")])
def test_cuda_graph_replay_equals_eager(T, regime, base):
    launchers.MIX_REGIME, launchers.BASE_MODE = regime, base
    c = _case(T, 256, 192, 8, 16, torch.bfloat16)
    args = _plain_args(c, 2)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        launchers.persona_moe_linear(args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = launchers.persona_moe_linear(args)
    c["x"].copy_(torch.randn_like(c["x"]))
    g.replay()
    torch.cuda.synchronize()
    fresh = launchers.persona_moe_linear(args)
    assert torch.equal(out[1], fresh[1])
    torch.testing.assert_close(out[0], fresh[0], atol=1e-2, rtol=1e-2)
