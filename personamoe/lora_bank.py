"""What every persona layer holds: a linear layer's base ``weight``/``bias`` and a stacked bank of
LoRA experts with its routing options.

:class:`~personamoe.nn.PersonaMoELinear` (a standalone layer with its own persona tables) and the
injected model's persona layers (:mod:`personamoe.integrations.layers`, tables from the model's
shared state) both build on :class:`LoraBankLinear`; each defines only its own forward. Parameter
names follow Hugging Face / PEFT (``weight``, ``bias``, ``lora_A``, ``lora_B``) so a base checkpoint
loads unchanged; the bank is stacked: ``lora_A [E, r, d_in]``, ``lora_B [E, d_out, r]``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from personamoe.options import check_routing_options

__all__ = ["BaseParams", "LoraBankLinear", "lora_scaling"]


def lora_scaling(rank: int, lora_alpha: float | None, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (``alpha`` defaults to r)."""
    alpha = float(rank if lora_alpha is None else lora_alpha)
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class BaseParams(NamedTuple):
    """An existing layer's base Parameters, adopted (shared, not copied) by a new bank layer."""

    weight: Tensor  # an nn.Parameter (nn.Linear's annotations say Tensor)
    bias: Tensor | None


def _check_sizes(**sizes: object) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


class LoraBankLinear(nn.Module):
    """A base linear layer plus ``E`` LoRA experts of rank ``r`` and how they are routed.

    ``base``: adopt these Parameters (the wrapped layer keeps working on the same tensors, and a
    base checkpoint loads into either) instead of allocating and initialising new ones like
    ``nn.Linear``; ``bias``, ``device`` and ``dtype`` are then read from them. The other arguments
    are those of :class:`~personamoe.nn.PersonaMoELinear`.
    """

    weight: Tensor
    bias: Tensor | None
    scaling: Tensor
    calibration: Tensor

    # Buffers that stay fp32 whatever dtype the module is cast to: the op accumulates in fp32, and
    # rsLoRA's alpha/sqrt(r) or a persona bias would round in bf16. They only follow the device.
    fp32_buffers: tuple[str, ...] = ("scaling", "calibration")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        rank: int,
        *,
        top_k: int,
        temperature: float,
        normalize: str,
        lora_alpha: float | None,
        use_rslora: bool,
        init_lora_weights: bool,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        base: BaseParams | None = None,
        experts: str = "E",
    ) -> None:
        super().__init__()
        _check_sizes(in_features=in_features, out_features=out_features)
        _check_sizes(num_experts=num_experts, rank=rank)
        self.in_features = in_features
        self.out_features = out_features
        if base is None:
            self.weight = nn.Parameter(
                torch.empty(out_features, in_features, device=device, dtype=dtype)
            )
            self.bias = (
                nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
                if bias
                else None
            )
            self._init_base()
        else:
            self.weight = base.weight
            self.bias = base.bias
        self._make_bank(num_experts, rank, lora_alpha, use_rslora, init_lora_weights)
        check_routing_options(top_k, num_experts, temperature, normalize, experts=experts)
        self.top_k = top_k
        self.temperature = float(temperature)
        self.normalize = normalize

    def _apply(self, fn: Any, recurse: bool = True) -> LoraBankLinear:
        keep = {n: t for n in self.fp32_buffers if (t := self._buffers.get(n)) is not None}
        super()._apply(fn, recurse)
        for n, t in keep.items():
            moved = self._buffers[n]
            if moved is not None and moved.dtype != t.dtype:
                self._buffers[n] = t.to(device=moved.device)
        return self

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
        self.register_buffer("scaling", torch.full((E,), s, device=dev))
        self.register_buffer("calibration", torch.ones(E, device=dev))

    def reset_lora_parameters(self, init_lora_weights: bool = True) -> None:
        """PEFT's init: ``lora_A`` Kaiming-uniform per expert, ``lora_B`` zero (random if False)."""
        with torch.no_grad():
            for e in range(self.num_experts):
                nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
            if init_lora_weights:
                self.lora_B.zero_()
            else:
                nn.init.normal_(self.lora_B, std=1.0 / math.sqrt(self.rank))

    def base_weight(self) -> Tensor:
        """The base weight as ``[d_out, d_in]`` (layers that store it transposed return a view)."""
        return self.weight

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, num_experts={self.num_experts}, rank={self.rank}, "
            f"top_k={self.top_k}, temperature={self.temperature}, normalize={self.normalize!r}"
        )
