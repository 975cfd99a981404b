"""The CUDA decode kernel's source, run on the CPU by an emulator (csrc/cuda/emu/).

The real bindings (``csrc/cuda/bindings.cpp``) and ``csrc/cuda/decode.cu`` are compiled as host
C++ against the emulator's CUDA shims into a stand-in ``personamoe._C_cuda``: each block runs with
256 CUDA threads that are fibers (ucontext) of one OS thread, switched at barriers, blocks one
after another in ticket order. The host launcher ``personamoe.backends.cuda_launch`` runs as it is,
on CPU tensors. This checks the kernel's indexing, reductions, routing, gates, mix and the
counters' reset, and the launcher's and the bindings' argument passing; it cannot check speed, GPU
memory ordering or races between concurrent blocks (the GPU check does).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest
import torch

from personamoe import reference
from personamoe.backends import cuda_launch
from personamoe.backends.base import LayerArgs

ROOT = Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
EMU = CUDA_SRC / "emu"


def _pybind11_include() -> str | None:
    """pybind11's headers: the pybind11 package's, else the copy that ships inside torch."""
    try:
        import pybind11

        return str(pybind11.get_include())
    except ImportError:
        inc = Path(torch.__file__).parent / "include"
        return str(inc) if (inc / "pybind11" / "pybind11.h").exists() else None


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is needed to build the CPU emulation of the CUDA kernel")
    pybind_inc = _pybind11_include()
    if pybind_inc is None:
        pytest.skip("pybind11's headers are needed to build the emulated personamoe._C_cuda")
    name = "_C_cuda_emulated"  # its own name: a real _C_cuda may be imported in this process
    so = tmp_path_factory.mktemp("emu") / (name + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [gxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-fvisibility=hidden", f"-I{EMU}",
           f"-DPERSONAMOE_CUDA_MODULE={name}",
           f"-I{pybind_inc}", f"-I{sysconfig.get_paths()['include']}",
           str(EMU / "emulate.cpp"), str(CUDA_SRC / "bindings.cpp"), "-o", str(so)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if res.returncode != 0:
        # The tools are here (checked above): a compile error is the kernel's, never a skip.
        pytest.fail(f"the emulated CUDA kernel does not compile: {res.stderr[-1500:]}")
    spec = importlib.util.spec_from_file_location(name, so)
    assert spec is not None and spec.loader is not None
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    calls: list[dict] = []

    def decode(stream, **fields):
        calls.append(fields)
        ext.decode(stream, **fields)

    # The emulated extension itself, with decode wrapped to record each call's fields.
    fake = types.ModuleType("personamoe._C_cuda")
    fake.__dict__.update({k: v for k, v in vars(ext).items() if not k.startswith("__")})
    fake.decode = decode  # type: ignore[attr-defined]
    fake.calls = calls  # type: ignore[attr-defined]
    return fake


@pytest.fixture
def emulated(emulator, monkeypatch):
    monkeypatch.setitem(sys.modules, "personamoe._C_cuda", emulator)
    import personamoe

    monkeypatch.setattr(personamoe, "_C_cuda", emulator, raising=False)
    monkeypatch.setattr(cuda_launch, "covers", lambda a: 1 <= a.x.shape[0] <= 16)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0)
    )
    monkeypatch.setattr(cuda_launch, "_counters", {})
    monkeypatch.setattr(cuda_launch, "_slots", {})
    emulator.calls.clear()
    return emulator


def _args(T, d_in, d_out, E, r, k, dtype, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    return LayerArgs(
        rnd(T, d_in), rnd(d_out, d_in, scale=d_in**-0.5), rnd(d_out),
        rnd(E, r, d_in, scale=d_in**-0.5), rnd(E, d_out, r, scale=r**-0.5),
        torch.rand(E, generator=g) + 0.5, k, kw.get("temperature", 1.0),
        kw.get("normalize", "topk"), kw.get("calibration"), kw.get("persona_bias"),
        kw.get("persona_ids"), kw.get("persona_weights"),
    )  # fmt: skip


TOLS = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}


def _check(a, dtype, *, vec=None, emulated=None):
    got = cuda_launch.persona_moe_linear(a)
    f = [t.float() if isinstance(t, torch.Tensor) else t for t in a[:6]]
    ref = reference.persona_moe_linear_full(
        *f, top_k=a.top_k, temperature=a.temperature, normalize=a.normalize,
        calibration=a.calibration, persona_bias=a.persona_bias, persona_ids=a.persona_ids,
        persona_weights=a.persona_weights,
    )  # fmt: skip
    atol, rtol = TOLS[dtype]
    y, idx, gates, n = got
    assert y.dtype == dtype and idx.dtype == torch.int32
    torch.testing.assert_close(n, ref[3], atol=atol, rtol=rtol)
    assert torch.equal(idx, ref[1])
    torch.testing.assert_close(gates, ref[2], atol=atol, rtol=rtol)
    torch.testing.assert_close(y.float(), ref[0].float(), atol=atol, rtol=rtol)
    if vec is not None:
        assert (emulated.calls[-1]["vec"], emulated.calls[-1]["vec_b"]) == vec
    assert all(c == 0 for c in next(iter(cuda_launch._counters.values())).flatten().tolist())
    return got


@pytest.mark.parametrize(
    ("T", "d_in", "d_out", "E", "r", "k", "dtype", "vec"),
    # vec: (16-byte loads of x/A/W, of B). A rank that is not a multiple of the vector width
    # turns off B's vector loads only (GPU finding 9: it used to turn off the base GEMV's too).
    [(1, 64, 64, 4, 16, 2, torch.float32, (1, 1)), (7, 40, 24, 3, 4, 2, torch.float32, (1, 1)),
     (16, 36, 70, 5, 3, 5, torch.float32, (1, 0)), (5, 64, 40, 64, 2, 2, torch.float32, (1, 0)),
     (9, 44, 40, 7, 5, 3, torch.float32, (1, 0)), (3, 24, 33, 1, 1, 1, torch.float32, (1, 0)),
     (7, 64, 48, 4, 8, 2, torch.float16, (1, 1)), (4, 48, 40, 3, 8, 3, torch.bfloat16, (1, 1)),
     (2, 30, 20, 4, 5, 2, torch.bfloat16, (0, 0)), (3, 40, 300, 16, 12, 2, torch.bfloat16, (1, 0))],
)  # fmt: skip
@pytest.mark.parametrize("fuse_base", [True, False], ids=["fused_base", "cublas_base"])
def test_emulated_decode_matches_reference(
    emulated, monkeypatch, fuse_base, T, d_in, d_out, E, r, k, dtype, vec
):
    monkeypatch.setattr(cuda_launch, "FUSE_BASE", fuse_base)
    a = _args(T, d_in, d_out, E, r, k, dtype)
    _check(a, dtype, vec=vec, emulated=emulated)
    if E * r <= 16:  # counters were left zero: a second launch works (cheap cases only)
        _check(a, dtype, vec=vec, emulated=emulated)


@pytest.mark.parametrize("normalize", ["topk", "full"])
def test_emulated_bias_ids_calibration(emulated, normalize):
    E = 8
    pb = torch.randn(4, E) * 0.1
    pb[1] = float("-inf")
    pb[2] = float("-inf")
    pb[2, 5] = 0.0
    pb[3, ::2] = float("-inf")
    ids = torch.tensor([0, 1, 2, 3, -1, 4, 1000])
    a = _args(7, 40, 24, E, 4, 3, torch.float32, persona_bias=pb, persona_ids=ids,
              calibration=torch.rand(E) + 0.5, temperature=0.7, normalize=normalize)  # fmt: skip
    _, idx, gates, _ = _check(a, torch.float32)
    assert idx[2].tolist() == [5, 0, 1] and gates[2, 1:].abs().sum() == 0
    assert gates[1].abs().sum() == 0
    a32 = a._replace(persona_ids=torch.tensor([3, 2, 1, 0, 7, -5, 2], dtype=torch.int32))
    _check(a32, torch.float32)


def test_emulated_fixed_mode(emulated):
    w = torch.tensor([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    ids = torch.tensor([0, 1, 2, -1, 3, 2, 0])
    a = _args(7, 40, 24, 3, 4, 2, torch.float32, persona_weights=w, persona_ids=ids)
    _check(a, torch.float32)


def test_emulated_ties_and_strided_x(emulated):
    E, r, d = 5, 4, 24
    a = _args(3, d, 16, E, r, 2, torch.float32)
    lora_a = a.lora_a[:1].expand(E, r, d).contiguous()
    x = torch.randn(d, 3).t()  # inner stride 3: the launcher makes it contiguous
    w = torch.randn(16, d + 8)[:, :d]  # rows d + 8 apart: the fused base reads them in place
    got = _check(a._replace(lora_a=lora_a, x=x, weight=w), torch.float32)
    assert got[1].tolist() == [[0, 1]] * 3
    assert emulated.calls[-1]["w_stride"] == d + 8 and emulated.calls[-1]["vec"]
    # x whose rows are not 16-byte aligned: copied (T rows), so the base keeps its vector loads.
    buf = torch.randn(3 * d + 1)
    x_odd = buf[1:].view(3, d)
    assert x_odd.data_ptr() % 16 != 0
    _check(a._replace(x=x_odd), torch.float32)
    assert emulated.calls[-1]["vec"] == 1 and emulated.calls[-1]["x"] != x_odd.data_ptr()


def test_emulated_decode_nan_expert_ranks_last(emulated):
    """A NaN score ranks last, even for expert 0 (scanned first): as the reference."""
    a = _args(3, 40, 24, 4, 4, 2, torch.float32, seed=5)
    a.lora_a[0, 1, 7] = float("nan")
    y, idx, _, n = cuda_launch.persona_moe_linear(a)
    assert torch.isnan(n[:, 0]).all() and not (idx == 0).any()
    assert torch.isfinite(y).all()
    assert torch.equal(idx, reference.forward(a)[1])


def test_counters_are_persistent_slots_one_per_stream_and_none_allocated_under_capture(
    monkeypatch,
):
    """Finding 10 of the GPU review: a launch under graph capture allocated ``torch.zeros(4)`` (a
    memset node per layer per graph). Now each stream keeps a slot of one per-device buffer made
    outside capture; under capture no tensor is made once the device has its buffer. Checked on
    CPU tensors through the launcher's seam (which device the buffer lives on does not matter)."""
    monkeypatch.setattr(cuda_launch, "_counters", {})
    monkeypatch.setattr(cuda_launch, "_slots", {})
    capturing = {"on": False}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["on"])
    made = []
    real_zeros = torch.zeros

    def counting_zeros(*a, **k):
        made.append(a)
        return real_zeros(*a, **k)

    monkeypatch.setattr(torch, "zeros", counting_zeros)
    cpu = torch.device("cpu")
    # A capture before any eager launch on the device: a fresh buffer inside the graph.
    capturing["on"] = True
    first = cuda_launch._get_counters(cpu, stream=7)
    assert tuple(first.shape) == (4,) and len(made) == 1
    capturing["on"] = False
    eager = cuda_launch._get_counters(cpu, stream=1)  # makes the device's buffer: one zeros
    assert len(made) == 2 and tuple(cuda_launch._counters[-1].shape) == (
        cuda_launch.COUNTER_SLOTS,
        4,
    )
    assert cuda_launch._get_counters(cpu, stream=1) is eager  # reused, nothing new
    other = cuda_launch._get_counters(cpu, stream=2)
    assert other.data_ptr() != eager.data_ptr()  # two streams never share counters
    capturing["on"] = True
    captured = [cuda_launch._get_counters(cpu, stream=9) for _ in range(50)]  # 50 layers
    assert len(made) == 2, "no allocation (memset node) under capture once the buffer exists"
    assert all(c is captured[0] for c in captured)
    assert captured[0].data_ptr() not in (eager.data_ptr(), other.data_ptr())
    assert cuda_launch._counters[-1].flatten().tolist() == [0] * (4 * cuda_launch.COUNTER_SLOTS)
    # More streams than slots: own buffers outside capture, a fresh one under capture.
    capturing["on"] = False
    for s in range(100, 100 + cuda_launch.COUNTER_SLOTS):
        cuda_launch._get_counters(cpu, stream=s)
    extra = cuda_launch._get_counters(cpu, stream=999)
    assert tuple(extra.shape) == (4,) and extra.tolist() == [0, 0, 0, 0]
