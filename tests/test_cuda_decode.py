"""The CUDA decode kernel (``personamoe._C_cuda``, backend ``cuda``).

Without a GPU only the import and the host-side routing run: the extension must import where it
was built even with no driver (static cudart), and ``import personamoe`` must never load it.
The numeric tests need a GPU and are skipped without one.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from personamoe import reference
from personamoe.backends import cuda_launch
from personamoe.backends.base import LayerArgs

HAS_CUDA = torch.cuda.is_available()
BUILT = importlib.util.find_spec("personamoe._C_cuda") is not None
NEEDS_GPU = pytest.mark.skipif(
    not (HAS_CUDA and BUILT), reason="needs a CUDA GPU and the built extension personamoe._C_cuda"
)


def test_import_personamoe_does_not_load_the_cuda_extension():
    code = "import sys, personamoe; assert 'personamoe._C_cuda' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not BUILT, reason="personamoe._C_cuda was not built here (no nvcc at build)")
def test_extension_imports_without_a_gpu():
    code = (
        "from personamoe import _C_cuda as m; "
        "assert m.MAX_TOKENS == 16 and m.MAX_EXPERTS == 64 and m.MAX_RANK == 64; "
        "assert m.runtime_version() > 0"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _args(T, d_in, d_out, E, r, k, dtype, device, **kw):
    g = torch.Generator().manual_seed(T * 100 + E)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return LayerArgs(
        rnd(T, d_in), rnd(d_out, d_in, scale=d_in**-0.5), rnd(d_out),
        rnd(E, r, d_in, scale=d_in**-0.5), rnd(E, d_out, r, scale=r**-0.5),
        (torch.rand(E, generator=g) + 0.5).to(device), k, kw.get("temperature", 1.0),
        kw.get("normalize", "topk"), kw.get("calibration"), kw.get("persona_bias"),
        kw.get("persona_ids"), kw.get("persona_weights"),
    )  # fmt: skip


def test_covers_is_shape_only():
    a = _args(4, 16, 8, 3, 4, 2, torch.float32, "cpu")
    assert not cuda_launch.covers(a)  # CPU tensors never go to the kernel
    big = _args(17, 16, 8, 3, 4, 2, torch.float32, "meta")
    assert not cuda_launch.covers(big)


def _ref(a):
    f = [t.float() if isinstance(t, torch.Tensor) else t for t in a[:6]]
    return reference.persona_moe_linear_full(
        *f, top_k=a.top_k, temperature=a.temperature, normalize=a.normalize,
        calibration=a.calibration, persona_bias=a.persona_bias, persona_ids=a.persona_ids,
        persona_weights=a.persona_weights,
    )  # fmt: skip


TOLS = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}


def _check(got, ref, dtype):
    atol, rtol = TOLS[dtype]
    y, idx, gates, n = got
    torch.testing.assert_close(n, ref[3].float(), atol=atol, rtol=rtol)
    assert torch.equal(idx, ref[1])
    torch.testing.assert_close(gates, ref[2].float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(y.float(), ref[0].float(), atol=atol, rtol=rtol)


@NEEDS_GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("T", "d_in", "d_out", "E", "r", "k"),
    [(1, 2048, 2048, 8, 16, 2), (16, 2048, 2048, 8, 16, 2), (7, 40, 24, 3, 4, 2),
     (5, 257, 130, 64, 64, 2), (16, 4096, 4096, 64, 64, 2), (3, 64, 96, 1, 1, 1),
     (9, 128, 72, 8, 16, 8)],
)  # fmt: skip
@pytest.mark.parametrize("fuse_base", [True, False], ids=["fused_base", "cublas_base"])
def test_decode_matches_reference(monkeypatch, fuse_base, dtype, T, d_in, d_out, E, r, k):
    monkeypatch.setattr(cuda_launch, "FUSE_BASE", fuse_base)
    a = _args(T, d_in, d_out, E, r, k, dtype, "cuda")
    for _ in range(2):  # the second launch checks that the counters were left zero
        _check(cuda_launch.persona_moe_linear(a), _ref(a), dtype)


@NEEDS_GPU
@pytest.mark.parametrize("normalize", ["topk", "full"])
def test_decode_bias_ids_calibration(normalize):
    E = 8
    pb = torch.randn(4, E, device="cuda") * 0.1
    pb[1] = float("-inf")
    pb[2] = float("-inf")
    pb[2, 5] = 0.0
    ids = torch.tensor([0, 1, 2, 3, -1, 4, 1000], device="cuda")
    cal = torch.rand(E, device="cuda") + 0.5
    a = _args(7, 64, 40, E, 4, 3, torch.float32, "cuda", persona_bias=pb, persona_ids=ids,
              calibration=cal, temperature=0.7, normalize=normalize)  # fmt: skip
    _check(cuda_launch.persona_moe_linear(a), _ref(a), torch.float32)


@NEEDS_GPU
def test_decode_fixed_mode():
    w = torch.tensor([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], device="cuda")
    ids = torch.tensor([0, 1, 2, -1, 3, 2, 0], device="cuda", dtype=torch.int32)
    a = _args(7, 64, 40, 3, 4, 2, torch.float32, "cuda", persona_weights=w, persona_ids=ids)
    _check(cuda_launch.persona_moe_linear(a), _ref(a), torch.float32)


@NEEDS_GPU
def test_decode_cuda_graph_replay_equals_eager():
    a = _args(4, 512, 256, 8, 16, 2, torch.bfloat16, "cuda")
    eager = cuda_launch.persona_moe_linear(a)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cuda_launch.persona_moe_linear(a)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = cuda_launch.persona_moe_linear(a)
    new_x = torch.randn_like(a.x)
    a.x.copy_(new_x)
    g.replay()
    torch.cuda.synchronize()
    fresh = cuda_launch.persona_moe_linear(a)
    assert torch.equal(out[1], fresh[1])
    for o, f in zip(out, fresh, strict=True):
        torch.testing.assert_close(o, f, atol=1e-2, rtol=1e-2)
    assert not torch.equal(out[0], eager[0])
