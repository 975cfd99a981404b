"""Every Triton kernel of ``personamoe/kernels/`` compiles for sm_90 with the Triton installed here.

pyproject.toml claims ``triton>=3.2``; the development venv carries a newer one, so this test is
meant for the throwaway venv of ``.ci/triton_oldest.sh`` (the oldest supported Triton, CPU torch,
pytest; personamoe itself not installed). Skipped unless ``PERSONAMOE_TRITON_OLDEST=1``.

The sm_90 configurations of ``tests/test_triton_compile.py`` (``CASES``: the ones the launchers
use) are compiled ahead of time, no GPU or driver needed: ``triton.compile`` of an ``ASTSource``
for ``GPUTarget("cuda", 90, 32)``. Triton 3.2 and Triton >= 3.3 spell an ``ASTSource`` differently
(constants by name and an ``AttrsDescriptor``, against constexprs and attributes by argument path);
both are built here. The compiles run in a child process (this file run as a script) without
``TRITON_INTERPRET``, which tests/conftest.py sets on a machine with no GPU. The kernel modules are
loaded from ``kernels/`` as ``personamoe.kernels`` without running ``personamoe/__init__.py``, so the
package need not be installed (nor its C++ extension built) in the throwaway venv.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV_FLAG = "PERSONAMOE_TRITON_OLDEST"
ARCH = 90
SMEM_LIMIT_SM90 = 227 * 1024
# Which JIT function of which module each CASES kernel name means.
KERNELS = {
    "shrink": ("shrink_route", "_shrink_kernel"),
    "route": ("shrink_route", "_route_kernel"),
    "linear_mix": ("mix", "_linear_mix_kernel"),
    "grouped": ("mix", "_grouped_expand_kernel"),
    "align": ("mix", "_align_kernel"),
}

pytestmark = pytest.mark.skipif(
    os.environ.get(ENV_FLAG) != "1",
    reason=f"oldest-Triton compile check: run by .ci/triton_oldest.sh ({ENV_FLAG}=1)",
)


def _load_kernel_modules() -> dict[str, types.ModuleType]:
    """``personamoe.kernels.{mix,shrink_route}`` from the tree, ``personamoe/__init__.py`` not run."""
    sys.modules.pop("personamoe", None)
    pkg = types.ModuleType("personamoe")
    pkg.__path__ = [str(ROOT / "personamoe")]
    sub = types.ModuleType("personamoe.kernels")
    sub.__path__ = [str(ROOT / "kernels")]
    pkg.kernels = sub  # type: ignore[attr-defined]
    sys.modules["personamoe"] = pkg
    sys.modules["personamoe.kernels"] = sub
    return {m: importlib.import_module(f"personamoe.kernels.{m}") for m in ("mix", "shrink_route")}


def _cases() -> list[tuple]:
    sys.path.insert(0, str(ROOT))
    from tests.test_triton_compile import CASES

    return [c for c in CASES if c[5] == ARCH]


def _source(fn: Any, kname: str, dtype: str, overrides: dict, const: dict) -> Any:
    """The ``ASTSource`` the JIT builds for contiguous, 16-aligned tensors of 16-divisible sizes
    (the specialisation of tests/test_triton_compile.py), in this Triton's spelling."""
    from triton.compiler import ASTSource

    from tests.test_triton_compile import DIV16, UNIT_STRIDES

    types_ = {}
    for arg in fn.arg_names:
        if arg in overrides:
            types_[arg] = overrides[arg]
        elif arg.endswith("_ptr"):
            types_[arg] = f"*{dtype}"
        else:
            types_[arg] = "fp32" if arg == "temperature" else "i32"
    unit = {a: 1 for a in UNIT_STRIDES.get(kname, ()) if a in types_ and a not in const}
    allc = {**const, **unit}
    div = [a for a in fn.arg_names if a not in allc and (a.endswith("_ptr") or a in DIV16)]
    index = {a: i for i, a in enumerate(fn.arg_names)}
    params = inspect.signature(ASTSource.__init__).parameters
    if "constants" in params:  # Triton 3.2: constants by name, divisibility in an AttrsDescriptor
        from triton.backends.compiler import AttrsDescriptor

        sig = {a: t for a, t in types_.items() if a not in const}  # unit strides stay in it
        attrs = AttrsDescriptor.from_hints({index[a]: 16 for a in div})
        return ASTSource(fn=fn, signature=sig, constants=allc, attrs=attrs)
    sig = {a: ("constexpr" if a in allc else t) for a, t in types_.items()}
    return ASTSource(fn=fn, signature=sig, constexprs={(index[k],): v for k, v in allc.items()},
                     attrs={(index[a],): [["tt.divisibility", 16]] for a in div})  # fmt: skip


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """``{"regs", "stack"}`` from the ``cuobjdump`` shipped with this Triton (-1 when none)."""
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path or tool
    except ImportError:  # Triton < 3.4 has no knobs
        pass
    if not os.path.exists(tool):
        return {"regs": -1, "stack": -1}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=False).stdout  # fmt: skip
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    return {"regs": int(m.group(1)), "stack": int(m.group(2))} if m else {"regs": -1, "stack": -1}


def _compile_all() -> dict[str, Any]:
    """Child process: ``{"triton", "kernels_defined", "cases": {name: {"ok", ...}}}``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    mods = _load_kernel_modules()
    defined = sorted(f"{m}.{n}" for m, mod in mods.items() for n, obj in vars(mod).items()
                     if isinstance(obj, JITFunction) and n.endswith("_kernel"))  # fmt: skip
    out: dict[str, Any] = {"triton": triton.__version__, "kernels_defined": defined, "cases": {}}
    for name, kname, dtype, overrides, const, arch, options in _cases():
        mod, attr = KERNELS[kname]
        fn = getattr(mods[mod], attr)
        r: dict[str, Any] = {"kernel": f"{mod}.{attr}", "arch": arch}
        try:
            src = _source(fn, kname, dtype, overrides, const)
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            r.update(ok="cubin" in k.asm, shared=int(k.metadata.shared),
                     **_resource_usage(k.asm["cubin"]))  # fmt: skip
        except Exception as e:
            r.update(ok=False, error=f"{type(e).__name__}: {e}"[-3000:])
        out["cases"][name] = r
    return out


@pytest.fixture(scope="module")
def compiled() -> dict[str, Any]:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                         timeout=1200)  # fmt: skip
    if res.returncode != 0:
        pytest.fail(f"compile child failed:\n{res.stderr[-4000:]}")
    got = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\nTriton {got['triton']}, sm_{ARCH}: name, ok, shared bytes, registers, stack bytes")
    for name, r in got["cases"].items():
        print(f"  {name}: ok={r['ok']} shared={r.get('shared')} regs={r.get('regs')} "
              f"stack={r.get('stack')}" + (f" ERROR {r['error'][:300]}" if "error" in r else ""))  # fmt: skip
    return got


def test_every_kernel_has_an_sm90_case(compiled):
    """A kernel added to personamoe/kernels/ without a compile case would escape this check."""
    covered = {f"{KERNELS[c[1]][0]}.{KERNELS[c[1]][1]}" for c in _cases()}
    assert compiled["kernels_defined"], "no @triton.jit *_kernel found in personamoe/kernels/"
    missing = sorted(set(compiled["kernels_defined"]) - covered)
    assert not missing, f"kernels with no sm_{ARCH} case in tests/test_triton_compile.py: {missing}"


@pytest.mark.parametrize("name", [c[0] for c in _cases()])
def test_kernel_compiles_with_this_triton(compiled, name):
    r = compiled["cases"][name]
    assert r["ok"], (
        f"{r['kernel']} ({name}) does not compile for sm_{ARCH} with Triton "
        f"{compiled['triton']}: {r.get('error')}"
    )
    assert r["shared"] <= SMEM_LIMIT_SM90, (
        f"{name}: {r['shared']} bytes of shared memory with Triton {compiled['triton']}, "
        f"more than sm_{ARCH}'s {SMEM_LIMIT_SM90}"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(_compile_all()))
