"""The op's analytic backward (personamoe/backward.py) against autograd of the reference.

Every comparison runs the op forward, takes its ``topk_idx`` and differentiates
``personamoe.reference.persona_moe_linear_full`` with that same choice of experts; the loss uses
all three differentiable outputs (``y``, ``topk_gates``, ``scores``) where asked, so the gates'
and scores' incoming gradients are checked too. All ``lora_b`` are random and non-zero.
"""

from __future__ import annotations

import pytest
import torch

import personamoe
from personamoe import reference as R
from personamoe.backward import adapter_grads
from personamoe.ops import persona_moe_linear_op

INF = float("inf")
NAMES = ("x", "weight", "bias", "lora_a", "lora_b")
# Inputs of the op in schema order that can get a gradient: x, weight, bias, lora_a, lora_b.
DIFF_POS = (0, 1, 2, 3, 4)


def _case(
    name: str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[list[object], dict[str, object]]:
    """The op's 13 arguments for a named case (random, non-zero ``lora_b``) and a description."""
    T, d_in, d_out, E, r, k = 13, 11, 9, 5, 3, 2
    tau, norm = 1.0, "topk"
    cal = pb = ids = pw = None
    if name == "k1":
        k = 1
    elif name == "kE":
        k = E
    elif name == "T1":
        T = 1
    elif name == "E1":
        E, k = 1, 1
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, w, b, a, bb = mk(T, d_in), mk(d_out, d_in), mk(d_out), mk(E, r, d_in), mk(E, d_out, r)
    s = torch.rand(E, generator=g, dtype=torch.float64) + 0.5
    ids_t = torch.randint(-1, 3, (T,), generator=g)
    ids_t[0] = -1  # at least one token without a persona
    if name == "full_tau":
        norm, tau = "full", 0.7
    elif name == "topk_tau":
        tau = 1.9
    elif name == "calibration":
        cal = torch.rand(E, generator=g, dtype=torch.float64) + 0.3
    elif name == "persona_bias":
        pb = torch.randn(3, E, generator=g, dtype=torch.float64)
        pb[0, 1] = -INF
        pb[1, :3] = -INF  # persona 1 allows E - 3 experts: with k = 3 one slot is padded
        pb[2, :] = -INF  # persona 2 allows nothing: gates all 0
        ids, k = ids_t, 3
    elif name == "full_bias_cal":
        norm, tau, k = "full", 0.6, 3
        cal = torch.rand(E, generator=g, dtype=torch.float64) + 0.3
        pb = torch.randn(3, E, generator=g, dtype=torch.float64)
        pb[1, 2] = -INF
        pb[2, :] = -INF
        ids = ids_t
    elif name == "fixed":
        pw = torch.rand(3, E, generator=g, dtype=torch.float64)
        pw[0, 2] = 0.0  # a zero weight: that expert is not used by persona 0
        pw[1, :] = torch.tensor([0.0, 1.5, 0.0, -0.5, 0.0])
        ids = ids_t
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    args = [
        cast(x),
        cast(w),
        cast(b),
        cast(a),
        cast(bb),
        s.float() if dtype != torch.float64 else s,
    ]
    args += [k, tau, norm, cal, pb, ids, pw]
    return args, {"T": T, "E": E, "k": min(k, E)}


CASES = [
    "topk",
    "topk_tau",
    "full_tau",
    "calibration",
    "persona_bias",
    "full_bias_cal",
    "fixed",
    "k1",
    "kE",
    "T1",
    "E1",
]
DTYPES = [
    pytest.param(torch.float64, 1e-9, 1e-9, id="fp64"),
    pytest.param(torch.float32, 2e-5, 2e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2e-2, 2e-2, id="bf16"),
]


def _loss_weights(T: int, E: int, k: int, d_out: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 + seed)
    return (
        torch.randn(T, d_out, generator=g),
        torch.randn(T, k, generator=g),
        torch.randn(T, E, generator=g),
    )


def _grads_both(
    args: list[object],
    wants: tuple[int, ...],
    *,
    use_gates: bool,
    use_scores: bool,
    seed: int = 0,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor]:
    """Gradients of the same loss through the op and through autograd of the reference."""
    tensors = [t.clone() for t in args[:5]]  # type: ignore[union-attr]
    for i in wants:
        tensors[i].requires_grad_(True)
    rest = args[5:]
    y, idx, gates, n = persona_moe_linear_op(*tensors, *rest)
    T, d_out = y.shape
    gy, gg, gs = _loss_weights(T, n.shape[1], idx.shape[1], d_out, seed)

    def loss(y: torch.Tensor, gates: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        out = (gy.to(y.dtype) * y).float().sum()
        if use_gates:
            out = out + (gg * gates).sum()
        if use_scores:
            finite = torch.isfinite(n)  # -inf scores of forbidden experts stay out of the loss
            out = out + (gs * torch.where(finite, n, torch.zeros_like(n))).sum()
        return out

    got = torch.autograd.grad(loss(y, gates, n), [tensors[i] for i in wants])
    ref = [t.detach().clone() for t in tensors]
    for i in wants:
        ref[i].requires_grad_(True)
    (s, k, tau, norm, cal, pb, ids, pw) = rest
    yr, idx_r, gates_r, n_r = R.persona_moe_linear_full(
        *ref,
        s,
        top_k=k,
        temperature=tau,
        normalize=norm,
        calibration=cal,
        persona_bias=pb,
        persona_ids=ids,
        persona_weights=pw,
        topk_idx=idx,
    )  # type: ignore[arg-type]
    assert torch.equal(idx_r, idx)
    want = torch.autograd.grad(loss(yr, gates_r, n_r), [ref[i] for i in wants], allow_unused=True)
    want = tuple(
        torch.zeros_like(ref[i]) if w is None else w for i, w in zip(wants, want, strict=True)
    )
    return tuple(got), want, idx


def _assert_grads_close(got, want, atol, rtol, dtype):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == dtype
        assert g.shape == w.shape
        scale = max(w.detach().abs().float().max().item(), 1.0) if w.numel() else 1.0
        torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_autograd(case, dtype, atol, rtol):
    args, _ = _case(case, dtype)
    with personamoe.use_backend("reference"):
        got, want, _ = _grads_both(args, DIFF_POS, use_gates=True, use_scores=True)
    _assert_grads_close(got, want, atol, rtol, dtype)
    # Guard against a vacuous comparison: the adapter grads are non-zero.
    assert got[3].abs().max() > 0 and got[4].abs().max() > 0


@pytest.mark.parametrize("case", ["topk", "full_bias_cal", "fixed", "kE"])
def test_matches_reference_autograd_cpp_backend(case):
    args, _ = _case(case, torch.float32, seed=1)
    with personamoe.use_backend("cpp"):
        got, want, _ = _grads_both(args, DIFF_POS, use_gates=True, use_scores=True, seed=1)
    _assert_grads_close(got, want, 1e-4, 1e-4, torch.float32)


@pytest.mark.parametrize(
    "wants", [(0,), (3,), (4,), (0, 4), (3, 4), (1, 2), (0, 1, 3)], ids=lambda w: str(w)
)
@pytest.mark.parametrize("use_gates, use_scores", [(False, False), (True, False), (False, True)])
def test_subsets_of_grads_and_incoming_grads(wants, use_gates, use_scores):
    args, _ = _case("full_bias_cal", torch.float64, seed=2)
    with personamoe.use_backend("reference"):
        got, want, _ = _grads_both(args, wants, use_gates=use_gates, use_scores=use_scores, seed=2)
    _assert_grads_close(got, want, 1e-9, 1e-9, torch.float64)


def test_gates_and_scores_gradients_reach_the_inputs():
    """The loss on gates and scores alone (no y term) still gives the reference's grads."""
    args, _ = _case("calibration", torch.float64, seed=3)
    tensors = [t.clone().requires_grad_(True) for t in args[:5]]  # type: ignore[union-attr]
    _, idx, gates, n = persona_moe_linear_op(*tensors, *args[5:])
    gg = torch.randn_like(gates)
    got = torch.autograd.grad((gg * gates).sum() + n.pow(2).sum(), [tensors[0], tensors[3]])
    ref = [t.detach().clone().requires_grad_(True) for t in args[:5]]
    (s, k, tau, norm, cal) = args[5:10]
    _, _, gr, nr = R.persona_moe_linear_full(
        *ref, s, top_k=k, temperature=tau, normalize=norm, calibration=cal, topk_idx=idx
    )  # type: ignore[arg-type]
    want = torch.autograd.grad((gg * gr).sum() + nr.pow(2).sum(), [ref[0], ref[3]])
    for g, w in zip(got, want, strict=True):
        assert w.abs().max() > 1e-3
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("T", [0, 1, 17])
def test_token_counts(T):
    args, _ = _case("topk", torch.float32, seed=4)
    g = torch.Generator().manual_seed(T)
    args[0] = torch.randn(T, args[0].shape[1], generator=g)  # type: ignore[union-attr]
    with personamoe.use_backend("reference"):
        got, want, _ = _grads_both(args, DIFF_POS, use_gates=True, use_scores=True)
    _assert_grads_close(got, want, 1e-5, 1e-5, torch.float32)


def test_zero_norm_gets_the_norm_backwards_zero_gradient():
    """A token with x = 0 and an expert with A = 0 have ``||h|| = 0``: torch's norm backward
    gives 0 there, not NaN; with k = E the zero expert is used (its B still gets no grad, its A
    does through the mix)."""
    args, _ = _case("kE", torch.float64, seed=5)
    args[0][3] = 0.0  # type: ignore[index]
    args[3][2] = 0.0  # type: ignore[index]
    got, want, _ = _grads_both(args, DIFF_POS, use_gates=True, use_scores=True, seed=5)
    for g in got:
        assert torch.isfinite(g).all()
    _assert_grads_close(got, want, 1e-10, 1e-10, torch.float64)
    assert got[3][2].abs().max() > 0  # the zero expert's A is still trained through the mix


@pytest.mark.parametrize("bad", [INF, float("nan")])
def test_non_finite_lora_b_matches_reference(bad):
    """An expert whose B holds inf/NaN: tokens that use it get NaN rows and send no gradient;
    tokens whose persona forbids it are untouched; B's non-finite entry gets gradient 0."""
    args, _ = _case("persona_bias", torch.float64, seed=6)
    pb = args[10].clone()  # type: ignore[union-attr]
    pb[0, :] = 0.0
    pb[0, 4] = -INF  # persona 0 forbids expert 4
    args[10] = pb
    args[6] = 4  # k = 4 of 5: persona-less tokens use expert 4 unless it ranks last
    lb = args[4].clone()  # type: ignore[union-attr]
    lb[4, 1, 0] = bad
    args[4] = lb
    got, want, _ = _grads_both(args, DIFF_POS, use_gates=True, use_scores=False, seed=6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, equal_nan=True)
    gx, _, _, ga, gb = got
    assert gb[4, 1, 0] == 0 and torch.isfinite(gb).all() and torch.isfinite(ga).all()
    assert torch.isfinite(gx).all()
    y = persona_moe_linear_op(*args)[0]
    assert torch.isnan(y).any() and not torch.isnan(y).all()  # the case does use expert 4


def test_unused_expert_with_infinite_h_makes_no_nan():
    """Fixed mode with a zero weight for an expert whose A overflows h: that expert touches no
    token (0 * inf would be NaN), in the grads as in the output."""
    args, _ = _case("fixed", torch.float32, seed=7)
    pw = args[12].clone()  # type: ignore[union-attr]
    pw[:, 0] = 0.0
    args[12] = pw
    a = args[3].clone()  # type: ignore[union-attr]
    a[0] = 1e38
    args[3] = a
    got, want, _ = _grads_both(args, (0, 4), use_gates=False, use_scores=False, seed=7)
    # x's grad goes through A (1e38) in the reference too; B's must be finite and equal.
    assert torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[1], want[1], equal_nan=True)
    torch.testing.assert_close(got[0], want[0], equal_nan=True)


@pytest.mark.parametrize("case", ["fixed", "topk"])
def test_nan_in_one_tokens_incoming_grad_stays_local(case):
    """NaN in one token's dy spoils the grads of what that token touches, as in the reference:
    the A of experts it does not use stays finite (unused terms are left out, not * 0). B's grad
    is one dense GEMM over tokens in the reference too, so it is only compared."""
    args, info = _case(case, torch.float64, seed=10)
    tensors = [t.clone().requires_grad_(True) for t in args[:5]]  # type: ignore[union-attr]
    y, idx, _, _ = persona_moe_linear_op(*tensors, *args[5:])
    gy = torch.randn_like(y)
    gy[0, 0] = float("nan")
    got = torch.autograd.grad(y, tensors, gy)
    ref = [t.detach().clone().requires_grad_(True) for t in args[:5]]
    (s, k, tau, norm, cal, pb, ids, pw) = args[5:]
    yr = R.persona_moe_linear_full(
        *ref, s, top_k=k, temperature=tau, normalize=norm, calibration=cal,
        persona_bias=pb, persona_ids=ids, persona_weights=pw, topk_idx=idx,
    )[0]  # type: ignore[arg-type]  # fmt: skip
    want = torch.autograd.grad(yr, ref, gy)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, equal_nan=True)
    used0 = (
        set(idx[0].tolist())
        if pw is None
        else set(torch.nonzero(pw[ids[0]]).flatten().tolist())
        if ids[0] >= 0
        else set()
    )  # type: ignore[index]
    unused0 = [e for e in range(info["E"]) if e not in used0]
    assert unused0, "the case must leave some expert unused by token 0"
    assert torch.isfinite(got[3][unused0]).all()
    assert not torch.isfinite(got[3]).all() or not used0
    assert torch.isnan(got[0][0]).any()


@pytest.mark.parametrize("case", ["persona_bias", "full_bias_cal"])
@pytest.mark.parametrize("where", ["grad_y", "grad_gates"])
def test_nan_incoming_grad_does_not_reach_forbidden_experts(case, where):
    """A NaN incoming gradient on a token whose persona forbids some experts: the softmax's
    backward leaves the forbidden ones at exactly 0, as the reference's ``where`` does."""
    args, _ = _case(case, torch.float64, seed=12)
    ids = args[11]
    t = int(torch.nonzero(ids == 1)[0])  # type: ignore[operator]
    tensors = [a.clone().requires_grad_(True) for a in args[:5]]  # type: ignore[union-attr]
    y, idx, gates, _ = persona_moe_linear_op(*tensors, *args[5:])
    gy, gg = torch.randn_like(y), torch.randn_like(gates)
    (gy if where == "grad_y" else gg)[t, 0] = float("nan")
    got = torch.autograd.grad([y, gates], tensors, [gy, gg])
    ref = [a.detach().clone().requires_grad_(True) for a in args[:5]]
    (s, k, tau, norm, cal, pb, ids, pw) = args[5:]
    yr, _, gr, _ = R.persona_moe_linear_full(
        *ref, s, top_k=k, temperature=tau, normalize=norm, calibration=cal,
        persona_bias=pb, persona_ids=ids, persona_weights=pw, topk_idx=idx,
    )  # type: ignore[arg-type]  # fmt: skip
    want = torch.autograd.grad([yr, gr], ref, [gy, gg])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, equal_nan=True)
    forbidden = torch.isneginf(pb[1])  # type: ignore[index]
    assert torch.isfinite(got[3][forbidden]).all()
    assert torch.isnan(got[3]).any()  # the NaN did reach the experts token t uses


@pytest.mark.parametrize("case", ["persona_bias", "fixed"])
def test_exact_non_finite_path_on_finite_b(monkeypatch, case):
    """The masking passes that GPUs and compiled graphs always run (CPU skips them when B is
    finite) give the same grads on finite B."""
    import personamoe.backward as bw

    calls = []
    monkeypatch.setattr(bw, "_all_finite", lambda t: calls.append(1) or False)
    args, _ = _case(case, torch.float64, seed=11)
    got, want, _ = _grads_both(args, DIFF_POS, use_gates=True, use_scores=True, seed=11)
    assert calls
    _assert_grads_close(got, want, 1e-10, 1e-10, torch.float64)


def test_no_replay_of_the_reference(monkeypatch):
    """The backward builds no graph: the reference forward is not called during backward."""
    args, _ = _case("full_bias_cal", torch.float32)
    tensors = [t.clone().requires_grad_(True) for t in args[:5]]  # type: ignore[union-attr]
    with personamoe.use_backend("cpp"):
        y, _, gates, _ = persona_moe_linear_op(*tensors, *args[5:])

    def boom(*a, **k):
        raise AssertionError("the backward replayed the reference")

    for name in ("persona_moe_linear_full", "gates_for", "expand", "_mix", "shrink", "scores"):
        monkeypatch.setattr(R, name, boom)
    grads = torch.autograd.grad(y.sum() + gates.sum(), tensors)
    assert all(torch.isfinite(g).all() for g in grads)


def test_adapter_grads_dtypes_and_needs():
    args, _ = _case("topk", torch.bfloat16, seed=8)
    x, _, _, a, bb, s = args[:6]
    idx = persona_moe_linear_op(*args)[1]
    gy = torch.randn(x.shape[0], bb.shape[1], dtype=torch.bfloat16)  # type: ignore[union-attr]
    dx, da, db = adapter_grads(x, a, bb, s, idx, gy)  # type: ignore[arg-type]
    assert dx is not None and da is not None and db is not None
    assert dx.dtype == torch.float32  # the caller adds dy W, then casts once
    assert da.dtype == db.dtype == torch.bfloat16
    none_x, none_a, only_b = adapter_grads(x, a, bb, s, idx, gy, need_x=False, need_a=False)  # type: ignore[arg-type]
    assert none_x is None and none_a is None and torch.equal(only_b, db)


CHECK_CASES = ["topk_tau", "full_bias_cal", "calibration", "fixed", "kE"]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("case", CHECK_CASES)
def test_gradcheck_float64_through_the_op(backend, case):
    args, _ = _case(case, torch.float64, seed=9)
    args[0] = args[0][:6]  # type: ignore[index]
    if args[11] is not None:
        args[11] = args[11][:6]  # type: ignore[index]
    rest = args[5:]
    inputs = tuple(t.clone().requires_grad_(True) for t in args[:5])  # type: ignore[union-attr]

    def f(x, w, b, a, bb):
        # y only: the op returns topk_gates and scores in fp32 (docs/design.md §1.5), too coarse
        # for finite differences; their gradients are compared with autograd in fp64 above.
        return torch.ops.personamoe.persona_moe_linear(x, w, b, a, bb, *rest)[0]

    with personamoe.use_backend(backend):
        assert torch.autograd.gradcheck(f, inputs)
