"""The layer benchmark of docs/design.md §5: cases L1/L16/L256 and the providers compared on them.

One source of truth for ``python -m personamoe bench`` (:mod:`personamoe.bench.cli`), the
pytest-benchmark suite ``benchmarks/test_bench_layer.py`` and ``benchmarks/gpu_check.py``. Every
provider computes the whole layer, base included, in token mode (``normalize="topk"``,
temperature 1, no calibration or persona table), so each one can be checked against
:func:`personamoe.reference.persona_moe_linear`.

Weights are rotated over several weight sets (:func:`make_weight_sets`) so that a case is not
measured with its weights sitting in cache; :func:`measure` times the providers interleaved
(A B C A B C ...) with the one timing loop of every benchmark, :func:`runner.time_interleaved`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import personamoe
from personamoe import reference
from personamoe.bench import runner

__all__ = [
    "CASES",
    "PROVIDERS",
    "LayerCase",
    "WeightSet",
    "fastest_base",
    "make_input",
    "make_weight_sets",
    "measure",
    "roofline_bytes",
    "stream_bandwidth",
]


@dataclass(frozen=True)
class LayerCase:
    """One layer shape: ``x [tokens, d_in]`` through ``d_in -> d_out`` with ``E`` experts of rank r."""

    name: str
    tokens: int
    d_in: int = 2048
    d_out: int = 2048
    experts: int = 8
    rank: int = 16
    top_k: int = 2
    dtype: torch.dtype = torch.float32

    def set_bytes(self) -> int:
        """Bytes of one weight set (base weight and bias, both adapter banks, scaling)."""
        el = torch.empty((), dtype=self.dtype).element_size()
        n = self.d_out * self.d_in + self.d_out
        n += self.experts * self.rank * (self.d_in + self.d_out)
        return n * el + 4 * self.experts


CASES: dict[str, LayerCase] = {
    "L1": LayerCase("L1", tokens=1),
    "L16": LayerCase("L16", tokens=16),
    "L256": LayerCase("L256", tokens=256),
}


@dataclass(frozen=True)
class WeightSet:
    """One layer's weights, in the layouts of docs/design.md §3.1."""

    weight: Tensor  # [d_out, d_in]
    bias: Tensor  # [d_out]
    lora_a: Tensor  # [E, r, d_in]
    lora_b: Tensor  # [E, d_out, r]
    scaling: Tensor  # [E] fp32


def make_weight_sets(case: LayerCase, count: int, *, seed: int = 0) -> list[WeightSet]:
    """``count`` independent random weight sets (never zero ``lora_b``: every expert matters)."""
    g = torch.Generator().manual_seed(seed)
    E, r, d_in, d_out = case.experts, case.rank, case.d_in, case.d_out
    out = []
    for _ in range(count):

        def rnd(*shape: int, std: float) -> Tensor:
            return (torch.randn(*shape, generator=g) * std).to(case.dtype)

        out.append(
            WeightSet(
                weight=rnd(d_out, d_in, std=1 / math.sqrt(d_in)),
                bias=rnd(d_out, std=0.1),
                lora_a=rnd(E, r, d_in, std=1 / math.sqrt(d_in)),
                lora_b=rnd(E, d_out, r, std=1 / math.sqrt(r)),
                scaling=torch.full((E,), 2.0),
            )
        )
    return out


def sets_for_bytes(case: LayerCase, rotate_bytes: int, *, minimum: int = 2) -> int:
    """How many weight sets it takes to rotate through at least ``rotate_bytes``."""
    return max(minimum, math.ceil(rotate_bytes / case.set_bytes()))


def make_input(case: LayerCase, *, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case.tokens, case.d_in, generator=g).to(case.dtype)


# ---- providers: (x, weight set, top_k) -> y -----------------------------------------------------
def _shrink_route(x: Tensor, w: WeightSet, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """All experts' h ``[T, E, r]`` (one GEMM), then top-k by norm and softmax gates over the k."""
    E, r, d_in = w.lora_a.shape
    h = (x @ w.lora_a.reshape(E * r, d_in).t()).reshape(x.shape[0], E, r)
    n = torch.linalg.vector_norm(h, dim=-1)
    top, idx = torch.topk(n, top_k, dim=-1)
    return h, idx, torch.softmax(top, dim=-1)


def provider_base(x: Tensor, w: WeightSet, top_k: int) -> Tensor:
    """The plain linear layer, no adapters: the floor."""
    return F.linear(x, w.weight, w.bias)


# Prepacked oneDNN weights of the ``base_onednn`` provider, by ``id`` of the plain weight: packed
# once before timing (:func:`prepare_providers`), as a deployment packs at load time.
_PACKED: dict[int, Tensor] = {}


def onednn_unavailable(device: torch.device | str, dtype: torch.dtype) -> str:
    """Why ``base_onednn`` cannot run here (``""`` when it can): CPU only, and the dtype must be one
    this CPU's oneDNN has kernels for (bf16/fp16 need native support, e.g. AVX-512 BF16/AMX)."""
    if torch.device(device).type != "cpu":
        return "oneDNN prepacking is a CPU path"
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN"
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype), 1)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8, dtype=dtype), w, None, "none", [], "")
    except (RuntimeError, AttributeError) as e:
        return f"oneDNN has no {dtype} linear on this CPU ({str(e).splitlines()[0][:80]})"
    return ""


def prepare_providers(
    providers: Sequence[str], weight_sets: Sequence[WeightSet], tokens: int
) -> None:
    """Work a deployment does once at load time, outside the timed region: prepack each set's
    weight for ``base_onednn`` (batch-size hint ``tokens``)."""
    _PACKED.clear()
    if "base_onednn" in providers:
        for w in weight_sets:
            _PACKED[id(w.weight)] = torch.ops.mkldnn._reorder_linear_weight(w.weight, tokens)


def provider_base_onednn(x: Tensor, w: WeightSet, top_k: int) -> Tensor:
    """The fastest plain layer on a CPU: oneDNN on a weight prepacked at load time (what vLLM's CPU
    build and inductor's CPU freezing run)."""
    packed = _PACKED[id(w.weight)]
    return torch.ops.mkldnn._linear_pointwise(x, packed, w.bias, "none", [], "")


def provider_naive(x: Tensor, w: WeightSet, top_k: int) -> Tensor:
    """Shrink all, top-k, then a Python loop over experts gathering each expert's tokens."""
    h, idx, gates = _shrink_route(x, w, top_k)
    y = F.linear(x, w.weight, w.bias)
    for e in range(w.lora_a.shape[0]):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        coeff = (gates[tok, slot] * w.scaling[e])[:, None]
        y.index_add_(0, tok, (h[tok, e] * coeff) @ w.lora_b[e].t())
    return y


def provider_dense(x: Tensor, w: WeightSet, top_k: int) -> Tensor:
    """Every expert's full output ``[T, E, d_out]`` materialised, then weighted (X-LoRA style)."""
    h, idx, gates = _shrink_route(x, w, top_k)
    full = torch.einsum("ter,eor->teo", h, w.lora_b)
    coeff = torch.zeros_like(h[:, :, 0]).scatter_(1, idx, gates) * w.scaling
    return F.linear(x, w.weight, w.bias) + (full * coeff[:, :, None]).sum(dim=1)


def provider_masked(x: Tensor, w: WeightSet, top_k: int) -> Tensor:
    """Gates scattered into ``[T, E]``, then one GEMM over ``E*r`` (the best pure-PyTorch form)."""
    h, idx, gates = _shrink_route(x, w, top_k)
    T, E, r = h.shape
    coeff = torch.zeros_like(h[:, :, 0]).scatter_(1, idx, gates) * w.scaling
    b_cat = w.lora_b.permute(0, 2, 1).reshape(E * r, -1)
    return torch.addmm(
        F.linear(x, w.weight, w.bias), (h * coeff[:, :, None]).reshape(T, E * r), b_cat
    )


def provider_reference(x: Tensor, w: WeightSet, top_k: int) -> Tensor:
    """``personamoe.reference`` (the contract in plain torch)."""
    y = reference.persona_moe_linear(
        x, w.weight, w.bias, w.lora_a, w.lora_b, w.scaling, top_k=top_k
    )
    assert isinstance(y, Tensor)
    return y


def provider_personamoe(x: Tensor, w: WeightSet, top_k: int) -> Tensor:
    """The public entry point ``personamoe.persona_moe_linear`` (backend ``auto``), validation included."""
    y = personamoe.persona_moe_linear(
        x, w.weight, w.bias, w.lora_a, w.lora_b, w.scaling, top_k=top_k
    )
    assert isinstance(y, Tensor)
    return y


Provider = Callable[[Tensor, WeightSet, int], Tensor]
PROVIDERS: dict[str, Provider] = {
    "base": provider_base,
    "base_onednn": provider_base_onednn,
    "naive": provider_naive,
    "dense": provider_dense,
    "masked": provider_masked,
    "reference": provider_reference,
    "personamoe": provider_personamoe,
}


def measure(
    case: LayerCase,
    providers: Sequence[str],
    weight_sets: Sequence[WeightSet],
    *,
    rounds: int,
    warmup: int = 3,
    x: Tensor | None = None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds per call of each provider, timed interleaved by :func:`runner.time_interleaved`:
    every round calls each provider once (in a rotated order), each call on the next weight set.
    Returns the raw samples (sample ``i`` of every provider from round ``i``).

    ``warmup`` untimed passes over the weight sets come first. ``clock`` is ``"wall"`` (default)
    or ``"cpu"`` (:data:`runner.CLOCKS`: the calling thread's CPU time, robust to other jobs on a
    shared machine; use it with one torch thread).
    """
    results = measure_results(
        case, providers, weight_sets, rounds=rounds, warmup=warmup, x=x, clock=clock
    )
    return {p: r.samples for p, r in results.items()}


def measure_results(
    case: LayerCase,
    providers: Sequence[str],
    weight_sets: Sequence[WeightSet],
    *,
    rounds: int,
    warmup: int = 3,
    x: Tensor | None = None,
    clock: str = "wall",
    budget: float | None = None,
    deadline: float | None = None,
) -> dict[str, runner.Result]:
    """:func:`measure`, returning the :class:`runner.Result` of each provider (with the note of a
    provider stopped by ``budget`` or ``deadline``, see :func:`runner.time_interleaved`)."""
    device = weight_sets[0].weight.device
    x = make_input(case).to(device) if x is None else x
    unavailable = {}
    if "base_onednn" in providers:
        why = onednn_unavailable(device, case.dtype)
        if why:
            unavailable["base_onednn"] = why
    providers = [p for p in providers if p not in unavailable]
    prepare_providers(providers, weight_sets, case.tokens)
    n_sets, n_prov = len(weight_sets), len(providers)

    def rotating(j: int, provider: Provider) -> Callable[[], Tensor]:
        calls = 0

        def call() -> Tensor:
            # Call c of provider j takes set (c * n_prov + j): within a round every provider
            # reads other weights than the one before it, so none is timed from a warm cache.
            nonlocal calls
            w = weight_sets[(calls * n_prov + j) % n_sets]
            calls += 1
            return provider(x, w, case.top_k)

        return call

    fns: dict[str, Callable[[], object]] = {
        p: rotating(j, PROVIDERS[p]) for j, p in enumerate(providers)
    }
    results = runner.time_interleaved(
        case.name,
        fns,
        repeats=rounds,
        warmup=warmup * n_sets,
        device=device.type,
        clock=clock,
        budget=budget,
        deadline=deadline,
    )
    _PACKED.clear()
    for p, why in unavailable.items():
        results[p] = runner.Result(case.name, p, note=f"skipped: {why}")
    return results


def fastest_base(results: dict[str, runner.Result]) -> str | None:
    """The plain-layer provider (``base`` or ``base_onednn``) with the smallest median, among those
    with samples: every ratio that counts is taken against it."""
    bases = [p for p in ("base", "base_onednn") if p in results and results[p].samples]
    return min(bases, key=lambda p: results[p].median) if bases else None


def stream_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second this machine streams (read + write) in a large copy: the memory roof."""
    src = torch.empty(mib << 18, dtype=torch.float32).fill_(1.0)  # mib MiB of fp32
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page once before timing
    times = []
    for _ in range(repeats):
        t0 = runner.CLOCKS["wall"]()
        dst.copy_(src)
        times.append(runner.CLOCKS["wall"]() - t0)
    return 2 * src.numel() * src.element_size() / sorted(times)[len(times) // 2]


def roofline_bytes(case: LayerCase) -> int:
    """Bytes the whole layer must move at least once: ``W`` and bias, all of ``A`` (every expert is
    scored), the ``B`` of the experts the case's tokens can use (at most ``min(E, T*k)``), ``x`` in
    and ``y`` out."""
    el = torch.empty((), dtype=case.dtype).element_size()
    used = min(case.experts, case.tokens * case.top_k)
    n = case.d_out * case.d_in + case.d_out  # W, bias
    n += case.experts * case.rank * case.d_in  # A
    n += used * case.d_out * case.rank  # used B
    n += case.tokens * (case.d_in + case.d_out)  # x, y
    return n * el


# The one machine description (runner.describe_machine), under the name the layer scripts use.
machine_info = runner.describe_machine
