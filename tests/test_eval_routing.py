"""``python -m personamoe eval-routing`` on a tiny random Llama with three PEFT adapters built so
that each one responds to the tokens of its own "domain", and one of them is loud (its ``A`` ten
times larger, its ``B`` ten times smaller: the same adapter output, larger norms everywhere).
Raw routing then picks the loud adapter for every text; data calibration recovers the domains."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from personamoe.__main__ import main
from tests_vllm import tiny

DOMAINS = ("a", "b", "c")
PER_DOMAIN = 6
WORDS = [f"{d}{i}" for d in DOMAINS for i in range(PER_DOMAIN)]
HIDDEN = 64
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tokenizer(out: Path) -> None:
    tiny.build_tokenizer(out, WORDS)


def _token_id(word: str) -> int:
    return WORDS.index(word) + 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("evalrouting")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(WORDS) + 3,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)  # fmt: skip
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(str(root / "base"), safe_serialization=True)
    _tokenizer(root / "base")
    emb = base.model.embed_tokens.weight.detach()
    adapters = {}
    for n, d in enumerate(DOMAINS):
        torch.manual_seed(10 + n)
        lcfg = LoraConfig(r=PER_DOMAIN, lora_alpha=PER_DOMAIN, target_modules=MODULES,
                          init_lora_weights=False)  # fmt: skip
        pm = get_peft_model(copy.deepcopy(base), lcfg)
        rows = emb[[_token_id(f"{d}{i}") for i in range(PER_DOMAIN)]]
        rows = rows / rows.norm(dim=1, keepdim=True)
        loud = 10.0 if d == "a" else 1.0
        with torch.no_grad():
            for _name, mod in pm.named_modules():
                if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                    a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                    if a.shape[1] == HIDDEN:  # inputs that carry the token embedding
                        a.copy_(rows)
                    a.mul_(loud)
                    b.mul_(0.3 / loud)
        pm.save_pretrained(str(root / "adapters" / d))
        adapters[d] = root / "adapters" / d
    g = torch.Generator().manual_seed(5)
    texts = {}
    for d in DOMAINS:
        words = [f"{d}{int(i)}" for i in torch.randint(0, PER_DOMAIN, (160,), generator=g)]
        (root / "text").mkdir(exist_ok=True)
        texts[d] = root / "text" / f"{d}.txt"
        # A few lines with a blank line, as real text has.
        texts[d].write_text(" ".join(words[:80]) + "\n\n" + " ".join(words[80:]) + "\n")
    return {"root": root, "base": root / "base", "adapters": adapters, "texts": texts}


def _run(world, out: Path, *extra: str) -> dict:
    argv = ["eval-routing", "--base", str(world["base"]), "--out", str(out), "--chunk-tokens", "20"]
    for d in DOMAINS:
        argv += ["--adapter", f"{d}={world['adapters'][d]}", "--text", f"{d}={world['texts'][d]}"]
    assert main([*argv, *extra]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def results(world):
    out = world["root"] / "out"
    return _run(world, out, "--top-k", "1,2"), out


def _entry(res: dict, cal: str, k: int) -> dict:
    (e,) = [e for e in res["routing"] if e["calibration"] == cal and e["top_k"] == k]
    return e


def test_json_is_complete_and_consistent(results):
    res, out = results
    assert res["format"] == "personamoe-eval-routing/1" and res["complete"] is True
    assert res["skipped"] == [] and res["top_ks"] == [1, 2]
    assert res["chance_top1"] == pytest.approx(1 / 3)
    assert {(e["calibration"], e["top_k"]) for e in res["routing"]} == {
        (c, k) for c in ("none", "frobenius", "data") for k in (1, 2)
    }
    assert res["texts"]["a"] == {"chunks": 8, "tokens": 160}
    for e in res["routing"]:
        for d in DOMAINS:
            a = e["adapters"][d]
            assert 0 <= a["top1_match"] <= a["topk_match"] <= 1
            if e["top_k"] == 1:
                assert a["topk_match"] == a["top1_match"]
            # 2 layers x 7 modules, every token of 8 chunks of 20
            assert a["decisions"] == 14 * 160 and a["chunks"] == 8 and a["tokens"] == 8 * 19
            assert set(a["by_depth"]) == {"0", "1"} and set(a["by_module"]) == set(MODULES)
            assert len(a["by_layer"]) == 14
            assert sum(v["decisions"] for v in a["by_depth"].values()) == a["decisions"]
            hits = sum(v["top1_match"] * v["decisions"] for v in a["by_module"].values())
            assert hits == pytest.approx(a["top1_match"] * a["decisions"])
            assert sum(a["top1_share"].values()) == pytest.approx(1.0)
            assert a["top1_share"][d] == pytest.approx(a["top1_match"])
        mean = sum(e["adapters"][d]["top1_match"] for d in DOMAINS) / 3
        assert e["mean_top1_match"] == pytest.approx(mean)
    assert (out / "routing.png").stat().st_size > 1000  # matplotlib is installed here


def test_data_calibration_beats_raw_norms(results):
    res, _ = results
    raw, data = _entry(res, "none", 1), _entry(res, "data", 1)
    # The loud adapter wins everywhere with raw norms ...
    for d in ("b", "c"):
        assert raw["adapters"][d]["top1_share"]["a"] > 0.7
    assert raw["mean_top1_match"] < 0.5
    # ... data calibration undoes the loudness (the measured mean is about 0.53 here; deeper
    # layers see inputs that no longer carry the token's embedding, and match less) ...
    assert data["mean_top1_match"] > raw["mean_top1_match"] + 0.15
    assert data["mean_vote_match"] > raw["mean_vote_match"]
    # ... and layer 0's q/k/v, whose inputs are the token embeddings, find every domain.
    for d in DOMAINS:
        by_layer = data["adapters"][d]["by_layer"]
        for m in ("q_proj", "k_proj", "v_proj"):
            assert by_layer[f"model.layers.0.self_attn.{m}"]["top1_match"] > 0.9, (d, m)
            assert raw["adapters"][d]["by_layer"][f"model.layers.0.self_attn.{m}"][
                "top1_match"
            ] == (1.0 if d == "a" else 0.0)


def test_losses_match_peft_and_the_base(world, results):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res, _ = results
    tok = AutoTokenizer.from_pretrained(str(world["base"]))
    from personamoe.integrations.text_data import read_texts, token_chunks

    def nll(model, chunks):
        total, count = 0.0, 0
        with torch.no_grad():
            for ids in chunks:
                logits = model(input_ids=ids).logits
                total += float(
                    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
                )
                count += ids.shape[1] - 1
        return total / count

    base = AutoModelForCausalLM.from_pretrained(str(world["base"])).eval()
    for d in DOMAINS:
        chunks = token_chunks(tok, read_texts(world["texts"][d]), 20)
        assert res["loss"]["base"][d] == pytest.approx(nll(base, chunks), rel=1e-5)
        peft = PeftModel.from_pretrained(copy.deepcopy(base), str(world["adapters"][d])).eval()
        assert res["loss"]["oracle"][d] == pytest.approx(nll(peft, chunks), rel=1e-5)
        assert abs(res["loss"]["oracle"][d] - res["loss"]["base"][d]) > 1e-4  # the adapter acts


def test_budget_stops_and_keeps_json(world, tmp_path):
    res = _run(world, tmp_path, "--budget-s", "0", "--top-k", "2")
    assert res["complete"] is False
    assert len(res["skipped"]) == 3 * 3 + 3  # base, oracle, uniform per text; 3 calibrations
    assert res["routing"] == [] and res["loss"]["base"] == {}


def test_bad_arguments_exit_naming_the_option(world, tmp_path):
    with pytest.raises(SystemExit, match="--text"):
        main(["eval-routing", "--base", str(world["base"]), "--adapter",
              f"a={world['adapters']['a']}", "--text", f"b={world['texts']['b']}"])  # fmt: skip
    with pytest.raises(SystemExit, match="--calibrations"):
        main(["eval-routing", "--base", str(world["base"]), "--adapter",
              f"a={world['adapters']['a']}", "--text", f"a={world['texts']['a']}",
              "--calibrations", "zscore"])  # fmt: skip


def test_export_cli_calibrates_on_text(world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import personamoe
    from personamoe.integrations.export import load_exported
    from personamoe.integrations.text_data import read_texts, token_chunks

    text_dir = world["texts"]["a"].parent
    adapters = [f"{d}={world['adapters'][d]}" for d in DOMAINS]
    with pytest.raises(SystemExit, match="--calibration-text"):
        main(["export", "--base", str(world["base"]), "--adapters", *adapters, "--out",
              str(tmp_path / "x"), "--calibration", "data"])  # fmt: skip
    out = tmp_path / "export"
    main(["export", "--base", str(world["base"]), "--adapters", *adapters, "--out", str(out),
          "--calibration", "data", "--calibration-text", str(text_dir)])  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["personamoe"]["calibration"] == "data"
    tok = AutoTokenizer.from_pretrained(str(world["base"]))
    chunks = token_chunks(tok, read_texts(text_dir), 256)
    assert len(chunks) == 3  # one chunk of 160 tokens per file
    direct = AutoModelForCausalLM.from_pretrained(str(world["base"])).eval()
    personamoe.inject(direct, dict(world["adapters"]), top_k=2)
    personamoe.calibrate(direct, chunks)
    ids = chunks[1][:, :30]
    with torch.no_grad():
        got = load_exported(out).eval()(ids).logits
        torch.testing.assert_close(got, direct(ids).logits, rtol=0, atol=0)
