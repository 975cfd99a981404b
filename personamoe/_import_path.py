"""Keep this repository's top-level ``kernels/`` folder from shadowing an installed ``kernels``.

The Triton kernels live in the source tree as ``kernels/`` (shipped as ``personamoe.kernels``). When
the repository root is on ``sys.path`` (``python -m personamoe`` or pytest run from a clone), a plain
``import kernels`` finds that folder instead of the Hugging Face ``kernels`` distribution, which
transformers >= 5.25 imports whenever it is installed ("cannot import name 'CUDAProperties' from
'kernels'"). :func:`prefer_installed_kernels` imports the installed one first, with the root off the
path; nothing of personamoe imports a top-level ``kernels``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

__all__ = ["prefer_installed_kernels"]

_ROOT = str(Path(__file__).resolve().parents[1])


def prefer_installed_kernels() -> None:
    """Import an installed ``kernels`` package before the source tree's folder can shadow it
    (a no-op when none is installed or it is already imported)."""
    in_a_clone = os.path.isfile(os.path.join(_ROOT, "pyproject.toml")) and os.path.isdir(
        os.path.join(_ROOT, "kernels")
    )  # an installed personamoe sits in site-packages: nothing of ours to shadow anything
    if "kernels" in sys.modules or not in_a_clone:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _ROOT]
    try:
        if importlib.util.find_spec("kernels") is not None:
            import kernels  # noqa: F401
    except ImportError:  # a broken install of it: transformers will say so itself
        pass
    finally:
        sys.path[:] = saved
