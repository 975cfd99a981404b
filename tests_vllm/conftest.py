"""tests_vllm run in the vLLM venv against the *installed* personamoe (a regular, non-editable
build there, with its ``vllm.general_plugins`` entry point), never the source tree: the engine
subprocesses load the plugin from the installation, so the in-process reference must too."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python -m pytest` puts the working directory first on sys.path; drop the repository root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
assert "personamoe" not in sys.modules, "personamoe was imported from the source tree too early"
