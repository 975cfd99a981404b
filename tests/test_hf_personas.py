"""Personas per request in one batched ``generate``, routing modes, and routing statistics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tests.test_hf_models import adapter_set, ids_batch, logits, tiny_model

pytest.importorskip("peft")

import personamoe
from personamoe import reference as R
from personamoe.integrations.layers import PersonaLayer
from personamoe.integrations.model_personas import state_of


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    base = tiny_model("llama")
    ads = adapter_set(base, tmp_path_factory.mktemp("llama"), "llama")
    return base, ads


def _gen(model, ids, **kw):
    kw.setdefault("do_sample", False)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=4,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
        **kw,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def test_batched_generate_with_per_request_personas(llama):
    base, ads = llama
    model = personamoe.inject(copy.deepcopy(base), ads, top_k=2)
    personamoe.add_persona(model, personamoe.Persona("counselor", allow=["a", "c"]))
    critic = personamoe.Persona("critic", bias={"b": 5.0, "a": -1.0})
    mix = personamoe.Persona("mix", weights={"a": 0.5, "b": 0.5})
    rows = ["counselor", critic, None, "counselor", mix]
    ids = ids_batch(batch=len(rows), seq=6, seed=3)
    with personamoe.use_personas(model, rows):
        seqs, lg = _gen(model, ids)
        # The layers saw per-token persona rows for the decode step [batch, 1].
        layer = model.get_submodule("model.layers.1.mlp.down_proj")
        assert layer.pm_last is not None and layer.pm_last.rows is not None
        assert layer.pm_last.rows.shape == (len(rows), 1)
    # Each row equals that request generated alone with its persona.
    for i, p in enumerate(rows):
        with personamoe.use_personas(model, [p]):
            s1, l1 = _gen(model, ids[i : i + 1])
        torch.testing.assert_close(lg[i : i + 1], l1, atol=1e-4, rtol=1e-4)
        assert torch.equal(seqs[i : i + 1], s1)
    # Personas change the output: "counselor" (a, c) is not free routing (a, b, c).
    assert not torch.allclose(lg[0], _gen(model, ids[:1])[1][0], atol=1e-3)
    # num_return_sequences expands the batch: each persona repeats over its copies (sampling
    # with top_k=1 is greedy, so every copy equals the unexpanded row).
    with personamoe.use_personas(model, rows[:2]):
        _, l2 = _gen(model, ids[:2], num_return_sequences=2, do_sample=True, top_k=1)
    torch.testing.assert_close(l2[::2], lg[:2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(l2[1::2], lg[:2], atol=1e-4, rtol=1e-4)


def test_bias_steers_routing_and_stats(llama):
    base, ads = llama
    model = personamoe.inject(copy.deepcopy(base), ads, top_k=1)
    ids = ids_batch(batch=2, seq=5)
    with personamoe.use_personas(model, [personamoe.Persona("likes_b", bias={"b": 1e4}), None]):
        model(input_ids=ids)
    stats = personamoe.routing_stats(model)
    assert set(stats.experts) == {"a", "b", "c"}
    q = stats.layers["model.layers.0.self_attn.q_proj"]
    assert int(q.counts["likes_b"][1]) == 5 and int(q.counts["likes_b"].sum()) == 5
    assert q.tokens == {"likes_b": 5, None: 5}
    assert q.entropy["likes_b"] == pytest.approx(0.0)  # k = 1: one gate of 1
    assert stats.usage("likes_b")["b"] == 5 * 4  # q_proj, v_proj in two layers


def test_routing_stats_entropy_and_balance_loss(llama):
    base, ads = llama
    model = personamoe.inject(copy.deepcopy(base), ads, top_k=2)
    out = model(input_ids=ids_batch(batch=3, seq=5))  # grad enabled: the loss must train the bank
    stats = personamoe.routing_stats(model, alpha=0.01)
    for name, lr in stats.layers.items():
        layer = model.get_submodule(name)
        k_used = min(2, int(layer.pm_available.sum()))
        assert int(lr.counts[None].sum()) == 15 * k_used
        assert 0.0 <= lr.entropy[None] <= math.log(2) + 1e-6
        assert (lr.entropy[None] > 0) == (k_used == 2)
    assert stats.loss.requires_grad and float(stats.loss) > 0
    (out.logits.square().mean() + stats.loss).backward()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.lora_A.grad is not None and float(layer.lora_A.grad.abs().sum()) > 0
    # Balance loss alone: gradient through the scores into lora_A, matching the reference.
    rec = layer.pm_last
    assert rec is not None and rec.scores is not None
    want = R.load_balancing_loss(rec.scores.reshape(-1, 3), rec.topk_idx.reshape(-1, 2))
    assert float(stats.layers["model.layers.0.self_attn.q_proj"].loss) == pytest.approx(float(want))
    with pytest.raises(ValueError, match="no routing recorded"):
        personamoe.routing_stats(personamoe.inject(copy.deepcopy(base), ads, top_k=1))


def test_mixed_fixed_and_routed_rows(llama):
    base, ads = llama
    model = personamoe.inject(copy.deepcopy(base), ads, top_k=2)
    fixed = personamoe.Persona("fixed", weights={"a": 1.0, "c": 0.25})
    rows = [fixed, None, personamoe.Persona("ab", allow=["a", "b"])]
    ids = ids_batch(batch=3, seq=5)
    with personamoe.use_personas(model, rows):
        got = logits(model, ids)
    stats_rows = personamoe.routing_stats(model)  # of the last forward: the mixed batch
    down = stats_rows.layers["model.layers.1.mlp.down_proj"]  # a and c present, b absent
    assert down.counts["fixed"].tolist() == [5, 0, 5]  # the mixture uses both, every token
    assert down.entropy["fixed"] == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)))
    assert down.tokens == {"fixed": 5, None: 5, "ab": 5}
    assert int(down.counts["ab"][2]) == 0 and int(down.counts["ab"].sum()) == 5  # only a there
    for i, p in enumerate(rows):
        with personamoe.use_personas(model, p):
            torch.testing.assert_close(
                got[i : i + 1], logits(model, ids[i : i + 1]), atol=1e-5, rtol=1e-5
            )


def _seq_layer(E=4, k=2, d=16):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d, d))
    personamoe.inject(net, E, rank=3, top_k=k, routing="sequence", init_lora_weights=False)
    return net, net[0]


def test_sequence_routing_matches_pooled_math():
    net, layer = _seq_layer()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        y = net(x)
        # By hand: scores pooled (mean) over each sequence, top-k, softmax gates, fixed mixture.
        h = R.shrink(x.reshape(-1, 16), layer.lora_A).reshape(3, 5, 4, 3)
        pooled = torch.linalg.vector_norm(h, dim=-1).mean(1)
        idx, g = R.route(pooled, top_k=2)
        want = x @ layer.weight.T + layer.bias
        for b in range(3):
            for j in range(2):
                e = int(idx[b, j])
                want[b] += g[b, j] * layer.scaling[e] * (h[b, :, e] @ layer.lora_B[e].T)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    rec = layer.pm_last
    assert rec is not None
    chosen = rec.topk_idx.sort(-1).values
    assert torch.equal(chosen, chosen[:, :1].expand_as(chosen))  # one choice per sequence
    # A persona's allow set and bias apply to the pooled scores.
    allow = personamoe.Persona("two", allow=["expert_2", "expert_3"], bias={"expert_3": 50.0})
    with torch.no_grad(), personamoe.use_personas(net, [allow, None, allow]):
        net(x)
    rec = layer.pm_last
    assert rec is not None
    assert (
        set(rec.topk_idx[0].flatten().tolist()) == {2, 3} == set(rec.topk_idx[2].flatten().tolist())
    )
    assert bool((rec.topk_gates[0, :, 0] > 0.99).all())  # the bias makes expert 3 dominate


def test_sequence_routing_keeps_prompt_choice_while_decoding(llama):
    base, ads = llama
    model = personamoe.inject(copy.deepcopy(base), ads, top_k=2, routing="sequence")
    ids = ids_batch(batch=2, seq=6)
    seen = []
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    hook = layer.register_forward_hook(lambda m, a, o: seen.append(m.pm_seq_weights.clone()))
    _gen(model, ids)
    hook.remove()
    assert len(seen) == 4 and all(torch.equal(s, seen[0]) for s in seen)
    assert torch.all((seen[0] > 0).sum(-1) == 2)
    # Left padding: the padded request chooses as if alone (pooling over its real tokens only).
    short = ids[:1, 3:]
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), short], dim=1)
    batch = torch.cat([padded, ids[1:]])
    mask = torch.cat([torch.tensor([[0, 0, 0, 1, 1, 1]]), torch.ones(1, 6, dtype=torch.long)])
    model.generate(
        input_ids=batch, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0
    )
    w_batch = layer.pm_seq_weights.clone()
    model.generate(input_ids=short, attention_mask=torch.ones_like(short), max_new_tokens=1, do_sample=False,
                   pad_token_id=0)  # fmt: skip
    torch.testing.assert_close(w_batch[:1], layer.pm_seq_weights, atol=1e-5, rtol=1e-5)


def test_set_routing_and_merge_modes(llama):
    base, ads = llama
    model = personamoe.inject(copy.deepcopy(base), ads, top_k=2)
    ids = ids_batch()
    token = logits(model, ids)
    personamoe.set_routing(model, "fixed")  # no persona: the default (uniform) mixture
    w = {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    with personamoe.use_personas(model, personamoe.Persona("u", weights=w)):
        uniform = logits(model, ids)
    torch.testing.assert_close(logits(model, ids), uniform)
    personamoe.set_routing(model, "token")
    torch.testing.assert_close(logits(model, ids), token)
    merged = personamoe.inject(copy.deepcopy(base), ads, routing="merged")
    torch.testing.assert_close(logits(merged, ids), uniform, atol=1e-4, rtol=1e-4)
    assert all(m.pm_merged for m in merged.modules() if isinstance(m, PersonaLayer))
    with pytest.raises(ValueError, match="merged"), personamoe.use_personas(merged, None):
        pass
    with pytest.raises(ValueError, match="already merged"):
        personamoe.merge(merged, w)
    personamoe.unmerge(merged)
    torch.testing.assert_close(logits(merged, ids), token)


def test_persona_errors(llama):
    base, ads = llama
    model = personamoe.inject(copy.deepcopy(base), ads, top_k=2)
    with pytest.raises(ValueError, match="unknown expert 'z'"):
        personamoe.add_persona(model, personamoe.Persona("p", allow=["z"]))
    with pytest.raises(ValueError, match="either weights"):
        personamoe.Persona("p", allow=["a"], weights={"a": 1.0})
    with (
        pytest.raises(ValueError, match="not a registered persona"),
        personamoe.use_personas(model, ["nobody"]),
    ):
        pass
    with (
        pytest.raises(TypeError, match="personas\\[1\\]"),
        personamoe.use_personas(model, [None, 3]),
    ):
        pass
    with (
        personamoe.use_personas(model, [None, None, None]),
        pytest.raises(ValueError, match="3 personas"),
    ):
        model(input_ids=ids_batch(batch=4))
    # Nested blocks restore the outer personas, and leaving restores free routing.
    st = state_of(model)
    p = personamoe.Persona("inner", allow=["a"])
    with personamoe.use_personas(model, [None, p]):
        with personamoe.use_personas(model, p):
            assert st.ids is not None and st.ids.tolist() == [1]
        assert st.ids is not None and st.ids.tolist() == [0, 1]
    assert st.ids is None and st.adhoc == ()


def test_layer_level_persona_ids(llama):
    """A layer called directly takes per-token ids of the registered personas (-1 = none)."""
    base, ads = llama
    model = personamoe.inject(copy.deepcopy(base), ads, top_k=2)
    personamoe.add_persona(model, personamoe.Persona("only_b", allow=["b"]))
    personamoe.add_persona(model, personamoe.Persona("fix", weights={"a": 2.0}))
    layer = model.get_submodule("model.layers.0.self_attn.v_proj")
    x = torch.randn(3, 4, 32)
    ids = torch.tensor([[0] * 4, [-1] * 4, [1] * 4])
    with torch.no_grad():
        got = layer(x, persona_ids=ids)
        with personamoe.use_personas(model, ["only_b", None, "fix"]):
            want = layer(x)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="persona_ids: expected ids in"):
        layer(x, persona_ids=torch.full((3, 4), 2))


def test_one_op_call_per_layer_whatever_the_personas(llama, monkeypatch):
    """Requests with different personas share one fused op call per layer (no loop over requests
    or adapters); the op receives per-token persona rows [batch, seq] and the [P, E] table."""
    import personamoe.integrations.layers as L

    base, ads = llama
    model = personamoe.inject(copy.deepcopy(base), ads, top_k=2)
    n_layers = sum(isinstance(m, PersonaLayer) for m in model.modules())
    calls = []
    real = L.persona_moe_linear_scores

    def counting(args):
        calls.append((tuple(args.x.shape), args.persona_bias, args.persona_ids))
        return real(args)

    monkeypatch.setattr(L, "persona_moe_linear_scores", counting)
    personas = [personamoe.Persona(f"p{i}", allow=[n, "a"]) for i, n in enumerate("abc")]
    with torch.no_grad(), personamoe.use_personas(model, [*personas, None, personas[0]]):
        model(input_ids=ids_batch(batch=5, seq=3))
    assert len(calls) == n_layers
    for shape, table, ids in calls:
        assert shape[:2] == (5, 3)
        assert ids is not None and tuple(ids.shape) == (5, 3)
        assert table is not None and tuple(table.shape) == (1 + 3, 3)  # no-persona row + 3
