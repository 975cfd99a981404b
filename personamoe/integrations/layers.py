"""Persona layers inside an injected model: :class:`~personamoe.nn.PersonaMoELinear` that reads its
persona ids, tables and routing mode from the model's shared
:class:`~personamoe.personas.PersonaState`, with one forward per kind of batch (:data:`_FORWARDS`),
and the table of the base module types that can hold experts (:func:`layer_class_for`).

Every layer keeps the base module's ``weight``/``bias`` Parameters (shared, same names), so the base
checkpoint still loads. Experts whose adapter does not target a layer are *absent* there: each layer
folds its availability mask into its own persona bias table (``-inf`` in every row, including the
"no persona" row 0), so they are never ranked, whatever the persona.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from personamoe import reference
from personamoe._validation import check_layer_args
from personamoe.layer_args import LayerArgs
from personamoe.lora_bank import BaseParams
from personamoe.nn import PersonaMoELinear
from personamoe.ops import persona_moe_linear_scores
from personamoe.personas import PersonaState

__all__ = [
    "PersonaConv1DLayer",
    "PersonaLayer",
    "RoutingRecord",
    "layer_class_for",
    "layer_classes",
    "persona_layers",
]


class RoutingRecord(NamedTuple):
    """What one layer's last forward chose (kept for :func:`personamoe.routing_stats`)."""

    topk_idx: Tensor  # [..., k] int32
    topk_gates: Tensor  # [..., k] fp32 (0 = an empty slot)
    scores: Tensor | None  # [..., E] routing scores of the routed tokens (None: nothing routed)
    rows: Tensor | None  # [...] persona row of each token (None: every token row 0)
    routed: Tensor | None  # [...] bool: tokens that routed (None: all when scores is set)
    row_names: tuple[str | None, ...]


class _Batch(NamedTuple):
    """Which persona row each token of one forward uses, and which kinds of rows the batch holds."""

    rows: Tensor | None  # per token, the leading dims of x (None: every token row 0)
    has_fixed: bool  # some token uses a fixed mixture
    has_route: bool  # some token routes


_MERGED = _Batch(None, False, False)


class PersonaLayer(PersonaMoELinear):
    """A persona-MoE layer wrapping an ``nn.Linear`` of a model (see the module docstring).

    Still a :class:`~personamoe.nn.PersonaMoELinear` (users find an injected model's layers by
    that type), built through its constructor; its own tables (``pm_bias``/``pm_weights``, from
    the model's personas) replace the standalone ``persona_bias``/``persona_weights``, which stay
    ``None``.
    """

    fp32_buffers = (
        *PersonaMoELinear.fp32_buffers,
        "pm_bias",
        "pm_weights",
        "score_shift",
        "data_scale",
    )
    fan_in_fan_out = False
    """Whether the base weight is stored ``[d_in, d_out]`` (PEFT's name; GPT-2's ``Conv1D``)."""

    pm_available: Tensor
    pm_rank: Tensor
    score_shift: Tensor
    data_scale: Tensor
    pm_bias: Tensor | None
    pm_weights: Tensor | None
    pm_row_fixed: Tensor | None
    pm_last: RoutingRecord | None

    def __init__(
        self,
        module: nn.Module,
        state: PersonaState,
        *,
        rank: int,
        top_k: int,
        temperature: float,
        normalize: str,
    ) -> None:
        """A layer over ``module``'s own ``weight``/``bias`` with ``E = len(state.experts)``."""
        d_in, d_out, base = self.base_of(module)
        E = len(state.experts)
        super().__init__(
            d_in, d_out, E, rank, min(top_k, E), bias=base.bias is not None,
            temperature=temperature, normalize=normalize, _base=base,
        )  # fmt: skip
        self.pm_state = state
        dev = self.weight.device
        self.register_buffer("pm_available", torch.ones(E, dtype=torch.bool, device=dev))
        self.register_buffer("pm_rank", torch.full((E,), rank, dtype=torch.long, device=dev))
        # Data calibration's statistics (personamoe.calibrate): score = ||h|| / data_scale +
        # score_shift. Kept whatever the active mode; the shift reaches the op only through the
        # persona bias table, when the mode is "data" (pm_shift_active). Not in the state dict
        # (the mode is not either): the bank files carry both (save_bank).
        self.register_buffer("score_shift", torch.zeros(E, device=dev), persistent=False)
        self.register_buffer("data_scale", torch.ones(E, device=dev), persistent=False)
        self.register_buffer("pm_bias", None, persistent=False)
        self.register_buffer("pm_weights", None, persistent=False)
        self.register_buffer("pm_row_fixed", None, persistent=False)
        self.pm_all_available = True
        self.pm_calibrated = False
        self.pm_data_calibrated = False  # score_shift / data_scale hold measured statistics
        self.pm_shift_active = False  # mode "data": score_shift is folded into pm_bias
        self.pm_merged = False
        self.pm_saved_weight: Tensor | None = None
        self.pm_seq_weights: Tensor | None = None
        self.pm_last = None

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
        """The persona layer for ``module`` (an instance of this class's base module type)."""
        return cls(module, state, rank=rank, top_k=top_k, temperature=temperature,
                   normalize=normalize)  # fmt: skip

    # -- the base layer ------------------------------------------------------------------------
    @classmethod
    def base_of(cls, module: nn.Module) -> tuple[int, int, BaseParams]:
        """``(d_in, d_out, Parameters)`` of the base module this class wraps."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module: expected a torch.nn.Linear, got {type(module).__name__}")
        return module.in_features, module.out_features, BaseParams(module.weight, module.bias)

    def base_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def _set_base_weight(self, w_out_in: Tensor) -> None:
        self.weight.copy_(w_out_in)

    # -- calibration ---------------------------------------------------------------------------
    @torch.no_grad()
    def pm_set_calibration(self, mode: str) -> None:
        """Make ``mode`` (one of ``CALIBRATIONS``) this layer's active calibration: the divisor in
        ``calibration`` and whether ``score_shift`` joins the bias table (at the next
        :meth:`pm_refresh`). ``"data"`` needs the statistics of ``personamoe.calibrate``."""
        if mode == "data" and not self.pm_data_calibrated:
            raise ValueError(
                "calibration: 'data' needs statistics measured on text; run "
                "personamoe.calibrate(model, batches) first"
            )
        if mode == "frobenius":
            norms = torch.linalg.vector_norm(self.lora_A.detach().float(), dim=(1, 2))
            divisor = torch.where(norms > 0, norms, torch.ones_like(norms))
        elif mode == "data":
            divisor = self.data_scale
        else:
            divisor = torch.ones_like(self.calibration)
        self.calibration.copy_(divisor)
        self.pm_calibrated = mode != "none"
        self.pm_shift_active = mode == "data"

    @torch.no_grad()
    def pm_set_data_statistics(self, scale: Tensor, shift: Tensor) -> None:
        """Keep measured statistics (``[E]`` each: ``sigma_e`` > 0 and ``-mu_e / sigma_e``)."""
        self.data_scale.copy_(scale)
        self.score_shift.copy_(shift)
        self.pm_data_calibrated = True

    # -- persona tables ------------------------------------------------------------------------
    def pm_refresh(self, bias: Tensor, weights: Tensor, fixed: Tensor) -> None:
        """Fold this layer's availability (and, in calibration mode "data", its score shift) into
        the model-wide tables ``[R, E]`` and keep them.

        Row 0 ("no persona", free routing) then holds only the shift, so free-routing tokens go
        through the table too; fixed rows ignore the bias table, so the shift never reaches them.
        """
        dev = self.weight.device
        avail = self.pm_available.to(dev)
        absent = torch.where(avail, 0.0, float("-inf")).to(torch.float32)
        if self.pm_shift_active:
            absent = absent + torch.where(avail, self.score_shift.to(dev, torch.float32), 0.0)
        self.pm_bias = bias.to(device=dev, dtype=torch.float32) + absent
        self.pm_weights = torch.where(avail, weights.to(device=dev, dtype=torch.float32), 0.0)
        self.pm_row_fixed = fixed.to(dev)
        # Whether row 0 of the bias table is all zeros (free routing may then skip the table).
        self.pm_all_available = bool(avail.all()) and not self.pm_shift_active
        self.pm_seq_weights = None

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor, persona_ids: Tensor | None = None) -> Tensor:
        """``x [batch, ..., d_in]``; the persona of each batch row comes from ``use_personas``.

        ``persona_ids`` (optional, per token, ``-1`` = none) indexes the registered personas
        directly and overrides the model's current ones.
        """
        if self.pm_merged:
            return self._forward_merged(x, _MERGED)
        batch = self._batch(x, persona_ids)
        return _FORWARDS[self._mode(batch)](self, x, batch)

    def _mode(self, batch: _Batch) -> str:
        """Which forward this batch takes (merged layers never get here)."""
        if not batch.has_route:
            return "fixed"
        if self.pm_state.routing == "sequence":
            return "sequence"  # fixed rows keep their mixture inside the sequence choice
        return "mixed" if batch.has_fixed else "token"

    def _batch(self, x: Tensor, persona_ids: Tensor | None) -> _Batch:
        st = self.pm_state
        lead = x.shape[:-1]
        if persona_ids is None:
            rows_b = self._request_rows(st, lead, x.device)
            rows = None if rows_b is None else _per_token(rows_b, lead)
            return _Batch(rows, st.has_fixed, st.has_route)
        dtype = persona_ids.dtype if isinstance(persona_ids, Tensor) else None
        if dtype is None or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            # A cast would truncate 0.7 to persona 0 silently.
            what = persona_ids.dtype if isinstance(persona_ids, Tensor) else type(persona_ids)
            raise TypeError(f"persona_ids: expected an integer tensor, got {what}")
        given = ids_to_rows(persona_ids.to(device=x.device), 1 + len(st.registered))
        # Per token (any shape holding one id per token), or broadcastable to the tokens.
        rows = (
            given.reshape(lead) if given.numel() == x.numel() // x.shape[-1] else given.expand(lead)
        )
        return _Batch(rows, _any_fixed(st), True)

    def _forward_merged(self, x: Tensor, batch: _Batch) -> Tensor:
        """The mixture is folded into the base weight (:meth:`pm_merge`): a plain linear layer."""
        return self.base_forward(x)

    def _forward_fixed(self, x: Tensor, batch: _Batch) -> Tensor:
        """Every token uses its row's fixed mixture: no routing."""
        rows = batch.rows if batch.rows is not None else _zeros(x.shape[:-1], x.device)
        y, idx, gates, _ = self._op(x, rows, weights=self.pm_weights)
        self._record(idx, gates, None, rows, None)
        return y

    def _forward_token(self, x: Tensor, batch: _Batch) -> Tensor:
        """Every token ranks the experts its row allows and mixes its top-k."""
        y, idx, gates, n = self._token_route(x, batch.rows)
        self._record(idx, gates, n, batch.rows, None)
        return y

    def _forward_mixed(self, x: Tensor, batch: _Batch) -> Tensor:
        """Some rows route, some use a fixed mixture.

        Two op calls, a routed and a fixed one over every token, then a per-token select: the op
        takes a bias table (routing rows) or a weight table (fixed rows) per call, and neither kind
        of row can be written as the other. A routed row's gates are a softmax over at most top_k
        experts (>= 0, summing to 1), while a fixed mixture weighs every expert with a non-zero
        weight, of any sign and sum. A routed row as a weight row would need its gates before the
        op, from scores ``||A_e x||`` the op computes itself: the shrink would run twice, round
        unlike the backends, and the gates would lose their gradient (``persona_weights`` has
        none). Both calls keep static shapes (no data-dependent gather), so CUDA graphs and
        ``torch.compile`` still see one graph.
        """
        rows, fixed_rows = batch.rows, self.pm_row_fixed
        assert rows is not None and fixed_rows is not None
        y, idx, gates, n = self._token_route(x, rows)
        y_f, idx_f, gates_f, _ = self._op(x, rows, weights=self.pm_weights)
        fixed = fixed_rows[rows][..., None]
        y = torch.where(fixed, y_f, y)
        idx = torch.where(fixed, idx_f, idx)
        gates = torch.where(fixed, gates_f, gates)
        self._record(idx, gates, n, rows, ~fixed[..., 0])
        return y

    def _request_rows(
        self, st: PersonaState, lead: torch.Size, device: torch.device
    ) -> Tensor | None:
        ids = st.ids_on(device)  # models spread over devices: one copy per device per step
        if ids is None:
            return None
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

    def _forward_sequence(self, x: Tensor, batch: _Batch) -> Tensor:
        """One choice of experts per sequence: token scores pooled (mean) over the prompt, then the
        top-k and its gates become that sequence's fixed mixture for its decode steps too."""
        st = self.pm_state
        lead = x.shape[:-1]
        B = lead[0] if len(lead) else 1
        S = x.numel() // (B * x.shape[-1]) if x.numel() else 0
        rows = batch.rows if batch.rows is not None else _zeros(lead, x.device)
        cached = self.pm_seq_weights
        # A new choice for new sequences (the root model's hook says so), and for any forward of
        # several tokens per sequence (a prompt, also when a submodule is called directly).
        if st.new_sequence or S > 1 or cached is None or cached.shape[0] != B:
            rows_b = rows.reshape(B, -1)[:, 0] if S else rows.new_zeros(B)
            w = self._sequence_mixture(x, B, S, rows_b, batch.has_fixed)
            self.pm_seq_weights = w
        else:
            w = cached
        seq = torch.arange(B, device=x.device).reshape(B, *([1] * (len(lead) - 1))).expand(lead)
        y, idx, gates, _ = self._op(x, seq, weights=w)
        self._record(idx, gates, None, rows, None)
        return y

    @torch.no_grad()
    def _sequence_mixture(
        self, x: Tensor, B: int, S: int, rows_b: Tensor, has_fixed: bool
    ) -> Tensor:
        """``[B, E]``: each sequence's weights, its top-k over the prompt-pooled scores plus its
        persona's bias (or its persona's fixed mixture)."""
        assert self.pm_bias is not None and self.pm_weights is not None
        assert self.pm_row_fixed is not None
        h = reference.shrink(x.reshape(-1, x.shape[-1]), self.lora_A)
        n_tok = reference.scores(h, self._calibration()).reshape(B, S, -1)
        mask = self.pm_state.attention_mask
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
        return w

    def _record(
        self, idx: Tensor, gates: Tensor, scores: Tensor | None, rows: Tensor | None,
        routed: Tensor | None,
    ) -> None:  # fmt: skip
        st = self.pm_state
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

    fan_in_fan_out = True

    @property
    def nx(self) -> int:
        """Conv1D's own name for the input features."""
        return self.in_features

    @property
    def nf(self) -> int:
        """Conv1D's own name for the output features."""
        return self.out_features

    @classmethod
    def base_of(cls, module: nn.Module) -> tuple[int, int, BaseParams]:
        w = getattr(module, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() != 2:
            raise TypeError(
                f"module: expected a Conv1D with a 2-D weight, got {type(module).__name__}"
            )
        bias = getattr(module, "bias", None)
        return int(w.shape[0]), int(w.shape[1]), BaseParams(w, bias)

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


def _reads_ids(ids: Tensor) -> bool:
    """Whether the ids are read on the host to word an error: on CPU in eager mode only."""
    return ids.device.type == "cpu" and not torch.compiler.is_compiling()


def ids_to_rows(persona_ids: Tensor, n_rows: int) -> Tensor:
    """Table rows (``id + 1``; row 0 = no persona) for persona ids given to a layer's forward.

    On CPU an id outside ``[-1, n_rows - 1)`` is a ``ValueError`` (reading the ids is free there).
    On an accelerator reading them would be a host sync in every layer of every decode step, so
    they are not read: an id out of range means "no persona" (row 0), as it does in the kernels,
    and no row index ever leaves the tables.
    """
    given = persona_ids.to(dtype=torch.long) + 1
    if _reads_ids(given):
        if given.numel():
            lo, hi = int(given.min()), int(given.max())
            if lo < 0 or hi >= n_rows:
                raise ValueError(
                    f"persona_ids: expected ids in [-1, {n_rows - 1}) (-1 = no persona, else "
                    f"a registered persona's index), got {lo - 1 if lo < 0 else hi - 1}"
                )
        return given
    return torch.where((given >= 0) & (given < n_rows), given, torch.zeros_like(given))


def _per_token(rows_b: Tensor, lead: torch.Size) -> Tensor:
    if len(lead) == 0:
        return rows_b[0]
    return rows_b.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)


def persona_layers(model: nn.Module) -> Iterator[tuple[str, PersonaLayer]]:
    """``(name, layer)`` for every persona layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, PersonaLayer):
            yield name, m


_Forward = Callable[[PersonaLayer, Tensor, _Batch], Tensor]
_FORWARDS: dict[str, _Forward] = {
    "token": PersonaLayer._forward_token,
    "sequence": PersonaLayer._forward_sequence,
    "fixed": PersonaLayer._forward_fixed,
    "mixed": PersonaLayer._forward_mixed,
    "merged": PersonaLayer._forward_merged,
}
"""One forward per kind of batch (:meth:`PersonaLayer._mode`): the routing modes, and token
routing with some fixed-mixture rows."""


def _transformers_conv1d() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is an optional extra
        return None
    return Conv1D


@functools.cache
def layer_classes() -> tuple[tuple[type[nn.Module], type[PersonaLayer]], ...]:
    """``(base module type, its persona layer class)``: the one place that says which modules can
    hold experts (transformers is only imported here, and only to recognise ``Conv1D``)."""
    table: list[tuple[type[nn.Module], type[PersonaLayer]]] = [(nn.Linear, PersonaLayer)]
    conv1d = _transformers_conv1d()
    if conv1d is not None:
        table.append((conv1d, PersonaConv1DLayer))
    return tuple(table)


def layer_class_for(module: nn.Module) -> type[PersonaLayer] | None:
    """The persona layer class that can wrap ``module`` (``None``: it cannot hold experts)."""
    if isinstance(module, PersonaLayer):
        return None
    for base_type, cls in layer_classes():
        if isinstance(module, base_type):
            return cls
    return None
