"""The ``cpp`` backend (fused C++ kernel, ``csrc/layer.cpp``) against ``personamoe.reference``.

Random inputs (never zeros); small sizes with ragged dims (not multiples of 8 or of the vector
width); every routing option; fixed mode; persona ids outside the table through a direct kernel
call; non-contiguous ``x``; 1 and 2 threads; each vectorised path the CPU has; fp32/bf16/fp16 with
the tolerances of ``conftest.DTYPE_TOLS``. ``topk_idx`` is compared exactly on tokens whose scores
are well separated (random data has distinct norms; a near tie may legitimately flip under a
different summation order, and then that token's gates and output follow the other choice).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch

import personamoe
from personamoe import reference
from personamoe.backends import LayerArgs, available_backends, resolve_backend, use_backend
from personamoe.backends.cpp_backend import CppBackend, active_isa, fused_forward
from tests.conftest import DTYPE_TOLS

pytestmark = pytest.mark.skipif(
    available_backends()["cpp"] != "available", reason="the C++ extension is not built"
)

NEG_INF = float("-inf")


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def isa(name: str) -> Iterator[None]:
    from personamoe import _C

    before = _C.active_isa()
    if _C.force_isa(name) is None:
        pytest.skip(f"this CPU has no {name} path")  # a CPU property, not a gap in the kernel
    try:
        yield
    finally:
        _C.force_isa(before)


def make(T, d_in, d_out, E, r, dtype=torch.float32, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    return dict(
        x=rnd(T, d_in),
        weight=rnd(d_out, d_in, std=1 / math.sqrt(d_in)),
        bias=rnd(d_out, std=0.5) if bias else None,
        lora_a=rnd(E, r, d_in, std=1 / math.sqrt(d_in)),
        lora_b=rnd(E, d_out, r, std=1 / math.sqrt(r)),
        scaling=torch.rand(E, generator=g) + 0.5,
    )


def run_both(t, *, top_k, **opts):
    la = LayerArgs(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scaling"], top_k,
                   opts.get("temperature", 1.0), opts.get("normalize", "topk"),
                   opts.get("calibration"), opts.get("persona_bias"), opts.get("persona_ids"),
                   opts.get("persona_weights"))  # fmt: skip
    got = CppBackend().forward(la)
    ref = reference.persona_moe_linear_full(
        t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scaling"], top_k=top_k, **opts
    )
    return got, ref


def well_separated(n_ref: torch.Tensor, k: int, gap: float = 1e-3) -> torch.Tensor:
    """Tokens whose k+1 best finite scores differ pairwise by more than ``gap`` (relative)."""
    s = torch.sort(n_ref, dim=-1, descending=True).values[:, : k + 1]
    d = (s[:, :-1] - s[:, 1:]).abs()
    finite = torch.isfinite(s[:, :-1]) & torch.isfinite(s[:, 1:])
    ok = (d > gap * (1 + s[:, :-1].abs())) | ~finite | (s[:, :-1] == s[:, 1:]) & ~finite
    return ok.all(dim=-1) if s.shape[1] > 1 else torch.ones(s.shape[0], dtype=torch.bool)


def check(got, ref, dtype, atol, rtol, k, *, fixed=False):
    y, idx, gates, n = got
    yr, ir, gr, nr = ref
    assert y.dtype == dtype and y.shape == yr.shape
    assert idx.dtype == torch.int32 and gates.dtype == torch.float32 and n.dtype == torch.float32
    assert idx.shape == ir.shape and gates.shape == gr.shape and n.shape == nr.shape
    if y.shape[0] == 0:
        return
    fin = torch.isfinite(nr)
    torch.testing.assert_close(n[fin], nr[fin], atol=1e-4, rtol=1e-4)
    assert torch.equal(torch.isneginf(n), torch.isneginf(nr))
    sep = well_separated(nr, k) if not fixed else torch.ones(n.shape[0], dtype=torch.bool)
    assert sep.float().mean() > 0.8, "random scores should mostly be well separated"
    assert torch.equal(idx[sep], ir[sep])
    same = (idx == ir).all(dim=-1)
    torch.testing.assert_close(gates[same], gr[same], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y[same].float(), yr[same].float(), atol=atol, rtol=rtol)


# (T, d_in, d_out, E, r, k): ragged dims, every E and r of the brief, k in {1, E}; T up to 257.
SHAPES = [
    (0, 13, 11, 3, 8, 1),
    (1, 37, 45, 3, 8, 3),
    (1, 130, 70, 8, 16, 2),
    (7, 19, 23, 1, 1, 1),
    (7, 37, 45, 8, 16, 8),
    (64, 45, 37, 3, 1, 1),
    (64, 67, 130, 8, 8, 2),
    (257, 29, 77, 8, 16, 1),
    (257, 51, 33, 3, 16, 3),
]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-d{}x{}-E{}-r{}-k{}".format(*s))
def test_token_mode_matches_reference(shape, dtype, atol, rtol):
    T, d_in, d_out, E, r, k = shape
    t = make(T, d_in, d_out, E, r, dtype, bias=T % 2 == 1, seed=T + E)
    check(*run_both(t, top_k=k), dtype, atol, rtol, k)


OPTIONS = [
    dict(normalize="full"),
    dict(temperature=0.37),
    dict(temperature=3.0, normalize="full"),
    dict(calibration="rand"),
    dict(persona_bias="rand", persona_ids="valid"),
    dict(persona_bias="inf_rows", persona_ids="valid", normalize="full", calibration="rand"),
    dict(persona_bias="inf_rows", persona_ids="valid", temperature=0.5),
]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("E, k", [(3, 1), (8, 2), (8, 8)])
def test_routing_options_match_reference(opts, E, k, dtype, atol, rtol):
    T, d_in, d_out, r = 33, 37, 21, 8
    t = make(T, d_in, d_out, E, r, dtype, seed=E * 10 + k)
    g = torch.Generator().manual_seed(7)
    o = dict(opts)
    if o.get("calibration") == "rand":
        o["calibration"] = torch.rand(E, generator=g) + 0.5
    P = 4
    if o.get("persona_bias") == "rand":
        o["persona_bias"] = torch.randn(P, E, generator=g)
    elif o.get("persona_bias") == "inf_rows":
        pb = torch.randn(P, E, generator=g)
        pb[1, 1:] = NEG_INF  # one expert allowed (fewer than k when k > 1)
        pb[2, :] = NEG_INF  # none allowed: y is the base output
        pb[3, ::2] = NEG_INF
        o["persona_bias"] = pb
    if o.get("persona_ids") == "valid":
        o["persona_ids"] = torch.randint(-1, P, (T,), generator=g)
    got, ref = run_both(t, top_k=k, **o)
    check(got, ref, dtype, atol, rtol, k)
    if opts.get("persona_bias") == "inf_rows":
        ids = o["persona_ids"]
        none_allowed = ids == 2
        if none_allowed.any():  # no expert allowed: all gates 0, y is the base output
            assert (got[2][none_allowed] == 0).all()
            base = torch.nn.functional.linear(t["x"], t["weight"], t["bias"])
            torch.testing.assert_close(got[0][none_allowed], base[none_allowed], atol=0, rtol=0)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("E, k, T", [(1, 1, 5), (3, 2, 64), (8, 2, 257), (8, 8, 7)])
def test_fixed_mode_matches_reference(E, k, T, dtype, atol, rtol):
    t = make(T, 45, 39, E, 16 if E == 8 else 8, dtype, seed=E + T)
    g = torch.Generator().manual_seed(3)
    P = 3
    w = torch.rand(P, E, generator=g)
    w[0, ::2] = 0.0  # zero weights: those experts are not used
    w[2] = 0.0  # a persona with no adapters: y is the base output
    ids = torch.randint(-1, P, (T,), generator=g)
    check(
        *run_both(t, top_k=k, persona_ids=ids, persona_weights=w), dtype, atol, rtol, k, fixed=True
    )


def test_out_of_range_ids_are_no_persona_in_the_kernel():
    """Ids outside [0, P) (the checks that skip under compile) read nothing: they mean no persona."""
    T, E, P = 9, 3, 2
    t = make(T, 23, 17, E, 4, seed=11)
    ids64 = torch.tensor([0, 1, 2, -1, -2, 10**12, -(2**63), 2**63 - 1, 1])
    pb = torch.randn(P, E)
    pb[1, 1:] = NEG_INF
    expect_ids = torch.where((ids64 >= 0) & (ids64 < P), ids64, torch.full_like(ids64, -1))
    ref = reference.persona_moe_linear_full(
        t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scaling"], top_k=2,
        persona_bias=pb, persona_ids=expect_ids,
    )  # fmt: skip
    ids32 = torch.tensor([0, 1, 2, -1, -2, 2**31 - 1, -(2**31), 7, 1], dtype=torch.int32)
    for ids in (ids64, ids32):
        got = fused_forward(LayerArgs(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"],
                                      t["scaling"], 2, 1.0, "topk", None, pb, ids, None))  # fmt: skip
        check(got, ref, torch.float32, 1e-4, 1e-4, 2)
    w = torch.rand(P, E)
    ref_f = reference.persona_moe_linear_full(
        t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scaling"], top_k=2,
        persona_weights=w, persona_ids=expect_ids,
    )  # fmt: skip
    got_f = fused_forward(LayerArgs(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"],
                                    t["scaling"], 2, 1.0, "topk", None, None, ids64, w))  # fmt: skip
    check(got_f, ref_f, torch.float32, 1e-4, 1e-4, 2, fixed=True)


@pytest.mark.parametrize("layout", ["strided_rows", "strided_cols", "transposed", "3d"])
def test_non_contiguous_x(layout):
    T, d_in = 19, 37
    t = make(T, d_in, 29, 3, 8, seed=5)
    big = torch.randn(T, 2 * d_in + 3)
    if layout == "strided_rows":
        x = big[:, 1 : d_in + 1]
    elif layout == "strided_cols":
        x = big[:, : 2 * d_in : 2]
    elif layout == "transposed":
        x = torch.randn(d_in, T).t()
    else:
        x = torch.randn(T, 2, d_in).transpose(0, 1)[1]
    assert not x.is_contiguous()
    t["x"] = x
    check(*run_both(t, top_k=2), torch.float32, 1e-4, 1e-4, 2)
    with use_backend("cpp"):
        y = personamoe.persona_moe_linear(
            x, t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scaling"], top_k=2
        )
    y_ref = reference.persona_moe_linear(
        x.contiguous(), t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scaling"], top_k=2
    )
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("path", ["generic", "avx2", "avx512"])
def test_threads_and_vector_paths(path, n_threads):
    with isa(path), threads(n_threads):
        for T, E, r, k, dtype, tol in [(3, 8, 16, 2, torch.float32, 1e-4),
                                       (66, 3, 5, 3, torch.float32, 1e-4),
                                       (130, 8, 16, 2, torch.bfloat16, 1e-1),
                                       (17, 8, 16, 2, torch.float16, 2e-2)]:  # fmt: skip
            t = make(T, 131, 140, E, r, dtype, seed=T)
            pb = torch.randn(2, E)
            ids = torch.randint(-1, 2, (T,))
            check(*run_both(t, top_k=k, persona_bias=pb, persona_ids=ids, calibration=torch.rand(E) + 0.5),
                  dtype, tol, tol, k)  # fmt: skip


def test_results_do_not_depend_on_thread_count():
    t = make(100, 70, 300, 8, 16, seed=9)
    la = LayerArgs(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scaling"], 2, 1.0,
                   "topk", None, None, None, None)  # fmt: skip
    with threads(1):
        one = fused_forward(la)
    with threads(2):
        two = fused_forward(la)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_auto_picks_cpp_on_cpu_and_public_paths_use_it():
    t = make(5, 16, 12, 3, 4, seed=2)
    la = LayerArgs(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scaling"], 2, 1.0,
                   "topk", None, None, None, None)  # fmt: skip
    with use_backend("auto"):
        assert isinstance(resolve_backend(torch.device("cpu"), la), CppBackend)
    assert active_isa() in ("avx512", "avx2", "generic")
    layer = personamoe.PersonaMoELinear(
        16, 12, num_experts=3, rank=4, top_k=2, init_lora_weights=False
    )
    x = torch.randn(2, 3, 16)
    with torch.no_grad(), use_backend("cpp"):
        y_cpp, i_cpp, g_cpp = layer.forward_routing(x)
    with torch.no_grad(), use_backend("reference"):
        y_ref, i_ref, g_ref = layer.forward_routing(x)
    assert torch.equal(i_cpp, i_ref)
    torch.testing.assert_close(y_cpp, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_cpp, g_ref, atol=1e-6, rtol=1e-5)


def test_fp64_stays_on_the_reference_path():
    t = make(4, 9, 7, 3, 2, torch.float64, seed=1)
    got, ref = run_both(t, top_k=2)
    assert got[0].dtype == torch.float64
    torch.testing.assert_close(got[0], ref[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("opts", [dict(), dict(normalize="full", temperature=0.7, calibration=True),
                                  dict(persona_bias=True), dict(persona_weights=True)],
                         ids=["plain", "full-temp-cal", "bias", "fixed"])  # fmt: skip
def test_gradients_match_reference(opts):
    T, d_in, d_out, E, r = 13, 21, 17, 4, 3
    t = make(T, d_in, d_out, E, r, seed=4)
    g = torch.Generator().manual_seed(1)
    kw = {}
    if opts.get("calibration"):
        kw["calibration"] = torch.rand(E, generator=g) + 0.5
    if "normalize" in opts:
        kw["normalize"], kw["temperature"] = opts["normalize"], opts["temperature"]
    if opts.get("persona_bias"):
        kw["persona_bias"] = torch.randn(3, E, generator=g)
        kw["persona_ids"] = torch.randint(-1, 3, (T,), generator=g)
    if opts.get("persona_weights"):
        kw["persona_weights"] = torch.rand(3, E, generator=g)
        kw["persona_ids"] = torch.randint(-1, 3, (T,), generator=g)
    grad_y = torch.randn(T, d_out, generator=g)
    grad_gates = torch.randn(T, 2, generator=g)
    names = ("x", "weight", "bias", "lora_a", "lora_b")
    grads = {}
    # "plain autograd": the reference function differentiated by autograd itself (ground truth);
    # "cpp": the custom op on the cpp backend with its backward formula.
    for path in ("cpp", "plain autograd"):
        leaves = {n: t[n].clone().requires_grad_(True) for n in names}
        fn = personamoe.persona_moe_linear if path == "cpp" else reference.persona_moe_linear
        with use_backend("cpp"):
            y, _, gates = fn(
                leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"],
                t["scaling"], top_k=2, return_routing=True, **kw,
            )  # fmt: skip
        loss = (y * grad_y).sum() + (gates * grad_gates).sum()
        loss.backward()
        grads[path] = {n: v.grad for n, v in leaves.items()}
    for n in names:
        assert grads["cpp"][n] is not None, n
        torch.testing.assert_close(
            grads["cpp"][n], grads["plain autograd"][n], atol=1e-5, rtol=1e-4
        )


def test_gradcheck_through_the_cpp_backend_fp64():
    t = make(4, 5, 3, 3, 2, torch.float64, seed=8)
    leaves = [t["x"].requires_grad_(True), t["lora_a"].requires_grad_(True),
              t["lora_b"].requires_grad_(True)]  # fmt: skip

    def f(x, a, b):
        # y only: topk_gates are fp32 by contract, too coarse for fp64 finite differences (their
        # gradient is compared against the reference in fp32 above).
        return personamoe.persona_moe_linear(x, t["weight"], t["bias"], a, b, t["scaling"], top_k=2)

    with use_backend("cpp"):
        assert torch.autograd.gradcheck(f, leaves, atol=1e-6)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.randn(3, 8)), "x: expected last dim"),
        (dict(lora_b=torch.randn(3, 10, 4)), "lora_b: expected shape"),
        (dict(x=torch.randn(3, 16, dtype=torch.float16)), "dtype"),
        (dict(top_k=4), "top_k"),
        (dict(scaling=torch.tensor([1.0, float("nan"), 1.0])), "scaling"),
        (dict(calibration=torch.tensor([1.0, 0.0, 1.0])), "calibration"),
        (dict(persona_bias=torch.zeros(2, 3), persona_ids=torch.tensor([0, 5, 1])), "persona_ids"),
        (
            dict(persona_weights=torch.ones(2, 3), persona_ids=torch.tensor([0, 1.0, 1])),
            "persona_ids",
        ),
        (dict(temperature=0.0), "temperature"),
    ],
)
def test_bad_inputs_raise_before_the_kernel(change, match):
    args = dict(x=torch.randn(3, 16), weight=torch.randn(11, 16), bias=None,
                lora_a=torch.randn(3, 4, 16), lora_b=torch.randn(3, 11, 4), scaling=torch.ones(3),
                top_k=2)  # fmt: skip
    args.update(change)
    with use_backend("cpp"), pytest.raises((ValueError, TypeError), match=match):
        personamoe.persona_moe_linear(**args)


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("T", [1, 9, 40])
def test_kernel_routes_and_mixes_from_a_given_h(T, fixed):
    """``LayerArgs.h``: the kernel skips its shrink and reads the caller's h (here a strided view,
    with expert 1's activation tripled), so its outputs are those of a layer whose ``A[1]`` is
    three times larger, although the ``lora_a`` it is given is the original one."""
    from personamoe import _C
    from personamoe.backends.cpp_backend import _codes

    E, r, d_in, d_out, k = 4, 8, 37, 29, 2
    t = make(T, d_in, d_out, E, r, seed=T + 100)
    a3 = t["lora_a"].clone()
    a3[1] *= 3.0
    h_buf = torch.randn(T, E * r + 5)  # h lives in columns 2..2+E*r of a wider buffer
    h = h_buf[:, 2 : 2 + E * r]
    h.copy_(reference.shrink(t["x"], a3).reshape(T, E * r))
    opts = {}
    table = None
    ids = torch.randint(-1, 3, (T,), dtype=torch.int64)
    if fixed:
        table = torch.rand(3, E)
        opts = dict(persona_weights=table, persona_ids=ids)
    ref = reference.persona_moe_linear_full(
        t["x"], t["weight"], t["bias"], a3, t["lora_b"], t["scaling"], top_k=k, **opts
    )
    y = torch.nn.functional.linear(t["x"], t["weight"], t["bias"])  # the base, as a caller gives it
    idx = torch.empty(T, k, dtype=torch.int32)
    gates = torch.empty(T, k)
    n = torch.empty(T, E)
    codes = _codes()
    _C.layer_forward(
        T=T, d_in=d_in, d_out=d_out, E=E, r=r, k=k, dtype=codes.dtype[torch.float32],
        x=t["x"].data_ptr(), x_stride=d_in, lora_a=t["lora_a"].data_ptr(),
        lora_b=t["lora_b"].data_ptr(), scaling=t["scaling"].data_ptr(),
        table=table.data_ptr() if fixed else 0, P=3 if fixed else 0,
        persona_ids=ids.data_ptr() if fixed else 0, ids_dtype=codes.dtype[torch.int64],
        mode=codes.fixed if fixed else codes.token, normalize=codes.normalize["topk"],
        y=y.data_ptr(), y_stride=d_out, h=h.data_ptr(), h_stride=h.stride(0),
        topk_idx=idx.data_ptr(), topk_gates=gates.data_ptr(), scores=n.data_ptr(), num_threads=2,
    )  # fmt: skip
    before = h_buf.clone()
    check((y, idx, gates, n), ref, torch.float32, 1e-4, 1e-4, k, fixed=fixed)
    assert torch.equal(h_buf, before)  # the caller's h is read, never written


def test_fp32_prefill_takes_the_onednn_gemms_and_bf16_does_not(monkeypatch):
    """Above the in-kernel base the fp32 layer's base and shrink are oneDNN GEMMs (on the plain
    weight: no prepacked copy), and the kernel routes and mixes from that h; bf16 keeps F.linear
    and the kernel's fp32-accumulated shrink. The seam: count the calls into the oneDNN linear."""
    from personamoe.backends import cpp_backend

    if cpp_backend._onednn_linear() is None:
        pytest.skip("this torch has no oneDNN linear")  # a property of the torch build
    calls: list[tuple[int, ...]] = []
    real = cpp_backend._onednn_linear()

    def counting(x, w, b):
        calls.append(tuple(w.shape))
        return real(x, w, b)

    monkeypatch.setattr(cpp_backend, "_onednn_linear", lambda: counting)
    mid = cpp_backend.BASE_IN_KERNEL_MAX_TOKENS + 1  # base in oneDNN, shrink in the kernel
    big = cpp_backend.SHRINK_GEMM_MIN_TOKENS  # both in oneDNN
    for T, dtype, tol, want in [(mid, torch.float32, 1e-4, [(29, 37)]),
                                (big, torch.float32, 1e-4, [(29, 37), (4 * 8, 37)]),
                                (big, torch.bfloat16, 1e-1, [])]:  # fmt: skip
        calls.clear()
        t = make(T, 37, 29, 4, 8, dtype, seed=3)
        check(*run_both(t, top_k=2), dtype, tol, tol, 2)
        assert calls == want
    calls.clear()
    t = make(cpp_backend.BASE_IN_KERNEL_MAX_TOKENS, 37, 29, 4, 8, seed=4)
    check(*run_both(t, top_k=2), torch.float32, 1e-4, 1e-4, 2)
    assert calls == []  # few tokens: the kernel computes the base and the shrink itself
