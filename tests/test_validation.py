"""Every bad input of the public API raises a clear error naming the argument."""

from __future__ import annotations

import pytest
import torch

import personamoe

INF = float("inf")


def _good(T=5, d_in=8, d_out=6, E=4, r=2):
    return dict(
        x=torch.randn(T, d_in),
        weight=torch.randn(d_out, d_in),
        bias=torch.randn(d_out),
        lora_a=torch.randn(E, r, d_in),
        lora_b=torch.randn(E, d_out, r),
        scaling=torch.ones(E),
    )


def _call(**over):
    args = _good()
    kw = dict(top_k=2)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return personamoe.persona_moe_linear(**args, **kw)


BAD = [
    # (overrides, exception, words the message must hold)
    (dict(x=torch.randn(5, 7)), ValueError, ["x", "d_in = 8", "7"]),
    (dict(x=torch.randint(0, 3, (5, 8))), TypeError, ["x", "torch.int64"]),
    (dict(x=[[1.0] * 8]), TypeError, ["x", "list"]),
    (dict(weight=torch.randn(6, 8, 1)), ValueError, ["weight", "2 dims"]),
    (dict(weight=torch.randn(6, 8).double()), TypeError, ["weight", "float64", "float32"]),
    (dict(bias=torch.randn(5)), ValueError, ["bias", "[6]", "[5]"]),
    (dict(lora_a=torch.randn(4, 8)), ValueError, ["lora_a", "3 dims"]),
    (
        dict(lora_a=torch.randn(0, 2, 8), lora_b=torch.randn(0, 6, 2), scaling=torch.ones(0)),
        ValueError,
        ["lora_a", "empty bank"],
    ),
    (dict(lora_a=torch.randn(4, 2, 9)), ValueError, ["lora_a", "[4, 2, 8]"]),
    (dict(lora_b=torch.randn(4, 6, 3)), ValueError, ["lora_b", "[E, d_out, r]", "[4, 6, 2]"]),
    (dict(scaling=torch.ones(3)), ValueError, ["scaling", "[4]", "[3]"]),
    (dict(scaling=torch.tensor([1.0, INF, 1.0, 1.0])), ValueError, ["scaling", "finite", "inf"]),
    (dict(scaling=torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError, ["scaling", "nan"]),
    (dict(top_k=0), ValueError, ["top_k", "1 <= top_k <= E = 4", "0"]),
    (dict(top_k=5), ValueError, ["top_k", "5"]),
    (dict(top_k=2.0), TypeError, ["top_k", "int", "float"]),
    (dict(temperature=0.0), ValueError, ["temperature", "> 0"]),
    (dict(temperature=float("nan")), ValueError, ["temperature"]),
    (dict(normalize="softmax"), ValueError, ["normalize", "'softmax'"]),
    (dict(calibration=torch.tensor([1.0, 0.0, 1.0, 1.0])), ValueError, ["calibration", "> 0"]),
    (dict(calibration=torch.ones(2)), ValueError, ["calibration", "[4]"]),
    (
        dict(persona_bias=torch.zeros(2, 3), persona_ids=torch.zeros(5, dtype=torch.long)),
        ValueError,
        ["persona_bias", "[P, E=4]", "[2, 3]"],
    ),
    (
        dict(persona_bias=torch.zeros(2, 4), persona_ids=torch.tensor([0, 1, 2, 0, 0])),
        ValueError,
        ["persona_ids", "[-1, 2)", "2"],
    ),
    (
        dict(persona_bias=torch.zeros(2, 4), persona_ids=torch.tensor([0, -2, 1, 0, 0])),
        ValueError,
        ["persona_ids", "-2"],
    ),
    (
        dict(persona_bias=torch.zeros(2, 4), persona_ids=torch.zeros(5)),
        TypeError,
        ["persona_ids", "int32 or int64", "float32"],
    ),
    (
        dict(persona_bias=torch.zeros(2, 4), persona_ids=torch.zeros(4, dtype=torch.long)),
        ValueError,
        ["persona_ids", "[5]", "[4]"],
    ),
    (dict(persona_weights=torch.ones(2, 4)), ValueError, ["persona_ids", "persona_weights"]),
    (
        dict(
            persona_weights=torch.ones(2, 4),
            persona_bias=torch.zeros(2, 4),
            persona_ids=torch.zeros(5, dtype=torch.long),
        ),
        ValueError,
        ["at most one"],
    ),
]


@pytest.mark.parametrize(("over", "exc", "words"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_raises_clear_error(over, exc, words):
    with pytest.raises(exc) as info:
        _call(**over)
    for w in words:
        assert w in str(info.value), f"{w!r} missing from: {info.value}"


def test_device_mismatch_is_named():
    meta = torch.randn(6, 8, device="meta")
    with pytest.raises(ValueError, match="weight: expected device cpu"):
        _call(weight=meta)


def test_module_rejects_bad_construction():
    with pytest.raises(ValueError, match="num_experts"):
        personamoe.PersonaMoELinear(4, 4, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        personamoe.PersonaMoELinear(4, 4, 2, 0)
    with pytest.raises(ValueError, match="top_k"):
        personamoe.PersonaMoELinear(4, 4, 2, 1, top_k=3)
    with pytest.raises(ValueError, match="normalize"):
        personamoe.PersonaMoELinear(4, 4, 2, 1, normalize="bad")
    with pytest.raises(TypeError, match="linear"):
        personamoe.PersonaMoELinear.from_linear(torch.nn.Conv1d(4, 4, 1), 2, 1)  # type: ignore[arg-type]
    layer = personamoe.PersonaMoELinear(4, 4, 2, 1)
    with pytest.raises(ValueError, match=r"persona_bias: expected a tensor of shape \[P, E=2\]"):
        layer.set_persona_bias(torch.zeros(3))
    with pytest.raises(ValueError, match="x: expected last dim d_in = 4"):
        layer(torch.randn(2, 5))


def test_empty_input_returns_empty_result():
    y, idx, g = personamoe.persona_moe_linear(
        **{**_good(), "x": torch.randn(0, 8)}, top_k=2, return_routing=True
    )
    assert y.shape == (0, 6) and idx.shape == (0, 2) and g.shape == (0, 2)
    layer = personamoe.PersonaMoELinear(8, 6, 4, 2)
    assert layer(torch.randn(2, 0, 8)).shape == (2, 0, 6)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_nan_in_one_token_stays_in_that_token(backend):
    args = _good(T=9)
    args["lora_b"] = torch.randn(4, 6, 2)
    args["x"][4, 3] = float("nan")
    with personamoe.use_backend(backend):
        y = personamoe.persona_moe_linear(**args, top_k=2)
    assert torch.isnan(y[4]).any()
    others = torch.cat([y[:4], y[5:]])
    assert torch.isfinite(others).all()
