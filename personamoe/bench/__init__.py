"""Benchmark cases and providers (DESIGN.md §3), importable so every driver shares one definition.

``personamoe.bench.layer``: the layer cases L1/L16/L256 and the providers ``base``, ``naive``,
``dense``, ``masked``, ``reference`` and ``personamoe``, plus an interleaved timing loop.
"""
