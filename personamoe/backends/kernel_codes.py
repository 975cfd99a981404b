"""The kernels' codes (``csrc/common/codes.h``) as the compiled extensions export them.

Both extensions (``personamoe._C``, ``personamoe._C_cuda``) export the enums ``DType``,
``Normalize`` and ``Mode`` with members named as Python spells them: torch dtype names
(``float32``, ``bfloat16``, ...) and the option strings of ``personamoe/options.py`` (``topk``,
``full``; ``token``, ``fixed``). This module is the one place where torch dtypes meet those
enums, and it writes no number: the values come from the extension.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, NamedTuple

import torch

__all__ = ["KernelCodes", "kernel_codes"]


class KernelCodes(NamedTuple):
    """One extension's enum members, keyed by the Python values they stand for."""

    dtype: dict[torch.dtype, Any]  # torch dtype -> ext.DType member
    normalize: dict[str, Any]  # "topk" / "full" -> ext.Normalize member
    token: Any  # ext.Mode.token: experts ranked per token (persona_bias)
    fixed: Any  # ext.Mode.fixed: the persona's fixed weights (persona_weights)


@functools.cache
def kernel_codes(ext: ModuleType) -> KernelCodes:
    """The codes of extension module ``ext`` (cached per module: each has its own enum types)."""
    return KernelCodes(
        dtype={getattr(torch, name): m for name, m in ext.DType.__members__.items()},
        normalize=dict(ext.Normalize.__members__),
        token=ext.Mode.token,
        fixed=ext.Mode.fixed,
    )
