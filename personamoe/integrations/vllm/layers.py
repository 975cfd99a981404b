"""Out-of-tree subclasses of vLLM's linear layers and the persona linear method they use.

Each subclass runs vLLM's own ``__init__`` and then, when the served checkpoint names one of its
output parts as a persona target, swaps its ``quant_method`` for a :class:`PersonaLinearMethod`:
a subclass of vLLM's ``UnquantizedLinearMethod`` (weights are created, loaded and post-processed by
vLLM's code) whose ``apply`` runs the persona mixture. Fused layers (``qkv_proj``, ``gate_up_proj``)
hold one bank per part, each with its own routing, exactly like the separate layers of the
checkpoint. Tensor-parallel sharding follows ``personamoe.integrations.tp``: column-parallel layers
keep ``A`` whole and shard ``B`` by output rows; row-parallel layers shard ``A`` by input columns,
all-reduce ``h`` and hand it to the op (``persona_moe_mix_(..., h=h)``: the fused kernel ranks on the
whole ``h``), with ``B`` zero outside the rank's share of the rank columns, so the ranks' partial
outputs sum (vLLM's all-reduce of ``y``) to the layer's. Every layout's base is vLLM's own GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)

from personamoe.integrations import tp
from personamoe.integrations.bank_format import BANK_TENSORS, LORA_A, LORA_B, tensor_key
from personamoe.integrations.checkpoint.bank_view import read_bank_tensors
from personamoe.integrations.checkpoint.section import ExportError, PersonaSection
from personamoe.integrations.vllm.config import current_section, part_targets
from personamoe.integrations.vllm.personas import (
    compiled_token_rows,
    current_batch,
    layer_tables,
    served_personas,
    token_rows,
)
from personamoe.mix_op import persona_moe_mix_op

__all__ = [
    "PersonaColumnParallelLinear",
    "PersonaLinearMethod",
    "PersonaMergedColumnParallelLinear",
    "PersonaQKVParallelLinear",
    "PersonaReplicatedLinear",
    "PersonaRowParallelLinear",
    "register_layers",
]


@dataclass
class _Part:
    """One output part of a (possibly fused) layer on this rank."""

    target: str | None  # checkpoint module name (None: no bank, plain linear)
    start: int  # first output row of the part in this rank's weight
    size: int  # rows on this rank
    shard: int  # which shard of the part's full rows this rank holds (column-parallel)
    bank: dict[str, Tensor | None] | None = None


@dataclass
class _Layout:
    kind: str  # "column" (incl. replicated) or "row"
    tp_rank: int
    tp_size: int
    parts: list[_Part]


class PersonaLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear method plus the persona mixture of the layer's target parts."""

    def __init__(self, section: PersonaSection, layout: _Layout) -> None:
        super().__init__()
        self.section = section
        self.layout = layout

    # -- loading ---------------------------------------------------------------------------------
    def process_weights_after_loading(self, layer: Any) -> None:
        # vLLM post-processes the weight as for any unquantized layer (on CPU: prepacked for its
        # oneDNN GEMM): every layout computes its base through vLLM's own method.
        # The plain weight's shape, device and dtype, before vLLM may replace it by a packed one.
        w = layer.weight
        plain = torch.empty((), device=w.device, dtype=w.dtype).expand(*w.shape)
        super().process_weights_after_loading(layer)
        self._load_banks(layer, plain)

    def _load_banks(self, layer: Any, weight: Tensor) -> None:
        """The banks of the layer's target parts, sharded like ``weight`` (a stand-in of the
        plain weight's shape, device and dtype: vLLM may have packed the real one)."""
        from safetensors import safe_open

        sec, lay = self.section, self.layout
        with safe_open(str(sec.bank_file()), framework="pt") as f:
            present = set(f.keys())
            for part in lay.parts:
                if part.target is None:
                    continue
                keys = [tensor_key(part.target, k) for k in BANK_TENSORS]
                raw = {key: f.get_tensor(key) for key in keys if key in present}
                t = read_bank_tensors(sec, part.target, raw)
                part.bank = self._shard(layer, part, t, weight)

    def _shard(
        self, layer: Any, part: _Part, t: dict[str, Tensor], weight: Tensor
    ) -> dict[str, Tensor | None]:
        sec, lay = self.section, self.layout
        dev, dt = weight.device, weight.dtype
        a, b = t["lora_A"], t["lora_B"]
        name = str(part.target)
        where = f"{sec.bank_file()}: key {tensor_key(name, LORA_A)!r}"
        if lay.kind == "column":
            if a.shape[2] != weight.shape[1]:
                raise ExportError(f"{where}: expected d_in={weight.shape[1]}, got {a.shape[2]}")
            full = b.shape[1]
            if full != part.size * _n_shards(layer, part, lay):
                raise ExportError(
                    f"{sec.bank_file()}: key {tensor_key(name, LORA_B)!r}: expected d_out="
                    f"{part.size * _n_shards(layer, part, lay)}, got {full}"
                )
            b = b[:, part.shard * part.size : (part.shard + 1) * part.size, :]
        else:
            d_in_full = weight.shape[1] * lay.tp_size
            if a.shape[2] != d_in_full or b.shape[1] != weight.shape[0]:
                raise ExportError(
                    f"{where}: expected [E, r, d_in={d_in_full}] / lora_B [E, d_out="
                    f"{weight.shape[0]}, r], got {list(a.shape)} / {list(b.shape)}"
                )
            # Row-parallel: A by input columns (like W). The kernel ranks and mixes from the
            # all-reduced h of the full (padded) rank, so B keeps every rank column, zero outside
            # this rank's: the ranks' partial outputs then sum to the layer's (all-reduce of y).
            a, b = tp.pad_rank(a, b, lay.tp_size)
            cols = tp.split_range(a.shape[2], lay.tp_rank, lay.tp_size)
            rcols = tp.split_range(a.shape[1], lay.tp_rank, lay.tp_size)
            b_mine = torch.zeros_like(b)
            b_mine[:, :, rcols] = b[:, :, rcols]
            a, b = a[:, :, cols], b_mine
        avail = t["available"]
        shift = t["score_shift"].to(torch.float32)  # zeros unless calibration == "data"
        bias = None
        if not bool(avail.all()) or sec.calibration == "data":
            # Experts that do not target this module are absent from its ranking (docs/design.md
            # §1); data calibration's shift is a bias every routed token gets (row 0, id 0).
            bias = torch.where(avail, shift, float("-inf")).reshape(1, -1).to(dev, torch.float32)
        cal = t["calibration"].to(dev, torch.float32) if sec.calibration != "none" else None
        out: dict[str, Tensor | None] = {
            # Row-parallel shrink input: [E*r, d_in/tp] fp32 (h is all-reduced in fp32).
            "lora_A_rows": a.reshape(-1, a.shape[2]).to(dev, torch.float32).contiguous()
            if lay.kind == "row"
            else None,
            "lora_A": a.to(dev, dt).contiguous(),
            "lora_B": b.to(dev, dt).contiguous(),
            "scaling": t["scaling"].to(dev, torch.float32),
            "calibration": cal,
            "persona_bias": bias,
            "route_bias": None,
            "fixed_weights": None,
        }
        if sec.personas:
            # Per-request personas: this layer's [R, E] tables (row 0: no persona).
            out["route_bias"], out["fixed_weights"] = layer_tables(
                served_personas(sec), avail, dev, shift
            )
        return out

    # -- forward ---------------------------------------------------------------------------------
    def apply(self, layer: Any, x: Tensor, bias: Tensor | None = None) -> Tensor:
        lay = self.layout
        # vLLM's own GEMM for the whole (possibly fused) base output, on its fastest path (a
        # prepacked oneDNN weight on CPU; a row-parallel rank's partial output), then each banked
        # part's mixture added into its columns of that output in place: no second base GEMM, no
        # torch.cat.
        y = super().apply(layer, x, bias)
        if not y.is_contiguous():  # the parts below must be views of the output returned
            y = y.contiguous()
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])
        rows, fixed = self._token_personas(x2)
        h = None
        if lay.kind == "row" and lay.tp_size > 1 and lay.parts[0].bank is not None:
            h = self._all_reduced_h(x2, lay.parts[0].bank)
        for part in lay.parts:
            if part.bank is not None:
                self._mix_into(x2, y2[:, part.start : part.start + part.size], part.bank, rows,
                               fixed, h)  # fmt: skip
        return y

    @staticmethod
    def _all_reduced_h(x: Tensor, bank: dict[str, Tensor | None]) -> Tensor:
        """Row-parallel: this rank's partial shrink from its input columns, summed over the
        ranks (one all-reduce of ``[T, E*r]`` fp32, the size of the adapters' activations)."""
        from vllm.distributed import tensor_model_parallel_all_reduce

        a_rows = bank["lora_A_rows"]
        assert a_rows is not None
        h = torch.nn.functional.linear(x.to(torch.float32), a_rows)
        return tensor_model_parallel_all_reduce(h)

    def _token_personas(self, x: Tensor) -> tuple[Tensor | None, bool]:
        """``(persona row per token or None, whether a fixed-mixture persona may be among them)``.
        ``None``: no request of this step names a persona (the free-routing path)."""
        if not self.section.personas:
            return None, False
        if torch.compiler.is_compiling():
            # One graph for every step: rows from an opaque op, both calls when fixed ones exist.
            return compiled_token_rows(x), served_personas(self.section).any_fixed
        batch = current_batch()
        rows = token_rows(x)
        return rows, rows is not None and batch is not None and batch.has_fixed

    def _mix_into(
        self, x: Tensor, y: Tensor, bank: dict[str, Tensor | None], rows: Tensor | None = None,
        fixed: bool = False, h: Tensor | None = None,
    ) -> None:  # fmt: skip
        sec = self.section
        common = (bank["lora_A"], bank["lora_B"], bank["scaling"], sec.top_k, sec.temperature,
                  sec.normalize, bank["calibration"])  # fmt: skip
        if rows is None:
            pb = bank["persona_bias"]
            ids = _zeros(x) if pb is not None else None
            persona_moe_mix_op(x, y, *common, pb, ids, None, h)
            return
        if fixed and not torch.compiler.is_compiling():
            # Eager, fixed personas in the batch: each token through one call, its kind's.
            split = current_batch()
            assert split is not None
            route_tok, fixed_tok = split.kinds(rows)
            for sel, pb, w in ((route_tok, bank["route_bias"], None),
                               (fixed_tok, None, bank["fixed_weights"])):  # fmt: skip
                if sel.numel():
                    ys = y.index_select(0, sel)
                    hs = None if h is None else h.index_select(0, sel)
                    persona_moe_mix_op(x.index_select(0, sel), ys, *common, pb, rows[sel], w, hs)
                    y.index_copy_(0, sel, ys)
            return
        # Routing rows rank with their persona's bias (a fixed row's is all -inf: it adds
        # nothing); then fixed rows add their mixture (a routing row's weights are zero).
        persona_moe_mix_op(x, y, *common, bank["route_bias"], rows, None, h)
        if fixed:
            persona_moe_mix_op(x, y, *common, None, rows, bank["fixed_weights"], h)


def _zeros(x: Tensor) -> Tensor:
    return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)


def _n_shards(layer: Any, part: _Part, lay: _Layout) -> int:
    """How many distinct shards a column part is split into (KV heads may be replicated)."""
    replicas = int(getattr(layer, "num_kv_head_replicas", 1) or 1)
    if isinstance(layer, QKVParallelLinear) and part.target is not None and _is_kv(part):
        return lay.tp_size // replicas
    return lay.tp_size


def _is_kv(part: _Part) -> bool:
    return part.target is not None and part.target.rsplit(".", 1)[-1] in ("k_proj", "v_proj")


def _setup(layer: Any, kind: str, fused: bool) -> None:
    """Swap ``layer.quant_method`` for the persona method when the checkpoint targets it."""
    section = current_section()
    if section is None:
        return
    targets = part_targets(str(getattr(layer, "prefix", "")), section, fused)
    if all(t is None for t in targets):
        return
    if type(layer.quant_method) is not UnquantizedLinearMethod:
        raise ExportError(
            f"{section.path}: layer {layer.prefix!r} is quantized "
            f"({type(layer.quant_method).__name__}); persona layers need unquantized weights"
        )
    tp_rank, tp_size = int(layer.tp_rank), int(layer.tp_size)
    sizes = list(getattr(layer, "output_partition_sizes", None) or [layer.weight.shape[0]])
    if len(sizes) != len(targets):
        raise ExportError(
            f"{section.path}: layer {layer.prefix!r} has {len(sizes)} output parts, the "
            f"checkpoint maps {len(targets)}"
        )
    parts: list[_Part] = []
    start = 0
    replicas = int(getattr(layer, "num_kv_head_replicas", 1) or 1)
    for i, (target, size) in enumerate(zip(targets, sizes, strict=True)):
        shard = tp_rank
        if isinstance(layer, QKVParallelLinear) and i > 0:
            shard = tp_rank // replicas
        if kind == "row":
            shard = 0
        parts.append(_Part(target, start, int(size), shard))
        start += int(size)
    layer.quant_method = PersonaLinearMethod(section, _Layout(kind, tp_rank, tp_size, parts))


class PersonaReplicatedLinear(ReplicatedLinear):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _setup(self, "column", fused=False)


class PersonaColumnParallelLinear(ColumnParallelLinear):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _setup(self, "column", fused=False)


class PersonaMergedColumnParallelLinear(MergedColumnParallelLinear):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _setup(self, "column", fused=True)


class PersonaQKVParallelLinear(QKVParallelLinear):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _setup(self, "column", fused=True)


class PersonaRowParallelLinear(RowParallelLinear):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _setup(self, "row", fused=False)


_OOT = (
    (ReplicatedLinear, PersonaReplicatedLinear),
    (ColumnParallelLinear, PersonaColumnParallelLinear),
    (MergedColumnParallelLinear, PersonaMergedColumnParallelLinear),
    (QKVParallelLinear, PersonaQKVParallelLinear),
    (RowParallelLinear, PersonaRowParallelLinear),
)


def register_layers() -> None:
    """Register the subclasses with vLLM (``register_oot`` under vLLM's class names)."""
    from vllm.model_executor.custom_op import op_registry_oot

    for base, cls in _OOT:
        if op_registry_oot.get(base.__name__) is cls:
            continue
        base.register_oot(cls)
