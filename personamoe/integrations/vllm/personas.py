"""Per-request personas in vLLM: a request names one of the served personas, every token of it
routes (or mixes) as that persona, and one engine step mixes requests of different personas.

A request names its persona in ``SamplingParams.extra_args`` (``{"persona": "calm"}``; online, the
OpenAI-compatible server's ``"vllm_xargs": {"persona": "calm"}`` lands there). No persona means free
routing over the whole bank. The pieces, all on vLLM's supported interfaces:

- **Admission** (front-end process). :meth:`PersonaRequests.validate_params`, the logits-processor
  hook vLLM runs on every request before it is queued, rejects an unknown name with ``ValueError``
  (vLLM turns it into an HTTP 400 online). The hook is a classmethod without the served model, so
  the plugin records which model the front end serves when vLLM builds its ``InputProcessor``
  (:func:`install_frontend_hook`, the one place that wraps a vLLM internal: pinned to the tested
  release by :func:`~personamoe.integrations.vllm.version.check_vllm_version`).
- **Batch rows** (worker). vLLM calls a logits processor's ``update_state`` before every forward
  with the requests added to, removed from and moved inside the persistent batch, each added one
  with its ``SamplingParams``. :class:`PersonaRequests` keeps one persona row per batch row in a
  persistent ``[max_num_reqs + 1]`` tensor (:class:`BatchPersonas`); free, stale and padded rows
  hold 0, "no persona".
- **Tokens** (inside the layers). The flattened batch orders tokens by batch row; the attention
  metadata of the forward context holds each row's query start offset, so the first persona layer
  of a forward expands rows to tokens once (:func:`token_rows`: a ``searchsorted`` over those
  offsets, a gather from the persistent rows) and the others reuse it. Under ``torch.compile`` the
  expansion is an opaque custom op, so a compiled graph never freezes one step's personas.

CUDA graphs would replay the first step's token expansion, so personas are refused (a clear
request error) when a GPU engine captures graphs: serve with ``--enforce-eager`` there. vLLM's V2
model runner (the GPU default in 0.32) has a different logits-processor interface; the class below
implements both so loading it never breaks an engine, but requests naming a persona are refused
on V2 (set ``VLLM_USE_V2_MODEL_RUNNER=0``). Speculative decoding builds no plugin logits
processors, so personas are refused there too.

Persona ids: row 0 is "no persona", row ``1 + i`` the ``i``-th persona saved with the bank; each
layer folds its own expert availability into the tables (:func:`layer_tables`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from personamoe.integrations.checkpoint.section import PersonaSection
from personamoe.integrations.vllm.config import section_of

__all__ = [
    "PERSONA_ARG",
    "SUPPORTED",
    "BatchPersonas",
    "PersonaRequests",
    "ServedPersonas",
    "current_batch",
    "install_frontend_hook",
    "layer_tables",
    "requested_persona",
    "served_personas",
    "token_rows",
]

SUPPORTED = True
PERSONA_ARG = "persona"
"""The key of ``SamplingParams.extra_args`` (online: of ``vllm_xargs``) that names a persona."""


# -- the served personas ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedPersonas:
    """The personas saved with a served export, as tables over its experts (row 0: none)."""

    path: str  # the export's config.json, for messages
    names: tuple[str, ...]
    bias: Tensor  # [R, E] fp32, -inf where a routing persona disallows an expert
    weights: Tensor  # [R, E] fp32, a fixed persona's mixture (zero rows for routing ones)
    fixed: Tensor  # [R] bool

    @property
    def any_fixed(self) -> bool:
        return bool(self.fixed.any())

    def row_of(self, name: str) -> int:
        """The table row of persona ``name``; ``ValueError`` naming it and the served ones."""
        if name not in self.names:
            raise ValueError(
                f"extra_args[{PERSONA_ARG!r}]: unknown persona {name!r}; {self.path} serves "
                f"{list(self.names)}"
            )
        return 1 + self.names.index(name)

    @classmethod
    def of(cls, section: PersonaSection) -> ServedPersonas:
        from personamoe._json_file import read_json_object
        from personamoe.integrations.bank_format import BANK_CONFIG
        from personamoe.personas import Persona, PersonaState

        st = PersonaState(section.experts, "token", None)
        if section.personas:
            meta = read_json_object(section.bank_file().parent / BANK_CONFIG)
            saved = {p["name"]: Persona.from_dict(p) for p in meta.get("personas") or []}
            for name in section.personas:  # the section's order: the ids requests get
                p = saved[name]
                st.check(p)
                st.registered[name] = p
        bias, weights, fixed = st.tables()
        return cls(str(section.path), tuple(st.registered), bias, weights, fixed)


_served: dict[int, tuple[PersonaSection, ServedPersonas]] = {}


def served_personas(section: PersonaSection) -> ServedPersonas:
    """:meth:`ServedPersonas.of`, read once per section (every layer of a model asks)."""
    hit = _served.get(id(section))
    if hit is None or hit[0] is not section:
        hit = _served[id(section)] = (section, ServedPersonas.of(section))
    return hit[1]


def layer_tables(
    served: ServedPersonas, available: Tensor, device: torch.device, shift: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(route_bias, fixed_weights)``, both ``[R, E]`` fp32 on ``device``, for one layer whose
    experts ``available [E]`` target it: a routing row gets its persona's bias plus ``-inf`` for
    absent experts; a fixed row's bias is all ``-inf`` (it contributes nothing to the routed call)
    and its weights are its mixture over the available experts (a routing row's weights are zero,
    so it contributes nothing to the fixed call). ``shift [E]`` (data calibration's score offset)
    is added to every routing row, row 0 included."""
    avail = available.to(torch.bool).reshape(1, -1)
    fixed = served.fixed.reshape(-1, 1)
    bias = served.bias if shift is None else served.bias + shift.to(torch.float32).reshape(1, -1)
    route = torch.where(avail & ~fixed, bias, float("-inf"))
    weights = torch.where(avail & fixed, served.weights, 0.0)
    return route.to(device, torch.float32).contiguous(), weights.to(device, torch.float32)


def requested_persona(params: Any) -> str | None:
    """The persona a request names (``extra_args["persona"]``), ``None`` when it names none;
    ``ValueError`` when the value is not a non-empty string."""
    extra = getattr(params, "extra_args", None)
    if not isinstance(extra, Mapping) or extra.get(PERSONA_ARG) is None:
        return None
    name = extra[PERSONA_ARG]
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"extra_args[{PERSONA_ARG!r}]: expected a persona name (a non-empty str), got {name!r}"
        )
    return name


# -- admission, in the front-end process -----------------------------------------------------------
@dataclass
class _Frontend:
    served: ServedPersonas | None  # None: the model has no personamoe section
    refusal: str | None  # why this engine cannot serve personas per request (None: it can)


_frontend: _Frontend | None = None


def _refusal(vllm_config: Any) -> str | None:
    """Why requests cannot name personas on this engine (``None``: they can)."""
    if getattr(vllm_config, "speculative_config", None) is not None:
        return "speculative decoding builds no plugin logits processors"
    if bool(getattr(vllm_config, "use_v2_model_runner", False)):
        return "vLLM's V2 model runner is in use (set VLLM_USE_V2_MODEL_RUNNER=0)"
    from vllm.platforms import current_platform

    cc = getattr(vllm_config, "compilation_config", None)
    mode = getattr(cc, "cudagraph_mode", None)
    if not current_platform.is_cpu() and mode is not None and str(mode.name) != "NONE":
        return "CUDA graphs would replay one step's personas (serve with --enforce-eager)"
    return None


def _record_frontend(vllm_config: Any) -> None:
    global _frontend
    section = section_of(getattr(vllm_config, "model_config", None))
    served = None if section is None else served_personas(section)
    _frontend = _Frontend(served, _refusal(vllm_config) if served is not None else None)


def install_frontend_hook() -> None:
    """Record the served model whenever vLLM builds an ``InputProcessor`` (the front end's request
    admission), so :meth:`PersonaRequests.validate_params` knows the served personas."""
    from vllm.v1.engine import input_processor

    cls = input_processor.InputProcessor
    if getattr(cls.__init__, "_personamoe", False):
        return
    init = cls.__init__
    if not callable(init):
        raise RuntimeError("vllm.v1.engine.input_processor.InputProcessor has no __init__")

    def __init__(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        init(self, vllm_config, *args, **kwargs)
        _record_frontend(vllm_config)

    __init__._personamoe = True  # type: ignore[attr-defined]
    cls.__init__ = __init__


def check_request(params: Any) -> None:
    """``ValueError`` unless the persona ``params`` names (if any) is served by this front end."""
    name = requested_persona(params)
    if name is None:
        return
    fe = _frontend
    if fe is None or fe.served is None:
        raise ValueError(
            f"extra_args[{PERSONA_ARG!r}]: persona {name!r} was requested, but the served model "
            "has no personas (not a personamoe export)"
        )
    if fe.refusal is not None:
        raise ValueError(
            f"extra_args[{PERSONA_ARG!r}]: persona {name!r} cannot be served per request here: "
            f"{fe.refusal}"
        )
    fe.served.row_of(name)


# -- batch rows, in each worker ---------------------------------------------------------------------
class BatchPersonas:
    """Each persistent-batch row's persona row (0: none), on the host and on the device."""

    def __init__(self, served: ServedPersonas, max_num_reqs: int, device: torch.device) -> None:
        self.served = served
        self.host = [0] * (max_num_reqs + 1)  # the last slot stays 0: padded rows' sentinel
        self.device_rows = torch.zeros(max_num_reqs + 1, dtype=torch.long, device=device)
        self.active = False  # some row of the batch names a persona
        self.has_fixed = False  # some row of the batch names a fixed-mixture persona
        self._cache: tuple[Any, int, Tensor] | None = None
        self._kinds: tuple[Tensor, Tensor, Tensor] | None = None
        self.fixed_rows = served.fixed.to(device)

    def row_of(self, params: Any) -> int:
        name = requested_persona(params)
        if name is None:
            return 0
        return self.served.row_of(name)  # admission refuses unknown names; never route them freely

    def update(self, batch_update: Any) -> None:
        """Apply vLLM's ``BatchUpdate`` (removed, then added, then moved; docs of vLLM's
        ``BatchUpdate``) and copy the rows to the device."""
        if batch_update is None:
            return
        from vllm.v1.sample.logits_processor import MoveDirectionality

        rows = self.host
        for i in batch_update.removed:
            rows[i] = 0
        for added in batch_update.added:
            rows[added[0]] = self.row_of(added[1])
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                rows[a], rows[b] = rows[b], rows[a]
            else:
                rows[b], rows[a] = rows[a], 0
        n = int(batch_update.batch_size)
        for i in range(n, len(rows)):
            rows[i] = 0
        fixed = self.served.fixed
        self.active = any(rows[:n])
        self.has_fixed = any(bool(fixed[r]) for r in rows[:n] if r)
        self.device_rows.copy_(torch.tensor(rows, dtype=torch.long), non_blocking=True)
        self._cache = self._kinds = None

    def kinds(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(indices of routing tokens, indices of fixed-mixture tokens)`` of this forward's
        token rows ``rows`` (computed once per forward, shared by the layers)."""
        hit = self._kinds
        if hit is not None and hit[0] is rows:
            return hit[1], hit[2]
        fixed = self.fixed_rows.to(rows.device)[rows]
        route_tok = (~fixed).nonzero().reshape(-1)
        fixed_tok = fixed.nonzero().reshape(-1)
        self._kinds = (rows, route_tok, fixed_tok)
        return route_tok, fixed_tok

    def tokens(self, num_tokens: int, device: torch.device) -> Tensor:
        """``[num_tokens]`` persona rows of this forward's tokens (0 for padding)."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return torch.zeros(num_tokens, dtype=torch.long, device=device)
        ctx = get_forward_context()
        hit = self._cache
        if hit is not None and hit[0] is ctx and hit[1] == num_tokens:
            return hit[2]
        starts = _query_starts(ctx.attn_metadata)
        if starts is None:  # a dummy or profiling run: no requests
            ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
        else:
            t = torch.arange(num_tokens, device=starts.device, dtype=starts.dtype)
            row = torch.searchsorted(starts[1:].contiguous(), t, right=True)
            row = row.clamp_(max=self.device_rows.shape[0] - 1)
            ids = self.device_rows.to(row.device)[row].to(device)
        self._cache = (ctx, num_tokens, ids)
        return ids


def _query_starts(attn_metadata: Any) -> Tensor | None:
    """The ``query_start_loc`` of this forward (one entry per batch row, plus the end)."""
    if isinstance(attn_metadata, list):
        raise RuntimeError(
            "personamoe: per-request personas do not support vLLM's micro-batching (DBO)"
        )
    if not attn_metadata:
        return None
    meta = next(iter(attn_metadata.values()))
    starts = getattr(meta, "query_start_loc", None)
    if starts is None:
        raise RuntimeError(
            f"personamoe: the attention metadata ({type(meta).__name__}) has no query_start_loc; "
            "per-request personas need it to map tokens to requests"
        )
    return starts


_batch: BatchPersonas | None = None


def current_batch() -> BatchPersonas | None:
    """This worker's batch rows (``None``: the served model has no personas, or the engine cannot
    serve them per request)."""
    return _batch


def token_rows(x: Tensor) -> Tensor | None:
    """Eager: the persona row of each of ``x``'s ``T`` tokens, ``None`` when no request of this
    batch names a persona (the layers then take the free-routing path)."""
    st = _batch
    if st is None or not st.active:
        return None
    return st.tokens(x.shape[0], x.device)


@torch.library.custom_op("personamoe_vllm::token_rows", mutates_args=())
def _token_rows_op(x: Tensor) -> Tensor:
    """Compiled graphs: the same, as an opaque op (zeros when no persona is named)."""
    st = _batch
    if st is None or not st.active:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return st.tokens(x.shape[0], x.device).clone()


@_token_rows_op.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], dtype=torch.long)


def compiled_token_rows(x: Tensor) -> Tensor:
    return torch.ops.personamoe_vllm.token_rows(x)


# -- the logits processor ---------------------------------------------------------------------------
def _interfaces() -> tuple[type, ...]:
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1

    try:  # loading must never break an engine on the V2 runner (which rejects V1-only classes)
        from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2
    except ImportError:  # pragma: no cover - other vLLM builds
        return (V1,)
    return (V1, V2)


class PersonaRequests(*_interfaces()):  # type: ignore[misc]
    """The ``vllm.logits_processors`` entry point: it never changes logits; it validates each
    request's persona and, in V1 workers, keeps the batch rows' personas for the layers."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        check_request(sampling_params)

    def __init__(self, vllm_config: Any, *args: Any) -> None:
        global _batch
        self.v2 = len(args) == 1  # V2: (vllm_config, req_states); V1: (vllm_config, device, pin)
        section = section_of(getattr(vllm_config, "model_config", None))
        if section is None or self.v2 or _refusal(vllm_config) is not None:
            return  # inert; admission refuses persona requests on such engines
        served = served_personas(section)
        if not served.names:
            return
        device = args[0] if args else torch.device("cpu")
        max_reqs = int(vllm_config.scheduler_config.max_num_seqs)
        # vLLM may rebuild its input batch (and this processor) once the KV cache is sized: the
        # layers always read the latest one.
        _batch = BatchPersonas(served, max_reqs, torch.device(device))

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Any) -> None:
        if _batch is not None:
            _batch.update(batch_update)

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:  # V2
        return False

    def apply(self, logits: Tensor, ctx: Any = None) -> Tensor:
        return logits
