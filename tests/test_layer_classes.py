"""The one table of base module types that can hold persona experts, and layers built through
their constructors (no ``__init__`` skipped)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import personamoe
from personamoe.integrations.layers import (
    PersonaConv1DLayer,
    PersonaLayer,
    layer_class_for,
    layer_classes,
)
from personamoe.personas import PersonaState


def test_linear_and_conv1d_map_to_their_layer_class() -> None:
    assert layer_class_for(nn.Linear(4, 3)) is PersonaLayer
    assert layer_class_for(nn.Embedding(4, 3)) is None
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(3, 4)  # nf=3 outputs, nx=4 inputs
    assert layer_class_for(conv1d) is PersonaConv1DLayer
    assert {cls for _, cls in layer_classes()} == {PersonaLayer, PersonaConv1DLayer}


def test_a_persona_layer_adopts_the_base_parameters_and_is_never_wrapped_twice() -> None:
    base = nn.Linear(4, 3)
    state = PersonaState(["a", "b"], "token", None)
    layer = PersonaLayer.wrap(base, state, rank=2, top_k=5, temperature=1.0, normalize="topk")
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.top_k == 2  # capped at E
    assert isinstance(layer, personamoe.PersonaMoELinear)
    assert layer_class_for(layer) is None
    assert layer.persona_bias is None and layer.persona_weights is None and layer.pm_last is None


def test_from_linear_goes_through_the_constructor() -> None:
    lin = nn.Linear(5, 2, bias=False)
    moe = personamoe.PersonaMoELinear.from_linear(lin, 3, 2)
    assert moe.weight is lin.weight and moe.bias is None
    assert set(moe.state_dict()) == {"weight", "lora_A", "lora_B", "scaling", "calibration"}
    assert moe.lora_A.shape == (3, 2, 5) and moe.record_routing is False
    assert moe(torch.randn(4, 5)).shape == (4, 2)
