"""Routing statistics of an injected model's last forward, and its load-balancing loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from personamoe import reference
from personamoe.integrations.layers import persona_layers
from personamoe.integrations.model_personas import state_of

__all__ = ["LayerRouting", "RoutingStats", "routing_stats"]


@dataclass
class LayerRouting:
    """One layer's last forward, per persona (``None`` = no persona)."""

    counts: dict[str | None, Tensor]  # [E] int64: tokens that used each expert (gate != 0)
    entropy: dict[str | None, float]  # mean over tokens of the entropy (nats) of |gates| / sum
    tokens: dict[str | None, int]
    loss: Tensor | None  # this layer's load-balancing loss (None: no routed token)


@dataclass
class RoutingStats:
    """:func:`routing_stats`' answer; ``loss`` sums the layers' load-balancing losses."""

    experts: tuple[str, ...]
    layers: dict[str, LayerRouting]
    loss: Tensor

    def usage(self, persona: str | None = None) -> dict[str, int]:
        """Expert usage of ``persona`` summed over layers, by expert name."""
        total = torch.zeros(len(self.experts), dtype=torch.long)
        for lr in self.layers.values():
            if persona in lr.counts:
                total += lr.counts[persona]
        return {e: int(c) for e, c in zip(self.experts, total, strict=True)}


def routing_stats(model: nn.Module, *, alpha: float = 0.01) -> RoutingStats:
    """Per layer and persona: expert usage counts and gate entropy of the last forward, and the
    load-balancing loss ``alpha * E * sum_e f_e P_e`` summed over layers (differentiable, for
    training; see :func:`personamoe.reference.load_balancing_loss`)."""
    st = state_of(model)
    E = len(st.experts)
    layers: dict[str, LayerRouting] = {}
    total: Tensor | None = None
    for name, layer in persona_layers(model):
        rec = layer.pm_last
        if rec is None:
            continue
        idx = rec.topk_idx.reshape(-1, rec.topk_idx.shape[-1]).long()
        gates = rec.topk_gates.reshape(-1, rec.topk_gates.shape[-1]).detach().float()
        rows = (rec.rows.reshape(-1).to(idx.device) if rec.rows is not None
                else torch.zeros(idx.shape[0], dtype=torch.long, device=idx.device))  # fmt: skip
        if rows.numel() == 1 and idx.shape[0] != 1:
            rows = rows.expand(idx.shape[0])
        counts: dict[str | None, Tensor] = {}
        entropy: dict[str | None, float] = {}
        tokens: dict[str | None, int] = {}
        for r in torch.unique(rows).tolist():
            sel = rows == r
            i, g = idx[sel], gates[sel]
            used = g != 0  # routed: empty slots have gate 0; fixed: weights may be negative
            key = rec.row_names[r] if 0 <= r < len(rec.row_names) else None
            counts[key] = torch.bincount(i[used], minlength=E).cpu()
            p = g.abs() / g.abs().sum(-1, keepdim=True).clamp_min(1e-30)
            ent = -(torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), 0.0)).sum(-1)
            entropy[key] = float(ent.mean()) if ent.numel() else 0.0
            tokens[key] = int(sel.sum())
        loss = None
        if rec.scores is not None:
            n = rec.scores.reshape(-1, E)
            sidx = rec.topk_idx.reshape(-1, rec.topk_idx.shape[-1])
            if rec.routed is not None:
                keep = rec.routed.reshape(-1)
                n, sidx = n[keep], sidx[keep]
            if n.shape[0]:
                loss = reference.load_balancing_loss(n, sidx, alpha=alpha)
                total = loss if total is None else total + loss
        layers[name] = LayerRouting(counts, entropy, tokens, loss)
    if not layers:
        raise ValueError(
            "routing_stats: no routing recorded yet (run a forward first; compiled forwards do not "
            "record)"
        )
    if total is None:
        total = torch.zeros(())
    return RoutingStats(st.experts, layers, total)
