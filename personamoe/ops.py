"""The custom-op boundary ``personamoe::persona_moe_linear`` (docs/design.md §2).

Registered with ``torch.library.Library`` (``define`` + ``impl``), not ``@custom_op``: the latter's
Python dispatch costs ~13 µs a call against ~3.5 µs (docs/design.md §2.6), a third of the budget at decode.
The op has a fake (meta) implementation, so it traces under ``torch.compile(fullgraph=True)``, and
an autograd formula. Inside, a backend is chosen at run time (``personamoe.set_backend``).

The public entry point :func:`persona_moe_linear` validates on the host, flattens leading dims and
calls the op. In eager mode with nothing requiring grad it calls the backend directly, skipping the
dispatcher round trip (the op would do exactly the same work).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from personamoe._validation import check_layer_args
from personamoe.backends import resolve_backend
from personamoe.backward import adapter_grads
from personamoe.layer_args import LayerArgs

__all__ = ["persona_moe_linear", "persona_moe_linear_op"]

_lib = torch.library.Library("personamoe", "DEF")
_lib.define(
    "persona_moe_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
    "Tensor scaling, int top_k, float temperature, str normalize, Tensor? calibration, "
    "Tensor? persona_bias, Tensor? persona_ids, Tensor? persona_weights) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


def _run_backend(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's CPU/CUDA implementation: reached by compile, autograd, the vLLM plugin and users
    calling ``torch.ops.personamoe.persona_moe_linear`` directly, none of which ran the public
    function's checks. Shapes, dtypes and devices are checked here (no data read, no sync), so no
    door reaches a kernel with arrays smaller than the kernel will index."""
    la = LayerArgs(*args)
    check_layer_args(la, values=False)
    if la.x.dim() != 2:
        raise ValueError(f"x: expected 2 dims [T, d_in] at the op, got shape {list(la.x.shape)}")
    return resolve_backend(la.x.device, la).forward(la)


_lib.impl("persona_moe_linear", _run_backend, "CPU")
_lib.impl("persona_moe_linear", _run_backend, "CUDA")


@torch.library.register_fake("personamoe::persona_moe_linear")
def _fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: Tensor,
    top_k: int,
    temperature: float,
    normalize: str,
    calibration: Tensor | None,
    persona_bias: Tensor | None,
    persona_ids: Tensor | None,
    persona_weights: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    T = x.shape[0]
    E = lora_a.shape[0]
    k = min(top_k, E)
    return (
        x.new_empty(T, weight.shape[0]),
        x.new_empty(T, k, dtype=torch.int32),
        x.new_empty(T, k, dtype=torch.float32),
        x.new_empty(T, E, dtype=torch.float32),
    )


# Schema positions of the tensor inputs that get no gradient from the op.
_NO_GRAD_INPUTS = {5: "scaling", 9: "calibration", 10: "persona_bias", 12: "persona_weights"}


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    # Inputs in schema order: six tensors, (top_k, temperature, normalize), four optional tables.
    tensors, (top_k, temperature, normalize), tables = inputs[:6], inputs[6:9], inputs[9:]
    ctx.save_for_backward(*tensors, *tables, output[1])
    ctx.top_k, ctx.temperature, ctx.normalize = top_k, temperature, normalize


def _backward(
    ctx: Any,
    grad_y: Tensor,
    _grad_idx: Tensor | None,
    grad_gates: Tensor | None,
    grad_scores: Tensor | None,
) -> tuple[Tensor | None, ...]:
    """Analytic gradients: the base term's directly, the adapter term's in a few GEMMs
    (:func:`personamoe.backward.adapter_grads`) with the forward's top-k fixed.

    The choice of experts has no gradient (docs/design.md §2.5); the gates' gradient flows through
    the norms into ``h``. No autograd graph is built and no forward is replayed.
    """
    (
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        scaling,
        calibration,
        persona_bias,
        persona_ids,
        persona_weights,
        topk_idx,
    ) = ctx.saved_tensors
    wants = ctx.needs_input_grad
    if torch.is_grad_enabled():
        # create_graph=True: the backward below is written out without autograd, so a second
        # derivative through it would be silently wrong. Refuse rather than return it.
        raise RuntimeError(
            "persona_moe_linear: double backward (create_graph=True) is not supported; "
            "differentiate the reference (personamoe.reference.persona_moe_linear) for "
            "higher-order gradients"
        )
    for i, name in _NO_GRAD_INPUTS.items():
        if wants[i]:
            raise RuntimeError(
                f"{name}: expected a tensor that does not require grad (the op gives gradients "
                "to x, weight, bias, lora_a and lora_b only), got requires_grad=True; "
                f"detach it, or train it through personamoe.reference"
            )
    grads: list[Tensor | None] = [None] * 13
    # The base term x W^T + b is linear: its gradients are one GEMM each.
    if wants[1]:
        grads[1] = (grad_y.t().to(x.dtype) @ x).to(weight.dtype)
    if bias is not None and wants[2]:
        grads[2] = grad_y.sum(dim=0).to(bias.dtype)
    base_gx = grad_y.to(weight.dtype) @ weight if wants[0] else None
    if wants[0] or wants[3] or wants[4]:
        dx, grads[3], grads[4] = adapter_grads(
            x,
            lora_a,
            lora_b,
            scaling,
            topk_idx,
            grad_y,
            grad_gates,
            grad_scores,
            temperature=ctx.temperature,
            normalize=ctx.normalize,
            calibration=calibration,
            persona_bias=persona_bias,
            persona_ids=persona_ids,
            persona_weights=persona_weights,
            need_x=bool(wants[0]),
            need_a=bool(wants[3]),
            need_b=bool(wants[4]),
            grad_x_base=base_gx,
        )
        grads[0] = None if dx is None else dx.to(x.dtype)
    return tuple(grads)


torch.library.register_autograd(
    "personamoe::persona_moe_linear", _backward, setup_context=_setup_context
)

persona_moe_linear_op = torch.ops.personamoe.persona_moe_linear
"""The raw op on 2-D ``x``: returns ``(y, topk_idx, topk_gates, scores)``; no validation."""


def _needs_op(tensors: tuple[Tensor | None, ...]) -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def persona_moe_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: Tensor,
    *,
    top_k: int,
    temperature: float = 1.0,
    normalize: str = "topk",
    calibration: Tensor | None = None,
    persona_bias: Tensor | None = None,
    persona_ids: Tensor | None = None,
    persona_weights: Tensor | None = None,
    return_routing: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """The persona-MoE linear layer (docs/design.md §1) on the chosen backend; same signature as
    :func:`personamoe.reference.persona_moe_linear`.

    ``x [..., d_in]``; ``persona_ids`` has the leading dims of ``x`` (``-1`` = no persona).
    Returns ``y [..., d_out]`` or ``(y, topk_idx [..., k] int32, topk_gates [..., k] fp32)``.
    """
    args = LayerArgs(x, weight, bias, lora_a, lora_b, scaling, top_k, temperature, normalize,
                     calibration, persona_bias, persona_ids, persona_weights)  # fmt: skip
    check_layer_args(args)
    y, idx, gates, _ = persona_moe_linear_scores(args)
    if return_routing:
        return y, idx, gates
    return y


def persona_moe_linear_scores(args: LayerArgs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unvalidated: ``(y, topk_idx, topk_gates, scores)`` with the leading dims of ``x`` restored."""
    x, ids = args.x, args.persona_ids
    lead = x.shape[:-1]
    flat = x.dim() == 2  # the common case: no reshapes in or out (each costs ~1 us at decode)
    if not flat:
        x = x.reshape(-1, x.shape[-1])
    if ids is not None and ids.dim() != 1:
        ids = ids.reshape(-1)
    if x is not args.x or ids is not args.persona_ids:
        args = args._replace(x=x, persona_ids=ids)
    if _needs_op((args.x, args.weight, args.bias, args.lora_a, args.lora_b)):
        y, idx, gates, n = persona_moe_linear_op(*args)
    else:
        y, idx, gates, n = resolve_backend(x.device, args).forward(args)
    if flat:
        return y, idx, gates, n
    return (
        y.reshape(*lead, y.shape[-1]),
        idx.reshape(*lead, idx.shape[-1]),
        gates.reshape(*lead, gates.shape[-1]),
        n.reshape(*lead, n.shape[-1]),
    )
