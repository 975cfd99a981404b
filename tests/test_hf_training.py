"""Training persona banks inside a transformers model, and torch.compile without graph breaks."""

from __future__ import annotations

import pytest
import torch

from tests.test_hf_models import adapter_set, ids_batch, tiny_model

pytest.importorskip("peft")

import personamoe
from personamoe.integrations.layers import PersonaLayer


def _fresh_llama(E=3, **kw):
    base = tiny_model("llama")
    personamoe.inject(base, E, rank=4, top_k=2, **kw)
    return base


def test_training_lowers_the_loss_and_only_moves_the_bank():
    model = _fresh_llama()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(
        n.endswith(("lora_A", "lora_B")) for n, p in model.named_parameters() if p.requires_grad
    )
    opt = torch.optim.Adam(params, lr=1e-2)
    ids = ids_batch(batch=4, seq=12, seed=5)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        out = model(input_ids=ids, labels=ids)
        aux = personamoe.routing_stats(model).loss  # load balancing over all layers
        (out.loss + aux).backward()
        opt.step()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0] - 0.1, losses
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == n.endswith(("lora_A", "lora_B")), n


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = ids_batch(batch=2, seq=8)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = _fresh_llama(init_lora_weights=False)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert float(g.abs().sum()) > 0, n
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5)


def test_loaded_adapters_train_too(tmp_path):
    base = tiny_model("gpt2")
    model = personamoe.inject(base, adapter_set(base, tmp_path, "gpt2"), top_k=2)
    ids = ids_batch(batch=2, seq=6)
    model(input_ids=ids, labels=ids).loss.backward()
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer, PersonaLayer) and layer.lora_B.grad is not None
    assert layer.weight.grad is None  # base frozen
    # Absent experts (c does not target c_attn) get no gradient signal.
    assert (
        float(layer.lora_B.grad[2].abs().sum()) == 0 and float(layer.lora_B.grad[0].abs().sum()) > 0
    )


# -- torch.compile ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_persona_layer_compiles_fullgraph(arch, tmp_path):
    base = tiny_model(arch)
    model = personamoe.inject(base, adapter_set(base, tmp_path, arch), top_k=2)
    name = "model.layers.1.mlp.up_proj" if arch == "llama" else "transformer.h.1.mlp.c_fc"
    layer = model.get_submodule(name)  # "c" is absent in layer 0 only: here all three are present
    x = torch.randn(3, 5, layer.in_features)
    mix = personamoe.Persona("mix", weights={"a": 0.5, "c": 2.0})
    cases = [None, ["mix"], [personamoe.Persona("ac", allow=["a", "c"]), None, mix]]
    personamoe.add_persona(model, mix)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for personas in cases:
            with personamoe.use_personas(model, personas) if personas else _nothing():
                torch.testing.assert_close(compiled(x), layer(x), atol=1e-6, rtol=1e-6)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_compiled_model_forward_and_generate(tmp_path):
    """The whole model traces as one graph (fullgraph=True) with per-request personas, and
    ``generate`` with a compiled forward gives the eager tokens and logits."""
    base = tiny_model("llama")
    model = personamoe.inject(base, adapter_set(base, tmp_path, "llama"), top_k=2)
    personamoe.add_persona(model, personamoe.Persona("ab", allow=["a", "b"]))
    mix = personamoe.Persona("mix", weights={"a": 0.5, "c": 1.0})
    ids = ids_batch(batch=3, seq=5)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0,
               return_dict_in_generate=True, output_logits=True)  # fmt: skip
    torch._dynamo.reset()
    with torch.no_grad(), personamoe.use_personas(model, ["ab", None, mix]):
        want = model(input_ids=ids).logits
        want_gen = model.generate(input_ids=ids, **gen)
        eager_forward = model.forward
        model.forward = torch.compile(model.forward, backend="eager", fullgraph=True)
        try:
            got_gen = model.generate(input_ids=ids, **gen)  # prefill: a whole forward, then decode
        finally:
            model.forward = eager_forward
    torch.testing.assert_close(got_gen.logits[0], want[:, -1], atol=1e-6, rtol=1e-6)
    assert torch.equal(got_gen.sequences, want_gen.sequences)
    torch.testing.assert_close(
        torch.stack(got_gen.logits), torch.stack(want_gen.logits), atol=1e-6, rtol=1e-6
    )


def test_dynamo_explain_finds_no_break(tmp_path):
    base = tiny_model("qwen2")
    model = personamoe.inject(base, adapter_set(base, tmp_path, "qwen2"), top_k=2)
    torch._dynamo.reset()
    with (
        torch.no_grad(),
        personamoe.use_personas(model, [personamoe.Persona("b", allow=["b"]), None]),
    ):
        explained = torch._dynamo.explain(model)(input_ids=ids_batch(batch=2, seq=4))
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1
