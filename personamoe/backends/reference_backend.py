"""The ``reference`` backend: ``personamoe.reference`` run as it is, on any device."""

from __future__ import annotations

from personamoe import reference
from personamoe.backends.base import Backend, LayerArgs, LayerOutputs


class ReferenceBackend(Backend):
    name = "reference"
    device_types = ("cpu", "cuda", "meta")

    def supports(self, device_type: str, *, explicit: bool) -> bool:
        return True

    def forward(self, args: LayerArgs) -> LayerOutputs:
        return reference.persona_moe_linear_full(
            args.x,
            args.weight,
            args.bias,
            args.lora_a,
            args.lora_b,
            args.scaling,
            top_k=args.top_k,
            temperature=args.temperature,
            normalize=args.normalize,
            calibration=args.calibration,
            persona_bias=args.persona_bias,
            persona_ids=args.persona_ids,
            persona_weights=args.persona_weights,
        )
