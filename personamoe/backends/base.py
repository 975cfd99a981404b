"""What every backend implements: one forward of the whole layer on 2-D ``x``."""

from __future__ import annotations

import torch

from personamoe import reference
from personamoe.layer_args import LayerArgs, LayerOutputs

__all__ = ["Backend", "LayerArgs", "LayerOutputs"]


class Backend:
    """Base class: subclasses set ``name``/``device_types`` and implement ``run``.

    ``forward`` is the one place where a call the compiled kernels do not take goes to the
    reference instead: inputs whose dtype is not in ``kernel_dtypes`` (fp64, for gradcheck; the
    kernels accumulate in fp32, which would fail a float64 gradcheck).
    """

    name: str = ""
    device_types: tuple[str, ...] = ()
    kernel_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

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
        """The layer's four outputs; dtypes outside ``kernel_dtypes`` run the reference."""
        if args.x.dtype not in self.kernel_dtypes:
            return reference.forward(args)
        return self.run(args)

    def run(self, args: LayerArgs) -> LayerOutputs:
        """The backend's own kernels, for inputs of a dtype in ``kernel_dtypes``."""
        raise NotImplementedError
