"""The adapter term's backward, written out as a few GEMMs (docs/design.md §2.5).

The op's forward is ``y = x W^T + b + sum_e C[t, e] * (B[e] @ h[t, e])`` with ``h = x A^T`` for
all experts at once and ``C[t, e] = g[t, e] * s[e]`` (token mode: the gates of the chosen experts;
fixed mode: the persona's weight row). :func:`adapter_grads` gives the gradients of ``x``,
``lora_a`` and ``lora_b`` of the adapter term without building an autograd graph:

- ``h = x A^T`` is recomputed (one GEMM over ``[E*r, d_in]``); the gates are recomputed from it
  exactly as the reference does, with the forward's ``topk_idx`` (the choice has no gradient);
- ``dB = dy^T (C*h)`` (one GEMM, laid out as ``[E, d_out, r]``), ``u = dy B_cat`` (one GEMM);
- token mode: ``dg[t, j] = s_e <u_e, h_e>`` (+ the gates' incoming gradient) goes back through the
  softmax into ``dn`` (+ the scores' incoming gradient), and through ``n = ||h_e|| / c_e + bias``
  into ``dh_e += dn_e / c_e * h_e / ||h_e||`` (0 where ``||h_e|| = 0``, as torch's norm backward);
- ``dh = C*u + that``, ``dA = dh^T x`` and ``dx = dh A_cat`` (one GEMM each).

Every step mirrors the reference's autograd (``tests/test_backward.py`` compares them), including
its non-finite handling: an unused expert (coefficient 0) never touches a token (``where``, not a
product with 0), non-finite entries of ``B`` get gradient 0 and the rows of tokens that use such
an expert (NaN outputs) send no gradient into the GEMMs. Arithmetic is fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

# The reference's masked softmax (forward only here: its detach of the row max changes no value).
from personamoe.reference import _masked_softmax, compute_dtype, persona_rows

__all__ = ["adapter_grads"]


def _plain_cpu_eager(t: Tensor) -> bool:
    """Whether ``t`` is a plain CPU tensor outside any tracing (compile, AOT, fake or proxy
    modes, tensor subclasses): only then may the backward read a value to pick a path."""
    return (
        t.device.type == "cpu"
        and type(t) in (torch.Tensor, torch.nn.Parameter)
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
    )


def _all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite, read from one sum (inf and NaN survive a sum; a
    finite overflow only sends the caller to its exact path). Reads a value: CPU/eager only."""
    return bool(torch.isfinite(t.sum()))


def _softmax_backward(p: Tensor, dp: Tensor, allowed: Tensor) -> Tensor:
    """``dz`` of ``p = softmax(z)`` over the ``allowed`` entries of the last dim:
    ``p * (dp - sum(p * dp))``, exactly 0 on disallowed entries (the reference masks them with
    ``where``, so a NaN elsewhere in the row does not reach them)."""
    dz = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
    return torch.where(allowed, dz, torch.zeros_like(dz))


def adapter_grads(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: Tensor,
    topk_idx: Tensor,
    grad_y: Tensor,
    grad_gates: Tensor | None = None,
    grad_scores: Tensor | None = None,
    *,
    temperature: float = 1.0,
    normalize: str = "topk",
    calibration: Tensor | None = None,
    persona_bias: Tensor | None = None,
    persona_ids: Tensor | None = None,
    persona_weights: Tensor | None = None,
    need_x: bool = True,
    need_a: bool = True,
    need_b: bool = True,
    grad_x_base: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx, d lora_a, d lora_b)`` of the adapter term, ``None`` where not needed.

    ``dx`` is in the compute dtype (fp32, or fp64), with ``grad_x_base`` (the base term's
    ``dy W``, ``[T, d_in]``) added if given (in place when it is in the compute dtype), so that
    the caller casts to ``x.dtype`` once; ``d lora_a`` and ``d lora_b`` are in the dtype of
    their inputs. ``grad_gates [T, k]`` and ``grad_scores [T, E]`` are the incoming gradients of
    the op's ``topk_gates`` and ``scores`` outputs (token mode only: in fixed mode those outputs
    are the persona table's rows and carry no gradient to the inputs).
    """
    cdt = compute_dtype(x.dtype)
    T, d_in = x.shape
    E, r, _ = lora_a.shape
    d_out = lora_b.shape[1]
    xc = x.to(cdt)
    a_flat = lora_a.reshape(E * r, d_in).to(cdt)
    h = (xc @ a_flat.t()).reshape(T, E, r)
    s = scaling.to(cdt)
    idx = topk_idx.long()

    fixed = persona_weights is not None
    norm = gates = p_full = allowed = None
    if fixed:
        assert persona_weights is not None
        coeff = persona_rows(persona_weights.to(cdt), persona_ids, T) * s
    else:
        norm = torch.linalg.vector_norm(h, dim=-1)
        n = norm / calibration.to(cdt) if calibration is not None else norm
        if persona_bias is not None:
            n = n + persona_rows(persona_bias.to(cdt), persona_ids, T)
        z = n / temperature
        if normalize == "topk":
            zk = z.gather(1, idx)
            allowed = ~torch.isneginf(zk)
            gates = _masked_softmax(zk, allowed)
        elif normalize == "full":
            allowed = ~torch.isneginf(z)
            p_full = _masked_softmax(z, allowed)
            gates = p_full.gather(1, idx)
        else:
            raise ValueError(f"normalize: expected 'topk' or 'full', got {normalize!r}")
        coeff = torch.zeros(T, E, dtype=cdt, device=x.device).scatter_add(1, idx, gates) * s
    used = coeff != 0  # [T, E]: only these experts touch token t

    # Non-finite B: the reference zeroes it for the GEMM and writes NaN rows for the tokens that
    # use it; those rows (constant NaN) send no gradient anywhere, and B's non-finite entries get
    # 0. On CPU in eager mode one reduction (a sum is finite only if every entry is) skips those
    # passes over B and dy when B is finite; elsewhere (no host sync, traceable) they always run.
    b = lora_b.to(cdt)
    dy = grad_y.to(cdt)
    finite = None
    if not _plain_cpu_eager(b) or not _all_finite(b):
        finite = torch.isfinite(b)
        b = torch.where(finite, b, torch.zeros_like(b))
        uses_bad = (used & ~finite.flatten(1).all(dim=1)[None, :]).any(dim=1)
        dy = torch.where(uses_bad[:, None], torch.zeros_like(dy), dy)

    grad_b = None
    if need_b:
        hc = torch.where(used[:, :, None], h * coeff[:, :, None], torch.zeros_like(h))
        db = (dy.t() @ hc.reshape(T, E * r)).reshape(d_out, E, r).permute(1, 0, 2)
        if finite is not None:
            db = torch.where(finite, db, torch.zeros_like(db))
        grad_b = db.to(lora_b.dtype).contiguous()
    if not (need_x or need_a):
        return None, None, grad_b

    b_cat = b.permute(1, 0, 2).reshape(d_out, E * r)  # column e*r + j holds B[e][:, j]
    u = (dy @ b_cat).reshape(T, E, r)
    dh = torch.where(used[:, :, None], u * coeff[:, :, None], torch.zeros_like(u))
    if not fixed:
        assert norm is not None and gates is not None and allowed is not None
        # dC[t, e] = <u_e, h_e> on used experts; C = scatter(gates) * s.
        dcoeff = torch.where(used, (u * h).sum(dim=-1), torch.zeros_like(norm)) * s
        dg = dcoeff.gather(1, idx)
        if grad_gates is not None:
            dg = dg + grad_gates.to(cdt)
        if p_full is None:
            dzk = _softmax_backward(gates, dg, allowed)
            dz = torch.zeros_like(norm).scatter_add(1, idx, dzk)
        else:
            dp = torch.zeros_like(norm).scatter_add(1, idx, dg)
            dz = _softmax_backward(p_full, dp, allowed)
        dn = dz / temperature
        if grad_scores is not None:
            dn = dn + grad_scores.to(cdt)
        dnorm = dn / calibration.to(cdt) if calibration is not None else dn
        ratio = torch.where(norm == 0, torch.zeros_like(norm), dnorm / norm)
        dh = dh + h * ratio[:, :, None]
    dh_flat = dh.reshape(T, E * r)
    grad_a = (dh_flat.t() @ xc).reshape(E, r, d_in).to(lora_a.dtype) if need_a else None
    grad_x = None
    if need_x:
        if grad_x_base is not None and grad_x_base.dtype == cdt:
            grad_x = grad_x_base.addmm_(dh_flat, a_flat)
        elif grad_x_base is not None:
            grad_x = torch.addmm(grad_x_base.to(cdt), dh_flat, a_flat)
        else:
            grad_x = dh_flat @ a_flat
    return grad_x, grad_a, grad_b
