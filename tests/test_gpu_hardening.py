"""GPU-path defects made right by construction, each tested on the CPU.

- Every tensor reaches a kernel with the strides the kernel indexes (``kernel_ready``): an
  expanded ``scaling`` or ``bias`` (stride 0) once read past its allocation in the Triton grouped
  regime.
- Every launch runs on ``x``'s own device (``device_guard``), whatever the current device is.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from personamoe import reference
from personamoe.backends import base
from personamoe.backends.triton_backend import TritonBackend
from personamoe.layer_args import LayerArgs

pytest.importorskip("triton")


def _layer(T=70, d_in=40, d_out=24, E=6, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    return dict(
        x=rnd(T, d_in), weight=rnd(d_out, d_in, scale=d_in**-0.5), bias=rnd(d_out),
        lora_a=rnd(E, r, d_in, scale=d_in**-0.5), lora_b=rnd(E, d_out, r, scale=r**-0.5),
    )  # fmt: skip


@pytest.mark.parametrize("regime", ["dense", "grouped"])
@pytest.mark.parametrize("base_mode", ["torch", "fused"])
def test_expanded_scaling_and_bias_in_every_triton_regime(monkeypatch, regime, base_mode):
    """``scaling = tensor([s]).expand(E)`` and an expanded bias give the reference's result."""
    from personamoe.kernels import launchers

    monkeypatch.setattr(launchers, "MIX_REGIME", regime)
    monkeypatch.setattr(launchers, "BASE_MODE", base_mode)
    c = _layer()
    E, d_out = c["lora_a"].shape[0], c["weight"].shape[0]
    scaling = torch.tensor([0.75]).expand(E)
    bias = torch.tensor([0.3]).expand(d_out)
    args = LayerArgs(c["x"], c["weight"], bias, c["lora_a"], c["lora_b"], scaling, 2, 1.0,
                     "topk", None, None, None, None)  # fmt: skip
    y, idx, gates, n = TritonBackend().forward(args)
    ry, ridx, rgates, rn = reference.forward(args._replace(scaling=scaling.contiguous(),
                                                           bias=bias.contiguous()))  # fmt: skip
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(n, rn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gates, rgates, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, ry, atol=1e-4, rtol=1e-4)


def test_kernel_ready_makes_small_tensors_dense_and_keeps_dense_ones():
    c = _layer(T=5)
    E = c["lora_a"].shape[0]
    ids = torch.zeros(10, dtype=torch.long)[::2]
    args = LayerArgs(c["x"].t().contiguous().t(), c["weight"], None, c["lora_a"], c["lora_b"],
                     torch.ones(1).expand(E), 2, 1.0, "topk", None, torch.zeros(2, E).t().t(),
                     ids, None)  # fmt: skip
    ready = base.kernel_ready(args)
    assert ready.x.stride(-1) == 1 and ready.scaling.is_contiguous()
    assert ready.persona_ids.is_contiguous() and torch.equal(ready.persona_ids, ids)
    dense = args._replace(x=c["x"], scaling=torch.ones(E), persona_ids=torch.zeros(5).long())
    assert base.kernel_ready(dense) is dense  # nothing copied on the usual path


def test_device_guard_enters_the_tensors_device():
    guard = base.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(base.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_backend_forward_launches_inside_the_guard(monkeypatch):
    """The guard wraps the launch for non-CPU tensors (seam: a recording guard, a fake device)."""
    seen: list[torch.device] = []
    order: list[str] = []

    @contextlib.contextmanager
    def recording(device):
        seen.append(device)
        order.append("enter")
        yield
        order.append("exit")

    class Probe(base.Backend):
        name = "probe"

        def run(self, args):
            order.append("run")
            return reference.forward(args)

    monkeypatch.setattr(base, "device_guard", recording)
    c = _layer(T=3)
    args = LayerArgs(c["x"].to("meta"), c["weight"].to("meta"), None, c["lora_a"].to("meta"),
                     c["lora_b"].to("meta"), torch.ones(6, device="meta"), 2, 1.0, "topk", None,
                     None, None, None)  # fmt: skip
    with contextlib.suppress(Exception):  # the reference on meta tensors may not finish
        Probe().forward(args)
    assert seen == [torch.device("meta")]
    assert order[:2] == ["enter", "run"]


@pytest.mark.parametrize("T", [1, 16, 17, 64])
def test_split_k_ties_go_to_lower_index_and_runs_are_bitwise_equal(T):
    """d_in = 2048 splits K at these T: duplicated experts tie exactly (the partials are summed in
    a fixed order), the tie goes to the lower index, and a second run gives the same bits."""
    from personamoe.kernels import shrink_route

    d_in, d_out, E, r = 2048, 32, 6, 16
    assert shrink_route.shrink_config(T, E * r, d_in)[3] > 1
    g = torch.Generator().manual_seed(T)
    one = torch.randn(1, r, d_in, generator=g) * d_in**-0.5
    lora_a = torch.cat([one, one, torch.randn(E - 2, r, d_in, generator=g) * 1e-3])
    args = LayerArgs(torch.randn(T, d_in, generator=g), torch.randn(d_out, d_in, generator=g),
                     None, lora_a, torch.randn(E, d_out, r, generator=g), torch.ones(E), 1, 1.0,
                     "topk", None, None, None, None)  # fmt: skip
    first = TritonBackend().forward(args)
    second = TritonBackend().forward(args)
    assert (first[1][:, 0] == 0).all()  # experts 0 and 1 tie; 0 wins, every token
    assert torch.equal(first[2], torch.ones(T, 1))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    ref = reference.forward(args)
    torch.testing.assert_close(first[0], ref[0], atol=1e-3, rtol=1e-4)


def test_layer_ids_are_not_read_on_an_accelerator_and_out_of_range_means_no_persona(monkeypatch):
    """Finding 4: a layer given ``persona_ids`` read their min and max (two host syncs per layer
    per decode step on a GPU). Off the CPU the ids are no longer read: ids out of range become row
    0 ("no persona", as in the kernels) on the device, so no row index leaves the tables. On CPU
    the error stays. Meta tensors stand for device tensors: any read of their values raises."""
    from personamoe.integrations import layers

    ids = torch.tensor([[-1, 0, 2], [3, -5, 1]])
    with pytest.raises(ValueError, match=r"persona_ids: expected ids in \[-1, 3\).*got -5"):
        layers.ids_to_rows(ids, 4)
    rows = layers.ids_to_rows(ids.to("meta"), 4)  # would raise on int(min) / item()
    assert rows.device.type == "meta" and rows.shape == ids.shape and rows.dtype == torch.long
    monkeypatch.setattr(layers, "_reads_ids", lambda t: False)  # the accelerator's path, on CPU
    got = layers.ids_to_rows(ids, 4)
    assert got.tolist() == [[0, 1, 3], [0, 0, 2]]  # 3 and -5 are out of range: no persona


def test_persona_rows_are_copied_to_another_device_once_per_rows_tensor():
    """A model spread over devices copied the batch's persona rows in every layer of every step;
    now once per device per rows tensor, and never a stale copy after the rows change."""
    from personamoe.personas import PersonaState

    st = PersonaState(["a", "b"], "token", None)
    st.set_ids([0, 0], torch.device("cpu"))
    meta = torch.device("meta")
    first = st.ids_on(meta)
    assert first is not None and first.device == meta
    assert st.ids_on(meta) is first  # the next layers reuse it
    assert st.ids_on(torch.device("cpu")) is st.ids
    st.ids = torch.tensor([0, 0, 0])  # restored by use_personas without set_ids
    again = st.ids_on(meta)
    assert again is not first and again is not None and again.shape == (3,)
