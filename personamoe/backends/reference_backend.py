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
        return reference.forward(args)  # every dtype: this is the fallback itself

    run = forward
