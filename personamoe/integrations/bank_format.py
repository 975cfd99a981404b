"""The on-disk persona bank, named once: its two files and the tensors each target layer stores.

Written by :func:`personamoe.integrations.bank.save_bank`, read by ``load_bank``, by the export's
loader and by the vLLM plugin. The bank is the single source of a layer's ranks and scalings: an
export's ``config.json`` section does not repeat them (docs/design.md).

``personamoe_bank.safetensors`` holds, per target module ``<module>``::

    <module>.lora_A        [E, r, d_in]   every expert's A, zero-padded to the layer's rank r
    <module>.lora_B        [E, d_out, r]  every expert's B, zero-padded likewise
    <module>.scaling       [E]            alpha / r (or alpha / sqrt(r)) per expert
    <module>.calibration   [E]            the active divisor of the scores: ||A_e||_F ("frobenius"),
                                          sigma_e ("data"), else ones
    <module>.pm_available  [E] bool       whether expert e targets this module
    <module>.pm_rank       [E]            expert e's own rank there (<= r)
    <module>.score_shift   [E]            -mu_e / sigma_e measured by ``personamoe.calibrate``
                                          (zeros when never calibrated on data); added to every
                                          routed persona row (and the "no persona" row) only when
                                          the calibration is "data"
    <module>.data_scale    [E]            sigma_e measured by ``personamoe.calibrate`` (ones when
                                          never calibrated on data); equals ``calibration`` in
                                          mode "data", kept so that the mode can be switched back

The last two are optional on read (banks written before them load with zeros / ones).

``personamoe_bank.json`` holds the rest (experts, routing options, personas, adapter configs, and
per layer its padded rank, whether it wraps a ``Conv1D``, whether it is calibrated and whether it
holds data statistics, ``data_calibrated``).
"""

from __future__ import annotations

__all__ = [
    "AVAILABLE",
    "BANK_CONFIG",
    "BANK_FORMAT",
    "BANK_TENSORS",
    "BANK_WEIGHTS",
    "CALIBRATION",
    "DATA_SCALE",
    "LORA_A",
    "LORA_B",
    "OPTIONAL_TENSORS",
    "RANK",
    "SCALING",
    "SCORE_SHIFT",
    "tensor_key",
]

BANK_WEIGHTS = "personamoe_bank.safetensors"
BANK_CONFIG = "personamoe_bank.json"
BANK_FORMAT = "personamoe-bank/1"

# The tensor names are also the attribute names of a persona layer (save_bank reads them with
# getattr), so renaming one here renames a layer buffer too.
LORA_A = "lora_A"
LORA_B = "lora_B"
SCALING = "scaling"
CALIBRATION = "calibration"
AVAILABLE = "pm_available"
RANK = "pm_rank"
SCORE_SHIFT = "score_shift"
DATA_SCALE = "data_scale"
BANK_TENSORS = (LORA_A, LORA_B, SCALING, CALIBRATION, AVAILABLE, RANK, SCORE_SHIFT, DATA_SCALE)
OPTIONAL_TENSORS: dict[str, float] = {SCORE_SHIFT: 0.0, DATA_SCALE: 1.0}
"""Tensors that banks written before them lack, with the value they read as (per expert)."""


def tensor_key(module: str, tensor: str) -> str:
    """The safetensors key of one of a target module's bank tensors."""
    return f"{module}.{tensor}"
