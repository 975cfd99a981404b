"""What every backend implements: one forward of the whole layer on 2-D ``x``."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from personamoe import reference
from personamoe.layer_args import LayerArgs, LayerOutputs

__all__ = [
    "Backend",
    "LayerArgs",
    "LayerOutputs",
    "device_guard",
    "kernel_ready",
    "reference_mix_into",
]


def _dense(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def kernel_ready(a: LayerArgs) -> LayerArgs:
    """The arguments as every kernel may read them: each small tensor (bias, scaling,
    calibration, tables, ids) and the banks contiguous, ``x`` with unit inner stride (its row
    stride is passed). Kernels index these with unit strides: an expanded ``scaling``
    (``tensor([s]).expand(E)``, stride 0) would otherwise be read past its one element.
    ``weight`` is left as it is: the launchers pass its strides or hand it to torch's GEMM."""
    x = a.x if a.x.stride(-1) == 1 else a.x.contiguous()
    fixed = (a.bias, a.scaling, a.calibration, a.persona_bias, a.persona_ids, a.persona_weights)
    dense = a.lora_a.is_contiguous() and a.lora_b.is_contiguous()
    if x is a.x and dense and all(t is None or t.is_contiguous() for t in fixed):
        return a  # the usual case on the decode path: no new tuple
    return a._replace(
        x=x, bias=_dense(a.bias), lora_a=a.lora_a.contiguous(), lora_b=a.lora_b.contiguous(),
        scaling=a.scaling.contiguous(), calibration=_dense(a.calibration),
        persona_bias=_dense(a.persona_bias), persona_ids=_dense(a.persona_ids),
        persona_weights=_dense(a.persona_weights),
    )  # fmt: skip


def device_guard(device: torch.device) -> Any:
    """The device context a launch runs in: ``x``'s own GPU (a model spread over several GPUs
    calls layers whose tensors are not on the current device; the eager fast path skips the
    dispatcher, which would otherwise set it), nothing on CPU."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


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
        args = kernel_ready(args)
        if args.x.device.type == "cpu":
            return self.run(args)
        with device_guard(args.x.device):
            return self.run(args)

    def run(self, args: LayerArgs) -> LayerOutputs:
        """The backend's own kernels, for inputs of a dtype in ``kernel_dtypes``."""
        raise NotImplementedError

    def mix_into(
        self, args: LayerArgs, y: Tensor, h: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Add the adapters' term of the layer into ``y`` (which holds the base output, computed by
        the caller: vLLM's own GEMM, a tensor-parallel all-reduce) in place; ``args.weight`` and
        ``args.bias`` are not read. ``h`` (fp32 ``[T, E*r]``, unit inner stride): a shrink the
        caller computed, used instead of ``A x`` (``args.lora_a`` is then not read). Returns
        ``(topk_idx, topk_gates, scores)``. The reference here; backends with kernels for it
        override :meth:`mix_run`."""
        if args.x.dtype not in self.kernel_dtypes:
            return reference_mix_into(args, y, h)
        args = kernel_ready(args)
        if args.x.device.type == "cpu":
            return self.mix_run(args, y, h)
        with device_guard(args.x.device):
            return self.mix_run(args, y, h)

    def mix_run(
        self, args: LayerArgs, y: Tensor, h: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        return reference_mix_into(args, y, h)


def reference_mix_into(
    args: LayerArgs, y: Tensor, h: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """:meth:`Backend.mix_into` by the reference: the adapter term alone, added into ``y``."""
    a = args
    term, idx, gates, n = reference.persona_moe_linear_full(
        a.x, a.weight, None, a.lora_a, a.lora_b, a.scaling,
        top_k=a.top_k, temperature=a.temperature, normalize=a.normalize,
        calibration=a.calibration, persona_bias=a.persona_bias, persona_ids=a.persona_ids,
        persona_weights=a.persona_weights, base=False, h=h,
    )  # fmt: skip
    y.add_(term.to(y.dtype))
    return idx, gates, n
