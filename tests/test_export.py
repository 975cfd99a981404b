"""The servable checkpoint (personamoe/integrations/export/): export, load back with transformers,
the CLI, and clear errors for malformed ``personamoe`` sections (and old ones that repeat the bank's
ranks and scalings)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from personamoe.integrations.export import (
    BANK_WEIGHTS,
    FORMAT,
    LEGACY_FORMAT,
    ExportError,
    load_exported,
    read_section,
)
from tests_vllm import tiny


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny.build_all(tmp_path_factory.mktemp("tiny"), top_k=2)


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 33, 70, 2 + 100], [1, 8, 8, 40, 3, 11]])


def test_layout(folders: dict[str, Path]) -> None:
    out = folders["export"]
    cfg = json.loads((out / "config.json").read_text())
    sec = read_section(cfg, out / "config.json")
    assert sec.experts == tuple(tiny.ADAPTERS)
    assert sec.top_k == 2 and sec.normalize == "topk" and sec.temperature == 1.0
    assert len(sec.targets) == 2 * 7
    mlp = "model.layers.0.mlp.down_proj"
    assert sec.ranks[mlp] == (4, 8, 4, 0)  # "terse" leaves the MLP out
    assert sec.scalings["model.layers.0.self_attn.q_proj"] == (2.0, 1.0, 1.0, 2.0)
    assert (out / BANK_WEIGHTS).is_file() and (out / "tokenizer.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}


def test_load_exported_equals_inject(folders: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    import personamoe

    ids = _ids()
    exported = load_exported(folders["export"]).eval()
    direct = AutoModelForCausalLM.from_pretrained(str(folders["base"])).eval()
    adapters = {n: folders["adapters"] / n for n in tiny.ADAPTERS}
    personamoe.inject(direct, adapters, top_k=2)
    base = AutoModelForCausalLM.from_pretrained(str(folders["base"])).eval()
    with torch.no_grad():
        got = exported(ids).logits
        want = direct(ids).logits
        plain = base(ids).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert (got - plain).abs().max() > 1e-2  # the experts change the output


def test_section_is_authoritative(folders: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "k1"
    shutil.copytree(folders["export"], out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["personamoe"]["top_k"] = 1
    (out / "config.json").write_text(json.dumps(cfg))
    model = load_exported(out)
    from personamoe.integrations.layers import persona_layers

    assert {layer.top_k for _, layer in persona_layers(model)} == {1}


def test_cli(folders: dict[str, Path], tmp_path: Path) -> None:
    from personamoe.__main__ import main

    args = ["export", "--base", str(folders["base"]), "--out", str(tmp_path / "cli"),
            "--top-k", "1", "--adapters"]  # fmt: skip
    args += [f"{n}={folders['adapters'] / n}" for n in ("calm", "formal")]
    assert main(args) == 0
    sec = read_section(json.loads((tmp_path / "cli/config.json").read_text()), "config.json")
    assert sec.experts == ("calm", "formal") and sec.top_k == 1
    with pytest.raises(SystemExit, match="NAME=DIR"):
        main(["export", "--base", "b", "--out", "o", "--adapters", "nodir"])


def _good(folders: dict[str, Path]) -> dict[str, Any]:
    return json.loads((folders["export"] / "config.json").read_text())


def _legacy(folder: Path) -> dict[str, Any]:
    """The export's config.json as personamoe-export/1 wrote it: the section also repeated each
    target's ranks and scalings (the bank's values)."""
    cfg = json.loads((folder / "config.json").read_text())
    sec = read_section(cfg, folder / "config.json")
    cfg["personamoe"]["format"] = LEGACY_FORMAT
    cfg["personamoe"]["ranks"] = {t: list(r) for t, r in sec.ranks.items()}
    cfg["personamoe"]["scalings"] = {t: list(s) for t, s in sec.scalings.items()}
    return cfg


BAD: list[tuple[str, Any, str]] = [
    ("format", "personamoe-export/0", "personamoe.format"),
    ("top_k", 5, r"personamoe.top_k': expected an int in 1..4"),
    ("top_k", "2", "personamoe.top_k"),
    ("normalize", "soft", "personamoe.normalize"),
    ("temperature", 0, "personamoe.temperature"),
    ("experts", ["a", "a", "b", "c"], "unique"),
    ("routing", "sequence", "personamoe.routing"),
    ("calibration", "l2", "personamoe.calibration"),
    ("bank", "../x.safetensors", "personamoe.bank"),
]


@pytest.mark.parametrize(("key", "value", "match"), BAD)
def test_malformed_section(folders: dict[str, Path], key: str, value: Any, match: str) -> None:
    cfg = copy.deepcopy(_good(folders))
    cfg["personamoe"][key] = value
    with pytest.raises(ExportError, match=match):
        read_section(cfg, "config.json")


def test_malformed_tables(folders: dict[str, Path]) -> None:
    cfg = _legacy(folders["export"])
    t = cfg["personamoe"]["targets"][0]
    for mutate, match in [
        (lambda s: s["ranks"].__setitem__(t, [4, 8]), f"ranks.{t}': expected a list of E=4"),
        (lambda s: s["scalings"].__setitem__(t, [1.0, "x", 1.0, 1.0]), f"scalings.{t}'"),
        (lambda s: s["ranks"].__setitem__("model.nope", [1, 1, 1, 1]), "not one of 'targets'"),
        (lambda s: s.pop("experts"), "personamoe.experts': missing"),
    ]:
        c = copy.deepcopy(cfg)
        mutate(c["personamoe"])
        with pytest.raises(ExportError, match=match):
            read_section(c, "config.json")
    with pytest.raises(ExportError, match="no 'personamoe' section"):
        read_section({"model_type": "llama"}, "config.json")
    assert _good(folders)["personamoe"]["format"] == FORMAT


def test_bank_disagreeing_with_section(folders: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "bad"
    shutil.copytree(folders["export"], out)
    cfg = _legacy(out)
    t = "model.layers.1.mlp.up_proj"
    cfg["personamoe"]["ranks"][t] = [4, 8, 4, 8]  # the bank says "terse" is absent there
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=rf"ranks.{t}'.*disagrees with the bank"):
        load_exported(out)


def test_vllm_layer_mapping_and_version_pin(folders: dict[str, Path]) -> None:
    """The plugin's pure parts (no vLLM needed): fused vLLM layers map to the checkpoint's modules,
    and any vLLM but the tested one is refused with a clear message."""
    from personamoe.integrations.vllm.config import part_targets
    from personamoe.integrations.vllm.version import TESTED_VLLM, check_vllm_version

    sec = read_section(_good(folders), "config.json")
    attn = "model.layers.1.self_attn"
    assert part_targets(f"{attn}.qkv_proj", sec, fused=True) == tuple(
        f"{attn}.{m}" for m in ("q_proj", "k_proj", "v_proj")
    )
    assert part_targets("model.layers.0.mlp.gate_up_proj", sec, fused=True) == (
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
    )
    assert part_targets(f"{attn}.o_proj", sec, fused=False) == (f"{attn}.o_proj",)
    assert part_targets("lm_head", sec, fused=False) == (None,)
    check_vllm_version(TESTED_VLLM + "+cpu")
    with pytest.raises(RuntimeError, match=r"tested with vLLM 0\.32\.0 only"):
        check_vllm_version("0.33.0")


def test_section_holds_no_bank_tables(folders: dict[str, Path]) -> None:
    """Ranks and scalings live in the bank file alone; the section names what to serve and how."""
    section = _good(folders)["personamoe"]
    assert section["format"] == FORMAT
    assert "ranks" not in section and "scalings" not in section


def test_legacy_export_loads_like_new(folders: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "legacy"
    shutil.copytree(folders["export"], out)
    (out / "config.json").write_text(json.dumps(_legacy(out)))
    sec = read_section(json.loads((out / "config.json").read_text()), out / "config.json")
    assert sec.declared_ranks == sec.ranks and sec.declared_scalings == sec.scalings
    ids = _ids()
    with torch.no_grad():
        got = load_exported(out).eval()(ids).logits
        want = load_exported(folders["export"]).eval()(ids).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_load_exported_reads_the_bank_once(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors
    import safetensors.torch

    opened: list[str] = []
    real_load, real_open = safetensors.torch.load_file, safetensors.safe_open

    def load_file(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path).name)
        return real_load(path, *args, **kwargs)

    def safe_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", load_file)
    monkeypatch.setattr(safetensors, "safe_open", safe_open)
    load_exported(folders["export"])
    assert opened.count(BANK_WEIGHTS) == 1


def test_bank_and_section_disagree_on_experts(folders: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "renamed"
    shutil.copytree(folders["export"], out)
    cfg = _good(folders)
    cfg["personamoe"]["experts"] = list(reversed(cfg["personamoe"]["experts"]))
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"personamoe.experts'.*disagrees with the bank"):
        load_exported(out)


def test_personas_travel_with_the_export(folders: dict[str, Path], tmp_path: Path) -> None:
    """Personas given to the export (API and CLI) are saved with the bank, listed by name in the
    section, and registered again by load_exported: the same names serve in transformers."""
    from personamoe import Persona, use_personas
    from personamoe.__main__ import main
    from personamoe.integrations.model_personas import state_of

    out = tmp_path / "with-personas"
    args = ["export", "--base", str(folders["base"]), "--out", str(out), "--top-k", "2",
            "--persona", "warm:allow=calm,formal", "--persona", "lean:bias=calm=1.5,formal=-2",
            "--persona", "mix:weights=calm=0.7,formal=0.3", "--adapters"]  # fmt: skip
    args += [f"{n}={folders['adapters'] / n}" for n in tiny.ADAPTERS]
    assert main(args) == 0
    sec = read_section(json.loads((out / "config.json").read_text()), out / "config.json")
    assert sec.personas == ("warm", "lean", "mix")
    model = load_exported(out).eval()
    got = state_of(model).registered
    assert list(got) == ["warm", "lean", "mix"]
    assert got["warm"].allow == ("calm", "formal") and got["lean"].bias == {
        "calm": 1.5,
        "formal": -2.0,
    }
    assert got["mix"].weights == {"calm": 0.7, "formal": 0.3}
    # A named persona gives what the same Persona object given ad hoc gives.
    ids = _ids()
    with torch.no_grad(), use_personas(model, ["mix", "warm"]):
        named = model(ids).logits
    with torch.no_grad(), use_personas(model, [Persona("m", weights={"calm": 0.7, "formal": 0.3}),
                                               Persona("w", allow=["calm", "formal"])]):  # fmt: skip
        adhoc = model(ids).logits
    torch.testing.assert_close(named, adhoc, atol=0, rtol=0)
    # The section and the bank must agree on the names.
    cfg = json.loads((out / "config.json").read_text())
    cfg["personamoe"]["personas"] = ["warm"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"personamoe\.personas.*disagrees"):
        load_exported(out)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("nocolon", "expected NAME:allow"),
        ("p:colour=a", "expected allow=..., bias=... or weights=..."),
        ("p:bias=a=x", r"bias: expected EXPERT=NUMBER"),
        ("p:allow=a;allow=b", "allow is given twice"),
        ("p:weights=a=1;allow=a", "either weights"),
        ("p:bias=a=inf", "finite"),
    ],
)
def test_persona_specs_that_are_wrong_exit_naming_the_option(spec: str, match: str) -> None:
    from personamoe.integrations.checkpoint.cli import parse_persona

    with pytest.raises(SystemExit, match=match):
        parse_persona(spec)
    assert parse_persona("p:allow=a,b;bias=a=1").allow == ("a", "b")


def test_export_refuses_a_persona_over_unknown_experts(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    from personamoe import Persona
    from personamoe.integrations.export import export

    adapters = {n: folders["adapters"] / n for n in tiny.ADAPTERS}
    with pytest.raises(ValueError, match="nosuch"):
        export(
            folders["base"], adapters, tmp_path / "bad", personas=[Persona("p", allow=["nosuch"])]
        )
    assert not (tmp_path / "bad").exists()
