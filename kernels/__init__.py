"""Triton kernels of personamoe, shipped as ``personamoe.kernels`` (never a top-level package)."""
