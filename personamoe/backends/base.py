"""What every backend implements: one forward of the whole layer on 2-D ``x``."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class LayerArgs(NamedTuple):
    """The op's arguments, with ``x [T, d_in]`` already flattened and ``persona_ids [T]``."""

    x: Tensor
    weight: Tensor
    bias: Tensor | None
    lora_a: Tensor
    lora_b: Tensor
    scaling: Tensor
    top_k: int
    temperature: float
    normalize: str
    calibration: Tensor | None
    persona_bias: Tensor | None
    persona_ids: Tensor | None
    persona_weights: Tensor | None


LayerOutputs = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(y [T, d_out] dtype of x, topk_idx [T, k] int32, topk_gates [T, k] fp32, scores [T, E] fp32)``."""


class Backend:
    """Base class: subclasses set ``name``/``device_types`` and implement ``forward``."""

    name: str = ""
    device_types: tuple[str, ...] = ()

    def available(self) -> tuple[bool, str]:
        """``(True, "")`` when usable here, else ``(False, reason)``."""
        return True, ""

    def supports(self, device_type: str, *, explicit: bool) -> bool:
        """Whether it runs on ``device_type``; ``explicit`` is True when the user named it."""
        return device_type in self.device_types

    def accepts(self, args: LayerArgs | None) -> bool:
        """Whether ``auto`` should give it this call (shape limits of specialised kernels)."""
        return True

    def forward(self, args: LayerArgs) -> LayerOutputs:
        raise NotImplementedError
