"""The C++ routing step (scores, top-k, gates of a given h) vs the reference, through the fused
kernel: with ``x = h`` flattened and ``A`` the identity, the kernel's shrink gives back ``h``."""

from __future__ import annotations

import pytest
import torch

from personamoe import reference as R
from personamoe.backends import available_backends
from personamoe.backends.cpp_backend import fused_forward
from personamoe.layer_args import LayerArgs

pytestmark = pytest.mark.skipif(
    available_backends()["cpp"] != "available", reason="the C++ extension is not built"
)

INF = float("inf")


def route_from_h(h, *, top_k, temperature, normalize, calibration, persona_bias, persona_ids):
    """``(topk_idx, topk_gates, scores)`` of ``h [T, E, r]`` by the C++ kernel.

    ``x = h.reshape(T, E*r)`` and ``A[e]`` selects the columns of expert ``e`` (an identity), so
    the shrink ``x A^T`` is ``h`` exactly (products by 1, sums of exact zeros; a NaN or inf in a
    token spreads only within that token). The mix's output is not looked at.
    """
    T, E, r = h.shape
    lora_a = torch.eye(E * r).reshape(E, r, E * r)
    a = LayerArgs(
        h.reshape(T, E * r).float().contiguous(), torch.zeros(1, E * r), None, lora_a,
        torch.zeros(E, 1, r), torch.ones(E), top_k, temperature, normalize, calibration,
        persona_bias, persona_ids, None,
    )  # fmt: skip
    _, idx, gates, n = fused_forward(a)
    return idx, gates, n


@pytest.mark.parametrize("T", [0, 1, 7, 64, 257])
@pytest.mark.parametrize(("E", "k"), [(1, 1), (3, 1), (3, 3), (8, 2), (8, 8)])
@pytest.mark.parametrize("normalize", ["topk", "full"])
@pytest.mark.parametrize("threads", [1, 2])
def test_route_matches_reference(T, E, k, normalize, threads):
    torch.set_num_threads(threads)
    r = 5
    h = torch.randn(T, E, r)
    cal = torch.rand(E) + 0.5
    table = torch.randn(3, E)
    table[0, : max(E - 1, 1) : 2] = -INF
    table[2, :] = -INF
    ids = torch.randint(-1, 3, (T,))
    kw = dict(calibration=cal, persona_bias=table, persona_ids=ids)
    idx, gates, n = route_from_h(h, top_k=k, temperature=0.7, normalize=normalize, **kw)
    want_n = R.scores(h, **kw)
    want_idx, want_g = R.route(want_n, top_k=k, temperature=0.7, normalize=normalize)
    torch.testing.assert_close(n, want_n)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(gates, want_g)


def test_ties_and_out_of_range_ids_are_safe():
    # Equal norms everywhere: the lower index must win. Ids far outside the table are "no persona".
    h = torch.ones(4, 6, 2)
    table = torch.zeros(2, 6)
    ids = torch.tensor([-(2**40), 2**40, 1, -1])
    idx, gates, _n = route_from_h(
        h,
        top_k=3,
        temperature=1.0,
        normalize="topk",
        calibration=None,
        persona_bias=table,
        persona_ids=ids,
    )
    assert idx.tolist() == [[0, 1, 2]] * 4
    torch.testing.assert_close(gates, torch.full((4, 3), 1 / 3))


def test_nan_token_is_isolated_and_indices_stay_in_range():
    h = torch.randn(5, 4, 3)
    h[2, 1, 0] = float("nan")
    h[3] = INF
    idx, gates, _ = route_from_h(
        h,
        top_k=2,
        temperature=1.0,
        normalize="full",
        calibration=None,
        persona_bias=None,
        persona_ids=None,
    )
    assert ((idx >= 0) & (idx < 4)).all()
    assert all(len(set(row)) == 2 for row in idx.tolist())
    ok = [0, 1, 4]
    want_idx, want_g = R.route(R.scores(h[ok]), top_k=2, normalize="full")
    assert torch.equal(idx[ok], want_idx)
    torch.testing.assert_close(gates[ok], want_g)
