"""An exported checkpoint's bank seen through its section: one target's tensors, validated
(:func:`read_bank_tensors`, used by :func:`~personamoe.integrations.export.load_exported` and by
the vLLM plugin), and the per-target rank/scaling tables read from the bank file."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from personamoe.adapters import check_finite
from personamoe.integrations.bank_format import (
    AVAILABLE,
    BANK_TENSORS,
    CALIBRATION,
    DATA_SCALE,
    LORA_A,
    LORA_B,
    OPTIONAL_TENSORS,
    RANK,
    SCALING,
    SCORE_SHIFT,
    tensor_key,
)
from personamoe.integrations.checkpoint.section import SECTION, ExportError, PersonaSection

__all__ = ["bank_tables", "read_bank_tensors"]


def read_bank_tensors(
    section: PersonaSection, target: str, tensors: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """One target's bank tensors from the bank file, checked for shape and consistency:
    ``lora_A [E, r, d_in]``, ``lora_B [E, d_out, r]``, ``scaling [E]`` (0 where absent),
    ``calibration [E]`` (the scores' divisor: ones for ``calibration == "none"``, ``||A_e||_F``
    for ``"frobenius"``, ``sigma_e`` for ``"data"``), ``score_shift [E]`` (fp32, the offset to add
    to every routed row of the persona bias table, the "no persona" row included: ``-mu_e /
    sigma_e`` for ``"data"``, else zeros; 0 where absent) and ``available [E]`` (bool).
    A ``personamoe-export/1`` section's ``ranks`` / ``scalings`` must agree with the bank.
    ``score_shift`` and ``data_scale`` may be missing from ``tensors`` (banks written before them)
    unless the section's calibration is ``"data"``."""
    file = section.bank_file()
    E = section.num_experts
    out: dict[str, Tensor] = {}
    for t in BANK_TENSORS:
        key = tensor_key(target, t)
        if key not in tensors and t in OPTIONAL_TENSORS and section.calibration != "data":
            out[t] = torch.full((E,), OPTIONAL_TENSORS[t])
            continue
        if key not in tensors:
            raise ExportError(f"{file}: missing key {key!r} ('{SECTION}.targets' lists {target!r})")
        out[t] = tensors[key]
    a, b = out[LORA_A], out[LORA_B]
    if a.dim() != 3 or a.shape[0] != E:
        raise ExportError(
            f"{file}: key {tensor_key(target, LORA_A)!r}: expected shape [E={E}, r, d_in] (E from "
            f"'{SECTION}.experts'), got {list(a.shape)}"
        )
    r = int(a.shape[1])
    if b.dim() != 3 or b.shape[0] != E or b.shape[2] != r:
        raise ExportError(
            f"{file}: key {tensor_key(target, LORA_B)!r}: expected shape [E={E}, d_out, r={r}], "
            f"got {list(b.shape)}"
        )
    for t in (SCALING, CALIBRATION, AVAILABLE, RANK, SCORE_SHIFT, DATA_SCALE):
        if tuple(out[t].shape) != (E,):
            raise ExportError(
                f"{file}: key {tensor_key(target, t)!r}: expected shape [E={E}], got "
                f"{list(out[t].shape)}"
            )
    avail = out[AVAILABLE].bool()
    ranks = torch.where(avail, out[RANK].long(), 0)
    if not bool(avail.any()) or bool((ranks[avail] < 1).any()) or bool((ranks > r).any()):
        raise ExportError(
            f"{file}: key {tensor_key(target, RANK)!r}: expected ranks in 1..{r} for the available "
            f"experts {avail.tolist()} (at least one), got {out[RANK].tolist()}"
        )
    scaling = torch.where(avail, out[SCALING].float(), 0.0)
    if not bool(torch.isfinite(scaling).all()):
        raise ExportError(
            f"{file}: key {tensor_key(target, SCALING)!r}: expected finite numbers, got "
            f"{out[SCALING].tolist()}"
        )
    _check_declared(section, target, ranks, scaling, out)
    for t in (LORA_A, LORA_B):  # a NaN factor would turn every routed token into NaN
        check_finite(file, tensor_key(target, t), out[t], ExportError)
    if section.calibration == "frobenius":
        calibration, cal_key = out[CALIBRATION].float(), CALIBRATION
    elif section.calibration == "data":  # sigma, kept apart so that a bank saved in another mode
        calibration, cal_key = out[DATA_SCALE].float(), DATA_SCALE  # serves "data" too
    else:
        calibration, cal_key = torch.ones(E), CALIBRATION
    if not bool((torch.isfinite(calibration) & (calibration > 0)).all()):
        raise ExportError(
            f"{file}: key {tensor_key(target, cal_key)!r}: expected finite values > 0, got "
            f"{out[cal_key].tolist()}"
        )
    shift = torch.zeros(E)
    if section.calibration == "data":
        shift = torch.where(avail, out[SCORE_SHIFT].float(), 0.0)
        if not bool(torch.isfinite(shift).all()):
            raise ExportError(
                f"{file}: key {tensor_key(target, SCORE_SHIFT)!r}: expected finite numbers, got "
                f"{out[SCORE_SHIFT].tolist()}"
            )
    return {
        "lora_A": a,
        "lora_B": b,
        "scaling": scaling,
        "calibration": calibration,
        "score_shift": shift,
        "available": avail,
    }


def _check_declared(
    section: PersonaSection, target: str, ranks: Tensor, scaling: Tensor, raw: Mapping[str, Tensor]
) -> None:
    """The ``ranks`` / ``scalings`` a personamoe-export/1 section repeated must match the bank."""
    name = section.bank_file().name
    if section.declared_ranks is not None:
        declared = section.declared_ranks[target]
        if not torch.equal(torch.tensor(declared, dtype=torch.long), ranks):
            raise ExportError(
                f"{section.path}: key '{SECTION}.ranks.{target}': {list(declared)} disagrees with "
                f"the bank {name} (ranks {raw[RANK].tolist()}, available "
                f"{raw[AVAILABLE].tolist()})"
            )
    if section.declared_scalings is not None:
        declared_s = section.declared_scalings[target]
        s = torch.tensor(declared_s, dtype=torch.float32)
        avail = ranks > 0
        if not torch.allclose(scaling, torch.where(avail, s, 0.0), rtol=1e-6, atol=0.0):
            raise ExportError(
                f"{section.path}: key '{SECTION}.scalings.{target}': {list(declared_s)} "
                f"disagrees with the bank {name} ({raw[SCALING].tolist()})"
            )


def bank_tables(
    section: PersonaSection,
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[float, ...]]]:
    """Each target's per-expert ranks (0 = absent) and scalings (0 where absent), read from the
    section's bank file (only the small ``[E]`` tensors are read)."""
    from safetensors import safe_open

    file = section.bank_file()
    if not file.is_file():
        raise ExportError(f"{section.path}: key '{SECTION}.bank': {file} not found")
    ranks: dict[str, tuple[int, ...]] = {}
    scalings: dict[str, tuple[float, ...]] = {}
    with safe_open(str(file), framework="pt") as f:
        present = set(f.keys())
        for target in section.targets:
            got: dict[str, Tensor] = {}
            for t in (SCALING, AVAILABLE, RANK):
                key = tensor_key(target, t)
                if key not in present:
                    raise ExportError(f"{file}: missing key {key!r}")
                got[t] = f.get_tensor(key)
            avail = got[AVAILABLE].bool()
            ranks[target] = tuple(torch.where(avail, got[RANK].long(), 0).tolist())
            scalings[target] = tuple(torch.where(avail, got[SCALING].float(), 0.0).tolist())
    return ranks, scalings
