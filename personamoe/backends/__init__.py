"""Backend registry and choice: ``reference``, ``cpp``, ``triton``, ``cuda`` and ``auto``.

The choice is read each time the op runs (not when it is traced), so ``set_backend`` takes effect
for compiled models too. ``PERSONAMOE_BACKEND`` sets the initial choice.
"""

from __future__ import annotations

import contextlib
import contextvars
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
# ``use_backend`` blocks: per thread and per asyncio task (a context variable), so one thread's
# block never changes the backend another thread runs; ``set_backend`` stays process-wide.
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "personamoe_backend", default=None
)


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
    """The backend name currently chosen (may be ``"auto"``): the innermost ``use_backend`` block
    of this thread, else the process-wide ``set_backend`` choice."""
    scoped = _scoped.get()
    return _current if scoped is None else scoped


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the block with backend ``name`` (in this thread only), then restore."""
    token = _scoped.set(_check_name(str(name).strip().lower(), "backend"))
    try:
        yield
    finally:
        _scoped.reset(token)


def available_backends() -> dict[str, str]:
    """Every backend name mapped to ``"available"`` or the reason it is not."""
    out = {}
    for name, b in _BACKENDS.items():
        ok, why = b.available()
        out[name] = "available" if ok else why
    return out


def resolve_backend(device: torch.device, args: LayerArgs | None = None) -> Backend:
    """The backend object that will run a call on ``device``."""
    current = get_backend()
    name = _check_name(current, "PERSONAMOE_BACKEND" if current != "auto" else "backend")
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
