"""NaN and inf stay in their token, on every backend (docs/design.md §1).

The contract: a NaN score ranks last (below ``-inf``), so an expert whose ``A`` holds NaN is chosen
only when nothing else is left; an expert that a token does not use never touches that token's
output, whatever its ``A`` or ``B`` hold; a token whose input is NaN gets a NaN row, alone.
"""

from __future__ import annotations

import pytest
import torch

from personamoe.backends import available_backends, use_backend
from personamoe.layer_args import LayerArgs
from personamoe.ops import persona_moe_linear_scores

# Triton runs on CPU tensors only in its interpreter (tests/conftest.py sets it without a GPU).
BACKENDS = [b for b in ("reference", "cpp", "triton") if available_backends()[b] == "available"]


def _case(T=7, d_in=12, d_out=10, E=5, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(T, d_in, generator=g),
        weight=torch.randn(d_out, d_in, generator=g),
        bias=torch.randn(d_out, generator=g),
        lora_a=torch.randn(E, r, d_in, generator=g),
        lora_b=torch.randn(E, d_out, r, generator=g),
        scaling=torch.rand(E, generator=g) + 0.5,
    )


def _run(backend, c, top_k=2, pb=None, ids=None, pw=None):
    args = LayerArgs(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], top_k,
                     1.0, "topk", None, pb, ids, pw)  # fmt: skip
    with use_backend(backend):
        return persona_moe_linear_scores(args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_expert_ranks_last_and_is_never_chosen(backend):
    c = _case()
    c["lora_a"][1, 0, 3] = float("nan")  # every token's score for expert 1 is NaN
    y, idx, gates, n = _run(backend, c)
    assert torch.isnan(n[:, 1]).all()
    assert not (idx == 1).any(), idx
    assert torch.isfinite(y).all() and torch.isfinite(gates).all()
    # The same choice as if expert 1 scored -inf.
    c_inf = {k: v.clone() for k, v in c.items()}
    c_inf["lora_a"][1] = 0.0
    pb = torch.zeros(1, 5)
    pb[0, 1] = float("-inf")
    y2, idx2, _, _ = _run("reference", c_inf, pb=pb, ids=torch.zeros(7, dtype=torch.long))
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(y, y2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_fills_only_when_nothing_else_is_left(backend):
    c = _case(E=3)
    c["lora_a"][0, 0, 0] = float("nan")
    pb = torch.tensor([[0.0, float("-inf"), 0.0]])
    _, idx, _, _ = _run(backend, c, top_k=3, pb=pb, ids=torch.zeros(7, dtype=torch.long))
    assert idx.tolist() == [[2, 1, 0]] * 7  # allowed, then -inf, then NaN


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["lora_a", "lora_b"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_forbidden_expert_with_non_finite_weights_touches_no_token(backend, where, value):
    c = _case()
    ref = _run("reference", {k: v.clone() for k, v in c.items()},
               pb=_forbid(3), ids=torch.zeros(7, dtype=torch.long))  # fmt: skip
    c[where][3].view(-1)[2] = value
    y, idx, _, _ = _run(backend, c, pb=_forbid(3), ids=torch.zeros(7, dtype=torch.long))
    assert not (idx == 3).any()
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_mode_weight_zero_expert_with_inf_touches_no_token(backend):
    c = _case()
    c["lora_b"][4, 0, 0] = float("inf")
    pw = torch.tensor([[0.5, 0.25, 0.25, 0.0, 0.0]])
    y, _, _, _ = _run(backend, c, pw=pw, ids=torch.zeros(7, dtype=torch.long))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_token_stays_alone(backend):
    c = _case()
    ref = _run("reference", {k: v.clone() for k, v in c.items()})
    c["x"][2, 5] = float("nan")
    y, _, _, _ = _run(backend, c)
    assert torch.isnan(y[2]).any()
    others = [t for t in range(7) if t != 2]
    assert torch.isfinite(y[others]).all()
    torch.testing.assert_close(y[others], ref[0][others], atol=1e-4, rtol=1e-4)


def _forbid(e: int, E: int = 5) -> torch.Tensor:
    pb = torch.zeros(1, E)
    pb[0, e] = float("-inf")
    return pb
