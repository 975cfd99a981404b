"""vLLM (CPU build) + the personamoe plugin against transformers + personamoe on one exported
checkpoint: a tiny random Llama, 4 persona adapters, top_k=2, 5 served personas; greedy tokens must
match exactly, without and with a vLLM LoRA request on top, and with requests naming different
personas in one batch. Run in the vLLM venv: ``python -m pytest -q tests_vllm``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

import tiny

from personamoe.adapters import read_adapter, write_adapter
from personamoe.integrations.export import load_exported

PROMPTS = [[1, 5, 9, 33, 70, 102], [1, 8, 8, 40], [1, 17, 23, 5, 60, 61, 62, 90, 14, 3]]
MAX_TOKENS = 12
# One request per persona kind in one batch (prompts repeat: prompt i % 3), and free routing.
PERSONAS = [None, "calm_only", "curious_lean", "blend", "steady", "terse_only"]
RUNNER = Path(__file__).with_name("run_engine.py")
ROOT = Path(__file__).resolve().parents[1]


def run_engine(
    model: Path, out: Path, lora: Path | None = None, tp: int = 1, *, prompts: Any = None,
    personas: list[str | None] | None = None, extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    cmd = [sys.executable, str(RUNNER), "--model", str(model),
           "--prompts", json.dumps(prompts or PROMPTS), "--max-tokens", str(MAX_TOKENS),
           "--out", str(out), "--tp", str(tp), *extra]  # fmt: skip
    if lora is not None:
        cmd += ["--lora", str(lora)]
    if personas is not None:
        cmd += ["--personas", json.dumps(personas)]
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    if tp > 1:
        # vLLM's CPU build binds each rank to a NUMA node; with one node, give each rank a core.
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tp)))
    # Run outside the repository so that the installed personamoe (with its entry point) is used.
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)


def build_lora(base: Path, out: Path) -> Path:
    """One ordinary PEFT LoRA (rank 8, every projection) for a vLLM LoRA request on top."""
    cfg = json.loads((base / "config.json").read_text())
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (d // cfg["num_attention_heads"])
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}  # fmt: skip
    g = torch.Generator().manual_seed(7)
    modules = {}
    for layer in range(L):
        for m, (d_in, d_out) in shapes.items():
            part = "self_attn" if m in tiny.ATTN else "mlp"
            a = torch.randn(8, d_in, generator=g) / d_in**0.5
            b = torch.randn(d_out, 8, generator=g) * 0.5 / 8**0.5
            modules[f"model.layers.{layer}.{part}.{m}"] = (a, b, 2.0)
    return write_adapter(out, modules, base_model_name_or_path=str(base))


def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def add_lora_hooks(model: torch.nn.Module, lora: Path) -> None:
    """LoRA on top of the persona layers, the math vLLM's LoRA wrapper adds: y += s * B (A x)."""
    ad = read_adapter(lora)
    names = dict(model.named_modules())
    for module, lm in ad.modules.items():
        layer = names[module]

        def hook(mod: Any, args: tuple[Any, ...], y: torch.Tensor, lm: Any = lm) -> torch.Tensor:
            x = args[0]
            return y + lm.scaling * ((x @ lm.lora_A.t().to(x.dtype)) @ lm.lora_B.t().to(x.dtype))

        layer.register_forward_hook(hook)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("vllm")
    folders = tiny.build_all(root, top_k=2, with_personas=True)
    lora = build_lora(folders["base"], root / "lora_extra")
    proc = run_engine(folders["export"], root / "out.json", lora=lora, personas=PERSONAS,
                      extra=("--bad-persona", "angry"))  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(
            f"vLLM run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    got = json.loads((root / "out.json").read_text())
    return {"folders": folders, "lora": lora, "got": got, "root": root}


def test_entry_point_declared() -> None:
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("personamoe") == "personamoe.integrations.vllm:register"


def test_version_pin() -> None:
    from personamoe.integrations.vllm import TESTED_VLLM, check_vllm_version

    check_vllm_version(TESTED_VLLM)
    check_vllm_version(TESTED_VLLM + "+cpu")
    with pytest.raises(
        RuntimeError, match=r"tested with vLLM 0\.32\.0 only.*0\.31\.1 is installed"
    ):
        check_vllm_version("0.31.1")


def test_greedy_matches_transformers(setup: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    folders = setup["folders"]
    model = load_exported(folders["export"]).eval()
    want = [greedy(model, p, MAX_TOKENS) for p in PROMPTS]
    assert setup["got"]["plain"] == want
    base = AutoModelForCausalLM.from_pretrained(str(folders["base"])).eval()
    # The persona mixture matters: the base model alone generates something else.
    assert [greedy(base, p, MAX_TOKENS) for p in PROMPTS] != want


def greedy_as(model: torch.nn.Module, prompt: list[int], persona: str | None) -> list[int]:
    from personamoe import use_personas

    with use_personas(model, [persona]):
        return greedy(model, prompt, MAX_TOKENS)


def persona_prompts(prompts: list[list[int]], n: int) -> list[list[int]]:
    return [prompts[i % len(prompts)] for i in range(n)]


def test_personas_in_one_batch_match_transformers(setup: dict[str, Any]) -> None:
    """Six requests in one batch, each naming a different persona (allowed set, bias, fixed
    mixtures, none): each gets the tokens transformers + personamoe gives that persona."""
    model = load_exported(setup["folders"]["export"]).eval()
    prompts = persona_prompts(PROMPTS, len(PERSONAS))
    want = [greedy_as(model, p, n) for p, n in zip(prompts, PERSONAS, strict=True)]
    got = setup["got"]["personas"]
    assert got == want
    # The personas matter: each one's tokens differ from the same prompt routed freely.
    free = setup["got"]["plain"]
    for i, name in enumerate(PERSONAS):
        if name is not None:
            assert got[i] != free[i % len(PROMPTS)], name
    assert got[0] == free[0]


def test_unknown_persona_is_refused_and_engine_keeps_serving(setup: dict[str, Any]) -> None:
    bad = setup["got"]["bad"]
    assert bad["error"] is not None
    assert "unknown persona 'angry'" in bad["error"]
    for name in ("calm_only", "curious_lean", "blend", "steady", "terse_only"):
        assert name in bad["error"]
    assert bad["after"] == setup["got"]["plain"][:1]


def test_greedy_with_lora_on_top(setup: dict[str, Any]) -> None:
    model = load_exported(setup["folders"]["export"]).eval()
    add_lora_hooks(model, setup["lora"])
    want = [greedy(model, p, MAX_TOKENS) for p in PROMPTS]
    assert setup["got"]["lora"] == want
    assert want != setup["got"]["plain"]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallelism needs 2 cores here")
def test_tensor_parallel_2_ranks_matches_transformers(setup: dict[str, Any]) -> None:
    """2 CPU ranks: column-parallel B shards (q/k/v and gate/up parts), row-parallel A shards with
    h all-reduced before ranking (personamoe/integrations/tp.py), same greedy tokens."""
    out = setup["root"] / "tp2.json"
    proc = run_engine(setup["folders"]["export"], out, tp=2, personas=PERSONAS)
    if proc.returncode != 0:
        pytest.fail(f"vLLM tp=2 run failed ({proc.returncode}):\n{proc.stderr[-8000:]}")
    model = load_exported(setup["folders"]["export"]).eval()
    want = [greedy(model, p, MAX_TOKENS) for p in PROMPTS]
    got = json.loads(out.read_text())
    assert got["plain"] == want
    prompts = persona_prompts(PROMPTS, len(PERSONAS))
    assert got["personas"] == setup["got"]["personas"]  # == transformers (test above)
    assert len(got["personas"]) == len(prompts)


def test_chunked_prefill_keeps_each_requests_persona(setup: dict[str, Any]) -> None:
    """Long prompts split over several steps (16 tokens per step) beside short ones: every
    chunk of a request mixes as its persona."""
    g = torch.Generator().manual_seed(3)
    long = [[1, *torch.randint(3, 120, (n,), generator=g).tolist()] for n in (40, 29)]
    prompts = [long[0], PROMPTS[1], long[1], PROMPTS[0]]
    names = ["curious_lean", "blend", "calm_only", None]
    out = setup["root"] / "chunked.json"
    proc = run_engine(setup["folders"]["export"], out, prompts=prompts, personas=names,
                      extra=("--max-num-batched-tokens", "16"))  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"vLLM chunked run failed ({proc.returncode}):\n{proc.stderr[-8000:]}")
    model = load_exported(setup["folders"]["export"]).eval()
    want = [greedy_as(model, p, n) for p, n in zip(prompts, names, strict=True)]
    assert json.loads(out.read_text())["personas"] == want


def test_qwen2_with_qkv_bias_matches_transformers(tmp_path: Path) -> None:
    """Qwen2: the fused qkv_proj carries a bias, split per persona part like the weight."""
    folders = tiny.build_all(tmp_path, top_k=2, arch="qwen2")
    proc = run_engine(folders["export"], tmp_path / "qwen2.json")
    if proc.returncode != 0:
        pytest.fail(f"vLLM Qwen2 run failed ({proc.returncode}):\n{proc.stderr[-8000:]}")
    model = load_exported(folders["export"]).eval()
    assert model.config.model_type == "qwen2"
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    want = [greedy(model, p, MAX_TOKENS) for p in PROMPTS]
    assert json.loads((tmp_path / "qwen2.json").read_text())["plain"] == want


def test_data_calibration_with_personas_matches_transformers(tmp_path: Path) -> None:
    """An export calibrated from data (per-expert sigma divides the score, the shift joins every
    routed row's bias, "no persona" included) serves the tokens transformers gives."""
    folders = tiny.build_all(tmp_path, top_k=2, with_personas=True, data_calibration=True)
    cfg = json.loads((folders["export"] / "config.json").read_text())
    assert cfg["personamoe"]["calibration"] == "data"
    out = tmp_path / "data.json"
    proc = run_engine(folders["export"], out, personas=PERSONAS)
    if proc.returncode != 0:
        pytest.fail(f"vLLM data-calibration run failed ({proc.returncode}):\n{proc.stderr[-8000:]}")
    model = load_exported(folders["export"]).eval()
    got = json.loads(out.read_text())
    assert got["plain"] == [greedy(model, p, MAX_TOKENS) for p in PROMPTS]
    prompts = persona_prompts(PROMPTS, len(PERSONAS))
    assert got["personas"] == [
        greedy_as(model, p, n) for p, n in zip(prompts, PERSONAS, strict=True)
    ]
    # The calibration matters: the uncalibrated export of the same bank routes otherwise.
    from personamoe import set_routing

    set_routing(model, calibration="none")
    assert got["plain"] != [greedy(model, p, MAX_TOKENS) for p in PROMPTS]


def test_malformed_section_fails_clearly(setup: dict[str, Any]) -> None:
    bad = setup["root"] / "bad_export"
    shutil.copytree(setup["folders"]["export"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["personamoe"]["top_k"] = 7
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = run_engine(bad, setup["root"] / "bad.json")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "key 'personamoe.top_k': expected an int in 1..4 (the number of experts), got 7" in text


def test_installed_personamoe_is_used() -> None:
    import personamoe

    here = Path(personamoe.__file__).resolve()
    assert "site-packages" in here.parts and not here.is_relative_to(ROOT / "personamoe")
