"""Calibration from data (docs/design.md §1.9): ``personamoe.calibrate`` measures per layer and
expert the mean and std of ``||A_e x||`` over real tokens; the layers then score
``||A_e x|| / sigma_e + shift_e`` with the shift folded into the persona bias table. Checked against
statistics computed here from the layers' inputs, against the reference op, across the modes and
through save_bank/load_bank and export/load_exported."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.test_hf_models import VOCAB, adapter_set, ids_batch, tiny_model

pytest.importorskip("peft")

import personamoe
from personamoe import reference as R
from personamoe.integrations.layers import PersonaLayer, persona_layers
from personamoe.integrations.model_personas import state_of


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny_model("llama")
    root = tmp_path_factory.mktemp("cal")
    return base, adapter_set(base, root, "llama"), root


def _batches(n: int = 3, seed: int = 10) -> list[torch.Tensor]:
    return [ids_batch(2, 5 + 2 * i, seed + i) for i in range(n)]


def _calibrated(setup, batches=None, **kw):
    base, ads, _ = setup
    model = personamoe.inject(copy.deepcopy(base), ads, top_k=2)
    return personamoe.calibrate(model, batches if batches is not None else _batches(), **kw)


@torch.no_grad()
def _layer_inputs(model, batches) -> dict[str, list[torch.Tensor]]:
    """Each persona layer's inputs (real tokens only) while the model runs in mode "none"."""
    got: dict[str, list[torch.Tensor]] = {}
    handles = [
        layer.register_forward_hook(
            lambda m, a, o, name=name: got.setdefault(name, []).append(
                a[0].reshape(-1, a[0].shape[-1])
            )
        )
        for name, layer in persona_layers(model)
    ]
    try:
        for ids in batches:
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return got


def test_statistics_are_mean_and_std_of_the_norms(setup):
    base, ads, _ = setup
    batches = _batches()
    model = _calibrated(setup, batches)
    # The calibration forward routes freely with raw norms: replay that mode and recompute here.
    plain = personamoe.inject(copy.deepcopy(base), ads, top_k=2)
    inputs = _layer_inputs(plain, batches)
    checked = 0
    for name, layer in persona_layers(model):
        x = torch.cat(inputs[name])
        n = torch.linalg.vector_norm(R.shrink(x.double(), layer.lora_A.double()), dim=-1)
        mu, sd = n.mean(0), n.std(0, unbiased=False)
        avail = layer.pm_available
        torch.testing.assert_close(
            layer.data_scale[avail].double(), sd[avail], rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(
            layer.score_shift[avail].double(), (-mu / sd)[avail], rtol=1e-4, atol=1e-5
        )
        assert bool((layer.data_scale[~avail] == 1).all()) and bool(
            (layer.score_shift[~avail] == 0).all()
        )
        assert bool((layer.calibration == layer.data_scale).all())
        checked += int(avail.sum())
    assert checked == 14 + 4 + 2  # a: every module of 2 layers; b: q, v; c: up, down of layer 1
    assert state_of(model).options["calibration"] == "data"


def test_first_layer_scores_are_standardised(setup):
    """Inputs of layer 0's q/k/v projections do not depend on any adapter: on the calibration
    tokens, their data-calibrated scores have mean 0 and std 1 per expert."""
    batches = _batches()
    model = _calibrated(setup, batches)
    got: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
            for name, layer in persona_layers(model):
                if name.startswith("model.layers.0.self_attn.") and name[-6] in "qkv":
                    got.setdefault(name, []).append(layer.pm_last.scores.reshape(-1, 3))
    assert len(got) == 3
    for name, parts in got.items():
        s = torch.cat(parts)
        avail = torch.isfinite(s[0])
        assert int(avail.sum()) >= (1 if name.endswith("k_proj") else 2), name
        torch.testing.assert_close(
            s[:, avail].mean(0), torch.zeros(int(avail.sum())), atol=1e-4, rtol=0
        )
        torch.testing.assert_close(s[:, avail].std(0, unbiased=False), torch.ones(int(avail.sum())),
                                   atol=1e-4, rtol=0)  # fmt: skip


def test_padding_and_max_tokens_do_not_count(setup):
    g = torch.Generator().manual_seed(3)
    a, b = (
        torch.randint(1, VOCAB, (1, 7), generator=g),
        torch.randint(1, VOCAB, (1, 4), generator=g),
    )
    # Right padding with random ids (causal attention: the real tokens' states are unchanged).
    ids = torch.cat([a, torch.cat([b, torch.randint(1, VOCAB, (1, 3), generator=g)], 1)])
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    padded = _calibrated(setup, [{"input_ids": ids, "attention_mask": mask}])
    separate = _calibrated(setup, [a, b])
    cut = _calibrated(setup, [a, torch.cat([b, b], 1)], max_tokens=11)  # 7 + the first 4
    counted_pads = _calibrated(setup, [ids])
    diff = 0.0
    for (_, lp), (_, ls), (_, lc), (_, lx) in zip(
        persona_layers(padded), persona_layers(separate), persona_layers(cut),
        persona_layers(counted_pads), strict=True,
    ):  # fmt: skip
        for t in ("data_scale", "score_shift"):
            torch.testing.assert_close(getattr(lp, t), getattr(ls, t), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(getattr(lc, t), getattr(ls, t), rtol=1e-4, atol=1e-5)
        diff = max(diff, float(((lx.data_scale - ls.data_scale).abs() / ls.data_scale).max()))
    assert diff > 1e-2  # counting the pads would change the statistics


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 7)])
def test_layer_equals_reference_with_sigma_and_shift(setup, backend, shape):
    model = _calibrated(setup)
    personamoe.add_persona(model, personamoe.Persona("p", allow=["a", "c"], bias={"a": 0.25}))
    personamoe.add_persona(model, personamoe.Persona("f", weights={"a": 0.5, "b": -1.0}))
    g = torch.Generator().manual_seed(sum(shape))
    for _name, layer in persona_layers(model):
        x = torch.randn(*shape, layer.in_features, generator=g)
        ids = torch.randint(-1, 2, shape, generator=g)  # -1 none, 0 "p" (routes), 1 "f" (fixed)
        with personamoe.use_backend(backend), torch.no_grad():
            got = layer(x, persona_ids=ids)
        avail = layer.pm_available
        shift = torch.where(avail, layer.score_shift, float("-inf"))
        row_p = torch.full((3,), float("-inf"))
        row_p[0], row_p[2] = 0.25, 0.0
        table = torch.stack([shift, row_p + shift])  # built here, not read from the layer
        x2, t = x.reshape(-1, x.shape[-1]), ids.reshape(-1) + 1
        want, *_ = R.persona_moe_linear_full(
            x2.double(), layer.weight.double(), None, layer.lora_A.double(), layer.lora_B.double(),
            layer.scaling.double(), top_k=2, calibration=layer.data_scale.double(),
            persona_bias=table.double(), persona_ids=torch.where(t == 2, 0, t),
        )  # fmt: skip
        w_f = torch.where(avail, torch.tensor([0.5, -1.0, 0.0]), 0.0)
        fixed, *_ = R.persona_moe_linear_full(
            x2.double(), layer.weight.double(), None, layer.lora_A.double(), layer.lora_B.double(),
            layer.scaling.double(), top_k=2, persona_weights=w_f[None].double(),
            persona_ids=torch.zeros_like(t),
        )  # fmt: skip
        want = torch.where((t == 2)[:, None], fixed, want)
        torch.testing.assert_close(
            got.reshape(-1, got.shape[-1]).double(), want, rtol=1e-4, atol=1e-4
        )
        # The backend's scores are an affine map of the norm: (||A x|| - mu) / sigma.
        assert layer.pm_last is not None and layer.pm_last.scores is not None
        n = layer.pm_last.scores.reshape(-1, 3).double()
        h = R.shrink(x2.double(), layer.lora_A.double())
        norm = torch.linalg.vector_norm(h, dim=-1)
        free = t == 0
        mu = -layer.score_shift.double() * layer.data_scale.double()
        z = (norm - mu) / layer.data_scale.double()
        torch.testing.assert_close(n[free][:, avail], z[free][:, avail], rtol=1e-5, atol=1e-5)


def test_modes_switch_and_errors(setup):
    base, ads, _ = setup
    ids = ids_batch(3, 6, 5)
    with pytest.raises(ValueError, match="calibration"):
        personamoe.inject(copy.deepcopy(base), ads, calibration="data")
    fresh = personamoe.inject(copy.deepcopy(base), ads, top_k=2)
    with pytest.raises(ValueError, match="calibration: 'data' needs"):
        personamoe.set_routing(fresh, calibration="data")
    with pytest.raises(ValueError, match="calibration: expected one of"):
        personamoe.set_routing(fresh, calibration="zscore")
    model = _calibrated(setup)
    frob = personamoe.inject(copy.deepcopy(base), ads, top_k=2, calibration="frobenius")
    with torch.no_grad():
        y_data = model(ids).logits
        personamoe.set_routing(model, calibration="none")
        y_none = model(ids).logits
        personamoe.set_routing(model, calibration="frobenius")
        y_frob = model(ids).logits
        personamoe.set_routing(model, calibration="data")
        y_back = model(ids).logits
        torch.testing.assert_close(y_none, fresh(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(y_frob, frob(ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(y_back, y_data, rtol=0, atol=0)
    assert (y_data - y_none).abs().max() > 1e-4  # the calibration changes the routing
    with pytest.raises(TypeError, match=r"batches\[0\]"):
        personamoe.calibrate(fresh, [torch.randn(2, 3)])
    with pytest.raises(ValueError, match="max_tokens"):
        personamoe.calibrate(fresh, [ids], max_tokens=0)
    with pytest.raises(ValueError, match="batches: expected at least one real token"):
        personamoe.calibrate(fresh, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}])
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        personamoe.calibrate(fresh, [{"input_ids": ids, "attention_mask": torch.ones(3, 2)}])
    assert state_of(fresh).options["calibration"] == "none"  # failed calls changed nothing


def test_calibrate_restores_personas_routing_and_training(setup):
    base, ads, _ = setup
    model = personamoe.inject(copy.deepcopy(base), ads, top_k=2, routing="fixed").train()
    with personamoe.use_personas(model, personamoe.Persona("only_a", allow=["a"])):
        personamoe.calibrate(model, _batches(1))
        st = state_of(model)
        assert st.routing == "fixed" and st.current_rows == (1,) and model.training


def test_save_and_load_bank_round_trip(setup, tmp_path):
    base, _, _ = setup
    model = _calibrated(setup)
    personamoe.add_persona(model, personamoe.Persona("p", allow=["a", "b"]))
    ids = ids_batch(2, 9, 4)
    personamoe.save_bank(model, tmp_path / "bank")
    meta = json.loads((tmp_path / "bank" / "personamoe_bank.json").read_text())
    assert meta["options"]["calibration"] == "data"
    loaded = personamoe.load_bank(copy.deepcopy(base), tmp_path / "bank")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        with personamoe.use_personas(model, "p"), personamoe.use_personas(loaded, "p"):
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    for (_, a), (_, b) in zip(persona_layers(model), persona_layers(loaded), strict=True):
        assert torch.equal(a.score_shift, b.score_shift) and torch.equal(a.data_scale, b.data_scale)
    # Saved in another mode, the statistics still travel: switch back after loading.
    personamoe.set_routing(model, calibration="frobenius")
    personamoe.save_bank(model, tmp_path / "frob")
    again = personamoe.load_bank(copy.deepcopy(base), tmp_path / "frob")
    personamoe.set_routing(again, calibration="data")
    personamoe.set_routing(model, calibration="data")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_old_bank_without_statistics_loads(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    base, ads, _ = setup
    model = personamoe.inject(copy.deepcopy(base), ads, top_k=2, calibration="frobenius")
    personamoe.save_bank(model, tmp_path)
    w = tmp_path / "personamoe_bank.safetensors"
    tensors = {
        k: v
        for k, v in load_file(str(w)).items()
        if not k.endswith((".score_shift", ".data_scale"))
    }
    save_file(tensors, str(w), metadata={"format": "personamoe-bank/1"})
    cfg = tmp_path / "personamoe_bank.json"
    meta = json.loads(cfg.read_text())
    for info in meta["layers"].values():
        del info["data_calibrated"]
    cfg.write_text(json.dumps(meta))
    loaded = personamoe.load_bank(copy.deepcopy(base), tmp_path)
    ids = ids_batch(2, 5, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="calibration: 'data' needs"):
        personamoe.set_routing(loaded, calibration="data")
    # A bank that claims mode "data" without statistics is refused, naming the key.
    meta["options"]["calibration"] = "data"
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="data_calibrated"):
        personamoe.load_bank(copy.deepcopy(base), tmp_path)


def test_export_carries_the_statistics(setup, tmp_path):
    from personamoe.integrations.checkpoint.bank_view import read_bank_tensors
    from personamoe.integrations.export import export, load_exported, read_section

    base, ads, _ = setup
    folder = tmp_path / "base"
    base.save_pretrained(str(folder), safe_serialization=True)
    batches = _batches()
    with pytest.raises(ValueError, match="calibration_batches"):
        export(folder, ads, tmp_path / "x", calibration="data")
    out = export(folder, ads, tmp_path / "export", calibration="data", calibration_batches=batches)
    model = _calibrated(setup, batches)
    loaded = load_exported(out).eval()
    ids = ids_batch(3, 8, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    cfg = json.loads((out / "config.json").read_text())
    sec = read_section(cfg, out / "config.json")
    assert sec.calibration == "data"
    from safetensors.torch import load_file

    raw = load_file(str(out / "personamoe_bank.safetensors"))
    for name, layer in persona_layers(model):
        t = read_bank_tensors(sec, name, raw)
        avail = layer.pm_available
        assert torch.equal(t["calibration"], layer.data_scale)
        assert torch.equal(t["score_shift"], torch.where(avail, layer.score_shift, 0.0))
    # The section is authoritative: "none" reads as ones and zeros.
    cfg["personamoe"]["calibration"] = "none"
    sec_none = read_section(cfg, out / "config.json")
    t = read_bank_tensors(sec_none, name, raw)
    assert torch.equal(t["calibration"], torch.ones(3)) and torch.equal(
        t["score_shift"], torch.zeros(3)
    )
    # Edited to "frobenius", the exported checkpoint routes as inject(calibration="frobenius").
    import shutil

    shutil.copytree(out, tmp_path / "edited")
    cfg["personamoe"]["calibration"] = "frobenius"
    (tmp_path / "edited" / "config.json").write_text(json.dumps(cfg))
    frob = personamoe.inject(copy.deepcopy(base), ads, top_k=2, calibration="frobenius")
    with torch.no_grad():
        edited = load_exported(tmp_path / "edited").eval()
        torch.testing.assert_close(edited(ids).logits, frob(ids).logits, rtol=0, atol=0)
    # A bank without the statistics cannot serve "data".
    key = f"{name}.score_shift"
    with pytest.raises(Exception, match="score_shift"):
        read_bank_tensors(sec, name, {k: v for k, v in raw.items() if k != key})


def test_layers_are_persona_layers(setup):
    model = _calibrated(setup)
    assert all(isinstance(m, PersonaLayer) for _, m in persona_layers(model))


def test_sequence_routing_pools_calibrated_scores(setup):
    model = _calibrated(setup)
    personamoe.set_routing(model, "sequence")
    name, layer = next(
        (n, m) for n, m in persona_layers(model) if bool(m.pm_available.all()) is False
    )
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, layer.in_features, generator=g)
    with torch.no_grad():
        y = layer(x)
        # By hand: (||h|| / sigma + shift) pooled over each sequence, top-k over available experts.
        h = R.shrink(x.reshape(-1, x.shape[-1]), layer.lora_A).reshape(3, 5, 3, -1)
        z = torch.linalg.vector_norm(h, dim=-1) / layer.data_scale + layer.score_shift
        pooled = torch.where(layer.pm_available, z.mean(1), float("-inf"))
        idx, gates = R.route(pooled, top_k=2)
        want = x @ layer.weight.T
        for b in range(3):
            for j in range(2):
                e = int(idx[b, j])
                if gates[b, j] > 0:
                    want[b] += gates[b, j] * layer.scaling[e] * (h[b, :, e] @ layer.lora_B[e].T)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert name  # a layer with an absent expert: the shift must not revive it
