"""Persona layers inside an injected model: :class:`PersonaMoELinear` that reads its persona ids,
tables and routing mode from the model's shared :class:`~personamoe.personas.PersonaState`.

Every layer keeps the base module's ``weight``/``bias`` Parameters (shared, same names), so the base
checkpoint still loads. Experts whose adapter does not target a layer are *absent* there: each layer
folds its availability mask into its own persona bias table (``-inf`` in every row, including the
"no persona" row 0), so they are never ranked, whatever the persona.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from personamoe import reference
from personamoe._validation import check_layer_args
from personamoe.layer_args import LayerArgs
from personamoe.nn import PersonaMoELinear
from personamoe.ops import persona_moe_linear_scores
from personamoe.personas import PersonaState

__all__ = ["PersonaConv1DLayer", "PersonaLayer", "RoutingRecord", "persona_layers"]


class RoutingRecord(NamedTuple):
    """What one layer's last forward chose (kept for :func:`personamoe.routing_stats`)."""

    topk_idx: Tensor  # [..., k] int32
    topk_gates: Tensor  # [..., k] fp32 (0 = an empty slot)
    scores: Tensor | None  # [..., E] routing scores of the routed tokens (None: nothing routed)
    rows: Tensor | None  # [...] persona row of each token (None: every token row 0)
    routed: Tensor | None  # [...] bool: tokens that routed (None: all when scores is set)
    row_names: tuple[str | None, ...]


class PersonaLayer(PersonaMoELinear):
    """A persona-MoE layer wrapping an ``nn.Linear`` of a model (see the module docstring)."""

    fp32_buffers = ("scaling", "calibration", "pm_bias", "pm_weights")

    pm_available: Tensor
    pm_rank: Tensor
    pm_bias: Tensor | None
    pm_weights: Tensor | None
    pm_row_fixed: Tensor | None
    pm_state: PersonaState
    pm_all_available: bool
    pm_calibrated: bool
    pm_merged: bool
    pm_saved_weight: Tensor | None
    pm_seq_weights: Tensor | None
    pm_last: RoutingRecord | None

    @classmethod
    def wrap(
        cls,
        module: nn.Module,
        state: PersonaState,
        *,
        rank: int,
        top_k: int,
        temperature: float,
        normalize: str,
    ) -> PersonaLayer:
        """A layer over ``module``'s own ``weight``/``bias`` Parameters with ``E = len(state.experts)``."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._adopt(module)
        E = len(state.experts)
        self._make_bank(E, rank, None, False, True)
        self._set_routing(min(top_k, E), temperature, normalize)
        self.record_routing = False
        self.last_routing = None
        self.last_scores = None
        self.pm_state = state
        dev = self.weight.device
        self.register_buffer("pm_available", torch.ones(E, dtype=torch.bool, device=dev))
        self.register_buffer("pm_rank", torch.full((E,), rank, dtype=torch.long, device=dev))
        self.register_buffer("pm_bias", None, persistent=False)
        self.register_buffer("pm_weights", None, persistent=False)
        self.register_buffer("pm_row_fixed", None, persistent=False)
        self.pm_all_available = True
        self.pm_calibrated = False
        self.pm_merged = False
        self.pm_saved_weight = None
        self.pm_seq_weights = None
        self.pm_last = None
        return self

    # -- the base layer ------------------------------------------------------------------------
    def _adopt(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module: expected a torch.nn.Linear, got {type(module).__name__}")
        self.in_features = module.in_features
        self.out_features = module.out_features
        self.weight = module.weight
        self.bias = module.bias

    def base_weight(self) -> Tensor:
        """The base weight as ``[d_out, d_in]`` (a view for transposed layouts)."""
        return self.weight

    def base_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def _set_base_weight(self, w_out_in: Tensor) -> None:
        self.weight.copy_(w_out_in)

    # -- persona tables ------------------------------------------------------------------------
    def pm_refresh(self, bias: Tensor, weights: Tensor, fixed: Tensor) -> None:
        """Fold this layer's availability into the model-wide tables ``[R, E]`` and keep them."""
        dev = self.weight.device
        avail = self.pm_available.to(dev)
        absent = torch.where(avail, 0.0, float("-inf")).to(torch.float32)
        self.pm_bias = bias.to(device=dev, dtype=torch.float32) + absent
        self.pm_weights = torch.where(avail, weights.to(device=dev, dtype=torch.float32), 0.0)
        self.pm_row_fixed = fixed.to(dev)
        self.pm_all_available = bool(avail.all())
        self.pm_seq_weights = None

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor, persona_ids: Tensor | None = None) -> Tensor:
        """``x [batch, ..., d_in]``; the persona of each batch row comes from ``use_personas``.

        ``persona_ids`` (optional, per token, ``-1`` = none) indexes the registered personas
        directly and overrides the model's current ones.
        """
        if self.pm_merged:
            return self.base_forward(x)
        st = self.pm_state
        lead = x.shape[:-1]
        if persona_ids is not None:
            given = persona_ids.to(device=x.device, dtype=torch.long) + 1
            n_rows = 1 + len(st.registered)
            if not torch.compiler.is_compiling() and given.numel():
                lo, hi = int(given.min()), int(given.max())
                if lo < 0 or hi >= n_rows:
                    raise ValueError(
                        f"persona_ids: expected ids in [-1, {n_rows - 1}) (-1 = no persona, else "
                        f"a registered persona's index), got {lo - 1 if lo < 0 else hi - 1}"
                    )
            # Per token (any shape holding one id per token), or broadcastable to the tokens.
            tok: Tensor | None = (
                given.reshape(lead)
                if given.numel() == x.numel() // x.shape[-1]
                else given.expand(lead)
            )
            has_fixed, has_route = _any_fixed(st), True
        else:
            rows_b = self._request_rows(st, lead, x.device)
            tok = None if rows_b is None else _per_token(rows_b, lead)
            has_fixed, has_route = st.has_fixed, st.has_route
        if st.routing == "sequence" and has_route:
            return self._sequence_forward(x, st, tok, has_fixed)
        if not has_route:
            tok = tok if tok is not None else _zeros(lead, x.device)
            y, idx, gates, _ = self._op(x, tok, weights=self.pm_weights)
            self._record(st, idx, gates, None, tok, None)
            return y
        y, idx, gates, n = self._token_route(x, tok)
        if not has_fixed:
            self._record(st, idx, gates, n, tok, None)
            return y
        assert tok is not None and self.pm_row_fixed is not None
        y_f, idx_f, gates_f, _ = self._op(x, tok, weights=self.pm_weights)
        fixed = self.pm_row_fixed[tok]
        y = torch.where(fixed[..., None], y_f, y)
        idx = torch.where(fixed[..., None], idx_f, idx)
        gates = torch.where(fixed[..., None], gates_f, gates)
        self._record(st, idx, gates, n, tok, ~fixed)
        return y

    def _request_rows(
        self, st: PersonaState, lead: torch.Size, device: torch.device
    ) -> Tensor | None:
        ids = st.ids
        if ids is None:
            return None
        if ids.device != device:  # models spread over devices
            ids = ids.to(device)
        batch = lead[0] if len(lead) else 1
        n = ids.shape[0]
        if n != batch:
            if n == 1:
                ids = ids.expand(batch)
            elif batch % n == 0:
                ids = ids.repeat_interleave(batch // n)
            else:
                raise ValueError(
                    f"use_personas: {n} personas were given but the batch holds {batch} rows "
                    "(expected one persona per row, or a batch that repeats each row equally)"
                )
        return ids

    def _calibration(self) -> Tensor | None:
        return self.calibration if self.pm_calibrated else None

    def _op(
        self, x: Tensor, tok: Tensor | None, *, bias: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        w = self.base_weight()
        args = LayerArgs(x, w, self.bias, self.lora_A, self.lora_B, self.scaling, self.top_k,
                         self.temperature, self.normalize, self._calibration(), bias, tok,
                         weights)  # fmt: skip
        # Persona ids and tables are built here, in range, and the bank was checked when it was
        # built: per call only ``x`` can be wrong. Cheap attribute checks first; the shared
        # validator (which reads data, a host sync on GPUs) runs only to word an error. Under
        # torch.compile the op's fake implementation checks shapes instead.
        if not torch.compiler.is_compiling() and not (
            x.dtype == w.dtype and x.device == w.device and x.dim() >= 1
            and x.shape[-1] == self.in_features
        ):  # fmt: skip
            check_layer_args(args._replace(persona_ids=None, persona_weights=None))
        return persona_moe_linear_scores(args)

    def _token_route(self, x: Tensor, tok: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if tok is None:
            if self.pm_all_available:
                return self._op(x, None)
            tok = _zeros(x.shape[:-1], x.device)
        return self._op(x, tok, bias=self.pm_bias)

    def _sequence_forward(
        self, x: Tensor, st: PersonaState, tok: Tensor | None, has_fixed: bool
    ) -> Tensor:
        """One choice of experts per sequence: token scores pooled (mean) over the prompt, then the
        top-k and its gates become that sequence's fixed mixture for its decode steps too."""
        assert self.pm_bias is not None and self.pm_weights is not None
        assert self.pm_row_fixed is not None
        lead = x.shape[:-1]
        B = lead[0] if len(lead) else 1
        S = x.numel() // (B * x.shape[-1]) if x.numel() else 0
        tok = tok if tok is not None else _zeros(lead, x.device)
        rows_b = tok.reshape(B, -1)[:, 0] if S else tok.new_zeros(B)
        cached = self.pm_seq_weights
        n_tok = None
        # A new choice for new sequences (the root model's hook says so), and for any forward of
        # several tokens per sequence (a prompt, also when a submodule is called directly).
        if st.new_sequence or S > 1 or cached is None or cached.shape[0] != B:
            with torch.no_grad():
                h = reference.shrink(x.reshape(-1, x.shape[-1]), self.lora_A)
                n_tok = reference.scores(h, self._calibration()).reshape(B, S, -1)
                mask = st.attention_mask
                if mask is not None and tuple(mask.shape) == (B, S):
                    m = mask.to(device=x.device, dtype=n_tok.dtype)[..., None]
                    pooled = (n_tok * m).sum(1) / m.sum(1).clamp(min=1.0)
                else:
                    pooled = n_tok.mean(1)
                pooled = pooled + self.pm_bias[rows_b]
                idx, g = reference.route(
                    pooled, top_k=self.top_k, temperature=self.temperature, normalize=self.normalize
                )
                w = torch.zeros_like(pooled).scatter(1, idx.long(), g)
                if has_fixed:
                    w = torch.where(self.pm_row_fixed[rows_b][:, None], self.pm_weights[rows_b], w)
            self.pm_seq_weights = w
        else:
            w = cached
        seq = torch.arange(B, device=x.device).reshape(B, *([1] * (len(lead) - 1))).expand(lead)
        y, idx, gates, _ = self._op(x, seq, weights=w)
        self._record(st, idx, gates, None, tok, None)
        return y

    def _record(
        self, st: PersonaState, idx: Tensor, gates: Tensor, scores: Tensor | None,
        rows: Tensor | None, routed: Tensor | None,
    ) -> None:  # fmt: skip
        if st.record and not torch.compiler.is_compiling():
            # A plain attribute: skip nn.Module.__setattr__'s parameter/buffer bookkeeping.
            self.__dict__["pm_last"] = RoutingRecord(idx, gates, scores, rows, routed, st.row_names)

    # -- merged mode ---------------------------------------------------------------------------
    @torch.no_grad()
    def pm_merge(self, weights: Tensor) -> None:
        """Fold ``sum_e w_e s_e B_e A_e`` into the base weight; :meth:`pm_unmerge` restores it."""
        if self.pm_merged:
            raise ValueError("merge: the model is already merged; call personamoe.unmerge first")
        w = weights.to(device=self.weight.device, dtype=torch.float32)
        coeff = w * self.scaling.float() * self.pm_available.float()
        delta = torch.einsum("e,eor,eri->oi", coeff, self.lora_B.float(), self.lora_A.float())
        self.pm_saved_weight = self.weight.detach().clone()
        merged = self.base_weight().float() + delta
        self._set_base_weight(merged.to(self.weight.dtype))
        self.pm_merged = True

    @torch.no_grad()
    def pm_unmerge(self) -> None:
        if not self.pm_merged or self.pm_saved_weight is None:
            return
        self.weight.copy_(self.pm_saved_weight)
        self.pm_saved_weight = None
        self.pm_merged = False

    def extra_repr(self) -> str:
        absent = int((~self.pm_available).sum())
        return super().extra_repr() + (f", absent_experts={absent}" if absent else "")


class PersonaConv1DLayer(PersonaLayer):
    """For GPT-2's ``Conv1D`` (weight stored transposed, ``[d_in, d_out]``, as in the checkpoint)."""

    def _adopt(self, module: nn.Module) -> None:
        w = getattr(module, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() != 2:
            raise TypeError(
                f"module: expected a Conv1D with a 2-D weight, got {type(module).__name__}"
            )
        self.in_features, self.out_features = int(w.shape[0]), int(w.shape[1])
        self.nx, self.nf = self.in_features, self.out_features
        self.weight = w
        self.bias = module.bias  # type: ignore[assignment]

    def base_weight(self) -> Tensor:
        return self.weight.t()

    def base_forward(self, x: Tensor) -> Tensor:
        size_out = (*x.shape[:-1], self.out_features)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(self.bias, x2, self.weight) if self.bias is not None else x2 @ self.weight
        return y.view(size_out)

    def _set_base_weight(self, w_out_in: Tensor) -> None:
        self.weight.copy_(w_out_in.t())


def _any_fixed(st: PersonaState) -> bool:
    return any(st.row_fixed(r) for r in st.rows)


def _zeros(lead: torch.Size, device: torch.device) -> Tensor:
    return torch.zeros(lead, dtype=torch.long, device=device)


def _per_token(rows_b: Tensor, lead: torch.Size) -> Tensor:
    if len(lead) == 0:
        return rows_b[0]
    return rows_b.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)


def persona_layers(model: nn.Module) -> Iterator[tuple[str, PersonaLayer]]:
    """``(name, layer)`` for every persona layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, PersonaLayer):
            yield name, m
