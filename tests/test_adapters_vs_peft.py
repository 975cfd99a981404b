"""personamoe reads PEFT adapters without importing PEFT (personamoe/adapters.py); these tests hold
its rules to PEFT's own: small PEFT models built with rank/alpha patterns (plain and regex keys),
``target_modules`` lists and regex strings, rsLoRA and the default ``lora_alpha`` are saved, read
back with :func:`personamoe.adapters.read_adapter`, and every module's rank, scaling and factors are
compared with what PEFT put on its ``LoraLayer`` modules (``module.r[adapter]``,
``module.scaling[adapter]``). Injection's ``target_modules`` selection is held to PEFT's as well."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import personamoe  # noqa: E402
from personamoe.adapters import read_adapter  # noqa: E402
from personamoe.integrations.layers import persona_layers  # noqa: E402
from tests.test_hf_models import LLAMA_LIKE, tiny_model  # noqa: E402

ADAPTER = "default"
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_model("llama")


def _peft_model(base: torch.nn.Module, seed: int = 0, **cfg: Any) -> Any:
    """A PEFT model with random A and B (PEFT zero-initialises B unless told otherwise)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **cfg))


def _peft_layers(pm: Any) -> dict[str, Any]:
    """PEFT's LoRA layers by module name (as in the saved file, without PEFT's prefix)."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix(PREFIX): m
        for name, m in pm.named_modules()
        if isinstance(m, LoraLayer) and ADAPTER in m.r
    }


def _assert_same_as_peft(pm: Any, folder: Path) -> None:
    """personamoe's reading of ``folder`` agrees with the PEFT model that saved it, module by
    module: the same modules, ranks, scalings (bitwise) and factors."""
    want = _peft_layers(pm)
    got = read_adapter(folder).modules
    assert sorted(got) == sorted(want)
    for name, m in want.items():
        lm = got[name]
        assert lm.rank == m.r[ADAPTER], name
        assert lm.scaling == m.scaling[ADAPTER], name
        torch.testing.assert_close(lm.lora_A, m.lora_A[ADAPTER].weight, atol=0, rtol=0)
        torch.testing.assert_close(lm.lora_B, m.lora_B[ADAPTER].weight, atol=0, rtol=0)


def _saved(pm: Any, folder: Path) -> Path:
    pm.save_pretrained(str(folder))
    return folder


def _reloaded(base: torch.nn.Module, folder: Path) -> Any:
    """PEFT's own reading of a saved folder (what ``PeftModel.from_pretrained`` computes)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(folder))


CASES: dict[str, dict[str, Any]] = {
    "plain_patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=LLAMA_LIKE,
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3, "model.layers.0.mlp.up_proj": 5.5},
    ),
    "regex_patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=LLAMA_LIKE,
        rank_pattern={r"layers\.0\.self_attn\.(k|v)_proj": 3, r".*mlp\.(gate|up)_proj": 5},
        alpha_pattern={r"layers\.1\..*_proj": 2.5},
    ),
    # Two keys match layers.1's q_proj (and v_proj): the first one in the file wins, as in PEFT.
    # (PEFT writes adapter_config.json with sorted keys, so the keys here are in sorted order:
    # see test_overlapping_rank_keys_out_of_sorted_order for what happens otherwise.)
    "first_matching_key_wins": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 6, "q_proj": 2},
        alpha_pattern={r"self_attn\.(q|v)_proj": 4, "v_proj": 16},
    ),
    # A key matches whole dot-separated name parts only: "proj" is no pattern for "q_proj".
    "key_matches_whole_name_parts": dict(
        r=4, lora_alpha=8, target_modules=LLAMA_LIKE, rank_pattern={"proj": 2, "0.mlp.up_proj": 3}
    ),
    "target_list_full_names_and_suffixes": dict(
        r=2,
        lora_alpha=4,
        target_modules=["model.layers.0.self_attn.o_proj", "down_proj", "mlp.gate_proj"],
    ),
    "target_regex_string": dict(
        r=3, lora_alpha=6, target_modules=r".*layers\.1\.(self_attn\.(q|k)_proj|mlp\.up_proj)"
    ),
    "all_linear": dict(r=2, lora_alpha=3, target_modules="all-linear"),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_LIKE),
    "rslora_with_patterns": dict(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=LLAMA_LIKE,
        rank_pattern={"o_proj": 9},
        alpha_pattern={"down_proj": 2},
    ),
    "default_alpha": dict(r=4, target_modules=["q_proj", "down_proj"]),
    "default_alpha_with_rank_pattern": dict(
        r=4, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 16}
    ),
}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")  # PEFT warns
@pytest.mark.parametrize("case", sorted(CASES))
def test_ranks_and_scalings_match_peft(base: torch.nn.Module, tmp_path: Path, case: str) -> None:
    pm = _peft_model(base, **CASES[case])
    folder = _saved(pm, tmp_path / case)
    _assert_same_as_peft(pm, folder)
    _assert_same_as_peft(_reloaded(base, folder), folder)


def test_patterns_did_vary_ranks_and_scalings(base: torch.nn.Module) -> None:
    """The cases above exercise what they claim (several ranks and scalings per adapter)."""
    for case in ("plain_patterns", "regex_patterns", "first_matching_key_wins"):
        layers = _peft_layers(_peft_model(base, **CASES[case])).values()
        assert len({m.r[ADAPTER] for m in layers}) > 1, case
        assert len({m.scaling[ADAPTER] for m in layers}) > 1, case


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_config_without_lora_alpha_uses_peft_default(base: torch.nn.Module, tmp_path: Path) -> None:
    """An adapter_config.json without ``lora_alpha`` (hand-written or from another tool) reads as
    PEFT reads it: ``LoraConfig``'s default alpha."""
    from peft import LoraConfig

    folder = _saved(_peft_model(base, r=2, lora_alpha=8, target_modules=["q_proj"]), tmp_path / "a")
    cfg_file = folder / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["lora_alpha"]
    cfg_file.write_text(json.dumps(cfg))
    assert LoraConfig.from_pretrained(str(folder)).lora_alpha == LoraConfig().lora_alpha
    _assert_same_as_peft(_reloaded(base, folder), folder)


def test_pattern_order_survives_the_config_file(base: torch.nn.Module, tmp_path: Path) -> None:
    """The first matching key wins, so the order of ``alpha_pattern`` in the JSON file matters:
    reversing it changes PEFT's answer, and personamoe's with it."""
    folder = _saved(_peft_model(base, **CASES["first_matching_key_wins"]), tmp_path / "a")
    cfg_file = folder / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["alpha_pattern"] = dict(reversed(list(cfg["alpha_pattern"].items())))
    cfg_file.write_text(json.dumps(cfg))
    reloaded = _reloaded(base, folder)
    # layers.1's v_proj now takes its alpha from "v_proj" (16), no longer from the regex (4).
    assert _peft_layers(reloaded)["model.layers.1.self_attn.v_proj"].scaling[ADAPTER] == 16 / 4
    _assert_same_as_peft(reloaded, folder)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_overlapping_rank_keys_out_of_sorted_order(base: torch.nn.Module, tmp_path: Path) -> None:
    """PEFT's own quirk: it picks the first matching key in the order given, but saves the config
    with sorted keys, so overlapping ``rank_pattern`` keys given out of sorted order save an adapter
    whose file disagrees with its weights. PEFT cannot load it back; personamoe refuses it too, with
    the file and the pattern key named (it follows the file, as PEFT's loader does)."""
    from personamoe.adapters import AdapterError

    pm = _peft_model(base, r=4, target_modules=["q_proj"],
                     rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.q_proj": 6})  # fmt: skip
    assert {m.r[ADAPTER] for m in _peft_layers(pm).values()} == {2}  # "q_proj" came first
    folder = _saved(pm, tmp_path / "a")
    assert list(json.loads((folder / "adapter_config.json").read_text())["rank_pattern"]) == [
        r"layers\.1\.self_attn\.q_proj",
        "q_proj",
    ]
    with pytest.raises(RuntimeError, match="size mismatch"):
        _reloaded(base, folder)
    with pytest.raises(AdapterError, match=r"rank_pattern\['layers"):
        read_adapter(folder)


TARGET_SELECTIONS: list[Any] = [
    ["q_proj", "v_proj"],
    ["model.layers.0.self_attn.o_proj", "mlp.down_proj"],
    r".*layers\.1\.mlp\.(gate|up)_proj",
    "all-linear",
]


@pytest.mark.parametrize("target_modules", TARGET_SELECTIONS)
def test_inject_selects_the_modules_peft_selects(
    base: torch.nn.Module, target_modules: Any
) -> None:
    """``inject(..., target_modules=...)`` (a fresh bank) picks exactly PEFT's modules."""
    want = sorted(_peft_layers(_peft_model(base, r=2, target_modules=target_modules)))
    model = personamoe.inject(copy.deepcopy(base), 2, rank=2, target_modules=target_modules)
    assert sorted(name for name, _ in persona_layers(model)) == want
