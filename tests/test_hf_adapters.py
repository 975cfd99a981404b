"""Adapter I/O: PEFT folders read with safetensors alone, clear errors, calibration, bank round trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_hf_models import adapter_set, ids_batch, logits, make_adapter, tiny_model

pytest.importorskip("peft")

import personamoe
from personamoe.adapters import AdapterError, read_adapter, write_adapter


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    base = tiny_model("llama")
    root = tmp_path_factory.mktemp("llama")
    return base, adapter_set(base, root, "llama")


def _edit_weights(src, dst, fn):
    import shutil

    shutil.copytree(src, dst)
    f = dst / "adapter_model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f))
    return dst


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    f = dst / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))
    return dst


def test_read_adapter_ranks_scalings_and_patterns(llama):
    _, ads = llama
    a, b, c = (read_adapter(ads[n]) for n in "abc")
    q = "model.layers.0.self_attn.q_proj"
    assert a.modules[q].rank == 4 and a.modules[q].scaling == pytest.approx(8 / 4)
    assert b.modules[q].rank == 2 and b.modules[q].scaling == pytest.approx(4 / 2**0.5)  # rsLoRA
    # c: rank_pattern {down_proj: 5}, alpha_pattern {up_proj: 2.5}, only layer 1.
    assert set(c.modules) == {"model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"}
    down, up = c.modules["model.layers.1.mlp.down_proj"], c.modules["model.layers.1.mlp.up_proj"]
    assert (down.rank, down.scaling) == (5, pytest.approx(6 / 5))
    assert (up.rank, up.scaling) == (3, pytest.approx(2.5 / 3))
    assert tuple(a.modules["model.layers.0.self_attn.k_proj"].lora_B.shape) == (16, 4)  # GQA


def test_padding_to_the_largest_rank_keeps_norms(llama):
    base, ads = llama
    model = personamoe.inject(copy.deepcopy(base), ads, top_k=2)
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    assert layer.rank == 5 and layer.pm_rank.tolist() == [4, 0, 5]
    assert torch.all(layer.lora_A[0, 4:] == 0) and torch.all(layer.lora_B[0, :, 4:] == 0)
    x = torch.randn(6, 64)
    with torch.no_grad():
        layer(x)
    rec = layer.pm_last
    assert rec is not None and rec.scores is not None
    a0 = read_adapter(ads["a"]).modules["model.layers.1.mlp.down_proj"].lora_A
    torch.testing.assert_close(rec.scores[:, 0], torch.linalg.vector_norm(x @ a0.T, dim=-1))
    assert torch.all(torch.isneginf(rec.scores[:, 1]))  # b does not target this layer


def test_frobenius_calibration(llama):
    base, ads = llama
    model = personamoe.inject(copy.deepcopy(base), ads, top_k=2, calibration="frobenius")
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    fro = torch.linalg.vector_norm(layer.lora_A, dim=(1, 2))
    torch.testing.assert_close(layer.calibration[:2], fro[:2])
    assert float(layer.calibration[2]) == 1.0  # absent expert: neutral
    x = torch.randn(5, 32)
    with torch.no_grad():
        layer(x)
    rec = layer.pm_last
    assert rec is not None and rec.scores is not None
    h = torch.einsum("erd,td->ter", layer.lora_A, x)
    torch.testing.assert_close(
        rec.scores[:, :2], torch.linalg.vector_norm(h, dim=-1)[:, :2] / fro[:2]
    )


def test_unsupported_adapters_name_file_and_key(llama, tmp_path):
    base, ads = llama
    dora = make_adapter(
        base, tmp_path / "dora", "llama", 5, use_dora=True, target_modules=["q_proj"]
    )
    with pytest.raises(AdapterError, match=r"dora/adapter_config\.json: key 'use_dora'.*DoRA"):
        personamoe.inject(copy.deepcopy(base), {"d": dora}, top_k=1)
    emb = make_adapter(base, tmp_path / "emb", "llama", 6, target_modules=["embed_tokens"])
    with pytest.raises(
        AdapterError, match=r"emb/adapter_model\.safetensors: key .*embed_tokens.*embedding"
    ):
        read_adapter(emb)
    bias = _edit_config(ads["a"], tmp_path / "bias", lora_bias=True)
    with pytest.raises(AdapterError, match="key 'lora_bias'"):
        read_adapter(bias)
    ia3 = _edit_config(ads["a"], tmp_path / "ia3", peft_type="IA3")
    with pytest.raises(AdapterError, match="key 'peft_type'"):
        read_adapter(ia3)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    missing = _edit_weights(ads["a"], tmp_path / "missing", lambda sd: sd.pop(key))
    with pytest.raises(
        AdapterError, match=rf"missing/adapter_model\.safetensors: missing key '{key}'"
    ):
        read_adapter(missing)
    akey = key.replace("lora_B", "lora_A")
    bad = _edit_weights(ads["a"], tmp_path / "bad", lambda sd: sd.update({akey: sd[akey][:3]}))
    with pytest.raises(AdapterError, match=rf"key '{akey}': expected shape \[r=4, d_in\]"):
        read_adapter(bad)
    extra = _edit_weights(
        ads["a"], tmp_path / "extra", lambda sd: sd.update({"lm_head.weight": torch.zeros(2, 2)})
    )
    with pytest.raises(AdapterError, match=r"key 'lm_head\.weight': not a LoRA factor"):
        read_adapter(extra)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(AdapterError, match="only safetensors"):
        read_adapter(tmp_path / "bin")


def test_base_model_mismatch(llama, tmp_path):
    base, ads = llama
    wider = tiny_model("qwen2")  # same names, but q/k/v carry biases: still shape-compatible
    other = make_adapter(tiny_model("gpt2"), tmp_path / "gpt2", "gpt2", 7)
    with pytest.raises(
        AdapterError, match=r"gpt2/adapter_model\.safetensors: key .*c_attn.*no module"
    ):
        personamoe.inject(copy.deepcopy(base), {"g": other}, top_k=1)
    from transformers import LlamaConfig, LlamaForCausalLM

    big = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=64))  # fmt: skip
    with pytest.raises(
        AdapterError, match=r"key '.*lora_(A|B).weight': expected shape \[(r, d_in|d_out)=48"
    ):
        personamoe.inject(big, {"a": ads["a"]}, top_k=1)
    assert personamoe.inject(wider, {"a": ads["a"]}, top_k=1) is wider
    named = _edit_config(ads["a"], tmp_path / "named", base_model_name_or_path="org/other-model")
    base.config._name_or_path = "org/my-model"
    with pytest.warns(UserWarning, match="base_model_name_or_path"):
        personamoe.inject(copy.deepcopy(base), {"a": named}, top_k=1)
    base.config._name_or_path = ""


def test_adapter_for_causal_lm_loads_into_backbone(llama):
    base, ads = llama
    full = personamoe.inject(copy.deepcopy(base), ads, top_k=2)
    backbone = personamoe.inject(copy.deepcopy(base.model), ads, top_k=2)  # names lack "model."
    ids = ids_batch()
    with torch.no_grad():
        want = full.model(input_ids=ids).last_hidden_state
        got = backbone(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want)


def test_save_and_load_bank_round_trip(llama, tmp_path):
    base, ads = llama
    model = personamoe.inject(
        copy.deepcopy(base), ads, top_k=2, calibration="frobenius", temperature=0.5
    )
    personamoe.add_persona(model, personamoe.Persona("calm", allow=["a", "c"], bias={"c": 0.5}))
    personamoe.add_persona(model, personamoe.Persona("blend", weights={"a": 0.3, "b": 0.7}))
    personamoe.save_bank(model, tmp_path / "bank")
    loaded = personamoe.load_bank(copy.deepcopy(base), tmp_path / "bank")
    ids = ids_batch(batch=3)
    for personas in (None, ["calm", "blend", None]):
        if personas is None:
            torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)
            continue
        with personamoe.use_personas(model, personas):
            want = logits(model, ids)
        with personamoe.use_personas(loaded, personas):
            got = logits(loaded, ids)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    lay = loaded.get_submodule("model.layers.1.mlp.down_proj")
    assert lay.temperature == 0.5 and lay.pm_calibrated and lay.pm_rank.tolist() == [4, 0, 5]
    # A fresh (trained) bank exports each expert as a plain PEFT adapter.
    fresh = personamoe.inject(copy.deepcopy(base), 2, rank=3, lora_alpha=6, init_lora_weights=False)
    out = personamoe.export_expert(fresh, "expert_1", tmp_path / "e1")
    e1 = read_adapter(out)
    assert len(e1.modules) == 14 and all(
        m.rank == 3 and m.scaling == 2.0 for m in e1.modules.values()
    )
    with pytest.raises(ValueError, match="already applied"):
        personamoe.load_bank(loaded, tmp_path / "bank")


def test_write_adapter_patterns_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    mods = {
        "m.layers.1.q": (torch.randn(2, 8, generator=g), torch.randn(4, 2, generator=g), 0.75),
        "m.layers.11.q": (torch.randn(3, 8, generator=g), torch.randn(4, 3, generator=g), 2.0),
        "m.layers.2.q": (torch.randn(2, 8, generator=g), torch.randn(4, 2, generator=g), 0.75),
    }
    back = read_adapter(write_adapter(tmp_path / "w", mods))
    for name, (a, b, s) in mods.items():
        m = back.modules[name]
        assert torch.equal(m.lora_A, a) and torch.equal(m.lora_B, b)
        assert m.rank == a.shape[0] and m.scaling == pytest.approx(s, rel=1e-12)
