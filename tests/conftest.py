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
