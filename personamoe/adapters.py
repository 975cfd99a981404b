"""PEFT LoRA adapters on disk, read and written with safetensors alone (no PEFT import).

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (``[r, d_in]``) and ``...lora_B.weight``
(``[d_out, r]``). The rank and alpha of a module come from ``rank_pattern`` / ``alpha_pattern``
(PEFT's matching: the first pattern key ``k``, in the file's order, with
``re.match(rf"(.*\\.)?({k})$", module)``), else ``r`` / ``lora_alpha`` (PEFT's default alpha 8
when the key is absent); the scaling is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
The modules are the ones the weights file holds (PEFT saves exactly its targeted modules, so
``target_modules`` needs no matching here). ``fan_in_fan_out`` only concerns the base layer
(GPT-2's ``Conv1D``): LoRA factors keep this layout.

Why not let PEFT parse the config (a decision, kept deliberately): loading needs only a JSON file
and a safetensors file, so ``inject``, ``python -m personamoe export`` and the vLLM tests' adapter
writer work with transformers (or nothing) installed, not PEFT; and importing PEFT costs. On the
development machine ``python -c "import peft"`` took 6.4-8.2 s and 425 MB peak RSS, against
2.3-2.5 s and 225 MB for ``python -c "import personamoe.adapters"`` (mostly torch): PEFT pulls in
transformers and accelerate. The rules copied here are few (pattern keys, the alpha default,
rsLoRA) and tests/test_adapters_vs_peft.py holds them to PEFT itself: PEFT models built
with rank/alpha patterns (plain and regex keys), ``target_modules`` lists and regex strings,
rsLoRA and the default alpha are saved, read back here and compared, module by module, with
PEFT's own ``module.r`` / ``module.scaling``.

Anything this library cannot reproduce exactly raises :class:`AdapterError` naming the file and key.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import Tensor

from personamoe._atomic import write_files
from personamoe._json_file import read_json_object

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterError",
    "LoraAdapter",
    "LoraModule",
    "PatternError",
    "pattern_key",
    "read_adapter",
    "write_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")

# Config entries that change the math in ways this library does not reproduce: key -> what it is.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "target_parameters": "LoRA on nn.Parameter targets",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable tokens",
}


class AdapterError(ValueError):
    """An adapter this library cannot load exactly; the message names the file and key."""


@dataclass
class LoraModule:
    """One module's LoRA factors as stored by PEFT."""

    lora_A: Tensor  # [r, d_in]
    lora_B: Tensor  # [d_out, r]
    rank: int
    alpha: float
    scaling: float
    key_A: str
    key_B: str


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read from ``path``: module name (as in the file, without the
    ``base_model.model.`` prefix) -> factors."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern key ``k`` (in order) with
    ``re.match(rf"(.*\\.)?({k})$", module)``, evaluated in time linear in ``len(module)``
    (:func:`_key_program`); a key this cannot evaluate raises :class:`PatternError`."""
    for key in patterns:
        if _run(_key_program(key), module):
            return key
    return None


class PatternError(ValueError):
    """A ``rank_pattern`` / ``alpha_pattern`` key that is not a regex personamoe can match in
    bounded time (the message says why; the caller adds the file and key)."""


# Pattern keys are regexes from a file. Python's backtracking ``re`` takes exponential time on
# keys such as "(.|.)*Z" (a denial of service), so a key is parsed by ``re``'s own parser (the
# exact syntax PEFT uses) and run as a Thompson NFA: no backtracking, time O(len(module) * size).
# The features of regular languages are supported; backreferences, lookarounds, atomic groups,
# possessive repeats and inline flags other than (?x) raise PatternError, as do keys larger
# than these bounds.
_MAX_KEY_CHARS = 1000
_MAX_PROGRAM = 2000  # NFA instructions (counted repeats are unrolled)
try:
    _sre: Any = importlib.import_module("re._parser")  # Python >= 3.11
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    _sre = importlib.import_module("sre_parse")
_OK_FLAGS = _sre.SRE_FLAG_UNICODE | _sre.SRE_FLAG_VERBOSE


def _word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: dict[Any, Callable[[str], bool]] = {
    _sre.CATEGORY_DIGIT: str.isdecimal,
    _sre.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    _sre.CATEGORY_WORD: _word,
    _sre.CATEGORY_NOT_WORD: lambda ch: not _word(ch),
    _sre.CATEGORY_SPACE: str.isspace,
    _sre.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
}


def _at(code: Any, s: str, pos: int) -> bool:
    """A zero-width assertion (``^ $ \\A \\Z \\b \\B``, no MULTILINE) at ``pos`` of ``s``."""
    n = len(s)
    if code in (_sre.AT_BEGINNING, _sre.AT_BEGINNING_STRING):
        return pos == 0
    if code == _sre.AT_END:
        return pos == n or (pos == n - 1 and s[-1] == "\n")
    if code == _sre.AT_END_STRING:
        return pos == n
    before = pos > 0 and _word(s[pos - 1])
    after = pos < n and _word(s[pos])
    if code == _sre.AT_BOUNDARY:
        return before != after
    return n > 0 and before == after  # AT_NON_BOUNDARY (never matches an empty string)


_ASSERTIONS = (_sre.AT_BEGINNING, _sre.AT_BEGINNING_STRING, _sre.AT_END, _sre.AT_END_STRING,
               _sre.AT_BOUNDARY, _sre.AT_NON_BOUNDARY)  # fmt: skip

# One NFA instruction: ("char", predicate), ("split", a, b), ("jmp", a), ("at", code), ("match",)
_Program = list[list[Any]]


def _char_class(items: list[tuple[Any, Any]]) -> Callable[[str], bool]:
    negate = False
    tests: list[Callable[[str], bool]] = []
    for op, av in items:
        if op == _sre.NEGATE:
            negate = True
        elif op == _sre.LITERAL:
            tests.append(functools.partial(str.__eq__, chr(av)))
        elif op == _sre.RANGE:
            tests.append(_in_range(av[0], av[1]))
        elif op == _sre.CATEGORY and av in _CATEGORIES:
            tests.append(_CATEGORIES[av])
        else:
            raise PatternError(f"unsupported character class item {op} {av}")
    return lambda ch: any(t(ch) for t in tests) != negate


def _in_range(lo: int, hi: int) -> Callable[[str], bool]:
    return lambda ch: lo <= ord(ch) <= hi


def _emit(prog: _Program, *ins: Any) -> int:
    if len(prog) >= _MAX_PROGRAM:
        raise PatternError(f"too complex (over {_MAX_PROGRAM} NFA states once repeats unroll)")
    prog.append(list(ins))
    return len(prog) - 1


def _compile_seq(prog: _Program, items: Any) -> None:
    for op, av in items:
        _compile_item(prog, op, av)


def _compile_item(prog: _Program, op: Any, av: Any) -> None:
    if op == _sre.LITERAL:
        _emit(prog, "char", functools.partial(str.__eq__, chr(av)))
    elif op == _sre.NOT_LITERAL:
        _emit(prog, "char", functools.partial(str.__ne__, chr(av)))
    elif op == _sre.ANY:
        _emit(prog, "char", lambda ch: ch != "\n")
    elif op == _sre.IN:
        _emit(prog, "char", _char_class(av))
    elif op == _sre.AT and av in _ASSERTIONS:
        _emit(prog, "at", av)
    elif op == _sre.SUBPATTERN:
        _group, add_flags, del_flags, body = av
        if add_flags or del_flags:
            raise PatternError("inline flags in a group are not supported")
        _compile_seq(prog, body)
    elif op == _sre.BRANCH:
        jumps = []
        alts = av[1]
        for i, alt in enumerate(alts):
            if i == len(alts) - 1:
                _compile_seq(prog, alt)
                break
            split = _emit(prog, "split", len(prog) + 1, None)
            _compile_seq(prog, alt)
            jumps.append(_emit(prog, "jmp", None))
            prog[split][2] = len(prog)
        for j in jumps:
            prog[j][1] = len(prog)
    elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):  # greedy or lazy: the same set of matches
        lo, hi, body = av
        for _ in range(min(lo, _MAX_PROGRAM + 1)):
            _compile_seq(prog, body)
        if hi == _sre.MAXREPEAT:
            split = _emit(prog, "split", len(prog) + 1, None)
            _compile_seq(prog, body)
            _emit(prog, "jmp", split)
            prog[split][2] = len(prog)
        else:
            splits = []
            for _ in range(min(hi - lo, _MAX_PROGRAM + 1)):
                splits.append(_emit(prog, "split", len(prog) + 1, None))
                _compile_seq(prog, body)
            for sp in splits:
                prog[sp][2] = len(prog)
    else:
        raise PatternError(f"unsupported regex feature {str(op).lower()}")


@functools.lru_cache(maxsize=1024)
def _key_program(key: str) -> _Program:
    """The NFA of PEFT's full pattern ``(.*\\.)?({key})$`` for one key."""
    if not isinstance(key, str):
        raise PatternError(f"expected a str, got {type(key).__name__}")
    if len(key) > _MAX_KEY_CHARS:
        raise PatternError(f"longer than {_MAX_KEY_CHARS} characters")
    try:
        parsed = _sre.parse(rf"(.*\.)?({key})$")
    except re.error as e:
        raise PatternError(f"not a valid regex ({e})") from None
    if parsed.state.flags & ~_OK_FLAGS:
        raise PatternError("inline flags other than (?x) are not supported")
    prog: _Program = []
    _compile_seq(prog, parsed)
    _emit(prog, "match")
    return prog


def _closure(prog: _Program, pcs: list[int], s: str, pos: int) -> list[int]:
    """The ``char``/``match`` instructions reachable from ``pcs`` without reading a character."""
    out, seen, stack = [], set(), list(reversed(pcs))
    while stack:
        pc = stack.pop()
        if pc in seen:
            continue
        seen.add(pc)
        ins = prog[pc]
        if ins[0] == "jmp":
            stack.append(ins[1])
        elif ins[0] == "split":
            stack += (ins[2], ins[1])
        elif ins[0] == "at":
            if _at(ins[1], s, pos):
                stack.append(pc + 1)
        else:
            out.append(pc)
    return out


def _run(prog: _Program, s: str) -> bool:
    """Whether ``re.match`` of the program's pattern finds a match in ``s`` (anchored at 0)."""
    current = _closure(prog, [0], s, 0)
    for pos in range(len(s) + 1):
        if any(prog[pc][0] == "match" for pc in current):
            return True
        if pos == len(s) or not current:
            return False
        ch = s[pos]
        step = [pc + 1 for pc in current if prog[pc][0] == "char" and prog[pc][1](ch)]
        current = _closure(prog, step, s, pos + 1)
    return False


def _check_config(cfg: dict[str, Any], cfg_file: Path) -> None:
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(
            f"{cfg_file}: key 'peft_type': expected 'LORA', got {peft_type!r} (only LoRA adapters "
            "can be persona experts)"
        )
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise AdapterError(
                f"{cfg_file}: key {key!r} = {cfg[key]!r}: {what} is not supported by personamoe "
                "(plain LoRA only)"
            )
    r = cfg.get("r")
    if not _is_int(r) or r < 1:
        raise AdapterError(f"{cfg_file}: key 'r': expected an int >= 1, got {r!r}")
    if "lora_alpha" in cfg and not _is_alpha(cfg["lora_alpha"]):
        raise AdapterError(
            f"{cfg_file}: key 'lora_alpha': expected a finite number (a float32), got "
            f"{cfg['lora_alpha']!r}"
        )
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise AdapterError(
            f"{cfg_file}: key 'use_rslora': expected true or false, got {cfg['use_rslora']!r}"
        )
    for name, ok, what in (("rank_pattern", _is_rank, "an int >= 1"),
                           ("alpha_pattern", _is_alpha, "a finite number (a float32)")):  # fmt: skip
        patterns = cfg.get(name) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(
                f"{cfg_file}: key {name!r}: expected an object pattern -> value, got {patterns!r}"
            )
        for key, value in patterns.items():
            try:
                _key_program(key)
            except PatternError as e:
                raise AdapterError(f"{cfg_file}: key {name}[{key!r}]: {e}") from None
            if not ok(value):
                raise AdapterError(
                    f"{cfg_file}: key {name}[{key!r}]: expected {what}, got {value!r}"
                )


_F32_MAX = 3.4028234663852886e38


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_rank(v: Any) -> bool:
    return _is_int(v) and v >= 1


def _is_alpha(v: Any) -> bool:
    """A finite number the bank's float32 ``scaling`` can hold (NaN, inf and 1e308 cannot)."""
    return (
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
        and abs(v) <= _F32_MAX
    )


def load_tensors(file: Path, error: type[ValueError]) -> dict[str, Tensor]:
    """Every tensor of a safetensors file on the CPU; an unreadable, truncated or empty file raises
    ``error`` naming it (safetensors' own error names neither the file nor the problem's place)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as e:  # SafetensorError, OSError, ...: one error type for callers
        raise error(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def check_finite(file: Path, key: str, t: Tensor, error: type[ValueError]) -> None:
    """``error`` naming the file and key when ``t`` is not floating point or holds NaN/inf."""
    if not t.is_floating_point():
        raise error(f"{file}: key {key!r}: expected floating-point values, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise error(f"{file}: key {key!r}: holds {bad} NaN or infinite values")


def read_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder (config and safetensors weights) onto the CPU; every value
    is checked (an :class:`AdapterError` names the file and key)."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise AdapterError(f"{cfg_file}: not found (expected a PEFT adapter folder)")
    cfg = read_json_object(cfg_file, AdapterError)
    _check_config(cfg, cfg_file)
    w_file = path / WEIGHTS_NAME
    if not w_file.is_file():
        other = " (found adapter_model.bin: only safetensors is supported)" if (
            path / "adapter_model.bin").is_file() else ""  # fmt: skip
        raise AdapterError(f"{w_file}: not found{other}")
    tensors = load_tensors(w_file, AdapterError)
    adapter = LoraAdapter(path=path, config=cfg)
    halves: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key in tensors:  # the specific unsupported features first, then anything unknown
        if "lora_magnitude_vector" in key:
            raise AdapterError(f"{w_file}: key {key!r}: DoRA magnitude vectors are not supported")
        if "lora_embedding_" in key:
            raise AdapterError(f"{w_file}: key {key!r}: LoRA on embedding layers is not supported")
    for key, t in tensors.items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        m = _KEY.match(name)
        if m is None:
            raise AdapterError(
                f"{w_file}: key {key!r}: not a LoRA factor (expected '<module>.lora_A.weight' or "
                "'<module>.lora_B.weight'; extra saved modules and lora biases are not supported)"
            )
        if t.dim() != 2:
            raise AdapterError(
                f"{w_file}: key {key!r}: expected a 2-D matrix, got shape {list(t.shape)}"
            )
        check_finite(w_file, key, t, AdapterError)
        halves.setdefault(m["module"], {})[m["ab"]] = (key, t)
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rslora = cfg.get("use_rslora", False)
    for module, ab in sorted(halves.items()):
        for half in ("A", "B"):
            if half not in ab:
                there = "B" if half == "A" else "A"
                other = ab[there][0]
                missing = other.replace(f".lora_{there}", f".lora_{half}")
                raise AdapterError(f"{w_file}: missing key {missing!r} (the pair of {other!r})")
        (key_a, a), (key_b, b) = ab["A"], ab["B"]
        rk = pattern_key(rank_pattern, module)
        ak = pattern_key(alpha_pattern, module)
        r = int(rank_pattern[rk]) if rk is not None else int(cfg["r"])  # all checked above
        alpha = float(alpha_pattern[ak]) if ak is not None else float(cfg.get("lora_alpha", 8))
        if a.shape[0] != r:
            src = f"rank_pattern[{rk!r}]" if rk is not None else "r"
            raise AdapterError(
                f"{w_file}: key {key_a!r}: expected shape [r={r}, d_in] (r from {CONFIG_NAME} "
                f"{src}), got {list(a.shape)}"
            )
        if b.shape[1] != r:
            raise AdapterError(
                f"{w_file}: key {key_b!r}: expected shape [d_out, r={r}], got {list(b.shape)}"
            )
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        adapter.modules[module] = LoraModule(a, b, r, alpha, scaling, key_a, key_b)
    if not adapter.modules:
        raise AdapterError(f"{w_file}: holds no LoRA factors")
    return adapter


def write_adapter(
    path: str | Path,
    modules: Mapping[str, tuple[Tensor, Tensor, float]],
    *,
    base_config: Mapping[str, Any] | None = None,
    fan_in_fan_out: bool = False,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a plain PEFT LoRA adapter: ``modules`` maps a full module name to
    ``(lora_A [r, d_in], lora_B [d_out, r], scaling)``; ranks may differ per module.

    The config uses the most common rank and scaling as ``r`` / ``lora_alpha`` and exact
    ``rank_pattern`` / ``alpha_pattern`` entries for the other modules (``use_rslora`` off).
    """
    from safetensors.torch import save_file

    if not modules:
        raise ValueError("modules: expected at least one module to write, got none")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ranks = {name: int(a.shape[0]) for name, (a, _, _) in modules.items()}
    alphas = {name: float(s) * ranks[name] for name, (_, _, s) in modules.items()}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a_values = [alphas[n] for n in modules if ranks[n] == r0]
    alpha0 = max(set(a_values), key=a_values.count)
    cfg: dict[str, Any] = dict(base_config or {})
    for key in _UNSUPPORTED:
        cfg.pop(key, None)
    cfg.update(
        peft_type="LORA",
        r=r0,
        lora_alpha=alpha0,
        use_rslora=False,
        use_dora=False,
        target_modules=sorted(modules),
        rank_pattern={re.escape(n): ranks[n] for n in sorted(modules) if ranks[n] != r0},
        alpha_pattern={re.escape(n): alphas[n] for n in sorted(modules) if alphas[n] != alpha0},
        fan_in_fan_out=fan_in_fan_out,
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        inference_mode=True,
    )
    cfg.setdefault("lora_dropout", 0.0)
    cfg.setdefault("bias", "none")
    cfg.setdefault("init_lora_weights", True)
    cfg.setdefault("task_type", None)
    if base_model_name_or_path is not None or "base_model_name_or_path" not in cfg:
        cfg["base_model_name_or_path"] = base_model_name_or_path
    tensors = {}
    for name, (a, b, _) in modules.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.detach().to("cpu").contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.detach().to("cpu").contiguous()
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    # Both files or neither (personamoe._atomic): an old adapter in ``path`` stays loadable.
    write_files({
        path / WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        path / CONFIG_NAME: text,
    })  # fmt: skip
    return path
