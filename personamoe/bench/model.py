"""The model case M of docs/design.md §5: a random-weight Llama generating greedily, per provider.

Providers, each a real implementation over the same base weights and the same eight adapters:
``base`` (no adapters), ``base_onednn`` (no adapters, the seven projections of every decoder layer
through oneDNN on weights prepacked at build time, as vLLM's CPU build and inductor freezing run
them; skipped with a note where this CPU's oneDNN lacks the dtype), ``peft_lora`` (one PEFT LoRA, unmerged), ``peft_mixed`` (PEFT mixed batch,
``adapter_names`` naming 4 distinct adapters), ``xlora`` (PEFT X-LoRA over the 8 adapters, top-2;
PEFT 0.21 runs it without a KV cache — measured as it is), ``personamoe`` (the 8 adapters injected
as a persona bank, top-2, backend ``auto``).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_PROVIDERS = ("base", "base_onednn", "personamoe", "peft_lora", "peft_mixed", "xlora")


@dataclass(frozen=True)
class ModelCase:
    """Sizes of the model case; ``M`` is docs/design.md §5.1's, the others make tests and quick runs cheap."""

    name: str = "M"
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    vocab_size: int = 32000
    num_experts: int = 8
    rank: int = 16
    top_k: int = 2
    batch: int = 4
    prompt_len: int = 64
    new_tokens: int = 32

    def llama_config(self) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            vocab_size=self.vocab_size,
            max_position_embeddings=max(256, self.prompt_len + self.new_tokens),
        )


M = ModelCase()
TINY = ModelCase(
    name="M-tiny",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    rank=4,
    batch=2,
    prompt_len=8,
    new_tokens=4,
)


def build_base(case: ModelCase, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """The base model with random weights (seed 0), in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(case.llama_config())
    model = model.to(device=device, dtype=dtype)
    model.generation_config.pad_token_id = 0
    return model.eval()


def make_adapters(case: ModelCase, base: Any, out_dir: Path) -> dict[str, Path]:
    """``num_experts`` PEFT LoRA adapters with random A and B (``init_lora_weights=False``), saved.

    All adapters are added to one PEFT model (one copy of the base) and saved one folder each.
    """
    from peft import LoraConfig, get_peft_model

    names = [f"persona{e}" for e in range(case.num_experts)]
    peft_model = None
    for e, name in enumerate(names):
        torch.manual_seed(100 + e)
        cfg = LoraConfig(
            r=case.rank, lora_alpha=2 * case.rank, target_modules=TARGETS, init_lora_weights=False
        )
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    assert peft_model is not None
    # Non-default adapters are saved into out_dir/<name>.
    peft_model.save_pretrained(str(out_dir), selected_adapters=names)
    return {name: out_dir / name for name in names}


class OneDNNLinear(torch.nn.Module):
    """A frozen ``nn.Linear`` computed by oneDNN on a weight prepacked once, at construction
    (``torch.ops.mkldnn._reorder_linear_weight`` with a batch-size hint): the plain layer as
    vLLM's CPU build and inductor's CPU freezing run it. Inference only."""

    def __init__(self, linear: torch.nn.Linear, batch_size_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_size_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, self.in_features), self.packed, self.bias, "none", [], ""
        )
        return y.reshape(*lead, self.out_features)


def onednn_model(base: Any, batch_size_hint: int) -> Any:
    """A copy of ``base`` whose decoder layers' seven projections (:data:`TARGETS`) are
    :class:`OneDNNLinear`; embeddings, norms and the LM head stay as they are."""
    model = copy.deepcopy(base)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            parent, attr = name.rsplit(".", 1)
            packed = OneDNNLinear(module, batch_size_hint)
            setattr(model.model.layers.get_submodule(parent), attr, packed)
    return model


def prompt(case: ModelCase, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, case.vocab_size, (case.batch, case.prompt_len), generator=g).to(device)


class ModelBench:
    """Builds each provider once and hands out a generate call per provider."""

    def __init__(self, case: ModelCase, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.case, self.dtype, self.device = case, dtype, device
        self._tmp = tempfile.TemporaryDirectory(prefix="personamoe-bench-")
        self.base = build_base(case, dtype, device)
        self.adapters = make_adapters(case, self.base, Path(self._tmp.name))
        self.input_ids = prompt(case, device)
        self.notes: dict[str, str] = {}

    def unavailable(self, name: str) -> str:
        """Why provider ``name`` cannot run here (``""`` when it can)."""
        if name == "base_onednn":
            from personamoe.bench.layer import onednn_unavailable

            return onednn_unavailable(self.device, self.dtype)
        return ""

    def close(self) -> None:
        self._tmp.cleanup()

    def _generate(self, model: Any, **kw: Any) -> Callable[[], object]:
        ids = self.input_ids
        mask = torch.ones_like(ids)
        n = self.case.new_tokens

        def run() -> object:
            return model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                **kw,
            )

        return run

    def provider(self, name: str) -> Callable[[], object]:
        """A zero-argument callable that runs one greedy generate with provider ``name``."""
        names = list(self.adapters)
        if name == "base":
            return self._generate(self.base)
        if name == "base_onednn":
            why = self.unavailable(name)
            if why:
                raise RuntimeError(f"base_onednn: {why}")
            # Decoding dominates the generate call: hint its token count (one per row).
            hint = self.case.batch
            self.notes[name] = f"7 projections per layer prepacked (batch-size hint {hint})"
            return self._generate(onednn_model(self.base, hint).eval())
        if name == "personamoe":
            import personamoe

            model = personamoe.inject(
                copy.deepcopy(self.base),
                {k: str(v) for k, v in self.adapters.items()},
                top_k=self.case.top_k,
            )
            self.notes[name] = f"backend {personamoe.get_backend()}, E={len(names)}, top-2"
            return self._generate(model)
        from peft import PeftModel

        if name == "peft_lora":
            model = PeftModel.from_pretrained(
                copy.deepcopy(self.base), str(self.adapters[names[0]])
            )
            return self._generate(model.eval())
        if name == "peft_mixed":
            model = PeftModel.from_pretrained(
                copy.deepcopy(self.base), str(self.adapters[names[0]]), adapter_name=names[0]
            )
            for other in names[1:4]:
                model.load_adapter(str(self.adapters[other]), adapter_name=other)
            rows = [names[i % 4] for i in range(self.case.batch)]
            self.notes[name] = "4 distinct adapters, one per row"
            return self._generate(model.eval(), adapter_names=rows)
        if name == "xlora":
            from peft import XLoraConfig, get_peft_model

            base = copy.deepcopy(self.base)
            base.config.use_cache = False
            cfg = XLoraConfig(
                task_type="CAUSAL_LM",
                hidden_size=self.case.hidden_size,
                adapters={str(i): str(self.adapters[n]) for i, n in enumerate(names)},
                top_k_lora=self.case.top_k,
                xlora_depth=1,
            )
            model = get_peft_model(base, cfg)
            self.notes[name] = "PEFT X-LoRA generates without a KV cache (use_cache=False)"
            return self._generate(model.eval())
        raise ValueError(f"provider: expected one of {MODEL_PROVIDERS}, got {name!r}")

    @property
    def tokens_per_call(self) -> int:
        return self.case.batch * self.case.new_tokens
