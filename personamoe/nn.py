"""``PersonaMoELinear``: a drop-in ``nn.Linear`` that carries a bank of LoRA persona experts.

Parameter names follow Hugging Face / PEFT (``weight``, ``bias``, ``lora_A``, ``lora_B``) so a base
checkpoint loads unchanged; the bank is stacked: ``lora_A [E, r, d_in]``, ``lora_B [E, d_out, r]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from personamoe._validation import check_layer_args
from personamoe.layer_args import LayerArgs
from personamoe.ops import persona_moe_linear_scores
from personamoe.options import NORMALIZE_MODES

__all__ = ["PersonaMoELinear"]


def lora_scaling(rank: int, lora_alpha: float | None, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (``alpha`` defaults to r)."""
    alpha = float(rank if lora_alpha is None else lora_alpha)
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class PersonaMoELinear(nn.Module):
    """``y = x W^T + b + sum_j g_j s_j B_j A_j x`` over the top-k experts of each token.

    Args:
        in_features, out_features: as ``nn.Linear``.
        num_experts: ``E``, the number of persona adapters in the bank.
        rank: ``r``, the LoRA rank of every expert (pad smaller ranks with zeros).
        top_k: experts mixed per token (``1 <= top_k <= E``).
        bias: whether the base layer has a bias.
        lora_alpha: LoRA alpha (defaults to ``rank``, i.e. scaling 1).
        use_rslora: scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.
        temperature: softmax temperature of the gates.
        normalize: ``"topk"`` (softmax over the chosen) or ``"full"`` (softmax over all experts,
            not renormalised).
        init_lora_weights: ``True`` initialises like PEFT (``lora_B = 0``: the layer starts equal to
            the base); ``False`` draws ``lora_B`` at random too (useful for tests).
        record_routing: keep ``last_routing = (topk_idx, topk_gates)`` after each forward.
    """

    weight: Tensor
    bias: Tensor | None
    scaling: Tensor
    calibration: Tensor
    persona_bias: Tensor | None
    persona_weights: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        rank: int,
        top_k: int = 2,
        bias: bool = True,
        lora_alpha: float | None = None,
        use_rslora: bool = False,
        temperature: float = 1.0,
        normalize: str = "topk",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        init_lora_weights: bool = True,
        record_routing: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("out_features", out_features),
            ("num_experts", num_experts),
            ("rank", rank),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype)
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        )
        self._init_base()
        self._make_bank(num_experts, rank, lora_alpha, use_rslora, init_lora_weights)
        self._set_routing(top_k, temperature, normalize)
        self.record_routing = record_routing
        self.last_routing: tuple[Tensor, Tensor] | None = None
        self.last_scores: Tensor | None = None

    # Buffers that stay fp32 whatever dtype the module is cast to: the op accumulates in fp32, and
    # rsLoRA's alpha/sqrt(r) or a persona bias would round in bf16. They only follow the device.
    fp32_buffers: tuple[str, ...] = ("scaling", "calibration", "persona_bias", "persona_weights")

    def _apply(self, fn: Any, recurse: bool = True) -> PersonaMoELinear:
        keep = {n: t for n in self.fp32_buffers if (t := self._buffers.get(n)) is not None}
        super()._apply(fn, recurse)
        for n, t in keep.items():
            moved = self._buffers[n]
            if moved is not None and moved.dtype != t.dtype:
                self._buffers[n] = t.to(device=moved.device)
        return self

    # -- construction ------------------------------------------------------------------------
    def _init_base(self) -> None:
        # Same as nn.Linear.reset_parameters.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _make_bank(
        self, E: int, r: int, lora_alpha: float | None, use_rslora: bool, init_lora_weights: bool
    ) -> None:
        dev, dt = self.weight.device, self.weight.dtype
        self.num_experts = E
        self.rank = r
        self.lora_A = nn.Parameter(torch.empty(E, r, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.empty(E, self.out_features, r, device=dev, dtype=dt))
        self.reset_lora_parameters(init_lora_weights)
        s = lora_scaling(r, lora_alpha, use_rslora)
        self.register_buffer("scaling", torch.full((E,), s, device=self.weight.device))
        self.register_buffer("calibration", torch.ones(E, device=self.weight.device))
        self.register_buffer("persona_bias", None)
        self.register_buffer("persona_weights", None)

    def _set_routing(self, top_k: int, temperature: float, normalize: str) -> None:
        if (
            isinstance(top_k, bool)
            or not isinstance(top_k, int)
            or not 1 <= top_k <= self.num_experts
        ):
            raise ValueError(f"top_k: expected an int in 1..{self.num_experts} (E), got {top_k!r}")
        if not (
            isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
        ):
            raise ValueError(f"temperature: expected a finite float > 0, got {temperature!r}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize: expected one of {NORMALIZE_MODES}, got {normalize!r}")
        self.top_k = top_k
        self.temperature = float(temperature)
        self.normalize = normalize

    def reset_lora_parameters(self, init_lora_weights: bool = True) -> None:
        """PEFT's init: ``lora_A`` Kaiming-uniform per expert, ``lora_B`` zero (random if False)."""
        with torch.no_grad():
            for e in range(self.num_experts):
                nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
            if init_lora_weights:
                self.lora_B.zero_()
            else:
                nn.init.normal_(self.lora_B, std=1.0 / math.sqrt(self.rank))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        num_experts: int,
        rank: int,
        top_k: int = 2,
        lora_alpha: float | None = None,
        use_rslora: bool = False,
        temperature: float = 1.0,
        normalize: str = "topk",
        *,
        init_lora_weights: bool = True,
        record_routing: bool = False,
    ) -> PersonaMoELinear:
        """Wrap an existing ``nn.Linear``: its ``weight``/``bias`` Parameters are shared, not copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        for name, value in (("num_experts", num_experts), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        self._make_bank(num_experts, rank, lora_alpha, use_rslora, init_lora_weights)
        self._set_routing(top_k, temperature, normalize)
        self.record_routing = record_routing
        self.last_routing = None
        self.last_scores = None
        return self

    # -- personas ----------------------------------------------------------------------------
    def set_persona_bias(self, table: Tensor | None) -> None:
        """Token mode with a persona bias table ``[P, E]`` (``-inf`` = expert not allowed)."""
        self._set_table("persona_bias", table)
        if table is not None:
            self.persona_weights = None

    def set_persona_weights(self, table: Tensor | None) -> None:
        """Fixed mode: a persona weight table ``[P, E]`` (each persona an explicit mixture)."""
        self._set_table("persona_weights", table)
        if table is not None:
            self.persona_bias = None

    def _set_table(self, name: str, table: Tensor | None) -> None:
        if table is not None:
            if (
                not isinstance(table, Tensor)
                or table.dim() != 2
                or table.shape[1] != self.num_experts
            ):
                got = list(table.shape) if isinstance(table, Tensor) else type(table).__name__
                raise ValueError(
                    f"{name}: expected a tensor of shape [P, E={self.num_experts}], got {got}"
                )
            table = table.detach().to(device=self.weight.device, dtype=torch.float32)
        setattr(self, name, table)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: Tensor, persona_ids: Tensor | None = None) -> Tensor:
        """``x [..., in_features]``; ``persona_ids`` with the leading dims of ``x`` (``-1`` = none)."""
        y, _, _ = self.forward_routing(x, persona_ids)
        return y

    def forward_routing(
        self, x: Tensor, persona_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(y, topk_idx, topk_gates)``; also the scores when ``record_routing`` is set."""
        pb = self.persona_bias
        pw = self.persona_weights
        ids = persona_ids
        if pb is None and pw is None:
            ids = None  # no table: every token routes freely, the ids have nothing to index
        args = LayerArgs(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                         self.top_k, self.temperature, self.normalize, self.calibration, pb, ids,
                         pw)  # fmt: skip
        check_layer_args(args)
        y, idx, gates, n = persona_moe_linear_scores(args)
        if self.record_routing:
            self.last_routing = (idx, gates)
            self.last_scores = n
        return y, idx, gates

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, num_experts={self.num_experts}, rank={self.rank}, "
            f"top_k={self.top_k}, temperature={self.temperature}, normalize={self.normalize!r}"
        )
