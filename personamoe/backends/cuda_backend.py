"""The ``cuda`` backend: the compiled decode kernel of ``personamoe._C_cuda`` (T <= 16).

``auto`` gives it the calls the kernel covers (``cuda_launch.covers``: T <= 16, E <= 64, r <= 64,
fp32/fp16/bf16); named explicitly, it sends the rest to the Triton backend. Unavailable when the extension was not built
(no nvcc at build time, or ``PERSONAMOE_CUDA=OFF``) or when no GPU is present.
"""

from __future__ import annotations

import functools

import torch

from personamoe.backends.base import Backend, LayerArgs, LayerOutputs


@functools.cache
def _cuda_status() -> tuple[bool, str]:
    try:
        from personamoe import _C_cuda  # type: ignore[attr-defined]  # noqa: F401
    except ImportError as e:
        return False, f"the CUDA extension personamoe._C_cuda is not built ({e})"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch"
    return True, ""


class CudaBackend(Backend):
    name = "cuda"
    device_types = ("cuda",)

    def available(self) -> tuple[bool, str]:
        return _cuda_status()

    def accepts(self, args: LayerArgs | None) -> bool:
        if args is None:
            return True
        from personamoe.backends import cuda_launch

        return cuda_launch.covers(args)

    def run(self, args: LayerArgs) -> LayerOutputs:
        from personamoe.backends import cuda_launch

        return cuda_launch.persona_moe_linear(args)

    def mix_run(
        self, args: LayerArgs, y: torch.Tensor, h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The mixture alone (a base computed elsewhere) goes through the Triton kernels, which
        # take any T; the decode kernel is built around its fused base.
        from personamoe.backends.triton_backend import TritonBackend

        triton = TritonBackend()
        if triton.available()[0]:
            return triton.mix_run(args, y, h)
        return super().mix_run(args, y, h)
