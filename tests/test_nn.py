"""PersonaMoELinear: names, construction, persona tables, and agreement with the reference."""

from __future__ import annotations

import math

import pytest
import torch

import personamoe
from personamoe import reference as R
from tests.conftest import DTYPE_TOLS

INF = float("inf")


def _ref(layer: personamoe.PersonaMoELinear, x, ids=None):
    return R.persona_moe_linear(
        x.float(),
        layer.weight.float(),
        None if layer.bias is None else layer.bias.float(),
        layer.lora_A.float(),
        layer.lora_B.float(),
        layer.scaling,
        top_k=layer.top_k,
        temperature=layer.temperature,
        normalize=layer.normalize,
        calibration=layer.calibration,
        persona_bias=layer.persona_bias,
        persona_weights=layer.persona_weights,
        persona_ids=ids
        if (layer.persona_bias is not None or layer.persona_weights is not None)
        else None,
        return_routing=True,
    )


def test_parameter_and_buffer_names_follow_hugging_face():
    layer = personamoe.PersonaMoELinear(10, 6, num_experts=3, rank=2)
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "lora_A", "lora_B"}
    assert layer.lora_A.shape == (3, 2, 10) and layer.lora_B.shape == (3, 6, 2)
    assert set(layer.state_dict()) == {
        "weight",
        "bias",
        "lora_A",
        "lora_B",
        "scaling",
        "calibration",
    }
    # A plain nn.Linear checkpoint loads into the base of the layer unchanged.
    lin = torch.nn.Linear(10, 6)
    missing = layer.load_state_dict(lin.state_dict(), strict=False).missing_keys
    assert torch.equal(layer.weight, lin.weight) and "weight" not in missing
    assert "num_experts=3" in repr(layer) and "top_k=2" in repr(layer)


def test_defaults_start_equal_to_the_base_layer_like_peft():
    layer = personamoe.PersonaMoELinear(10, 6, 3, 2)
    assert (layer.lora_B == 0).all() and (layer.lora_A != 0).any()
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize(
    ("alpha", "rslora", "want"), [(None, False, 1.0), (16, False, 4.0), (16, True, 8.0)]
)
def test_scaling_follows_peft(alpha, rslora, want):
    layer = personamoe.PersonaMoELinear(8, 8, 2, 4, lora_alpha=alpha, use_rslora=rslora)
    assert layer.scaling.tolist() == [want, want]
    assert math.isclose(want, (alpha or 4) / (math.sqrt(4) if rslora else 4))


def test_from_linear_shares_the_base_weight():
    lin = torch.nn.Linear(9, 5, bias=False)
    layer = personamoe.PersonaMoELinear.from_linear(lin, 4, 3, top_k=1, init_lora_weights=False)
    assert layer.weight is lin.weight and layer.bias is None
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    x = torch.randn(3, 9)
    torch.testing.assert_close(layer(x), _ref(layer, x)[0])


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPE_TOLS)
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("shape", [(1, 17), (2, 7, 17), (3, 1, 5, 17)])
def test_layer_matches_reference(dtype, atol, rtol, backend, shape):
    layer = personamoe.PersonaMoELinear(17, 11, 5, 3, top_k=2, init_lora_weights=False)
    layer.to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    with personamoe.use_backend(backend):
        layer.record_routing = True
        y = layer(x)
    want, want_idx, want_g = _ref(layer, x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], 11)
    torch.testing.assert_close(y.float(), want.float(), atol=atol, rtol=rtol)
    assert layer.last_routing is not None
    idx, g = layer.last_routing
    assert idx.shape == (*shape[:-1], 2) and idx.dtype == torch.int32
    if dtype == torch.float32:
        assert torch.equal(idx, want_idx)
        torch.testing.assert_close(g, want_g)


def test_non_contiguous_input():
    layer = personamoe.PersonaMoELinear(16, 8, 4, 2, init_lora_weights=False)
    x = torch.randn(16, 9).t()  # [9, 16], strides (1, 9)
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), _ref(layer, x.contiguous())[0])


def test_persona_bias_and_fixed_weights_on_the_module():
    layer = personamoe.PersonaMoELinear(12, 7, 4, 2, top_k=2, init_lora_weights=False)
    table = torch.tensor([[0.0, -INF, -INF, 0.0], [-INF, 0.0, -INF, -INF]])
    layer.set_persona_bias(table)
    x = torch.randn(2, 3, 12)
    ids = torch.tensor([[0, 1, -1], [1, 0, 0]])
    layer.record_routing = True
    y = layer(x, ids)
    want, _want_idx, _ = _ref(layer, x, ids)
    torch.testing.assert_close(y, want)
    idx, g = layer.last_routing  # type: ignore[misc]
    assert set(idx[0, 0].tolist()) == {0, 3}
    assert idx[0, 1, 0].item() == 1 and g[0, 1, 1].item() == 0.0  # one allowed: second slot gate 0
    # Without ids every token routes freely over all experts.
    torch.testing.assert_close(layer(x), _ref(layer, x, torch.full((2, 3), -1))[0])

    layer.set_persona_weights(torch.tensor([[1.0, 0.0, 0.5, 0.0]]))
    assert layer.persona_bias is None
    ids = torch.zeros(2, 3, dtype=torch.long)
    torch.testing.assert_close(layer(x, ids), _ref(layer, x, ids)[0])


def test_training_step_reaches_the_bank_only_when_base_frozen():
    layer = personamoe.PersonaMoELinear(8, 8, 3, 2, init_lora_weights=False)
    layer.weight.requires_grad_(False)
    assert layer.bias is not None
    layer.bias.requires_grad_(False)
    layer(torch.randn(5, 8)).pow(2).mean().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


def test_scaling_and_tables_stay_fp32_when_the_module_is_cast():
    layer = personamoe.PersonaMoELinear(8, 8, 3, 4, lora_alpha=7, use_rslora=True)
    layer.set_persona_bias(torch.tensor([[0.1, 0.2, 0.3]]))
    exact = layer.scaling.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.bfloat16
    assert layer.scaling.dtype == torch.float32 and torch.equal(layer.scaling, exact)
    assert layer.calibration.dtype == torch.float32
    assert layer.persona_bias is not None and layer.persona_bias.dtype == torch.float32
