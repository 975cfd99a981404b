"""``PersonaMoELinear``: a drop-in ``nn.Linear`` that carries a bank of LoRA persona experts.

Parameter names follow Hugging Face / PEFT (``weight``, ``bias``, ``lora_A``, ``lora_B``) so a base
checkpoint loads unchanged; the bank is stacked: ``lora_A [E, r, d_in]``, ``lora_B [E, d_out, r]``
(:class:`~personamoe.lora_bank.LoraBankLinear`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from personamoe._validation import check_layer_args
from personamoe.layer_args import LayerArgs
from personamoe.lora_bank import BaseParams, LoraBankLinear, lora_scaling
from personamoe.ops import persona_moe_linear_scores

__all__ = ["PersonaMoELinear", "lora_scaling"]


class PersonaMoELinear(LoraBankLinear):
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

    persona_bias: Tensor | None
    persona_weights: Tensor | None

    fp32_buffers = (*LoraBankLinear.fp32_buffers, "persona_bias", "persona_weights")

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
        _base: BaseParams | None = None,
    ) -> None:
        # ``_base`` (private): adopt an existing layer's Parameters, see :meth:`from_linear`.
        super().__init__(
            in_features, out_features, num_experts, rank, top_k=top_k, temperature=temperature,
            normalize=normalize, lora_alpha=lora_alpha, use_rslora=use_rslora,
            init_lora_weights=init_lora_weights, bias=bias, device=device, dtype=dtype, base=_base,
        )  # fmt: skip
        self.register_buffer("persona_bias", None)
        self.register_buffer("persona_weights", None)
        self.record_routing = record_routing
        self.last_routing: tuple[Tensor, Tensor] | None = None
        self.last_scores: Tensor | None = None

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
        return cls(
            linear.in_features, linear.out_features, num_experts, rank, top_k,
            bias=linear.bias is not None, lora_alpha=lora_alpha, use_rslora=use_rslora,
            temperature=temperature, normalize=normalize, init_lora_weights=init_lora_weights,
            record_routing=record_routing, _base=BaseParams(linear.weight, linear.bias),
        )  # fmt: skip

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
