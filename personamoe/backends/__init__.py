"""Backend registry and choice: ``reference``, ``cpp``, ``triton``, ``cuda`` and ``auto``.

The choice is read each time the op runs (not when it is traced), so ``set_backend`` takes effect
for compiled models too. ``PERSONAMOE_BACKEND`` sets the initial choice.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from personamoe.backends.base import Backend, LayerArgs
from personamoe.backends.cpp_backend import CppBackend
from personamoe.backends.cuda_backend import CudaBackend
from personamoe.backends.reference_backend import ReferenceBackend
from personamoe.backends.triton_backend import TritonBackend

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "LayerArgs",
    "available_backends",
    "get_backend",
    "resolve_backend",
    "set_backend",
    "use_backend",
]

_BACKENDS: dict[str, Backend] = {
    b.name: b for b in (ReferenceBackend(), CppBackend(), TritonBackend(), CudaBackend())
}
BACKEND_NAMES = ("auto", *_BACKENDS)
# Order in which ``auto`` tries backends per device type: fastest first. The Triton interpreter is
# never picked by ``auto`` (TritonBackend.supports answers False for CPU unless asked explicitly).
_AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}

_current: str = os.environ.get("PERSONAMOE_BACKEND", "auto").strip().lower() or "auto"


def _check_name(name: str, source: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source}: expected one of {BACKEND_NAMES}, got {name!r}")
    if name != "auto":
        ok, why = _BACKENDS[name].available()
        if not ok:
            raise ValueError(f"{source}: backend {name!r} is not available here: {why}")
    return name


def set_backend(name: str) -> None:
    """Choose the backend for every later call (``"auto"`` picks the fastest available one)."""
    global _current
    _current = _check_name(str(name).strip().lower(), "backend")


def get_backend() -> str:
    """The backend name currently chosen (may be ``"auto"``)."""
    return _current


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the block with backend ``name``, then restore the previous choice."""
    global _current
    previous = _current
    set_backend(name)
    try:
        yield
    finally:
        _current = previous


def available_backends() -> dict[str, str]:
    """Every backend name mapped to ``"available"`` or the reason it is not."""
    out = {}
    for name, b in _BACKENDS.items():
        ok, why = b.available()
        out[name] = "available" if ok else why
    return out


def resolve_backend(device: torch.device, args: LayerArgs | None = None) -> Backend:
    """The backend object that will run a call on ``device``."""
    name = _check_name(_current, "PERSONAMOE_BACKEND" if _current != "auto" else "backend")
    dev = device.type
    if name != "auto":
        b = _BACKENDS[name]
        if not b.supports(dev, explicit=True):
            raise ValueError(
                f"backend: {name!r} cannot run on {dev} tensors (it runs on {b.device_types})"
            )
        return b
    for cand in _AUTO_ORDER.get(dev, ("reference",)):
        b = _BACKENDS[cand]
        if b.available()[0] and b.supports(dev, explicit=False) and b.accepts(args):
            return b
    return _BACKENDS["reference"]
