"""Benchmark cases and providers (docs/design.md §5), importable so every driver shares one definition.

``personamoe.bench.layer``: the layer cases L1/L16/L256 and the providers ``base``, ``naive``,
``dense``, ``masked``, ``reference`` and ``personamoe``; ``personamoe.bench.model``: the model
case M; ``personamoe.bench.runner``: the one interleaved timing loop and the one machine
description every benchmark uses; ``personamoe.bench.cli``: ``python -m personamoe bench``.
"""
