"""Calibration from data (:func:`calibrate`): per layer and expert, the mean and spread of the
norm ``||A_e x||`` over the tokens of a calibration sample, so that routing compares experts on
one scale (docs/design.md §1.9).

The score of expert ``e`` becomes ``(||h_e|| - mu_e) / sigma_e = ||h_e|| / sigma_e + shift_e``, an
affine map of the norm: ``sigma_e`` is the op's existing ``calibration`` divisor and
``shift_e = -mu_e / sigma_e`` is folded into the persona bias table by the layers (so the kernels'
contract does not change).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from personamoe.integrations.layers import PersonaLayer, persona_layers
from personamoe.integrations.model_personas import model_layers, refresh, state_of

__all__ = ["LayerNormStats", "calibrate", "collect_norm_stats", "data_statistics"]

M = TypeVar("M", bound=nn.Module)

MIN_RELATIVE_SPREAD = 1e-6
"""A spread below this fraction of the mean (or an exactly constant norm) reads as no spread:
``sigma`` is then 1, and the score is just the norm minus its mean."""


class LayerNormStats:
    """Running sums of ``||h_e||`` (fp64) over the real tokens one layer has seen."""

    def __init__(self, E: int) -> None:
        self.count = torch.zeros(E, dtype=torch.float64)
        self.total = torch.zeros(E, dtype=torch.float64)
        self.total_sq = torch.zeros(E, dtype=torch.float64)

    def add(self, norms: Tensor) -> None:
        """``norms [T, E]``: raw norms of T real tokens (``-inf``/NaN entries are left out)."""
        n = norms.detach().to("cpu", torch.float64)
        ok = torch.isfinite(n)
        z = torch.where(ok, n, 0.0)
        self.count += ok.sum(0)
        self.total += z.sum(0)
        self.total_sq += (z * z).sum(0)

    def mean_std(self) -> tuple[Tensor, Tensor]:
        """``(mu [E], sigma [E])`` (population std); 0 where no token was seen."""
        c = self.count.clamp(min=1.0)
        mu = self.total / c
        var = (self.total_sq / c - mu * mu).clamp(min=0.0)
        return mu, var.sqrt()


def data_statistics(stats: LayerNormStats, available: Tensor) -> tuple[Tensor, Tensor]:
    """``(scale = sigma [E], shift = -mu / sigma [E])`` (fp32) from one layer's sums.

    Absent experts (never ranked) get ``(1, 0)``; an expert whose norm did not vary (or that saw no
    token) gets ``sigma = 1`` so that the divisor stays finite and positive."""
    mu, sigma = stats.mean_std()
    avail = available.detach().cpu().bool()
    flat = (sigma <= MIN_RELATIVE_SPREAD * mu.abs()) | (sigma <= 0) | (stats.count == 0)
    scale = torch.where(flat | ~avail, torch.ones_like(sigma), sigma)
    shift = torch.where(avail, -mu / scale, torch.zeros_like(mu))
    return scale.float(), shift.float()


def _batch_parts(batch: Any, i: int) -> tuple[Tensor, Tensor | None]:
    """``(input_ids [B, S], attention_mask [B, S] or None)`` of one calibration batch."""
    if isinstance(batch, Tensor):
        ids, mask = batch, None
    elif isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(
                f"batches[{i}]: expected a dict with 'input_ids', got keys {list(batch)}"
            )
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        raise TypeError(
            f"batches[{i}]: expected a tensor of token ids or a dict with input_ids/attention_mask, "
            f"got {type(batch).__name__}"
        )
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"batches[{i}]: input_ids: expected an integer tensor, got {ids!r:.80}")
    if ids.dim() == 1:
        ids = ids[None]
        mask = mask[None] if isinstance(mask, Tensor) and mask.dim() == 1 else mask
    if ids.dim() != 2:
        raise ValueError(f"batches[{i}]: input_ids: expected shape [B, S], got {list(ids.shape)}")
    if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(ids.shape)):
        got = list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"batches[{i}]: attention_mask: expected shape {list(ids.shape)} like input_ids, "
            f"got {got}"
        )
    return ids, mask


@contextlib.contextmanager
def _free_raw_routing(model: nn.Module) -> Iterator[list[PersonaLayer]]:
    """Inside: every layer routes freely per token with raw norms (no calibration, no personas),
    so the op's scores are ``||h_e||`` (``-inf`` for absent experts); restored on exit."""
    layers = model_layers(model)
    if any(layer.pm_merged for layer in layers):
        raise ValueError("model: calibrate needs the experts; the model is merged (call unmerge)")
    st = state_of(model)
    saved_layers = [(layer, layer.pm_calibrated, layer.pm_shift_active, layer.calibration.clone())
                    for layer in layers]  # fmt: skip
    saved = (st.routing, st.ids, st.current_rows, st.record, st.adhoc, model.training)
    try:
        st.routing, st.ids, st.current_rows, st.record, st.adhoc = "token", None, None, True, ()
        for layer in layers:
            layer.pm_calibrated = False
            layer.pm_shift_active = False
        refresh(model)
        model.eval()
        yield layers
    finally:
        for layer, cal, shift, c in saved_layers:
            layer.pm_calibrated, layer.pm_shift_active = cal, shift
            with torch.no_grad():
                layer.calibration.copy_(c)
        st.routing, st.ids, st.current_rows, st.record, st.adhoc, training = saved
        model.train(training)
        refresh(model)


@torch.no_grad()
def collect_norm_stats(
    model: nn.Module, batches: Iterable[Any], *, max_tokens: int | None = None
) -> dict[str, LayerNormStats]:
    """Run ``model`` (eval, no grad) over ``batches`` with free, uncalibrated routing and sum each
    layer's per-expert norms ``||A_e x||`` (read off the fused op's scores) over the real tokens
    (``attention_mask`` 1), at most ``max_tokens`` of them."""
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise ValueError(f"max_tokens: expected an int >= 1 or None, got {max_tokens!r}")
    E = len(state_of(model).experts)
    names = {id(layer): name for name, layer in persona_layers(model)}
    stats = {name: LayerNormStats(E) for name in names.values()}
    current: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        rec = getattr(module, "pm_last", None)
        keep = current.get("mask")
        if rec is None or rec.scores is None or keep is None:
            return
        n = rec.scores.reshape(-1, E)
        if n.shape[0] != keep.numel():
            raise ValueError(
                f"calibrate: layer {names[id(module)]!r} saw {n.shape[0]} tokens but the batch "
                f"holds {keep.numel()} (expected one call per layer per token)"
            )
        stats[names[id(module)]].add(n[keep.reshape(-1).to(n.device)])

    seen = 0
    with _free_raw_routing(model) as layers:
        handles = [layer.register_forward_hook(hook) for layer in layers]
        try:
            for i, batch in enumerate(batches):
                ids, mask = _batch_parts(batch, i)
                real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
                if max_tokens is not None:
                    left = max_tokens - seen
                    if left <= 0:
                        break
                    real = real & (real.reshape(-1).cumsum(0) <= left).reshape(real.shape)
                if not bool(real.any()):
                    continue
                current["mask"] = real.cpu()
                dev = next(model.parameters()).device
                kwargs = {"attention_mask": mask.to(dev)} if mask is not None else {}
                model(input_ids=ids.to(dev), **kwargs)
                seen += int(real.sum())
        finally:
            for h in handles:
                h.remove()
            current.clear()
    if seen == 0:
        raise ValueError("batches: expected at least one real token (attention_mask 1), got none")
    return stats


def calibrate(model: M, batches: Iterable[Any], *, max_tokens: int | None = None) -> M:
    """Measure per layer and expert the mean ``mu_e`` and std ``sigma_e`` of ``||A_e x||`` over the
    real tokens of ``batches`` and switch ``model`` (injected) to ``calibration="data"``: the score
    becomes ``(||A_e x|| - mu_e) / sigma_e`` (plus any persona bias). Returns ``model``.

    ``batches``: token-id tensors ``[B, S]`` (or ``[S]``) or dicts with ``input_ids`` and an optional
    ``attention_mask`` (padding, mask 0, does not count). The calibration forward routes freely
    with raw norms; personas, the routing mode and train/eval are restored afterwards.
    ``personamoe.set_routing(model, calibration=...)`` switches between the modes later;
    ``save_bank`` and the export keep the statistics."""
    stats = collect_norm_stats(model, batches, max_tokens=max_tokens)
    for name, layer in persona_layers(model):
        scale, shift = data_statistics(stats[name], layer.pm_available)
        if not (bool(torch.isfinite(scale).all()) and bool(torch.isfinite(shift).all())):
            raise ValueError(
                f"calibrate: layer {name!r}: non-finite statistics (sigma {scale.tolist()}, "
                f"shift {shift.tolist()}); does the calibration text give finite activations?"
            )
        layer.pm_set_data_statistics(scale.to(layer.data_scale.device),
                                     shift.to(layer.score_shift.device))  # fmt: skip
    from personamoe.integrations.modes import set_routing

    set_routing(model, calibration="data")
    return model
