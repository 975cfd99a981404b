"""Tiny random-config transformers models and PEFT test adapters (shared by tests/test_hf_*.py), and
the injection itself: names, shared weights, base checkpoints, target selection."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import personamoe  # noqa: E402
from personamoe.integrations.layers import PersonaConv1DLayer, PersonaLayer  # noqa: E402

VOCAB = 64
ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2")
LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer model of hidden size 32 with random weights (no download)."""
    from transformers import (
        GemmaConfig,
        GemmaForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    common: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                  max_position_embeddings=128)  # fmt: skip
    if arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "qwen3":
        m = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8))
    elif arch == "mistral":
        m = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif arch == "gemma":
        m = GemmaForCausalLM(GemmaConfig(**{**common, "num_key_value_heads": 1}, head_dim=8))
    elif arch == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                       n_positions=128, bos_token_id=0, eos_token_id=0))  # fmt: skip
    else:
        raise ValueError(arch)
    return m.eval()


def targets(arch: str, which: str = "all") -> list[str]:
    if arch == "gpt2":
        return {"all": ["c_attn", "c_proj", "c_fc"], "attn": ["c_attn"], "mlp": ["c_fc"]}[which]
    return {"all": LLAMA_LIKE, "attn": ["q_proj", "v_proj"], "mlp": ["down_proj", "up_proj"]}[which]


def make_adapter(base: torch.nn.Module, path: Path, arch: str, seed: int, **cfg: Any) -> Path:
    """Save a PEFT LoRA adapter with random A and B (``init_lora_weights=False``) for ``base``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg.setdefault("r", 4)
    cfg.setdefault("lora_alpha", 8)
    cfg.setdefault("target_modules", targets(arch))
    if arch == "gpt2":
        cfg.setdefault("fan_in_fan_out", True)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **cfg))
    pm.save_pretrained(str(path))
    return path


def adapter_set(base: torch.nn.Module, root: Path, arch: str) -> dict[str, Path]:
    """Three adapters that differ in rank, scaling (rsLoRA, patterns) and targets."""
    mlp = targets(arch, "mlp")
    return {
        "a": make_adapter(base, root / "a", arch, 1, r=4, lora_alpha=8),
        "b": make_adapter(
            base,
            root / "b",
            arch,
            2,
            r=2,
            lora_alpha=4,
            use_rslora=True,
            target_modules=targets(arch, "attn"),
        ),
        "c": make_adapter(
            base,
            root / "c",
            arch,
            3,
            r=3,
            lora_alpha=6,
            target_modules=mlp,
            layers_to_transform=[1],
            rank_pattern={mlp[0]: 5},
            alpha_pattern={mlp[-1]: 2.5},
        ),
    }


def ids_batch(batch: int = 4, seq: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    return model(input_ids=ids, **kw).logits


# -- tests of the injection itself -------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_inject_keeps_names_and_shares_base_weights(arch, tmp_path):
    base = tiny_model(arch)
    ads = adapter_set(base, tmp_path, arch)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    params = dict(base.named_parameters())
    model = personamoe.inject(base, ads)
    assert model is base
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PersonaLayer)}
    assert layers
    for name, layer in layers.items():
        assert layer.weight is params[name + ".weight"]  # shared, not copied
        assert isinstance(layer, PersonaConv1DLayer) == (arch == "gpt2")
    # The base checkpoint still loads: same names and shapes, only the bank is extra.
    res = model.load_state_dict(base_sd, strict=False)
    assert res.unexpected_keys == []
    extra = {"lora_A", "lora_B", "scaling", "calibration", "pm_available", "pm_rank"}
    assert res.missing_keys and all(k.rsplit(".", 1)[1] in extra for k in res.missing_keys)
    # Frozen base, trainable bank.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_absent_expert_is_never_chosen(arch, tmp_path):
    base = tiny_model(arch)
    ads = adapter_set(base, tmp_path, arch)
    model = personamoe.inject(base, ads, top_k=2)
    with torch.no_grad():
        model(input_ids=ids_batch())
    stats = personamoe.routing_stats(model)
    for name, layer in model.named_modules():
        if not isinstance(layer, PersonaLayer):
            continue
        avail = layer.pm_available
        assert not bool(avail.all()) or name.endswith(tuple(targets(arch, "attn")))
        counts = stats.layers[name].counts[None]
        assert int(counts[~avail].sum()) == 0, name
        # Adapter "c" only targets layer 1's MLP: it exists there and is absent in layer 0.
        assert bool(avail[2]) == (".1." in name and name.endswith(tuple(targets(arch, "mlp"))))


def test_one_available_expert_with_top_k_2_uses_one_slot(tmp_path):
    base = tiny_model("llama")
    ads = adapter_set(base, tmp_path, "llama")
    model = personamoe.inject(base, ads, top_k=2)
    with torch.no_grad():
        model(input_ids=ids_batch())
    layer = model.get_submodule("model.layers.0.self_attn.o_proj")  # only "a" targets it
    assert layer.pm_last is not None
    gates = layer.pm_last.topk_gates
    assert torch.allclose(gates[..., 0], torch.ones_like(gates[..., 0]))
    assert torch.all(gates[..., 1] == 0)


def test_target_modules_options(tmp_path):
    base = tiny_model("llama")
    ads = {"a": make_adapter(base, tmp_path / "a", "llama", 1, target_modules=["q_proj", "v_proj"])}
    m1 = personamoe.inject(copy.deepcopy(base), ads, top_k=1)
    names = [n for n, m in m1.named_modules() if isinstance(m, PersonaLayer)]
    assert sorted(names) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                   for p in ("q_proj", "v_proj"))  # fmt: skip
    # Fresh banks: "all-linear" skips the output head, like PEFT.
    m2 = personamoe.inject(copy.deepcopy(base), 3, rank=2, target_modules="all-linear")
    names2 = {n for n, m in m2.named_modules() if isinstance(m, PersonaLayer)}
    assert len(names2) == 14 and "lm_head" not in names2
    m3 = personamoe.inject(copy.deepcopy(base), 2, rank=2, target_modules=r".*\.(q|k)_proj")
    assert len([m for m in m3.modules() if isinstance(m, PersonaLayer)]) == 4
    # An adapter whose layers target_modules leaves out is an error, not a silent drop.
    with pytest.raises(personamoe.AdapterError, match="leaves out"):
        personamoe.inject(copy.deepcopy(base), ads, top_k=1, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already applied"):
        personamoe.inject(m1, ads, top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        personamoe.inject(copy.deepcopy(base), ads, top_k=2)


def test_half_precision_model_keeps_fp32_scalings(tmp_path):
    base = tiny_model("llama")
    ads = adapter_set(base, tmp_path, "llama")
    ref = personamoe.inject(copy.deepcopy(base), ads, top_k=2)
    half = copy.deepcopy(ref).to(torch.bfloat16)
    layer = half.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.lora_A.dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    ref_layer = ref.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.scaling.dtype == torch.float32 and torch.equal(layer.scaling, ref_layer.scaling)
    assert layer.pm_bias is not None and layer.pm_bias.dtype == torch.float32
    ids = ids_batch()
    want, got = logits(ref, ids), logits(half, ids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)
