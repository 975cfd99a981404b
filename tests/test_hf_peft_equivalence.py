"""personamoe against PEFT itself, on tiny random Llama, Qwen2, Mistral, Gemma and GPT-2 models.

The adapters differ in rank (padded in the bank), scaling (rsLoRA, rank/alpha patterns) and targets
(one only in layer 1's MLP: absent elsewhere), so every special case of the loader is on the path.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.test_hf_models import ARCHS, adapter_set, ids_batch, logits, make_adapter, tiny_model

peft = pytest.importorskip("peft")

import personamoe  # noqa: E402

ATOL, RTOL = 2e-5, 1e-4


def _peft_multi(base, ads):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(ads["a"]), adapter_name="a")
    for name in ("b", "c"):
        pm.load_adapter(str(ads[name]), adapter_name=name)
    return pm.eval()


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    base = tiny_model(arch)
    return arch, base, adapter_set(base, root, arch)


def test_one_adapter_top1_equals_peft_lora(setup):
    from peft import PeftModel

    _, base, ads = setup
    ids = ids_batch()
    for name in ("a", "c"):  # all layers; one layer's MLP with rank/alpha patterns
        want = logits(PeftModel.from_pretrained(copy.deepcopy(base), str(ads[name])).eval(), ids)
        ours = personamoe.inject(copy.deepcopy(base), {name: ads[name]}, top_k=1)
        got = logits(ours, ids)
        assert not torch.allclose(want, logits(base, ids), atol=1e-3)  # the adapter does something
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_persona_allowing_one_adapter_equals_peft_mixed_batch(setup):
    _, base, ads = setup
    ids = ids_batch(batch=5)
    pm = _peft_multi(base, ads)
    want = logits(pm, ids, adapter_names=["a", "b", "c", "__base__", "b"])
    ours = personamoe.inject(copy.deepcopy(base), ads, top_k=1)
    personamoe.add_persona(ours, personamoe.Persona("only_a", allow=["a"]))
    only_c = personamoe.Persona("only_c", allow=["c"])  # ad hoc, not registered
    rows = [
        "only_a",
        personamoe.Persona("only_b", allow="b"),
        only_c,
        personamoe.Persona("none", allow=[]),
    ]
    with personamoe.use_personas(ours, [*rows, rows[1]]):
        got = logits(ours, ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    # Rows really differ (the comparison is not between equal rows).
    assert not torch.allclose(want[0], want[1], atol=1e-3)
    # After the block, requests route freely again over all three adapters.
    free = logits(ours, ids)
    assert not torch.allclose(free, got, atol=1e-3)


def test_fixed_weights_equal_peft_cat_and_merge(setup):
    _, base, ads = setup
    ids = ids_batch()
    w = {"a": 0.7, "b": -0.4, "c": 1.3}
    pm = _peft_multi(base, ads)
    pm.add_weighted_adapter(["a", "b", "c"], list(w.values()), "mix", combination_type="cat")
    pm.set_adapter("mix")
    want = logits(pm, ids)

    ours = personamoe.inject(copy.deepcopy(base), ads, top_k=2)
    mix = personamoe.Persona("mix", weights=w)
    with personamoe.use_personas(ours, mix):
        got = logits(ours, ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)

    # routing="fixed": requests without a persona use the model's default mixture.
    fixed = personamoe.inject(copy.deepcopy(base), ads, routing="fixed", weights=w)
    torch.testing.assert_close(logits(fixed, ids), want, atol=ATOL, rtol=RTOL)

    # Merged: the same mixture folded into the base weights; unmerge restores them bitwise.
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    personamoe.merge(ours, mix)
    torch.testing.assert_close(logits(ours, ids), want, atol=1e-4, rtol=1e-4)
    assert any(not torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    personamoe.unmerge(ours)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


def test_export_expert_round_trips_through_peft(setup, tmp_path):
    from peft import PeftModel

    _, base, ads = setup
    ids = ids_batch()
    ours = personamoe.inject(copy.deepcopy(base), ads, top_k=2)
    for name in ("a", "b", "c"):
        out = personamoe.export_expert(ours, name, tmp_path / name)
        exported = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
        original = PeftModel.from_pretrained(copy.deepcopy(base), str(ads[name])).eval()
        torch.testing.assert_close(
            logits(exported, ids), logits(original, ids), atol=1e-6, rtol=1e-5
        )


def test_gqa_and_fan_in_fan_out_shapes(setup, tmp_path):
    """k_proj/v_proj have a smaller d_out (grouped-query attention); GPT-2's c_attn is a Conv1D."""
    from peft import PeftModel

    arch, base, ads = setup
    ours = personamoe.inject(copy.deepcopy(base), {"a": ads["a"]}, top_k=1)
    shapes = {n.rsplit(".", 1)[-1]: tuple(m.lora_B.shape) for n, m in ours.named_modules()
              if isinstance(m, personamoe.PersonaMoELinear)}  # fmt: skip
    if arch == "gpt2":
        assert shapes["c_attn"] == (1, 96, 4)
    else:
        assert shapes["k_proj"][1] < shapes["q_proj"][1]
    # A second adapter of a rank not a multiple of the first: padded, still exact.
    odd = make_adapter(base, tmp_path / "odd", arch, 9, r=5, lora_alpha=3)
    want = logits(PeftModel.from_pretrained(copy.deepcopy(base), str(odd)).eval(), ids_batch())
    both = personamoe.inject(copy.deepcopy(base), {"a": ads["a"], "odd": odd}, top_k=1)
    with personamoe.use_personas(both, personamoe.Persona("o", allow=["odd"])):
        torch.testing.assert_close(logits(both, ids_batch()), want, atol=ATOL, rtol=RTOL)
