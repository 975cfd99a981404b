"""Files written and read by personamoe: crash-safe saves (a failed save leaves the previous files
loadable and no temporaries), a failed export keeps the earlier export, every load checks every
value first (errors name the file and key, the model is left untouched), bounded pattern keys."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import personamoe
from personamoe.adapters import CONFIG_NAME, WEIGHTS_NAME, read_adapter, write_adapter
from personamoe.integrations.bank_format import BANK_CONFIG, BANK_WEIGHTS

REPO = Path(__file__).resolve().parents[1]


def _mlp(seed: int = 0, d: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 8))


def _bank_model(seed: int = 0) -> nn.Module:
    """A fresh 2-expert bank of random factors on a 2-layer MLP (no transformers needed)."""
    torch.manual_seed(seed)
    return personamoe.inject(_mlp(), 2, rank=4, lora_alpha=8, init_lora_weights=False)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` (recursively) by relative path; hidden temporaries included."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


class _FailOn:
    """Calls ``real`` but raises ``OSError(ENOSPC)`` on call number ``n`` (1-based)."""

    def __init__(self, real: Callable[..., Any], n: int) -> None:
        self.real, self.n, self.calls = real, n, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.n:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return self.real(*args, **kwargs)


# -- finding 2: every save is atomic and all-or-nothing -------------------------------------------


def _save_bank(folder: Path) -> None:
    personamoe.save_bank(_bank_model(seed=1), folder)


def _save_adapter(folder: Path) -> None:
    g = torch.Generator().manual_seed(1)
    mods = {"m.q": (torch.randn(2, 8, generator=g), torch.randn(4, 2, generator=g), 0.5)}
    write_adapter(folder, mods)


def _save_expert(folder: Path) -> None:
    personamoe.export_expert(_bank_model(seed=1), "expert_1", folder)


def _first(kind: str, folder: Path) -> None:
    if kind == "bank":
        personamoe.save_bank(_bank_model(seed=0), folder)
    else:
        g = torch.Generator().manual_seed(0)
        mods = {"m.q": (torch.randn(3, 8, generator=g), torch.randn(4, 3, generator=g), 2.0)}
        write_adapter(folder, mods)


_SAVES = {"bank": _save_bank, "adapter": _save_adapter, "expert": _save_expert}


@pytest.mark.parametrize("kind", sorted(_SAVES))
@pytest.mark.parametrize("fail", ["rename", "write"])
def test_failed_save_keeps_the_previous_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, fail: str
) -> None:
    folder = tmp_path / "out"
    _first("bank" if kind == "bank" else "adapter", folder)
    before = _snapshot(folder)
    if fail == "rename":  # the second file's rename fails, after the first one's succeeded
        monkeypatch.setattr(os, "replace", _FailOn(os.replace, 2))
    else:  # the second file's data does not reach the disk
        import personamoe._atomic as atomic

        monkeypatch.setattr(atomic, "_fsync_file", _FailOn(atomic._fsync_file, 2))
    with pytest.raises(OSError, match="simulated"):
        _SAVES[kind](folder)
    monkeypatch.undo()
    assert _snapshot(folder) == before  # unchanged, and no temporary left behind
    if kind == "bank":
        personamoe.load_bank(_mlp(), folder)
    else:
        read_adapter(folder)


def _big_config_model(seed: int) -> nn.Module:
    """A bank whose JSON (a persona with a long name) is larger than its weights."""
    model = _bank_model(seed)
    personamoe.add_persona(model, personamoe.Persona("p" * 30000, allow=["expert_0"]))
    return model


def test_save_under_a_file_size_limit_keeps_the_previous_bank(tmp_path: Path) -> None:
    """A real write failure (EFBIG from RLIMIT_FSIZE, as a full disk would give), in a child
    process, while writing the config (the weights fit): the old bank still loads byte for byte,
    and no temporary is left."""
    pytest.importorskip("resource")  # POSIX only
    folder = tmp_path / "bank"
    personamoe.save_bank(_big_config_model(seed=0), folder)
    before = _snapshot(folder)
    assert len(before[BANK_WEIGHTS]) < 16384 < len(before[BANK_CONFIG])
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from tests.test_files_reliability import _big_config_model
        import personamoe
        model = _big_config_model(seed=1)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))
        try:
            personamoe.save_bank(model, {str(folder)!r})
        except OSError as e:
            print("failed:", e)
            sys.exit(0)
        sys.exit("save_bank did not fail")
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert _snapshot(folder) == before
    personamoe.load_bank(_mlp(), folder)


def test_save_writes_readable_files_with_the_default_mode(tmp_path: Path) -> None:
    folder = tmp_path / "bank"
    personamoe.save_bank(_bank_model(), folder)
    personamoe.save_bank(_bank_model(seed=3), folder)  # over an existing bank
    assert sorted(os.listdir(folder)) == sorted([BANK_CONFIG, BANK_WEIGHTS])
    umask = os.umask(0)
    os.umask(umask)
    for name in (BANK_CONFIG, BANK_WEIGHTS):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask
    out = write_adapter(tmp_path / "ad", {"m.q": (torch.ones(1, 2), torch.ones(3, 1), 1.0)})
    assert sorted(os.listdir(out)) == sorted([CONFIG_NAME, WEIGHTS_NAME])


# -- finding 1: a failed export keeps the earlier export -------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("transformers")
    from tests_vllm import tiny

    return tiny.build_all(tmp_path_factory.mktemp("export"), top_k=2)


def _copy_export(exported: dict[str, Path], tmp_path: Path) -> Path:
    out = tmp_path / "ckpt" / "export"
    shutil.copytree(exported["export"], out)
    return out


def _adapters(exported: dict[str, Path]) -> dict[str, Path]:
    root = exported["adapters"]
    return {p.name: p for p in sorted(root.iterdir())}


def _assert_intact(out: Path, before: dict[str, bytes]) -> None:
    from personamoe.integrations.export import load_exported

    assert _snapshot(out) == before
    assert sorted(os.listdir(out.parent)) == [out.name]  # no temporary sibling left
    load_exported(out)


def test_export_with_a_corrupt_adapter_keeps_the_earlier_export(
    exported: dict[str, Path], tmp_path: Path
) -> None:
    from personamoe.integrations.export import export

    out = _copy_export(exported, tmp_path)
    before = _snapshot(out)
    ads = _adapters(exported)
    bad = tmp_path / "bad"
    shutil.copytree(ads["calm"], bad)
    w = bad / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=str(w)):
        export(exported["base"], {**ads, "calm": bad}, out)
    _assert_intact(out, before)


def test_export_failing_on_a_full_disk_keeps_the_earlier_export(
    exported: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    from personamoe.integrations.export import export

    out = _copy_export(exported, tmp_path)
    before = _snapshot(out)
    # The bank is written with safetensors.torch.save_file (transformers has its own reference).
    monkeypatch.setattr(safetensors.torch, "save_file", _FailOn(safetensors.torch.save_file, 1))
    with pytest.raises(OSError, match="simulated"):
        export(exported["base"], _adapters(exported), out, top_k=1)
    monkeypatch.undo()
    _assert_intact(out, before)
    # And the swap itself failing (the last step) keeps it too.
    calls = _count_replaces(monkeypatch, exported, tmp_path)
    out2 = _copy_export(exported, tmp_path / "again")
    before2 = _snapshot(out2)
    monkeypatch.setattr(os, "replace", _FailOn(os.replace, calls))  # the last rename: new -> out
    with pytest.raises(OSError, match="simulated"):
        export(exported["base"], _adapters(exported), out2, top_k=1)
    monkeypatch.undo()
    _assert_intact(out2, before2)
    export(exported["base"], _adapters(exported), out2, top_k=1)  # a good export replaces it
    assert json.loads((out2 / "config.json").read_text())["personamoe"]["top_k"] == 1
    assert sorted(os.listdir(out2.parent)) == [out2.name]


def _count_replaces(
    monkeypatch: pytest.MonkeyPatch, exported: dict[str, Path], tmp_path: Path
) -> int:
    """How many ``os.replace`` calls a successful export over an earlier one makes."""
    from personamoe.integrations.export import export

    counter = _FailOn(os.replace, 10**9)
    monkeypatch.setattr(os, "replace", counter)
    export(exported["base"], _adapters(exported), _copy_export(exported, tmp_path / "count"))
    monkeypatch.undo()
    return counter.calls


def test_export_refuses_a_folder_holding_other_files(
    exported: dict[str, Path], tmp_path: Path
) -> None:
    from personamoe.integrations.export import export

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="neither empty nor an earlier export"):
        export(exported["base"], _adapters(exported), out)
    assert (out / "notes.txt").read_text() == "keep me"


# -- finding 12: pattern keys are matched in bounded time -------------------------------------------

_KEYS = ["q_proj", "layers.0.self_attn.q_proj", r"layers\.\d+\.mlp\..*", r"(q|v)_proj", r".*_proj",
         r"^model", r"proj$", r"layers.[0-9]{1,2}.mlp.down_proj", r"[^.]+", r"\bq_proj", r"\Bproj",
         r"(?:mlp|self_attn)\.(up|down|v)_proj", "", r"a|b", r"layers\.1[0-9]?\..*", r"\w+\Z",
         r"\s*q_proj", r".+?proj", "x{0}q_proj", r"(.|.)*j", r"[a-z_]+proj", r"\D+", r"\S+"]  # fmt: skip
_MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj", "q_proj", "a.b",
            "", "model.layers.1.mlp.up_proj\n", "x_proj.q_proj", "model.layers.3.self_attn.v_proj"]  # fmt: skip


@pytest.mark.parametrize("key", _KEYS)
def test_pattern_keys_match_like_python_re(key: str) -> None:
    import re

    from personamoe.adapters import pattern_key

    for module in _MODULES:
        want = re.match(rf"(.*\.)?({key})$", module) is not None
        assert (pattern_key({key: 1}, module) == key) == want, (key, module)


def _run_with_timeout(code: str, seconds: float) -> subprocess.CompletedProcess[str]:
    """A child process, so that a hang fails the test instead of hanging the suite."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=seconds)  # fmt: skip


def test_catastrophic_pattern_key_is_matched_fast(tmp_path: Path) -> None:
    """``(.|.)*Z`` takes exponential time in Python's ``re`` (> 20 s per module name)."""
    src = tmp_path / "ad"
    write_adapter(
        src, {"model.layers.0.self_attn.q_proj": (torch.ones(2, 8), torch.ones(4, 2), 1.0)}
    )
    cfg = json.loads((src / CONFIG_NAME).read_text())
    cfg["rank_pattern"] = {"(.|.)*Z": 4}
    cfg["alpha_pattern"] = {"(.|.)*j": 6}
    (src / CONFIG_NAME).write_text(json.dumps(cfg))
    code = f"from personamoe.adapters import read_adapter; print(read_adapter({str(src)!r}))"
    try:
        run = _run_with_timeout(code, 30)
    except subprocess.TimeoutExpired:
        pytest.fail("read_adapter hung on the pattern key '(.|.)*Z'")
    assert run.returncode == 0, run.stderr
    m = read_adapter(src).modules["model.layers.0.self_attn.q_proj"]
    assert (m.rank, m.scaling) == (2, 3.0)  # (.|.)*Z matches nothing; (.|.)*j matches


@pytest.mark.parametrize(
    ("key", "why"),
    [(r"(a)\1", "groupref"), (r"(?=q)q_proj", "assert"), ("a{5000}", "too complex"),
     ("(", "not a valid regex"), ("x" * 1001, "longer than")],
)  # fmt: skip
def test_unmatchable_pattern_keys_name_file_and_key(tmp_path: Path, key: str, why: str) -> None:
    from personamoe.adapters import AdapterError

    src = tmp_path / "ad"
    write_adapter(src, {"m.q": (torch.ones(2, 8), torch.ones(4, 2), 1.0)})
    cfg = json.loads((src / CONFIG_NAME).read_text())
    cfg["rank_pattern"] = {key: 2}
    (src / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=why) as info:
        read_adapter(src)
    assert str(src / CONFIG_NAME) in str(info.value) and "rank_pattern[" in str(info.value)


# -- findings 9, 10, 11: every load checks every value first ---------------------------------------


def _adapter_with(tmp_path: Path, **cfg_changes: Any) -> Path:
    src = tmp_path / "ad"
    g = torch.Generator().manual_seed(0)
    write_adapter(src, {"m.q": (torch.randn(2, 8, generator=g), torch.randn(4, 2, generator=g), 1.0),
                        "m.k": (torch.randn(2, 8, generator=g), torch.randn(4, 2, generator=g), 1.0)})  # fmt: skip
    f = src / CONFIG_NAME
    cfg = json.loads(f.read_text())
    cfg.update(cfg_changes)
    f.write_text(json.dumps(cfg))  # json writes NaN / Infinity, as Python's json reads them
    return src


@pytest.mark.parametrize(
    ("changes", "key"),
    [({"lora_alpha": float("nan")}, "'lora_alpha'"), ({"lora_alpha": float("inf")}, "'lora_alpha'"),
     ({"lora_alpha": 1e308}, "'lora_alpha'"), ({"lora_alpha": "eight"}, "'lora_alpha'"),
     ({"alpha_pattern": {"q": float("nan")}}, "alpha_pattern['q']"),
     ({"rank_pattern": {"q": "("}}, "rank_pattern['q']"),
     ({"rank_pattern": {"q": 0}}, "rank_pattern['q']"),
     ({"rank_pattern": ["q"]}, "'rank_pattern'"), ({"use_rslora": "no"}, "'use_rslora'")],
)  # fmt: skip
def test_bad_adapter_config_values_name_file_and_key(
    tmp_path: Path, changes: dict[str, Any], key: str
) -> None:
    from personamoe.adapters import AdapterError

    src = _adapter_with(tmp_path, **changes)
    with pytest.raises(AdapterError) as info:
        read_adapter(src)
    assert str(src / CONFIG_NAME) in str(info.value) and key in str(info.value)


@pytest.mark.parametrize("how", ["nan", "int", "truncated", "empty"])
def test_bad_adapter_weights_name_the_file(tmp_path: Path, how: str) -> None:
    from safetensors.torch import load_file, save_file

    from personamoe.adapters import AdapterError

    src = _adapter_with(tmp_path)
    w = src / WEIGHTS_NAME
    if how in ("nan", "int"):
        sd = load_file(str(w))
        key = "base_model.model.m.q.lora_A.weight"
        sd[key] = sd[key].clone()
        if how == "nan":
            sd[key][0, 0] = float("nan")
        else:
            sd[key] = sd[key].to(torch.int32)
        save_file(sd, str(w))
    else:
        w.write_bytes(w.read_bytes()[:60] if how == "truncated" else b"")
    with pytest.raises(AdapterError, match=str(w)) as info:
        read_adapter(src)
    if how in ("nan", "int"):
        assert "m.q.lora_A" in str(info.value)


def test_fresh_bank_alpha_must_be_finite() -> None:
    with pytest.raises(ValueError, match="lora_alpha"):
        personamoe.inject(_mlp(), 2, rank=2, lora_alpha=float("nan"))


def _saved_bank(tmp_path: Path) -> Path:
    model = _bank_model(seed=0)
    personamoe.add_persona(model, personamoe.Persona("calm", allow=["expert_0"]))
    return personamoe.save_bank(model, tmp_path / "good")


def _edit_json(src: Path, dst: Path, fn: Callable[[dict[str, Any]], Any]) -> Path:
    shutil.copytree(src, dst)
    f = dst / BANK_CONFIG
    meta = json.loads(f.read_text())
    fn(meta)
    f.write_text(json.dumps(meta))
    return dst


def _edit_tensor(
    src: Path, dst: Path, key: str, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = dst / BANK_WEIGHTS
    sd = load_file(str(f))
    sd[key] = fn(sd[key].clone()).contiguous()
    save_file(sd, str(f))
    return dst


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        d = meta
        for p in parents:
            d = d[p]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value

    return edit


def _nan_at(t: torch.Tensor) -> torch.Tensor:
    t.view(-1)[0] = float("nan")
    return t


_BAD_JSON = {
    "top_k 99": (_set("options/top_k", 99), "options.top_k"),
    "temperature nan": (_set("options/temperature", float("nan")), "options.temperature"),
    "no options": (_set("options", KeyError), "'options'"),
    "no top_k": (_set("options/top_k", KeyError), "options.top_k"),
    "rank 0": (_set("layers/0/rank", 0), "layers.0.rank"),
    "rank 3e6": (_set("layers/0/rank", 3_000_000), "'0.lora_A'"),
    "rank str": (_set("layers/0/rank", "4"), "layers.0.rank"),
    "experts twice": (_set("experts", ["expert_0", "expert_0"]), "'experts'"),
    "routing": (_set("routing", "psychic"), "'routing'"),
    "weights nan": (_set("default_weights/expert_0", float("nan")), "'default_weights'"),
    "persona unknown expert": (
        _set("personas", [{"name": "x", "allow": ["nobody"]}]),
        "personas[0]",
    ),
    "persona no name": (_set("personas", [{"allow": ["expert_0"]}]), "personas[0]"),
    "layer missing module": (_set("layers/9", {"rank": 4}), "'9.lora_A'"),
    "layer not linear": (_set("layers/1", {"rank": 4}), "'1.lora_A'"),
}
_BAD_TENSORS = {
    "lora_A nan": ("0.lora_A", _nan_at),
    "lora_B inf": ("2.lora_B", lambda t: t.fill_(float("inf"))),
    "scaling nan": ("0.scaling", _nan_at),
    "calibration 0": ("0.calibration", lambda t: t.zero_()),
    "rank too large": ("0.pm_rank", lambda t: t.fill_(9)),
    "lora_A shape": ("0.lora_A", lambda t: t[:, :2]),
    "lora_A missing": ("0.lora_A", None),
}


def _assert_untouched(model: nn.Module, before: nn.Module) -> None:
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    sd, sd0 = model.state_dict(), before.state_dict()
    assert sd.keys() == sd0.keys() and all(torch.equal(sd[k], sd0[k]) for k in sd)
    assert [p.requires_grad for p in model.parameters()] == [
        p.requires_grad for p in before.parameters()
    ]
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("case", sorted(_BAD_JSON) + sorted(_BAD_TENSORS) + ["invalid json"])
def test_failed_load_bank_names_file_and_key_and_leaves_the_model(
    tmp_path: Path, case: str
) -> None:
    import copy

    good = _saved_bank(tmp_path)
    bad = tmp_path / "bad"
    if case in _BAD_JSON:
        edit, key = _BAD_JSON[case]
        _edit_json(good, bad, edit)
        # Keys of tensors ('<module>.lora_A') are reported against the weights file.
        file = bad / (BANK_WEIGHTS if key.endswith(".lora_A'") else BANK_CONFIG)
    elif case == "invalid json":
        shutil.copytree(good, bad)
        (bad / BANK_CONFIG).write_text('{"format": "personamoe-bank/1", ')
        key, file = "not valid JSON", bad / BANK_CONFIG
    else:
        key, fn = _BAD_TENSORS[case]
        if fn is None:
            from safetensors.torch import load_file, save_file

            shutil.copytree(good, bad)
            sd = load_file(str(bad / BANK_WEIGHTS))
            del sd[key]
            save_file(sd, str(bad / BANK_WEIGHTS))
        else:
            _edit_tensor(good, bad, key, fn)
        file = bad / BANK_WEIGHTS
    model = _mlp()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError) as info:
        personamoe.load_bank(model, bad)
    msg = str(info.value)
    assert str(file) in msg and key.strip("'") in msg, msg
    _assert_untouched(model, before)
    personamoe.load_bank(model, good)  # a retry with a good bank succeeds
    assert len(list(personamoe.integrations.layers.persona_layers(model))) == 2


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_corrupt_bank_weights_name_the_file(tmp_path: Path, how: str) -> None:
    good = _saved_bank(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    w = bad / BANK_WEIGHTS
    w.write_bytes(w.read_bytes()[:50] if how == "truncated" else b"")
    with pytest.raises(ValueError, match=str(w)):
        personamoe.load_bank(_mlp(), bad)


def test_failure_while_installing_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even an unexpected error after the layers are in (here: while copying the personas) leaves
    the model as it was."""
    import copy

    good = _saved_bank(tmp_path)
    model = _mlp()
    before = copy.deepcopy(model)
    from personamoe.integrations import bank

    def boom(d: Any) -> Any:
        raise RuntimeError("simulated")

    monkeypatch.setattr(bank.Persona, "from_dict", staticmethod(boom))
    with pytest.raises((RuntimeError, ValueError)):
        personamoe.load_bank(model, good)
    monkeypatch.undo()
    _assert_untouched(model, before)
    personamoe.load_bank(model, good)


def test_float_persona_ids_are_refused() -> None:
    model = _bank_model()
    personamoe.add_persona(model, personamoe.Persona("calm", allow=["expert_0"]))
    layer = model.get_submodule("0")
    x = torch.randn(3, 64)
    layer(x, persona_ids=torch.tensor([0, -1, 0]))
    for ids in (torch.tensor([0.7, -1.0, 0.0]), torch.tensor([True, False, True])):
        with pytest.raises(TypeError, match="persona_ids: expected an integer tensor"):
            layer(x, persona_ids=ids)


def test_load_exported_refuses_nan_factors(exported: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from personamoe.integrations.export import load_exported

    out = _copy_export(exported, tmp_path)
    f = out / BANK_WEIGHTS
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith(".lora_B"))
    sd[key] = _nan_at(sd[key].clone())
    save_file(sd, str(f))
    with pytest.raises(ValueError, match=rf"{f}: key '{key}'"):
        load_exported(out)
