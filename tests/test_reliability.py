"""Hostile and unlucky inputs: every door refuses what would make a kernel read out of bounds,
value checks name the argument, backend choice is per thread, gradients are given or refused."""

from __future__ import annotations

import threading

import pytest
import torch

import personamoe
from personamoe.backends import get_backend, use_backend
from personamoe.ops import persona_moe_linear_op


def _args(T=3, d_in=8, d_out=6, E=4, r=2, dtype=torch.float32):
    torch.manual_seed(0)
    return dict(
        x=torch.randn(T, d_in, dtype=dtype),
        weight=torch.randn(d_out, d_in, dtype=dtype),
        bias=torch.randn(d_out, dtype=dtype),
        lora_a=torch.randn(E, r, d_in, dtype=dtype),
        lora_b=torch.randn(E, d_out, r, dtype=dtype),
        scaling=torch.rand(E) + 0.5,
    )


def _raw(a, top_k=2, cal=None, pb=None, ids=None, pw=None):
    return persona_moe_linear_op(
        a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["scaling"], top_k, 1.0,
        "topk", cal, pb, ids, pw,
    )  # fmt: skip


# Each of these overflowed the heap in the C++ kernel when called through the raw op.
RAW_OP_BAD = [
    ("lora_b", lambda a: a.update(lora_b=torch.randn(4, 9, 2)), "lora_b"),
    ("short scaling", lambda a: a.update(scaling=torch.ones(2)), "scaling"),
    ("short bias", lambda a: a.update(bias=torch.randn(3)), "bias"),
    ("small weight", lambda a: a.update(weight=torch.randn(6, 5)), "x"),
    ("small lora_a", lambda a: a.update(lora_a=torch.randn(4, 2, 5)), "lora_a"),
    ("bf16 weight", lambda a: a.update(weight=a["weight"].bfloat16()), "weight"),
    ("3-D x", lambda a: a.update(x=a["x"][None]), "x"),
]


@pytest.mark.parametrize("what,change,word", RAW_OP_BAD, ids=[c[0] for c in RAW_OP_BAD])
def test_raw_op_checks_structure(what, change, word):
    a = _args()
    change(a)
    with pytest.raises((ValueError, TypeError), match=word):
        _raw(a)


def test_raw_op_checks_tables_and_ids():
    a = _args()
    with pytest.raises(ValueError, match="persona_bias"):
        _raw(a, pb=torch.zeros(2, 3), ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="persona_ids"):
        _raw(a, pb=torch.zeros(2, 4), ids=torch.zeros(2, dtype=torch.long))


def test_zero_input_features_refused():
    a = _args(d_in=0)
    with pytest.raises(ValueError, match="d_in >= 1"):
        personamoe.persona_moe_linear(**a, top_k=2)
    with pytest.raises(ValueError, match="d_in >= 1"):
        _raw(a)


@pytest.mark.parametrize(
    "over,word",
    [
        (dict(persona_bias=torch.tensor([[0.0, float("nan"), 0.0, 0.0]])), "persona_bias"),
        (dict(persona_bias=torch.tensor([[0.0, float("inf"), 0.0, 0.0]])), "persona_bias"),
        (dict(persona_weights=torch.tensor([[0.5, float("inf"), 0.0, 0.0]])), "persona_weights"),
        (dict(persona_weights=torch.tensor([[0.5, float("-inf"), 0.0, 0.0]])), "persona_weights"),
        (dict(scaling=torch.full((4,), 1e300, dtype=torch.float64)), "scaling"),
        (dict(calibration=torch.full((4,), 1e-300, dtype=torch.float64)), "calibration"),
        (dict(temperature=True), "temperature"),
        (dict(temperature=1e-300), "temperature"),
    ],
)
def test_values_refused(over, word):
    a = _args()
    kw = dict(top_k=2)
    if "persona_bias" in over or "persona_weights" in over:
        kw["persona_ids"] = torch.zeros(3, dtype=torch.long)
    a.update({k: v for k, v in over.items() if k in a})
    kw.update({k: v for k, v in over.items() if k not in a})
    with pytest.raises(ValueError, match=word):
        personamoe.persona_moe_linear(**a, **kw)


def test_minus_inf_bias_still_allowed():
    a = _args()
    pb = torch.tensor([[0.0, float("-inf"), 0.0, 0.0]])
    _, idx, _ = personamoe.persona_moe_linear(
        **a, top_k=2, persona_bias=pb, persona_ids=torch.zeros(3, dtype=torch.long),
        return_routing=True,
    )  # fmt: skip
    assert not (idx == 1).any()


def test_use_backend_is_per_thread():
    """A ``use_backend`` block in one thread never changes the backend another thread runs."""
    inside, release = threading.Event(), threading.Event()
    seen: list[str] = []

    def hold():
        with use_backend("reference"):
            seen.append(get_backend())
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert inside.wait(10)
    try:
        assert get_backend() == "auto"
    finally:
        release.set()
        t.join()
    assert seen == ["reference"]
    assert get_backend() == "auto"


@pytest.mark.parametrize("name", ["scaling", "calibration", "persona_bias", "persona_weights"])
def test_grad_on_non_differentiable_inputs_refused(name):
    a = _args()
    a["x"].requires_grad_(True)
    kw: dict = dict(top_k=2)
    table = torch.rand(2, 4)
    extra = {
        "scaling": {},
        "calibration": {"calibration": torch.rand(4) + 0.5},
        "persona_bias": {"persona_bias": table, "persona_ids": torch.zeros(3, dtype=torch.long)},
        "persona_weights": {
            "persona_weights": table,
            "persona_ids": torch.zeros(3, dtype=torch.long),
        },
    }[name]
    kw.update(extra)
    target = a if name == "scaling" else kw
    target[name] = target[name].clone().requires_grad_(True)
    y = personamoe.persona_moe_linear(**a, **kw)
    with pytest.raises(RuntimeError, match=name):
        y.sum().backward()


def test_double_backward_refused():
    a = _args()
    a["x"].requires_grad_(True)
    y = personamoe.persona_moe_linear(**a, top_k=2)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), a["x"], create_graph=True)


def test_scaling_written_through_data_is_rechecked():
    """A write that bumps no version counter (``.data``, numpy) is still seen on CPU."""
    a = _args()
    scaling = torch.ones(4)
    personamoe.persona_moe_linear(**{**a, "scaling": scaling}, top_k=2)
    scaling.data[1] = float("nan")
    with pytest.raises(ValueError, match="scaling"):
        personamoe.persona_moe_linear(**{**a, "scaling": scaling}, top_k=2)
    scaling.data[1] = 1.0
    scaling.numpy()[2] = float("inf")
    with pytest.raises(ValueError, match="scaling"):
        personamoe.persona_moe_linear(**{**a, "scaling": scaling}, top_k=2)


def test_triton_interpreter_refuses_bf16():
    pytest.importorskip("triton")
    a = _args(dtype=torch.bfloat16)
    with use_backend("triton"), pytest.raises(ValueError, match="bfloat16"):
        personamoe.persona_moe_linear(**a, top_k=2)


def test_persona_ids_of_another_shape_with_the_same_count_refused():
    a = _args(T=6)
    a["x"] = a["x"].reshape(2, 3, 8)
    pb = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="persona_ids"):
        personamoe.persona_moe_linear(**a, top_k=2, persona_bias=pb,
                                      persona_ids=torch.zeros(3, 2, dtype=torch.long))  # fmt: skip
    y = personamoe.persona_moe_linear(**a, top_k=2, persona_bias=pb,
                                      persona_ids=torch.zeros(2, 3, dtype=torch.long))  # fmt: skip
    assert y.shape == (2, 3, 6)
