"""The contract of ``docs/design.md`` §1 in plain torch: the ground truth of every backend.

Every function here works on any device and dtype and is differentiable. Arithmetic runs in fp32
(fp64 when the inputs are fp64) and the output is cast back to the dtype of ``x`` once, at the end.

Shapes: ``x [T, d_in]``, ``weight [d_out, d_in]``, ``bias [d_out]``, ``lora_a [E, r, d_in]``,
``lora_b [E, d_out, r]``, ``scaling [E]``, ``calibration [E]``, ``persona_bias``/``persona_weights
[P, E]``, ``persona_ids [T]`` (``-1``, or any id outside ``[0, P)``, means "no persona").
"""

from __future__ import annotations

import torch
from torch import Tensor

from personamoe.layer_args import LayerArgs, LayerOutputs
from personamoe.options import NORMALIZE_MODES

__all__ = [
    "compute_dtype",
    "expand",
    "fixed_route",
    "forward",
    "gates_for",
    "load_balancing_loss",
    "persona_moe_linear",
    "persona_moe_linear_full",
    "route",
    "scores",
    "shrink",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every input dtype, fp64 stays fp64 (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def persona_rows(table: Tensor, persona_ids: Tensor | None, num_tokens: int) -> Tensor:
    """Row ``table[p(t)]`` per token; ids outside ``[0, P)`` give a zero row ("no persona").

    Out-of-range ids are treated as "no persona" instead of being read, as the kernels must.
    """
    P, E = table.shape
    if persona_ids is None:
        return table.new_zeros(num_tokens, E)
    ids = persona_ids.reshape(-1).long()
    valid = (ids >= 0) & (ids < P)
    rows = table[ids.clamp(0, max(P - 1, 0))]
    return torch.where(valid[:, None], rows, torch.zeros_like(rows))


def shrink(x: Tensor, lora_a: Tensor) -> Tensor:
    """Step 1: ``h[t, e, :] = A[e] @ x[t]`` for all experts, as one GEMM over ``[E*r, d_in]``."""
    E, r, d_in = lora_a.shape
    cdt = compute_dtype(x.dtype)
    h = x.to(cdt) @ lora_a.reshape(E * r, d_in).to(cdt).t()
    return h.reshape(x.shape[0], E, r)


def scores(
    h: Tensor,
    calibration: Tensor | None = None,
    persona_bias: Tensor | None = None,
    persona_ids: Tensor | None = None,
) -> Tensor:
    """Step 2: ``n[t, e] = ||h[t, e]||_2 / c[e] + bias[p(t), e]`` (fp32 ``[T, E]``)."""
    n = torch.linalg.vector_norm(h, dim=-1)
    if calibration is not None:
        n = n / calibration.to(n.dtype)
    if persona_bias is not None:
        n = n + persona_rows(persona_bias.to(n.dtype), persona_ids, h.shape[0])
    return n


def _masked_softmax(z: Tensor, allowed: Tensor) -> Tensor:
    """Softmax over ``allowed`` entries of the last dim; rows with none allowed give all zeros."""
    z = torch.where(allowed, z, torch.full_like(z, float("-inf")))
    m = z.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m).detach()
    e = torch.exp(z - m)
    denom = e.sum(dim=-1, keepdim=True)
    return e / torch.where(denom == 0, torch.ones_like(denom), denom)


def _sorted_topk(values: Tensor, k: int) -> Tensor:
    """Indices of the k largest values per row, ties to the lower index (a stable descending sort).

    NaN ranks last, below ``-inf`` (torch's sort would put it first): an expert whose score is
    NaN is chosen only when nothing else is left, so NaN in one expert never reaches tokens that
    had k other experts to choose from (docs/design.md §1)."""
    nan = torch.isnan(values)
    order = torch.sort(values.masked_fill(nan, float("-inf")), dim=-1, descending=True, stable=True)
    last = torch.sort(nan.gather(-1, order.indices).to(torch.uint8), dim=-1, stable=True).indices
    return order.indices.gather(-1, last)[:, :k]


def gates_for(
    n: Tensor, topk_idx: Tensor, *, temperature: float = 1.0, normalize: str = "topk"
) -> Tensor:
    """Step 4: the gates of the chosen experts ``topk_idx`` from the scores ``n`` (differentiable in ``n``)."""
    idx = topk_idx.long()
    z = n / temperature
    if normalize == "topk":
        zk = z.gather(1, idx)
        return _masked_softmax(zk, ~torch.isneginf(zk))
    if normalize == "full":
        return _masked_softmax(z, ~torch.isneginf(z)).gather(1, idx)
    raise ValueError(f"normalize: expected one of {NORMALIZE_MODES}, got {normalize!r}")


def route(
    n: Tensor, *, top_k: int, temperature: float = 1.0, normalize: str = "topk"
) -> tuple[Tensor, Tensor]:
    """Steps 3-4: ``(topk_idx [T, k] int32, topk_gates [T, k])`` from the scores ``n [T, E]``.

    Disallowed experts (score ``-inf``) are only chosen when fewer than k are allowed; they then
    fill the empty slots in index order with gate 0.
    """
    idx = _sorted_topk(n.detach(), top_k)
    return idx.to(torch.int32), gates_for(n, idx, temperature=temperature, normalize=normalize)


def fixed_route(weights_rows: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Fixed mode's report: the k largest weights of each token's row and their values."""
    idx = _sorted_topk(weights_rows.detach(), top_k)
    return idx.to(torch.int32), weights_rows.gather(1, idx)


def _mix(h: Tensor, lora_b: Tensor, coeff: Tensor) -> Tensor:
    """``sum_e coeff[t, e] * (B[e] @ h[t, e])`` as one GEMM over ``E*r`` (coeff already holds ``s``).

    Only used experts touch a token: ``h`` of an unused expert (coefficient 0) is replaced by 0,
    not multiplied by it (``0 * inf`` is NaN).
    Non-finite entries of ``B`` are zeroed for the GEMM (a dense GEMM would multiply them by
    other tokens' zeros); a token that does use such an expert gets a NaN row instead.
    """
    T, E, r = h.shape
    d_out = lora_b.shape[1]
    used = coeff != 0
    hc = torch.where(used[:, :, None], h * coeff[:, :, None], torch.zeros_like(h))
    b = lora_b.to(h.dtype)
    finite = torch.isfinite(b)
    b = torch.where(finite, b, torch.zeros_like(b))
    y = hc.reshape(T, E * r) @ b.permute(0, 2, 1).reshape(E * r, d_out)
    uses_bad = (used & ~finite.flatten(1).all(dim=1)[None, :]).any(dim=1)
    return torch.where(uses_bad[:, None], torch.full_like(y, float("nan")), y)


def expand(
    h: Tensor, lora_b: Tensor, scaling: Tensor, topk_idx: Tensor, topk_gates: Tensor
) -> Tensor:
    """Step 5's adapter term: ``sum_j g[t, j] * s[I_tj] * (B[I_tj] @ h[t, I_tj])`` (``[T, d_out]``)."""
    T, E, _ = h.shape
    coeff = torch.zeros(T, E, dtype=h.dtype, device=h.device)
    coeff = coeff.scatter_add(1, topk_idx.long(), topk_gates.to(h.dtype))
    return _mix(h, lora_b, coeff * scaling.to(h.dtype))


def persona_moe_linear_full(
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
    topk_idx: Tensor | None = None,
    base: bool = True,
    h: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The whole layer on 2-D ``x``: ``(y, topk_idx int32, topk_gates, scores)``.

    ``scores`` is ``n [T, E]`` in token mode and the token's weight row in fixed mode. Passing
    ``topk_idx`` replays a routing decision already made (the backward pass uses this so that the
    choice, which has no gradient, is exactly the forward one). ``base=False`` leaves out
    ``x W^T + b``: ``y`` is the adapter term alone. ``h`` (``[T, E, r]`` or ``[T, E*r]``) is a
    shrink the caller computed (e.g. all-reduced over tensor-parallel ranks), used in place of
    ``A x`` for the scores and the mix.
    """
    cdt = compute_dtype(x.dtype)
    T = x.shape[0]
    E = lora_a.shape[0]
    k = min(top_k, E)
    if base:
        y = x.to(cdt) @ weight.to(cdt).t()
        if bias is not None:
            y = y + bias.to(cdt)
    else:  # the adapter term alone (the op's backward adds the base's gradient analytically)
        y = x.new_zeros((), dtype=cdt)
    if h is None:
        h = shrink(x, lora_a)
    else:
        h = h.to(cdt).reshape(T, E, lora_a.shape[1])
    if persona_weights is not None:
        w = persona_rows(persona_weights.to(cdt), persona_ids, T)
        idx, gates = fixed_route(w, k)
        if topk_idx is not None:
            idx, gates = topk_idx, w.gather(1, topk_idx.long())
        y = y + _mix(h, lora_b, w * scaling.to(cdt))
        return y.to(x.dtype), idx.to(torch.int32), gates.to(torch.float32), w.to(torch.float32)
    n = scores(h, calibration, persona_bias, persona_ids)
    if topk_idx is None:
        idx, gates = route(n, top_k=k, temperature=temperature, normalize=normalize)
    else:
        idx = topk_idx.to(torch.int32)
        gates = gates_for(n, idx, temperature=temperature, normalize=normalize)
    y = y + expand(h, lora_b, scaling.to(cdt), idx, gates)
    return y.to(x.dtype), idx, gates.to(torch.float32), n.to(torch.float32)


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
    """The persona-MoE linear layer of docs/design.md §1 for ``x`` of any leading dims.

    Returns ``y`` (dtype of ``x``), or ``(y, topk_idx [..., k] int32, topk_gates [..., k] fp32)``
    with ``return_routing=True``. ``persona_weights`` switches to the fixed mode.
    """
    lead = x.shape[:-1]
    ids = persona_ids.reshape(-1) if persona_ids is not None else None
    y, idx, gates, _ = persona_moe_linear_full(
        x.reshape(-1, x.shape[-1]),
        weight,
        bias,
        lora_a,
        lora_b,
        scaling,
        top_k=top_k,
        temperature=temperature,
        normalize=normalize,
        calibration=calibration,
        persona_bias=persona_bias,
        persona_ids=ids,
        persona_weights=persona_weights,
    )
    y = y.reshape(*lead, y.shape[-1])
    if not return_routing:
        return y
    return y, idx.reshape(*lead, idx.shape[-1]), gates.reshape(*lead, gates.shape[-1])


def forward(args: LayerArgs) -> LayerOutputs:
    """The op's four outputs for a :class:`~personamoe.layer_args.LayerArgs` on 2-D ``x``: the
    contract every backend is compared against, and where backends send what their kernels do not
    take (fp64 for gradcheck, shapes outside a specialised kernel)."""
    a = args
    return persona_moe_linear_full(
        a.x, a.weight, a.bias, a.lora_a, a.lora_b, a.scaling,
        top_k=a.top_k, temperature=a.temperature, normalize=a.normalize,
        calibration=a.calibration, persona_bias=a.persona_bias, persona_ids=a.persona_ids,
        persona_weights=a.persona_weights,
    )  # fmt: skip


def load_balancing_loss(
    scores: Tensor, topk_idx: Tensor, *, alpha: float = 0.01, allowed_only: bool = True
) -> Tensor:
    """Switch-style balance loss ``alpha * E * sum_e f_e * P_e``.

    ``P = softmax(scores)`` averaged over tokens (``-inf`` experts get probability 0), ``f_e`` the
    share of tokens whose top-k holds ``e`` (so ``sum_e f_e = k``). Differentiable through ``scores``.
    """
    n = scores.reshape(-1, scores.shape[-1]).float()
    idx = topk_idx.reshape(-1, topk_idx.shape[-1]).long()
    T, E = n.shape
    if T == 0:
        return n.sum() * 0.0
    p = _masked_softmax(n, ~torch.isneginf(n)) if allowed_only else torch.softmax(n, dim=-1)
    chosen = torch.zeros(T, E, device=n.device, dtype=n.dtype).scatter_(1, idx, 1.0)
    f = chosen.mean(dim=0)
    return alpha * E * (f * p.mean(dim=0)).sum()
