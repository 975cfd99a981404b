"""Triton kernels of personamoe, shipped as ``personamoe.kernels`` (never a top-level package).

- ``shrink_route.py``: ``_shrink_kernel`` (h = x @ A^T over all experts, split-K while the tiles alone
  cannot fill the chip) and
  ``_route_kernel`` (norms, calibration, persona bias, top-k, gates, per-expert coefficients);
- ``mix.py``: ``_linear_mix_kernel`` (dense-masked mix, optionally fused into the base GEMM, plus the
  grouped regime's epilogue), ``_grouped_expand_kernel`` (pairs sorted by expert) and
  ``_align_kernel`` (that sort, one launch);
- ``configs.py``: the tile table, one entry per device name (unmeasured guesses for H100/H200, a
  default for other devices and the interpreter), looked up once per device; nothing autotuned;
- ``launchers.py``: ``persona_moe_linear(LayerArgs)``, the Triton backend's whole layer, and the
  documented path heuristics (``MIX_REGIME``, ``BASE_MODE`` and their thresholds).

Importing this package imports Triton; ``import personamoe`` never does (backends load it lazily).
"""
