"""The training-step case ``train``: one AdamW step of a random-weight Llama, per provider.

One step is forward + backward (causal LM loss, labels = inputs) + ``AdamW.step`` on a batch of
``case.batch`` sequences of ``case.prompt_len`` tokens, base weights frozen, only the adapters
(and X-LoRA's classifier) trainable. The model is case M's width with 4 decoder layers
(:data:`TRAIN`); ``--quick`` uses a tiny model (:data:`TRAIN_TINY`) that times nothing meaningful
but runs the whole path in seconds.

Providers, each with its own model and optimizer, built outside the timed region:

- ``personamoe``: a fresh bank of ``E`` adapters of rank ``r`` on the seven projections, top-k,
  injected with :func:`personamoe.inject` (backend ``auto``), trained as the package trains it;
- ``peft_lora``: one PEFT LoRA of rank ``r`` on the same targets (``init_lora_weights=False``);
- ``naive``: the MoE-LoRA loop a user would write (MixLoRA style, :class:`NaiveMoELoRALinear`);
- ``xlora``: PEFT X-LoRA over ``E`` saved LoRA adapters with ``use_trainable_adapters=True``
  (experts and classifier trained; PEFT runs its scaling pass without a KV cache).
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from personamoe.bench.model import TARGETS, TINY, M, ModelCase, build_base, make_adapters

TRAIN_PROVIDERS = ("personamoe", "peft_lora", "naive", "xlora")

# Case M's width, 4 decoder layers, batch 4 x 128 tokens (prompt_len is the sequence length).
TRAIN = dataclasses.replace(M, name="train", num_hidden_layers=4, batch=4, prompt_len=128)
TRAIN_TINY = dataclasses.replace(TINY, name="train-tiny", batch=2, prompt_len=16)
LR = 1e-4


class NaiveMoELoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``E`` LoRA experts, routed router-free as a user would write it
    (MixLoRA style): ``h_e = A_e x`` for all experts, the top-k experts by ``||h_e||``, softmax
    gates over those k, then a Python loop over experts gathering the tokens that chose each one
    and ``index_add``-ing ``B_e h_e * gate * scaling``. The math of :mod:`personamoe.reference`."""

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, alpha: float, top_k: int):
        super().__init__()
        self.base = base
        self.top_k = top_k
        self.scaling = alpha / rank
        d_out, d_in = base.weight.shape
        kw: dict[str, Any] = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.randn(num_experts, rank, d_in, **kw) / d_in**0.5)
        self.lora_B = nn.Parameter(torch.randn(num_experts, d_out, rank, **kw) / rank**0.5)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        E, r, d_in = self.lora_A.shape
        h = F.linear(x2, self.lora_A.reshape(E * r, d_in)).view(-1, E, r)
        top, idx = torch.linalg.vector_norm(h, dim=-1).topk(self.top_k, dim=-1)
        gates = torch.softmax(top, dim=-1)
        delta = x2.new_zeros(x2.shape[0], self.lora_B.shape[1])
        for e in range(E):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            coeff = (gates[tok, slot] * self.scaling)[:, None]
            delta.index_add_(0, tok, F.linear(h[tok, e] * coeff, self.lora_B[e]))
        y = self.base(x2) + delta
        return y.reshape(*lead, y.shape[-1])


def inject_naive(model: nn.Module, case: ModelCase, alpha: float) -> nn.Module:
    """Wrap every target ``nn.Linear`` of ``model`` in :class:`NaiveMoELoRALinear`, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            parent, attr = name.rsplit(".", 1)
            wrapped = NaiveMoELoRALinear(module, case.num_experts, case.rank, alpha, case.top_k)
            setattr(model.get_submodule(parent), attr, wrapped)
    return model


def batch(case: ModelCase, device: str = "cpu") -> Tensor:
    g = torch.Generator().manual_seed(2)
    shape = (case.batch, case.prompt_len)
    return torch.randint(1, case.vocab_size, shape, generator=g).to(device)


class TrainBench:
    """Builds each provider's model and optimizer once and hands out one training step each."""

    def __init__(
        self, case: ModelCase, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> None:
        self.case, self.dtype, self.device = case, dtype, device
        self.alpha = 2 * case.rank
        self._tmp = tempfile.TemporaryDirectory(prefix="personamoe-train-")
        self.base = build_base(case, dtype, device)
        self._adapters: dict[str, Path] | None = None
        self.input_ids = batch(case, device)
        self.models: dict[str, nn.Module] = {}
        self.notes: dict[str, str] = {}

    def close(self) -> None:
        self._tmp.cleanup()

    @property
    def tokens_per_call(self) -> int:
        return self.case.batch * self.case.prompt_len

    def build(self, name: str) -> nn.Module:
        """Provider ``name``'s model, base frozen, in train mode."""
        case = self.case
        model: Any
        if name == "personamoe":
            import personamoe

            torch.manual_seed(10)
            model = personamoe.inject(
                copy.deepcopy(self.base),
                case.num_experts,
                target_modules=TARGETS,
                rank=case.rank,
                lora_alpha=self.alpha,
                top_k=case.top_k,
                init_lora_weights=False,
            )
            self.notes[name] = (
                f"backend {personamoe.get_backend()}, E={case.num_experts}, r={case.rank}, "
                f"top-{case.top_k}"
            )
        elif name == "peft_lora":
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(11)
            cfg = LoraConfig(
                r=case.rank,
                lora_alpha=self.alpha,
                target_modules=TARGETS,
                init_lora_weights=False,
            )
            model = get_peft_model(copy.deepcopy(self.base), cfg)
            self.notes[name] = f"one LoRA, r={case.rank}"
        elif name == "naive":
            torch.manual_seed(12)
            model = copy.deepcopy(self.base)
            for p in model.parameters():
                p.requires_grad_(False)
            inject_naive(model, case, self.alpha)
            self.notes[name] = f"Python loop over E={case.num_experts} experts per layer"
        elif name == "xlora":
            from peft import XLoraConfig, get_peft_model

            if self._adapters is None:
                self._adapters = make_adapters(case, self.base, Path(self._tmp.name))
            base = copy.deepcopy(self.base)
            base.config.use_cache = False
            xcfg = XLoraConfig(
                task_type="CAUSAL_LM",
                hidden_size=case.hidden_size,
                adapters={str(i): str(p) for i, p in enumerate(self._adapters.values())},
                top_k_lora=case.top_k,
                xlora_depth=1,
                use_trainable_adapters=True,
            )
            model = get_peft_model(base, xcfg)
            self.notes[name] = (
                f"PEFT X-LoRA over {case.num_experts} adapters, experts and classifier trained"
            )
        else:
            raise ValueError(f"provider: expected one of {TRAIN_PROVIDERS}, got {name!r}")
        model.train()
        self.models[name] = model
        return model

    def provider(self, name: str) -> Callable[[], object]:
        """A zero-argument callable that runs one training step of provider ``name``."""
        model = self.build(name)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{name}: no trainable parameters")
        opt = torch.optim.AdamW(params, lr=LR)
        ids = self.input_ids
        mask = torch.ones_like(ids)

        def step() -> object:
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            opt.step()
            return loss.detach()

        return step
