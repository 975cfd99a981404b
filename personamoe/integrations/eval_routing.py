"""``python -m personamoe eval-routing``: how often free routing picks the adapter a text belongs
to, and what each routing costs in held-out loss (:func:`evaluate_routing`).

For every adapter ``name`` there is held-out text of its domain. Each configuration (calibration
``none`` / ``frobenius`` / ``data`` x top-k) runs that text with free routing and counts, over every
(token, layer) decision at layers where the adapter is present: how often the top-1 expert is
``name`` (``top1_match``), how often ``name`` is among the chosen experts with a non-zero gate
(``topk_match``), the same per decoder depth and per module kind, and per chunk whether the expert
chosen top-1 most often is ``name`` (``vote_match``). Losses (mean token NLL) are reported for the
base model, the oracle (a persona allowing only ``name``, top-1: the adapter alone), a uniform fixed
mixture and each free-routing configuration. Results are written to ``results.json`` as they come,
so a run cut by its time budget keeps what it measured.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from personamoe._atomic import write_text
from personamoe.integrations.calibrate import calibrate
from personamoe.integrations.hf import inject
from personamoe.integrations.layers import PersonaLayer, persona_layers
from personamoe.integrations.model_personas import state_of, use_personas
from personamoe.integrations.modes import set_routing
from personamoe.options import CALIBRATIONS
from personamoe.personas import Persona

__all__ = ["RESULTS_FORMAT", "add_arguments", "evaluate_routing", "main", "print_table"]

RESULTS_FORMAT = "personamoe-eval-routing/1"
CLI_HELP = "measure how often free routing picks each text's own adapter, and the held-out loss"


class _Budget:
    def __init__(self, budget_s: float | None) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> bool:
        return self.budget_s is None or self.elapsed() < self.budget_s


def _depth(name: str) -> int | None:
    """The decoder layer index of a module name (its first integer component)."""
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def _set_top_k(model: nn.Module, k: int) -> None:
    st = state_of(model)
    E = len(st.experts)
    for _, layer in persona_layers(model):
        layer.top_k = min(k, E)
        layer.pm_seq_weights = None
    st.options["top_k"] = min(k, E)


@torch.no_grad()
def _nll(model: nn.Module, ids: Tensor) -> tuple[float, int]:
    """``(summed next-token NLL, number of predicted tokens)`` of one chunk ``[1, S]``."""
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    logits = model(input_ids=ids).logits.float()
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )
    return float(loss), int(ids.shape[1] - 1)


def _mean_loss(model: nn.Module, chunks: Sequence[Tensor]) -> float:
    total, count = 0.0, 0
    for ids in chunks:
        s, n = _nll(model, ids)
        total, count = total + s, count + n
    return total / max(count, 1)


class _Match:
    """Counts of one adapter's text under one configuration."""

    def __init__(self, E: int) -> None:
        self.top1 = 0
        self.topk = 0
        self.decisions = 0
        self.share = torch.zeros(E, dtype=torch.long)
        self.by_depth: dict[str, list[int]] = {}  # key -> [top1, topk, decisions]
        self.by_module: dict[str, list[int]] = {}
        self.by_layer: dict[str, list[int]] = {}
        self.votes = 0
        self.chunks = 0
        self.nll = 0.0
        self.nll_tokens = 0

    def add_layer(self, name: str, layer: PersonaLayer, own: int) -> Tensor | None:
        """Count the last forward's decisions of ``layer``; returns its top-1 picks ``[T]``."""
        rec = layer.pm_last
        if rec is None or not bool(layer.pm_available[own]):
            return None
        idx = rec.topk_idx.reshape(-1, rec.topk_idx.shape[-1]).long().cpu()
        gates = rec.topk_gates.reshape(-1, rec.topk_gates.shape[-1]).float().cpu()
        top1 = idx[:, 0]
        hit1 = int((top1 == own).sum())
        hitk = int(((idx == own) & (gates != 0)).any(dim=1).sum())
        T = idx.shape[0]
        self.top1, self.topk, self.decisions = (
            self.top1 + hit1,
            self.topk + hitk,
            self.decisions + T,
        )
        self.share += torch.bincount(top1, minlength=len(self.share))
        keys = ((self.by_depth, str(_depth(name))), (self.by_module, name.rsplit(".", 1)[-1]),
                (self.by_layer, name))  # fmt: skip
        for table, key in keys:
            row = table.setdefault(key, [0, 0, 0])
            row[0], row[1], row[2] = row[0] + hit1, row[1] + hitk, row[2] + T
        return top1

    def report(self, experts: Sequence[str]) -> dict[str, Any]:
        d = max(self.decisions, 1)

        def rows(table: Mapping[str, list[int]]) -> dict[str, dict[str, float | int]]:
            return {k: {"top1_match": v[0] / max(v[2], 1), "topk_match": v[1] / max(v[2], 1),
                        "decisions": v[2]} for k, v in sorted(table.items())}  # fmt: skip

        return {
            "top1_match": self.top1 / d,
            "topk_match": self.topk / d,
            "decisions": self.decisions,
            "vote_match": self.votes / max(self.chunks, 1),
            "chunks": self.chunks,
            "loss": self.nll / max(self.nll_tokens, 1),
            "tokens": self.nll_tokens,
            "top1_share": {e: int(c) / d for e, c in zip(experts, self.share, strict=True)},
            "by_depth": rows(self.by_depth),
            "by_module": rows(self.by_module),
            "by_layer": rows(self.by_layer),
        }


@torch.no_grad()
def _free_routing(
    model: nn.Module, own: int, chunks: Sequence[Tensor], E: int, experts: Sequence[str]
) -> dict[str, Any]:
    m = _Match(E)
    layers = list(persona_layers(model))
    st = state_of(model)
    st.record = True
    for ids in chunks:
        for _, layer in layers:
            layer.__dict__["pm_last"] = None
        s, n = _nll(model, ids)
        m.nll, m.nll_tokens = m.nll + s, m.nll_tokens + n
        picks = [p for name, layer in layers if (p := m.add_layer(name, layer, own)) is not None]
        if picks:
            counts = torch.bincount(torch.cat(picks), minlength=E)
            # Ties go to the lower index, as the routing's own ties do.
            m.votes += int(int(torch.argmax(counts)) == own)
            m.chunks += 1
    return m.report(experts)


def evaluate_routing(
    base: nn.Module,
    adapters: Mapping[str, str | Path],
    texts: Mapping[str, Sequence[Tensor]],
    *,
    calibration_chunks: Sequence[Tensor] | None = None,
    top_ks: Sequence[int] = (1, 2),
    calibrations: Sequence[str] = CALIBRATIONS,
    budget_s: float | None = None,
    out: str | Path | None = None,
    info: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the evaluation on ``base`` (a causal LM; a copy is injected, ``base`` is not changed).

    ``adapters``: ``name -> PEFT folder``; ``texts``: ``name -> token chunks [1, S]`` of held-out
    text per adapter (same names). ``calibration_chunks`` feed ``personamoe.calibrate`` for
    ``"data"`` (default: every text's chunks pooled, labels unused). Stops starting new units of
    work once ``budget_s`` seconds have passed (``complete`` is then false); with ``out`` the
    results are saved to ``out/results.json`` after every unit."""
    names = list(adapters)
    if set(texts) != set(names):
        raise ValueError(
            f"texts: expected one entry per adapter {sorted(names)}, got {sorted(texts)}"
        )
    for name in names:
        if not texts[name]:
            raise ValueError(
                f"texts[{name!r}]: expected at least one chunk of >= 2 tokens, got none"
            )
    E = len(names)
    ks = sorted({int(k) for k in top_ks})
    if not ks or any(k < 1 or k > E for k in ks):
        raise ValueError(
            f"top_ks: expected ints in 1..{E} (the number of adapters), got {list(top_ks)}"
        )
    for c in calibrations:
        if c not in CALIBRATIONS:
            raise ValueError(f"calibrations: expected values in {CALIBRATIONS}, got {c!r}")
    budget = _Budget(budget_s)
    out_dir = Path(out) if out is not None else None
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        **dict(info or {}),
        "adapters": {n: str(p) for n, p in adapters.items()},
        "texts": {
            n: {"chunks": len(texts[n]), "tokens": int(sum(c.shape[-1] for c in texts[n]))}
            for n in names
        },
        "top_ks": ks,
        "calibrations": list(calibrations),
        "chance_top1": 1.0 / E,
        "budget_s": budget_s,
        "complete": False,
        "elapsed_s": 0.0,
        "loss": {"base": {}, "oracle": {}, "uniform": {}},
        "routing": [],
        "skipped": [],
    }

    def save() -> None:
        results["elapsed_s"] = round(budget.elapsed(), 3)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")

    def unit(what: str) -> bool:
        if budget.left():
            return True
        results["skipped"].append(what)
        return False

    base.eval()
    for name in names:
        if unit(f"loss base {name}"):
            results["loss"]["base"][name] = _mean_loss(base, texts[name])
            save()
    model = inject(copy.deepcopy(base), dict(adapters), top_k=max(ks)).eval()
    experts = list(state_of(model).experts)
    _set_top_k(model, 1)
    for i, name in enumerate(names):
        if unit(f"loss oracle {name}"):
            with use_personas(model, Persona(f"oracle_{name}", allow=[name])):
                results["loss"]["oracle"][name] = _mean_loss(model, texts[name])
            save()
        del i
    uniform = Persona("uniform", weights={e: 1.0 / E for e in experts})
    for name in names:
        if unit(f"loss uniform {name}"):
            with use_personas(model, uniform):
                results["loss"]["uniform"][name] = _mean_loss(model, texts[name])
            save()
    calibrated = False
    for cal in calibrations:
        for k in ks:
            label = f"routing calibration={cal} top_k={k}"
            if not unit(label):
                continue
            if cal == "data" and not calibrated:
                pool = calibration_chunks or [c for n in names for c in texts[n]]
                _set_top_k(model, k)
                calibrate(model, pool)
                calibrated = True
                results["calibration_tokens"] = int(sum(c.shape[-1] for c in pool))
            set_routing(model, calibration=cal)
            _set_top_k(model, k)
            entry: dict[str, Any] = {"calibration": cal, "top_k": k, "adapters": {}}
            for name in names:
                entry["adapters"][name] = _free_routing(
                    model, experts.index(name), texts[name], E, experts
                )
            per = entry["adapters"].values()
            entry["mean_top1_match"] = sum(a["top1_match"] for a in per) / E
            entry["mean_topk_match"] = sum(a["topk_match"] for a in per) / E
            entry["mean_vote_match"] = sum(a["vote_match"] for a in per) / E
            entry["mean_loss"] = sum(a["loss"] for a in per) / E
            results["routing"].append(entry)
            log(f"  {label}: top-1 match {entry['mean_top1_match']:.3f}, loss "
                f"{entry['mean_loss']:.4f} ({budget.elapsed():.0f}s)")  # fmt: skip
            save()
    results["complete"] = not results["skipped"]
    save()
    return results


def print_table(results: Mapping[str, Any], log: Callable[[str], None] = print) -> None:
    """The results as a plain-text table: one row per configuration, per adapter top-1 / top-k /
    vote match and loss."""
    names = list(results["adapters"])
    log(f"chance top-1 match: {results['chance_top1']:.3f}")
    head = f"{'configuration':<24}" + "".join(f"{n[:22]:>24}" for n in names) + f"{'mean':>10}"
    log(head)
    log(f"{'':<24}" + "".join(f"{'top1/topk/vote  loss':>24}" for _ in names))
    for kind in ("base", "oracle", "uniform"):
        losses = results["loss"][kind]
        row = f"{kind:<24}" + "".join(
            f"{losses[n]:>24.4f}" if n in losses else f"{'-':>24}" for n in names
        )
        log(row)
    for e in results["routing"]:
        label = f"{e['calibration']} k={e['top_k']}"
        cells = []
        for n in names:
            a = e["adapters"][n]
            cells.append(f"{a['top1_match']:.2f}/{a['topk_match']:.2f}/{a['vote_match']:.2f} "
                         f"{a['loss']:7.4f}")  # fmt: skip
        log(f"{label:<24}" + "".join(f"{c:>24}" for c in cells) + f"{e['mean_top1_match']:>10.3f}")
    if results.get("skipped"):
        log(f"not run (time budget): {', '.join(results['skipped'])}")


def plot(results: Mapping[str, Any], path: Path) -> bool:
    """A PNG of top-1 match and loss per configuration; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results["adapters"])
    entries = results["routing"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(4 + 1.5 * len(entries), 4))
    width = 0.8 / max(len(names), 1)
    for j, n in enumerate(names):
        xs = [i + j * width for i in range(len(entries))]
        ax1.bar(xs, [e["adapters"][n]["top1_match"] for e in entries], width, label=n)
        ax2.bar(xs, [e["adapters"][n]["loss"] for e in entries], width, label=n)
    labels = [f"{e['calibration']}\nk={e['top_k']}" for e in entries]
    for ax in (ax1, ax2):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(entries))], labels)
    ax1.axhline(results["chance_top1"], color="gray", linestyle="--", label="chance")
    ax1.set_ylabel("top-1 match")
    ax2.set_ylabel("held-out NLL")
    for kind, style in (("oracle", ":"), ("base", "-.")):
        vals = list(results["loss"][kind].values())
        if vals:
            ax2.axhline(
                sum(vals) / len(vals), color="black", linestyle=style, label=f"{kind} (mean)"
            )
    shown = [e["adapters"][n]["loss"] for e in entries for n in names]
    shown += [v for kind in ("oracle", "base") for v in results["loss"][kind].values()]
    if shown:  # the differences, not the distance from zero
        lo, hi = min(shown), max(shown)
        pad = 0.1 * (hi - lo) + 1e-3
        ax2.set_ylim(lo - pad, hi + pad)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -- command line ------------------------------------------------------------------------------
def add_arguments(p: Any) -> None:
    """The ``python -m personamoe eval-routing`` options."""
    p.add_argument("--base", required=True, help="the base model: a transformers folder or name")
    p.add_argument("--gguf-file", default=None, help="a GGUF file of --base to load instead")
    p.add_argument("--adapter", action="append", required=True, metavar="NAME=PEFT_DIR",
                   help="one expert per PEFT LoRA adapter folder (repeat)")  # fmt: skip
    p.add_argument("--text", action="append", required=True, metavar="NAME=FILE_OR_FOLDER",
                   help="held-out text of each adapter's domain (repeat, same names)")  # fmt: skip
    p.add_argument("--calibration-text", default=None, metavar="FILE_OR_FOLDER",
                   help="text for calibration 'data' (default: the held-out texts, pooled)")  # fmt: skip
    p.add_argument("--top-k", default="1,2", help="comma-separated top-k values (default 1,2)")
    p.add_argument("--calibrations", default=",".join(CALIBRATIONS),
                   help=f"comma-separated, of {CALIBRATIONS}")  # fmt: skip
    p.add_argument("--chunk-tokens", type=int, default=128, help="tokens per chunk (default 128)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="at most this many tokens of each text (and of the calibration text)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=None, help="time budget in seconds")
    p.add_argument("--out", default="eval-routing", help="folder for results.json and the plot")


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{option}: expected comma-separated ints, got {text!r}") from None


def main(args: Any) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personamoe.integrations.checkpoint.cli import name_value_pairs
    from personamoe.integrations.text_data import read_texts, token_chunks

    adapters = name_value_pairs(args.adapter, "--adapter")
    text_paths = name_value_pairs(args.text, "--text", "PATH")
    if set(text_paths) != set(adapters):
        raise SystemExit(
            f"--text: expected one per --adapter name {sorted(adapters)}, got {sorted(text_paths)}"
        )
    ks = _ints(args.top_k, "--top-k")
    cals = [c.strip() for c in args.calibrations.split(",") if c.strip()]
    for c in cals:
        if c not in CALIBRATIONS:
            raise SystemExit(f"--calibrations: expected values in {CALIBRATIONS}, got {c!r}")
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(args.base, **extra)
    base = AutoModelForCausalLM.from_pretrained(args.base, **extra).eval()
    try:
        texts = {n: token_chunks(tok, read_texts(p, f"--text {n}"), args.chunk_tokens,
                                 max_tokens=args.max_tokens)
                 for n, p in text_paths.items()}  # fmt: skip
        calib = None
        if args.calibration_text is not None:
            calib = token_chunks(tok, read_texts(args.calibration_text, "--calibration-text"),
                                 args.chunk_tokens, max_tokens=args.max_tokens)  # fmt: skip
    except ValueError as e:
        raise SystemExit(str(e)) from None
    info = {"base": args.base, "gguf_file": args.gguf_file, "chunk_tokens": args.chunk_tokens,
            "max_tokens": args.max_tokens, "text_paths": text_paths,
            "calibration_text": args.calibration_text or "the held-out texts, pooled (labels unused)"}  # fmt: skip
    out = Path(args.out)
    results = evaluate_routing(base, adapters, texts, calibration_chunks=calib, top_ks=ks,
                               calibrations=cals, budget_s=args.budget_s, out=out, info=info)  # fmt: skip
    print_table(results)
    if plot(results, out / "routing.png"):
        print(f"wrote {out / 'results.json'} and {out / 'routing.png'}")
    else:
        print(f"wrote {out / 'results.json'} (no plot: matplotlib is not installed)")
    return 0
