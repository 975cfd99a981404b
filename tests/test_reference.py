"""The reference against small cases computed by hand, and the special cases of docs/design.md §1."""

from __future__ import annotations

import math

import pytest
import torch

from personamoe import reference as R

INF = float("inf")


def _bank_from_h(h_rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """x [1, d] and A [E, 1, d] such that h[0, e, 0] = h_rows[0][e] (one token, rank 1)."""
    E = len(h_rows[0])
    x = torch.ones(1, E, dtype=torch.float64)
    a = torch.diag(torch.tensor(h_rows[0], dtype=torch.float64)).reshape(E, 1, E)
    return x, a


def test_scores_norm_calibration_bias_by_hand():
    h = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]])  # norms 5, 1, 2
    n = R.scores(h)
    assert n.tolist() == [[5.0, 1.0, 2.0]]
    n = R.scores(h, calibration=torch.tensor([5.0, 0.5, 1.0]))
    assert n.tolist() == [[1.0, 2.0, 2.0]]
    table = torch.tensor([[0.0, 10.0, -INF], [1.0, 1.0, 1.0]])
    n = R.scores(h, persona_bias=table, persona_ids=torch.tensor([0]))
    assert n.tolist() == [[5.0, 11.0, -INF]]
    n = R.scores(h, persona_bias=table, persona_ids=torch.tensor([1]))
    assert n.tolist() == [[6.0, 2.0, 3.0]]
    # -1 (and any id outside the table) is "no persona": no bias, no out-of-range read.
    for pid in (-1, 2, 99):
        assert R.scores(h, persona_bias=table, persona_ids=torch.tensor([pid])).tolist() == [
            [5.0, 1.0, 2.0]
        ]


def test_route_topk_softmax_and_temperature_by_hand():
    n = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    idx, g = R.route(n, top_k=2)
    assert idx.dtype == torch.int32 and idx.tolist() == [[1, 2]]
    e = math.exp(-1.0)
    torch.testing.assert_close(g, torch.tensor([[1 / (1 + e), e / (1 + e)]]))
    idx, g = R.route(n, top_k=2, temperature=0.5)
    e = math.exp(-2.0)
    torch.testing.assert_close(g, torch.tensor([[1 / (1 + e), e / (1 + e)]]))


def test_route_full_normalisation_by_hand():
    n = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    idx, g = R.route(n, top_k=2, normalize="full")
    p = torch.softmax(n, dim=-1)
    assert idx.tolist() == [[1, 2]]
    torch.testing.assert_close(g, p[:, [1, 2]])
    assert float(g.sum()) < 1.0  # not renormalised


def test_ties_go_to_the_lower_index():
    n = torch.tensor([[2.0, 5.0, 5.0, 2.0, 5.0]])
    idx, g = R.route(n, top_k=2)
    assert idx.tolist() == [[1, 2]]
    torch.testing.assert_close(g, torch.tensor([[0.5, 0.5]]))
    idx, _ = R.route(n, top_k=4)
    assert idx.tolist() == [[1, 2, 4, 0]]


def test_fewer_allowed_than_k_fill_with_lowest_disallowed_at_gate_zero():
    n = torch.tensor([[-INF, 1.0, -INF, -INF, 0.0]])
    idx, g = R.route(n, top_k=4)
    assert idx.tolist() == [[1, 4, 0, 2]]
    e = math.exp(-1.0)
    torch.testing.assert_close(g, torch.tensor([[1 / (1 + e), e / (1 + e), 0.0, 0.0]]))
    idx, g = R.route(n, top_k=3, normalize="full")
    assert idx.tolist() == [[1, 4, 0]]
    torch.testing.assert_close(g, torch.tensor([[1 / (1 + e), e / (1 + e), 0.0]]))


def test_no_expert_allowed_gives_base_output():
    torch.manual_seed(0)
    T, d_in, d_out, E, r = 3, 6, 5, 4, 2
    x = torch.randn(T, d_in)
    w, b = torch.randn(d_out, d_in), torch.randn(d_out)
    a, bb = torch.randn(E, r, d_in), torch.randn(E, d_out, r)
    table = torch.full((1, E), -INF)
    y, idx, g = R.persona_moe_linear(
        x,
        w,
        b,
        a,
        bb,
        torch.ones(E),
        top_k=2,
        persona_bias=table,
        persona_ids=torch.zeros(T, dtype=torch.long),
        return_routing=True,
    )
    torch.testing.assert_close(y, x @ w.t() + b)
    assert idx.tolist() == [[0, 1]] * T and (g == 0).all()


def test_whole_layer_by_hand_two_experts():
    # One token, rank 1: h = [2, 1] (expert 0 wins with k=1), B scalars, scaling per expert.
    x, a = _bank_from_h([[2.0, 1.0]])
    w = torch.zeros(1, 2, dtype=torch.float64) + 0.5  # base: 0.5 * (1 + 1) = 1
    bias = torch.tensor([0.25], dtype=torch.float64)
    lb = torch.tensor([[[3.0]], [[7.0]]], dtype=torch.float64)  # B_0 = 3, B_1 = 7
    s = torch.tensor([0.5, 2.0], dtype=torch.float64)
    y = R.persona_moe_linear(x, w, bias, a, lb, s, top_k=1)
    # k=1: gate 1 on expert 0: 1 + 0.25 + 1 * 0.5 * 3 * 2 = 4.25
    assert y.item() == pytest.approx(4.25)
    y = R.persona_moe_linear(x, w, bias, a, lb, s, top_k=2)
    g0, g1 = 1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))
    assert y.item() == pytest.approx(1.25 + g0 * 0.5 * 3 * 2 + g1 * 2.0 * 7 * 1)
    # A calibration that flips the ranking: n = [2/4, 1/1].
    y = R.persona_moe_linear(
        x, w, bias, a, lb, s, top_k=1, calibration=torch.tensor([4.0, 1.0], dtype=torch.float64)
    )
    assert y.item() == pytest.approx(1.25 + 2.0 * 7 * 1)


def _rand_layer(T=7, d_in=11, d_out=9, E=5, r=3, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(7)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        x=mk(T, d_in),
        weight=mk(d_out, d_in),
        bias=mk(d_out) if bias else None,
        lora_a=mk(E, r, d_in),
        lora_b=mk(E, d_out, r),
        scaling=torch.rand(E, generator=g) + 0.5,
    )


def test_single_expert_equals_plain_lora():
    p = _rand_layer(E=1)
    y = R.persona_moe_linear(**p, top_k=1)
    x, a, b = p["x"], p["lora_a"][0], p["lora_b"][0]
    plain = x @ p["weight"].t() + p["bias"] + p["scaling"][0] * (x @ a.t() @ b.t())
    torch.testing.assert_close(y, plain)


def test_fixed_mode_equals_cat_formula_and_reports_largest_weights():
    p = _rand_layer(E=4)
    weights = torch.tensor([[0.5, 0.0, 2.0, -1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    ids = torch.tensor([0, 1, 0, 0, -1, 1, 0])
    y, idx, g = R.persona_moe_linear(
        **p, top_k=2, persona_weights=weights, persona_ids=ids, return_routing=True
    )
    s = p["scaling"].double()
    # "cat": A_cat = [A_e], B_cat = [w_e s_e B_e]; y = base + B_cat A_cat x.
    a_cat = p["lora_a"].reshape(-1, p["lora_a"].shape[-1])
    for t in range(p["x"].shape[0]):
        w = weights[ids[t]] if ids[t] >= 0 else torch.zeros(4, dtype=torch.float64)
        b_cat = torch.cat([w[e] * s[e] * p["lora_b"][e] for e in range(4)], dim=1)
        want = p["x"][t] @ p["weight"].t() + p["bias"] + b_cat @ (a_cat @ p["x"][t])
        torch.testing.assert_close(y[t], want)
    assert idx[0].tolist() == [2, 0]
    torch.testing.assert_close(g[0], torch.tensor([2.0, 0.5]))
    assert idx[1].tolist() == [0, 1] and (g[1] == 0).all()


def test_one_allowed_expert_with_k1_equals_that_adapter():
    p = _rand_layer(E=4)
    table = torch.full((4, 4), -INF, dtype=torch.float64)
    for i in range(4):
        table[i, i] = 0.0
    ids = torch.tensor([3, 0, 1, 2, 3, 0, 1])
    y = R.persona_moe_linear(**p, top_k=1, persona_bias=table, persona_ids=ids)
    x = p["x"]
    for t in range(x.shape[0]):
        e = int(ids[t])
        lora = p["scaling"][e] * (p["lora_b"][e] @ (p["lora_a"][e] @ x[t]))
        torch.testing.assert_close(y[t], x[t] @ p["weight"].t() + p["bias"] + lora)


def test_leading_dims_and_empty_input():
    p = _rand_layer(T=6, dtype=torch.float32)
    x3 = p["x"].reshape(2, 3, -1)
    y3, idx3, g3 = R.persona_moe_linear(**{**p, "x": x3}, top_k=2, return_routing=True)
    y2 = R.persona_moe_linear(**p, top_k=2)
    assert y3.shape == (2, 3, 9) and idx3.shape == (2, 3, 2) and g3.shape == (2, 3, 2)
    torch.testing.assert_close(y3.reshape(6, -1), y2)
    y0 = R.persona_moe_linear(**{**p, "x": p["x"][:0]}, top_k=2)
    assert y0.shape == (0, 9)


def test_half_inputs_accumulate_in_fp32_and_return_input_dtype():
    p = _rand_layer(dtype=torch.float32)
    half = {k: (v.half() if k != "scaling" and v is not None else v) for k, v in p.items()}
    y = R.persona_moe_linear(**half, top_k=2)
    assert y.dtype == torch.float16
    y32 = R.persona_moe_linear(
        **{k: (v.float() if v is not None and k != "scaling" else v) for k, v in half.items()},
        top_k=2,
    )
    torch.testing.assert_close(y.float(), y32, atol=1e-2, rtol=1e-2)


def test_nan_token_never_spreads():
    p = _rand_layer(dtype=torch.float32)
    p["x"][3, 2] = float("nan")
    y = R.persona_moe_linear(**p, top_k=2)
    assert torch.isnan(y[3]).any()
    assert torch.isfinite(torch.cat([y[:3], y[4:]])).all()


@pytest.mark.parametrize("normalize", ["topk", "full"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_float64(normalize, with_bias):
    p = _rand_layer(T=4, d_in=5, d_out=3, E=3, r=2)
    table = torch.tensor([[0.3, -INF, 0.0], [0.0, 0.1, 0.2]], dtype=torch.float64)
    kwargs = dict(
        top_k=2,
        normalize=normalize,
        temperature=0.7,
        calibration=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64),
    )
    if with_bias:
        kwargs.update(persona_bias=table, persona_ids=torch.tensor([0, 1, -1, 0]))

    def f(x, a, b):
        return R.persona_moe_linear(x, p["weight"], p["bias"], a, b, p["scaling"], **kwargs)

    inputs = tuple(p[k].clone().requires_grad_(True) for k in ("x", "lora_a", "lora_b"))
    assert torch.autograd.gradcheck(f, inputs)


def test_load_balancing_loss_by_hand():
    n = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    idx = torch.tensor([[0], [1]])
    loss = R.load_balancing_loss(n, idx, alpha=1.0)
    # f = [0.5, 0.5], P = mean softmax = [0.5, 0.5] -> 1 * E * (0.25 + 0.25) = 1.0, the balanced value
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert n.grad is not None and torch.isfinite(n.grad).all()
    # Unbalanced routing costs more.
    unbalanced = R.load_balancing_loss(
        torch.tensor([[2.0, 0.0], [2.0, 0.0]]), torch.tensor([[0], [0]]), alpha=1.0
    )
    assert unbalanced.item() > 1.0
