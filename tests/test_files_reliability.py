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
