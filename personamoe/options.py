"""The names of every routing option, in one place, with the one check that enforces them.

A leaf module: the reference, the validation, the layers, the Hugging Face integration, the bank
files and the export all read their choices from here, so adding a mode is a change of one tuple
(and of the code that implements it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "CALIBRATIONS",
    "NORMALIZE_MODES",
    "ROUTING_MODES",
    "SERVABLE_ROUTINGS",
    "check_choice",
    "check_routing_options",
]

NORMALIZE_MODES = ("topk", "full")
"""How gates are normalised: softmax over the chosen top-k, or over every expert (docs/design.md §1)."""

ROUTING_MODES = ("token", "sequence", "fixed", "merged")
"""How an injected model chooses experts: per token, once per prompt, a fixed mixture, or folded
into the base weights."""

SERVABLE_ROUTINGS = ("token",)
"""The routing modes an export may carry (a server routes per token)."""

CALIBRATIONS = ("none", "frobenius", "data")
"""How expert scores are put on one scale: not at all, divided by ``||A_e||_F``, or standardised
per expert with statistics of ``||A_e x||`` measured on text (``"data"``: ``personamoe.calibrate``
must have run first)."""


def check_choice(name: str, value: object, choices: Sequence[str], where: str = "") -> str:
    """``value`` when it is one of ``choices``, else ``ValueError`` naming the argument."""
    if not isinstance(value, str) or value not in choices:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_routing_options(
    top_k: object, num_experts: int, temperature: object, normalize: object, *, experts: str = "E"
) -> None:
    """``ValueError`` naming the first wrong routing option a layer or an injected model is built
    with: ``top_k`` in ``1..num_experts`` (``experts`` says what that number counts), a finite
    ``temperature > 0``, a known ``normalize``."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected an int in 1..{num_experts} ({experts}), got {top_k!r}")
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature: expected a finite float > 0, got {temperature!r}")
    check_choice("normalize", normalize, NORMALIZE_MODES)
