"""Host-side checks of the layer's arguments, run before any kernel (docs/design.md §2.3).

Shape, dtype and device checks always run. Checks that must read the data (persona ids in range,
finite scaling) run only in eager mode: under ``torch.compile`` or CUDA-graph capture they would
force a host sync, so the kernels themselves treat out-of-range ids as "no persona".
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

from personamoe.layer_args import LayerArgs
from personamoe.options import NORMALIZE_MODES, check_choice

# Below this, scores / temperature overflows float32 for scores of ordinary size (|n| ~ 1e-2..1e3).
_MIN_TEMPERATURE = 1e-30
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    # is_initialized (~0.05 us) rather than is_available (~0.6 us, per check on the decode path):
    # no stream can be capturing before CUDA is initialised.
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _require_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _check_shape(name: str, t: Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name}: expected shape {what} = {list(expected)}, got {list(t.shape)}")


def _check_same(name: str, t: Tensor, x: Tensor, *, dtype: bool = True) -> None:
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")
    if dtype and t.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")


# Value checks of the small per-expert vectors passed: tensor id -> (weak reference, version,
# positive). A layer passes the same scaling/calibration buffers on every call, and the check (a few
# tiny torch ops, ~10-30 us) is a large share of a decode step's budget; an in-place change bumps
# the tensor's version and so re-runs the check.
_VALUES_OK: dict[int, tuple[weakref.ref[Tensor], int, bool]] = {}


def _values_known_ok(t: Tensor, positive: bool) -> bool:
    hit = _VALUES_OK.get(id(t))
    return hit is not None and hit[0]() is t and hit[1] == t._version and hit[2] >= positive
    # (inference tensors are never stored: they have no version counter)


def _remember_values_ok(t: Tensor, positive: bool) -> None:
    key = id(t)
    _VALUES_OK[key] = (weakref.ref(t, lambda _r: _VALUES_OK.pop(key, None)), t._version, positive)


def _check_float_vector(
    name: str, t: Tensor | None, E: int, x: Tensor, *, positive: bool, reads: bool
) -> None:
    if t is None:
        return
    _require_tensor(name, t)
    _check_shape(name, t, (E,), "[E]")
    _check_same(name, t, x, dtype=False)
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if reads and t.device.type == "cpu":
        # On CPU reading E values is cheap, so it is checked every call: no write (``.data``, numpy
        # views) can slip past a cache. On GPUs a read is a host sync, so the check is cached by
        # version counter there (``.data`` writes bypass it: documented). A Python list costs
        # ~2 us here against ~9 us through numpy's ufuncs (at E = 8, on the decode path).
        v = (t if t.dtype is torch.float32 else t.detach().float()).tolist()
        if not (all(map(math.isfinite, v)) and (not positive or min(v) > 0)):
            i = next(
                j for j, e in enumerate(v) if not (math.isfinite(e) and (e > 0 or not positive))
            )
            want = "finite and > 0 in float32" if positive else "finite in float32"
            raise ValueError(f"{name}: expected every entry {want}, got {t[i].item()} at index {i}")
    elif reads and not _values_known_ok(t, positive):
        # Checked as the kernels read it (fp32): a float64 1e300 is finite there only as inf.
        f = t.detach().float()
        bad = ~torch.isfinite(f) | ((f <= 0) if positive else torch.zeros_like(f, dtype=torch.bool))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            want = "finite and > 0 in float32" if positive else "finite in float32"
            raise ValueError(f"{name}: expected every entry {want}, got {t[i].item()} at index {i}")
        if not (t.requires_grad or t.is_inference()):  # no version counter to trust
            _remember_values_ok(t, positive)


def _check_table_values(name: str, table: Tensor) -> None:
    """A persona bias may hold ``-inf`` (expert forbidden) but no NaN or ``+inf``; a weight table
    only finite values (in float32, as the kernels read them)."""
    f = table.detach().float()
    bad = torch.isnan(f) | (f == float("inf"))
    if name == "persona_weights":
        bad = bad | torch.isneginf(f)
    if bool(bad.any()):
        p, e = (int(v) for v in bad.nonzero()[0])
        want = "finite" if name == "persona_weights" else "finite or -inf"
        raise ValueError(
            f"{name}: expected every entry {want} in float32, got {table[p, e].item()} at [{p}, {e}]"
        )


def check_layer_args(args: LayerArgs, *, values: bool = True) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument, the expected and the actual value.

    Shapes, dtypes and devices are always checked (no data is read). ``values=True`` also checks
    what only the data can tell (finite scaling, ids in range, ...) in eager mode; the op's own
    implementation passes ``values=False``: every door into the kernels gets the structural checks,
    which are what keeps a kernel inside its arrays.
    """
    (x, weight, bias, lora_a, lora_b, scaling, top_k, temperature, normalize, calibration,
     persona_bias, persona_ids, persona_weights) = args  # fmt: skip
    _require_tensor("x", x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected one of {[str(d) for d in FLOAT_DTYPES]}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dim [..., d_in], got shape {list(x.shape)}")
    _require_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2 dims [d_out, d_in], got shape {list(weight.shape)}")
    d_out, d_in = weight.shape
    if d_in < 1:
        raise ValueError(
            f"weight: expected d_in >= 1 input features, got shape {list(weight.shape)}"
        )
    if x.shape[-1] != d_in:
        raise ValueError(f"x: expected last dim d_in = {d_in} (from weight), got {x.shape[-1]}")
    _check_same("weight", weight, x)
    if bias is not None:
        _require_tensor("bias", bias)
        _check_shape("bias", bias, (d_out,), "[d_out]")
        _check_same("bias", bias, x)
    _require_tensor("lora_a", lora_a)
    if lora_a.dim() != 3:
        raise ValueError(f"lora_a: expected 3 dims [E, r, d_in], got shape {list(lora_a.shape)}")
    E, r, _ = lora_a.shape
    if E < 1:
        raise ValueError("lora_a: expected at least one expert (E >= 1), got an empty bank (E = 0)")
    if r < 1:
        raise ValueError(f"lora_a: expected rank r >= 1, got r = {r}")
    _check_shape("lora_a", lora_a, (E, r, d_in), "[E, r, d_in]")
    _check_same("lora_a", lora_a, x)
    _require_tensor("lora_b", lora_b)
    _check_shape("lora_b", lora_b, (E, d_out, r), "[E, d_out, r]")
    _check_same("lora_b", lora_b, x)
    reads = values and not _is_tracing()
    _require_tensor("scaling", scaling)
    _check_float_vector("scaling", scaling, E, x, positive=False, reads=reads)
    _check_float_vector("calibration", calibration, E, x, positive=True, reads=reads)

    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k: expected an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k: expected 1 <= top_k <= E = {E}, got {top_k}")
    # Under torch.compile(dynamic=True) a float may arrive symbolic: its value is checked in eager.
    if not _is_tracing() and (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature > 0)
        or temperature < _MIN_TEMPERATURE
    ):
        raise ValueError(
            f"temperature: expected a finite float > 0 (and >= {_MIN_TEMPERATURE:g}, so that "
            f"scores / temperature stays finite in float32), got {temperature!r}"
        )
    check_choice("normalize", normalize, NORMALIZE_MODES)

    if persona_bias is not None and persona_weights is not None:
        raise ValueError(
            "persona_bias, persona_weights: expected at most one of them (token mode with a bias "
            "table, or fixed mode with a weight table), got both"
        )
    table_name = "persona_bias" if persona_bias is not None else "persona_weights"
    table = persona_bias if persona_bias is not None else persona_weights
    if table is not None:
        _require_tensor(table_name, table)
        if table.dim() != 2 or table.shape[1] != E:
            raise ValueError(f"{table_name}: expected shape [P, E={E}], got {list(table.shape)}")
        if table.shape[0] < 1:
            raise ValueError(f"{table_name}: expected at least one persona row (P >= 1), got 0")
        _check_same(table_name, table, x, dtype=False)
        if not table.is_floating_point():
            raise TypeError(f"{table_name}: expected a floating dtype, got {table.dtype}")
        if reads:
            _check_table_values(table_name, table)
    if persona_weights is not None and persona_ids is None:
        raise ValueError("persona_ids: expected per-token ids with persona_weights, got None")
    if persona_ids is not None:
        _require_tensor("persona_ids", persona_ids)
        if persona_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"persona_ids: expected dtype int32 or int64, got {persona_ids.dtype}")
        if persona_ids.device != x.device:
            raise ValueError(f"persona_ids: expected device {x.device}, got {persona_ids.device}")
        lead = tuple(x.shape[:-1])
        # The exact leading dims: ids of another shape with the same count would silently pair
        # tokens with other rows' personas.
        if tuple(persona_ids.shape) != lead:
            raise ValueError(
                f"persona_ids: expected shape {list(lead)} (the leading dims of x), "
                f"got {list(persona_ids.shape)}"
            )
        if table is not None and persona_ids.numel() and reads:
            P = table.shape[0]
            lo, hi = int(persona_ids.min()), int(persona_ids.max())
            if lo < -1 or hi >= P:
                bad = lo if lo < -1 else hi
                raise ValueError(
                    f"persona_ids: expected ids in [-1, {P}) (-1 = no persona; P = {P} rows "
                    f"of {table_name}), got {bad}"
                )
