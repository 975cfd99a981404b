"""A tiny random Llama, a tokenizer built from scratch and four random PEFT LoRA adapters, all
written locally (no downloads), and their exported personamoe checkpoint.

Used by tests_vllm/ (vLLM's CPU build) and tests/test_export.py (main venv).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from personamoe.adapters import write_adapter

WORDS = [f"w{i}" for i in range(120)]
# Four persona adapters: different ranks and alphas; "terse" leaves out the MLP (absent there).
ADAPTERS = {
    "calm": {"r": 4, "alpha": 8.0, "modules": "all"},
    "curious": {"r": 8, "alpha": 8.0, "modules": "all"},
    "formal": {"r": 4, "alpha": 4.0, "modules": "all"},
    "terse": {"r": 8, "alpha": 16.0, "modules": "attn"},
}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def build_tokenizer(out: Path, words: list[str] | None = None) -> None:
    """A whitespace word-level tokenizer over ``words`` (default :data:`WORDS`), ids from 3 up."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS if words is None else words
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(out))


def build_base(out: Path, seed: int = 0, arch: str = "llama") -> Path:
    """A 2-layer Llama (or ``arch="qwen2"``: Qwen2, whose q/k/v carry biases, here random) with
    hidden 256, 4 heads of 64, 2 KV heads; random weights with a wide init so that greedy choices
    are far from ties."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    cfg = config_cls(
        vocab_size=len(WORDS) + 3,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.15,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.1)
    model.save_pretrained(str(out), safe_serialization=True)
    build_tokenizer(out)
    return out


def build_adapters(base: Path, out: Path, seed: int = 1) -> dict[str, Path]:
    """Random PEFT LoRA adapters (lora_B non-zero, so every expert changes the output)."""
    import json

    cfg = json.loads((base / "config.json").read_text())
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (d // cfg["num_attention_heads"])
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    paths: dict[str, Path] = {}
    for name, spec in ADAPTERS.items():
        r, alpha = int(spec["r"]), float(spec["alpha"])  # type: ignore[call-overload]
        names = ATTN + MLP if spec["modules"] == "all" else ATTN
        modules = {}
        for layer in range(L):
            for m in names:
                part = "self_attn" if m in ATTN else "mlp"
                d_in, d_out = shapes[m]
                a = torch.randn(r, d_in, generator=g) / d_in**0.5
                b = torch.randn(d_out, r, generator=g) * 0.5 / r**0.5
                modules[f"model.layers.{layer}.{part}.{m}"] = (a, b, alpha / r)
        paths[name] = write_adapter(out / name, modules, base_model_name_or_path=str(base))
    return paths


def personas() -> list[Any]:
    """Served personas of every kind: an allowed set, a bias, fixed mixtures (one over an expert
    absent from the MLP), and one allowing only that absent expert."""
    from personamoe import Persona

    return [
        Persona("calm_only", allow=["calm"]),
        Persona("curious_lean", bias={"curious": 1.5, "formal": -0.5}),
        Persona("blend", weights={"formal": 0.7, "terse": 0.3}),
        Persona("steady", weights={"calm": 0.5, "curious": 0.5}),
        Persona("terse_only", allow=["terse"]),
    ]


def build_all(
    root: Path, top_k: int = 2, arch: str = "llama", with_personas: bool = False,
    data_calibration: bool = False,
) -> dict[str, Path]:  # fmt: skip
    """``{"base", "adapters", "export"}`` folders under ``root`` (the export with ``top_k``, the
    :func:`personas` when ``with_personas``, calibration "data" measured on random token batches
    when ``data_calibration``)."""
    from personamoe.integrations.export import export

    base = build_base(root / "base", arch=arch)
    adapters = build_adapters(base, root / "adapters")
    extra: dict[str, Any] = {}
    if data_calibration:
        g = torch.Generator().manual_seed(5)
        extra = {"calibration": "data",
                 "calibration_batches": [torch.randint(3, len(WORDS) + 3, (2, 24), generator=g)
                                         for _ in range(3)]}  # fmt: skip
    out = export(base, adapters, root / "export", top_k=top_k,
                 personas=personas() if with_personas else (), **extra)  # fmt: skip
    return {"base": base, "adapters": root / "adapters", "export": out}
