"""The ``triton`` backend (GPU; on CPU only under ``TRITON_INTERPRET=1`` and only when named).

The kernels live in ``personamoe.kernels`` (shipped from ``kernels/``); the whole layer is
``personamoe.kernels.launchers.persona_moe_linear``. Unavailable when Triton is not installed.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from personamoe.backends.base import Backend, LayerArgs, LayerOutputs


@functools.cache
def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "the 'triton' package is not installed"
    try:
        from personamoe.kernels import launchers  # noqa: F401
    except ImportError as e:
        return False, f"the Triton kernels are not built into this install ({e})"
    return True, ""


class TritonBackend(Backend):
    name = "triton"
    device_types = ("cuda",)

    def available(self) -> tuple[bool, str]:
        return _triton_status()

    def supports(self, device_type: str, *, explicit: bool) -> bool:
        if device_type == "cuda":
            return True
        # The interpreter runs the kernels on CPU tensors, slowly: only when asked for by name.
        return explicit and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"

    def run(self, args: LayerArgs) -> LayerOutputs:
        from personamoe.kernels import launchers

        if args.x.device.type == "cpu" and args.x.dtype == torch.bfloat16:
            # The interpreter computes tl.dot through numpy, which has no bfloat16: wrong numbers.
            raise ValueError(
                "x: expected float32 or float16 for the Triton interpreter on CPU (it computes "
                "bfloat16 dots wrongly), got torch.bfloat16; use the cpp backend on CPU"
            )

        return launchers.persona_moe_linear(args)

    def mix_run(
        self, args: LayerArgs, y: torch.Tensor, h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from personamoe.kernels import launchers

        if args.x.device.type == "cpu" and args.x.dtype == torch.bfloat16:
            raise ValueError(
                "x: expected float32 or float16 for the Triton interpreter on CPU (it computes "
                "bfloat16 dots wrongly), got torch.bfloat16; use the cpp backend on CPU"
            )
        _, idx, gates, n = launchers.persona_moe_linear(args, y_given=y, h_given=h)
        return idx, gates, n
