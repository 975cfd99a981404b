"""pytest-benchmark suite of the layer cases L1/L16/L256 (docs/design.md §5), one benchmark per
(case, provider), weights rotated over several sets between calls.

    python -m pytest benchmarks/test_bench_layer.py --benchmark-enable --benchmark-group-by=param:case

pyproject's ``addopts`` carries ``--benchmark-disable``, so in CI each runs once as a smoke test
(with two weight sets to keep it quick). For the ratio table that counts (interleaved medians) use
``python -m personamoe bench``; the cases and providers are the same objects
(``personamoe.bench.layer``), and ``benchmarks/conftest.py`` adds the same machine description.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from personamoe.bench import layer as bl

ROTATE_BYTES = 256 << 20  # weights rotated through when benchmarking for real


@functools.cache
def _weights(case_name: str, n_sets: int) -> list[bl.WeightSet]:
    return bl.make_weight_sets(bl.CASES[case_name], n_sets)


@pytest.mark.parametrize("provider", list(bl.PROVIDERS))
@pytest.mark.parametrize("case", list(bl.CASES))
def test_layer(benchmark, case, provider):
    c = bl.CASES[case]
    enabled = not benchmark.disabled
    n_sets = bl.sets_for_bytes(c, ROTATE_BYTES) if enabled else 2
    sets = _weights(case, n_sets)
    x = bl.make_input(c)
    fn = bl.PROVIDERS[provider]
    order = itertools.cycle(range(n_sets))
    benchmark.group = case

    def call() -> torch.Tensor:
        return fn(x, sets[next(order)], c.top_k)

    with torch.inference_mode():
        y = benchmark(call)
    assert y.shape == (c.tokens, c.d_out) and y.dtype == c.dtype
    assert bool(torch.isfinite(y).all())
