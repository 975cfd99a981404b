"""``personamoe.persona_moe_mix_``: the mixture alone, added in place into a base output computed
elsewhere (vLLM's GEMM, one part of a fused projection, an all-reduced row-parallel output).

Every backend that runs on CPU here (reference, cpp, triton under the interpreter) against the
whole layer of ``personamoe.reference`` with the same base: random inputs, ``y`` a column slice of
a wider fused output (rows apart, unit inner stride) whose other columns must stay bitwise as they
were, T = 1 / prime / above the oneDNN-shrink threshold, every routing option, dtypes with their
tolerances; bad ``y`` raises naming it; the op passes ``opcheck`` and traces under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import personamoe
from personamoe import reference
from personamoe.backends import available_backends, use_backend
from personamoe.backends.cpp_backend import SHRINK_GEMM_MIN_TOKENS
from personamoe.mix_op import persona_moe_mix_op
from tests.conftest import DTYPE_TOLS

BACKENDS = ["reference", "cpp"] + (
    ["triton"]
    if os.environ.get("TRITON_INTERPRET") == "1" and available_backends()["triton"] == "available"
    else []
)


def make(T, d_in, d_out, E, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    return dict(
        x=rnd(T, d_in),
        weight=rnd(d_out, d_in, std=1 / math.sqrt(d_in)),
        bias=rnd(d_out, std=0.5),
        lora_a=rnd(E, r, d_in, std=1 / math.sqrt(d_in)),
        lora_b=rnd(E, d_out, r, std=1 / math.sqrt(r)),
        scaling=torch.rand(E, generator=g) + 0.5,
    )


def fused_output(t, pad_before=5, pad_after=3):
    """The base output as one part of a wider fused output: columns [pad_before, +d_out)."""
    T, d_out = t["x"].shape[0], t["weight"].shape[0]
    full = torch.randn(T, pad_before + d_out + pad_after).to(t["x"].dtype)
    part = full[:, pad_before : pad_before + d_out]
    part.copy_(torch.nn.functional.linear(t["x"], t["weight"], t["bias"]))
    return full, part


def run(backend, t, part, **opts):
    k = opts.pop("top_k")
    with use_backend(backend):
        return personamoe.persona_moe_mix_(
            t["x"], part, t["lora_a"], t["lora_b"], t["scaling"], top_k=k, **opts
        )


def expected(t, part_before, k, **opts):
    """The reference's whole layer with the given base: adapter term + the same base values."""
    term, idx, gates, n = reference.persona_moe_linear_full(
        t["x"], t["weight"], None, t["lora_a"], t["lora_b"], t["scaling"], top_k=k,
        base=False, **opts,
    )  # fmt: skip
    return (part_before.float() + term.float()), idx, gates, n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("T", [1, 37, SHRINK_GEMM_MIN_TOKENS + 3])
def test_mix_into_a_fused_output_part_matches_the_reference(backend, dtype, atol, rtol, T):
    if backend == "triton" and (dtype == torch.bfloat16 or T > 64):
        pytest.skip("the Triton interpreter: no bf16 dots; large T too slow")  # see conftest
    t = make(T, 29, 23, 5, 4, dtype, seed=T)
    full, part = fused_output(t)
    before = full.clone()
    idx, gates, n = run(backend, t, part, top_k=2)
    y_ref, i_ref, g_ref, n_ref = expected(t, before[:, 5:28], 2)
    torch.testing.assert_close(part.float(), y_ref, atol=atol, rtol=rtol)
    assert torch.equal(full[:, :5], before[:, :5]) and torch.equal(full[:, 28:], before[:, 28:])
    assert idx.dtype == torch.int32 and torch.equal(idx, i_ref)
    torch.testing.assert_close(gates, g_ref.float(), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(n, n_ref.float(), atol=1e-4, rtol=1e-3)


OPTIONS = [
    dict(normalize="full", temperature=0.6, calibration="rand"),
    dict(persona_bias="rand", persona_ids="valid"),
    dict(persona_weights="rand", persona_ids="valid"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o))
def test_mix_routing_options(backend, opts):
    T, E = 11, 6
    t = make(T, 31, 17, E, 8, torch.float32, seed=4)
    g = torch.Generator().manual_seed(9)
    o = dict(opts)
    if o.get("calibration") == "rand":
        o["calibration"] = torch.rand(E, generator=g) + 0.5
    if o.get("persona_bias") == "rand":
        pb = torch.randn(3, E, generator=g)
        pb[1, 2:] = float("-inf")
        o["persona_bias"] = pb
    if o.get("persona_weights") == "rand":
        o["persona_weights"] = torch.rand(3, E, generator=g)
    if o.get("persona_ids") == "valid":
        o["persona_ids"] = torch.randint(-1, 3, (T,), generator=g)
    full, part = fused_output(t)
    before = full.clone()
    idx, gates, n = run(backend, t, part, top_k=2, **o)
    y_ref, i_ref, g_ref, n_ref = expected(t, before[:, 5:22], 2, **o)
    torch.testing.assert_close(part, y_ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(idx, i_ref)
    torch.testing.assert_close(gates, g_ref.float(), atol=1e-5, rtol=1e-4)
    fin = torch.isfinite(n_ref)
    torch.testing.assert_close(n[fin], n_ref.float()[fin], atol=1e-5, rtol=1e-4)
    assert torch.equal(torch.isneginf(n), torch.isneginf(n_ref))


@pytest.mark.parametrize(
    "make_y, match",
    [
        (lambda x: torch.zeros(x.shape[0] + 1, 23), r"y: expected 2 dims \[T=7, d_out\]"),
        (lambda x: torch.zeros(7, 23, dtype=torch.float64), r"y: expected dtype torch.float32"),
        (lambda x: torch.zeros(23, 7).t(), r"y: expected unit stride along d_out"),
        (lambda x: torch.zeros(7, 22), r"lora_b: expected shape \[E, d_out, r\] = \[5, 22, 4\]"),
    ],
)
def test_bad_y_raises_naming_it(make_y, match):
    t = make(7, 29, 23, 5, 4, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        personamoe.persona_moe_mix_(
            t["x"], make_y(t["x"]), t["lora_a"], t["lora_b"], t["scaling"], top_k=2
        )
    with pytest.raises((ValueError, TypeError), match=match):  # the raw op checks structure too
        persona_moe_mix_op(t["x"], make_y(t["x"]), t["lora_a"], t["lora_b"], t["scaling"], 2,
                           1.0, "topk", None, None, None, None)  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_opcheck_and_compile(backend):
    t = make(6, 20, 12, 4, 4, torch.float32, seed=2)
    y0 = torch.nn.functional.linear(t["x"], t["weight"], t["bias"])
    args = (t["x"], y0.clone(), t["lora_a"], t["lora_b"], t["scaling"], 2, 1.0, "topk",
            None, None, None, None)  # fmt: skip
    with use_backend(backend):
        torch.library.opcheck(persona_moe_mix_op, args)

        def f(x, y):
            personamoe.persona_moe_mix_(x, y, t["lora_a"], t["lora_b"], t["scaling"], top_k=2)
            return y * 2

        eager = f(t["x"], y0.clone())
        compiled = torch.compile(f, fullgraph=True)(t["x"], y0.clone())
    torch.testing.assert_close(compiled, eager)
    assert not torch.allclose(eager, y0 * 2, atol=1e-3), "the mixture must change y"


# -- a shrink the caller computed (h) -----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 13, SHRINK_GEMM_MIN_TOKENS + 3])
@pytest.mark.parametrize("opts", [{}, *OPTIONS], ids=lambda o: "-".join(o) or "plain")
def test_mix_from_a_given_h_ranks_and_mixes_from_it(backend, T, opts):
    """``h`` given: the op ranks and mixes from it, not from ``A x``. The given ``h`` is ``A x``
    plus a perturbation large enough to change the routing, so a backend that recomputed the
    shrink (or read ``lora_a``) would fail."""
    if backend == "triton" and T > 64:
        pytest.skip("the Triton interpreter: large T too slow")
    E, r = 6, 4
    t = make(T, 31, 17, E, r, torch.float32, seed=7)
    g = torch.Generator().manual_seed(11)
    o = dict(opts)
    if o.get("calibration") == "rand":
        o["calibration"] = torch.rand(E, generator=g) + 0.5
    if o.get("persona_bias") == "rand":
        o["persona_bias"] = torch.randn(3, E, generator=g)
    if o.get("persona_weights") == "rand":
        o["persona_weights"] = torch.rand(3, E, generator=g)
    if o.get("persona_ids") == "valid":
        o["persona_ids"] = torch.randint(0, 3, (T,), generator=g)  # T=1: a used row
    h = reference.shrink(t["x"], t["lora_a"]) + torch.randn(T, E, r, generator=g)
    # A strided h: every token's (E, r) block dense, rows apart (a slice of a wider buffer).
    wide = torch.randn(T, E * r + 5, generator=g)
    wide[:, : E * r] = h.reshape(T, E * r)
    h_given = wide[:, : E * r]
    h_before = h_given.clone()
    full, part = fused_output(t)
    before = full.clone()
    idx, gates, _n = run(backend, t, part, top_k=2, h=h_given, **o)
    term, i_ref, g_ref, _n_ref = reference.persona_moe_linear_full(
        t["x"], t["weight"], None, t["lora_a"], t["lora_b"], t["scaling"], top_k=2,
        base=False, h=h, **o,
    )  # fmt: skip
    torch.testing.assert_close(part, before[:, 5:22] + term, atol=1e-4, rtol=1e-4)
    assert torch.equal(idx, i_ref)
    torch.testing.assert_close(gates, g_ref.float(), atol=1e-5, rtol=1e-4)
    assert torch.equal(h_given, h_before), "the op must never write h"
    # Not the shrink of x: the perturbed h routes (or mixes) differently.
    term_x, _i_x, _, _ = reference.persona_moe_linear_full(
        t["x"], t["weight"], None, t["lora_a"], t["lora_b"], t["scaling"], top_k=2,
        base=False, **o,
    )  # fmt: skip
    assert not torch.allclose(term, term_x, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_parallel_ranks_sum_to_the_unsharded_layer(backend):
    """Two ranks of a row-parallel layer: each holds A by input columns and B by rank columns,
    all-reduces h, and passes the whole h with its B shard zero-padded to the full rank. The sum
    of the ranks' partial outputs equals the unsharded layer, routing included."""
    T, d_in, d_out, E, r = 9, 30, 14, 5, 6
    t = make(T, d_in, d_out, E, r, torch.float32, seed=3)
    k = 2
    cols = [slice(0, 15), slice(15, 30)]
    rcols = [slice(0, 3), slice(3, 6)]
    h = sum(reference.shrink(t["x"][:, c], t["lora_a"][:, :, c]) for c in cols)  # the all-reduce
    total = torch.zeros(T, d_out)
    for c, rc in zip(cols, rcols, strict=True):
        y = torch.nn.functional.linear(t["x"][:, c], t["weight"][:, c])
        b_pad = torch.zeros_like(t["lora_b"])
        b_pad[:, :, rc] = t["lora_b"][:, :, rc]
        with use_backend(backend):
            personamoe.persona_moe_mix_(
                t["x"][:, c], y, t["lora_a"][:, :, c], b_pad, t["scaling"], top_k=k, h=h
            )
        total += y
    want = reference.persona_moe_linear(
        t["x"], t["weight"], None, t["lora_a"], t["lora_b"], t["scaling"], top_k=k
    )
    torch.testing.assert_close(total, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "make_h, match",
    [
        (lambda: torch.zeros(7, 5, 3), r"h: expected shape \[T=7, E=5, r=4\] or \[T, E\*r=20\]"),
        (lambda: torch.zeros(7, 20, dtype=torch.float64), r"h: expected dtype torch.float32"),
        (lambda: torch.zeros(7, 20, dtype=torch.bfloat16), r"h: expected dtype torch.float32"),
        (lambda: [[0.0] * 20] * 7, r"h: expected a torch.Tensor or None, got list"),
    ],
)
def test_bad_h_raises_naming_it(make_h, match):
    t = make(7, 29, 23, 5, 4, torch.float32)
    y = torch.zeros(7, 23)
    with pytest.raises((ValueError, TypeError), match=match):
        personamoe.persona_moe_mix_(
            t["x"], y, t["lora_a"], t["lora_b"], t["scaling"], top_k=2, h=make_h()
        )
    if isinstance(make_h(), torch.Tensor):  # the raw op too (the dispatcher refuses non-tensors)
        with pytest.raises(ValueError, match=match):
            persona_moe_mix_op(t["x"], y, t["lora_a"], t["lora_b"], t["scaling"], 2, 1.0, "topk",
                               None, None, None, None, make_h())  # fmt: skip


def test_opcheck_with_h():
    t = make(6, 20, 12, 4, 4, torch.float32, seed=2)
    y0 = torch.nn.functional.linear(t["x"], t["weight"], t["bias"])
    h = reference.shrink(t["x"], t["lora_a"]).reshape(6, 16) + 0.1
    args = (t["x"], y0.clone(), t["lora_a"], t["lora_b"], t["scaling"], 2, 1.0, "topk",
            None, None, None, None, h)  # fmt: skip
    with use_backend("cpp"):
        torch.library.opcheck(persona_moe_mix_op, args)
