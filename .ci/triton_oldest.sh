#!/usr/bin/env bash
# CI: every Triton kernel of personamoe/kernels/ compiles for sm_90 with the oldest Triton that
# pyproject.toml claims (triton>=3.2), not only with the newer one of the development venv.
# A throwaway venv gets that Triton, the CPU torch the README's set-up installs (the kernel modules
# import torch; tests/conftest.py too) and pytest; personamoe itself is not installed there:
# tests/test_triton_oldest.py loads kernels/ from the tree and compiles ahead of time for
# GPUTarget("cuda", 90, 32) (no GPU or driver needed). Its own Triton cache folder, so nothing
# compiled by another Triton is reused. About a minute and a half on 2 cores, mostly pip.
set -euo pipefail
cd "$(dirname "$0")/.."

# The lower bound of pyproject.toml's triton requirement, so the two cannot drift apart.
oldest=$(python3 - <<'PY'
import re, pathlib
text = pathlib.Path("pyproject.toml").read_text()
m = re.search(r'"triton>=([0-9][0-9.]*)', text)
assert m, "pyproject.toml: no triton>= requirement found"
v = m.group(1)
print(v if v.count(".") >= 2 else v + ".0")
PY
)
torch_pin=${PERSONAMOE_TRITON_OLDEST_TORCH:-torch==2.13.0}

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
echo "== oldest Triton: triton==$oldest, $torch_pin (CPU), pytest in a throwaway venv"
python3 -m venv "$dir/venv"
"$dir/venv/bin/pip" install -q "triton==$oldest" "$torch_pin" numpy pytest
"$dir/venv/bin/python" -c "import triton; print('triton', triton.__version__)"
# -o addopts=: pyproject's addopts name a pytest-benchmark option this venv has no plugin for.
PERSONAMOE_TRITON_OLDEST=1 TRITON_CACHE_DIR="$dir/triton_cache" \
  "$dir/venv/bin/python" -m pytest -q -s -p no:cacheprovider -o addopts= \
  tests/test_triton_oldest.py
