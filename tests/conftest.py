"""Test set-up: Triton runs in its interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before any Triton kernel module is imported, so it is set here,
at conftest import time, ahead of every test module.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from personamoe._import_path import prefer_installed_kernels

# The source tree's kernels/ folder must not shadow an installed `kernels` (personamoe/_import_path.py).
prefer_installed_kernels()


def _column_symmetric_interpreter_dot() -> None:
    """Make the Triton interpreter's ``tl.dot`` give identical columns identical results.

    On a GPU every output element of a tensor-core dot goes through the same reduction over K, so
    two experts with identical ``A`` get bitwise equal ``h`` and an exact tie (broken to the lower
    index by the contract). The interpreter computes ``tl.dot`` with ``np.matmul``, whose BLAS
    micro-kernels handle edge columns with another summation order: identical columns differ in
    the last bit (every time, measured), so exact-tie tests would test numpy, not the kernel. Here
    the dot is a plain ``einsum`` (products summed in K order for every column), which keeps the
    GPU's property. Only the interpreter is patched; compiled kernels are untouched.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = d.data.dtype
        prod = np.einsum(
            "...mk,...kn->...mn", a.data.astype(out), b.data.astype(out), optimize=False
        )
        return interpreter.TensorHandle(prod + d.data, d.dtype.scalar)

    builder.create_dot = create_dot


_column_symmetric_interpreter_dot()

# (dtype, atol, rtol) against the fp32 reference: accumulation is fp32 everywhere, the difference is
# the rounding of inputs/outputs (and of the base GEMM's output for half types).
DTYPE_TOLS = [
    pytest.param(torch.float32, 1e-4, 1e-4, id="fp32"),
    pytest.param(torch.float16, 2e-2, 2e-2, id="fp16"),
    pytest.param(torch.bfloat16, 1e-1, 5e-2, id="bf16"),
]


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Every test starts from a fixed seed and the default backend choice."""
    import personamoe.backends as backends

    torch.manual_seed(1234)
    previous = backends._current
    threads = torch.get_num_threads()
    yield
    backends._current = previous
    torch.set_num_threads(threads)
