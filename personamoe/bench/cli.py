"""``python -m personamoe bench``: every standard case, every provider, side by side in one run.

Prints a table (median and spread per provider, ratio against ``base``, tokens/s for the model
case), writes ``results.json`` (the machine and every sample) and ``results.png`` to ``--out``.
The table and ``results.json`` are rewritten after every case, so a run that is killed keeps the
cases it finished. Time budgets bound the run: each provider (``--provider-budget``) and the whole
run (``--time-budget``); what they cut short says so in the table's note column.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from personamoe.bench import layer as bl
from personamoe.bench.runner import (
    CLOCKS,
    Result,
    describe_machine,
    machine_info,
    paired_ratio,
    ratio_table,
)

LAYER_CASES = tuple(bl.CASES)
DEFAULT_CASES = (*LAYER_CASES, "M")
# The training step (personamoe/bench/train.py) runs only when named: --cases train.
ALL_CASES = (*DEFAULT_CASES, "train")
# Rounds per case: --quick keeps the default run under 3 minutes on a 2-core machine.
QUICK_ROUNDS = {"L1": 150, "L16": 80, "L256": 20, "M": 3, "train": 5}
FULL_ROUNDS = {"L1": 400, "L16": 200, "L256": 40, "M": 5, "train": 5}
QUICK_NEW_TOKENS = 8
# Time budgets in seconds (--provider-budget, --time-budget) by mode; inf: no limit. The quick
# default stays near a minute on a busy 2-core machine (X-LoRA in the model case dominated it).
QUICK_BUDGETS = (20.0, 75.0)
FULL_BUDGETS = (300.0, math.inf)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help=f"comma-separated cases from {','.join(ALL_CASES)} (default: {','.join(DEFAULT_CASES)}"
        f"; train is a training step, --quick runs it on a tiny model)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: float32 on CPU, bfloat16 on CUDA (docs/design.md §5)",
    )
    p.add_argument(
        "--providers",
        default=None,
        help="comma-separated providers (default: all of each case; base always runs)",
    )
    p.add_argument("--repeats", type=int, default=0, help="timed rounds per case (0: by mode)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="quick",
        action="store_true",
        default=True,
        help=f"(default) fewer rounds; model case generates {QUICK_NEW_TOKENS} tokens",
    )
    mode.add_argument(
        "--full",
        dest="quick",
        action="store_false",
        help="the full settings of docs/design.md §5 (model case: 32 new tokens)",
    )
    p.add_argument("--out", default="bench-results", help="folder for results.json and results.png")
    p.add_argument(
        "--rotate-mib",
        type=int,
        default=0,
        help="layer weight bytes rotated per case (0: 256 MiB quick, 640 MiB full)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument(
        "--provider-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"wall-clock seconds each provider may spend per case, warmup included; then it stops "
        f"with the rounds it has, or is skipped if one call takes longer (default: "
        f"{QUICK_BUDGETS[0]:g} quick, {FULL_BUDGETS[0]:g} full; 0: no limit)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"seconds for the whole run, shared out among the cases not yet run; cases left "
        f"when it is spent are skipped (default: {QUICK_BUDGETS[1]:g} quick, no limit full; "
        f"0: no limit)",
    )
    p.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall-clock (default) or the calling thread's CPU time, which leaves out time spent "
        "descheduled on a machine shared with other jobs (CPU only; use with --threads 1)",
    )


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _split(s: str | None) -> list[str] | None:
    return [p.strip() for p in s.split(",") if p.strip()] if s else None


def budgets(args: argparse.Namespace) -> tuple[float, float]:
    """(per-provider, whole-run) budgets in seconds from the options and the mode; inf: none."""
    default = QUICK_BUDGETS if args.quick else FULL_BUDGETS

    def pick(value: float | None, d: float, opt: str) -> float:
        if value is None:
            return d
        if value < 0 or math.isnan(value):
            raise SystemExit(f"{opt}: expected seconds >= 0, got {value}")
        return value or math.inf

    return (
        pick(args.provider_budget, default[0], "--provider-budget"),
        pick(args.time_budget, default[1], "--time-budget"),
    )


def run_layer_case(
    name: str,
    args: argparse.Namespace,
    dtype: torch.dtype,
    budget: float | None = None,
    deadline: float | None = None,
) -> list[Result]:
    import dataclasses

    case = dataclasses.replace(bl.CASES[name], dtype=dtype)
    wanted = _split(args.providers)
    providers = [p for p in bl.PROVIDERS if wanted is None or p in wanted or p == "base"]
    unknown = set(wanted or []) - set(bl.PROVIDERS) - {"peft_lora", "peft_mixed", "xlora"}
    if unknown:
        raise SystemExit(
            f"--providers: unknown {sorted(unknown)}; layer providers: {list(bl.PROVIDERS)}"
        )
    rotate = (args.rotate_mib or (256 if args.quick else 640)) << 20
    n_sets = bl.sets_for_bytes(case, rotate)
    _log(
        f"{name}: {n_sets} weight sets ({n_sets * case.set_bytes() >> 20} MiB rotated), "
        f"providers {', '.join(providers)}"
    )
    sets = bl.make_weight_sets(case, n_sets)
    if args.device == "cuda":
        sets = [bl.WeightSet(*(t.cuda() for t in dataclasses.astuple(w))) for w in sets]
    x = bl.make_input(case).to(args.device)
    rounds = args.repeats or (QUICK_ROUNDS if args.quick else FULL_ROUNDS)[name]
    results = bl.measure_results(
        case,
        providers,
        sets,
        rounds=rounds,
        x=x,
        clock=args.clock,
        budget=budget,
        deadline=deadline,
    )
    return list(results.values())


def run_model_case(
    args: argparse.Namespace,
    dtype: torch.dtype,
    budget: float | None = None,
    deadline: float | None = None,
) -> list[Result]:
    import dataclasses

    from personamoe.bench.model import MODEL_PROVIDERS, M, ModelBench

    case = dataclasses.replace(M, new_tokens=QUICK_NEW_TOKENS) if args.quick else M
    wanted = _split(args.providers)
    providers = [p for p in MODEL_PROVIDERS if wanted is None or p in wanted or p == "base"]
    _log(f"M: building the model (random weights) and {case.num_experts} PEFT adapters")
    bench = ModelBench(case, dtype=dtype, device=args.device)
    skipped = {p: why for p in providers if (why := bench.unavailable(p))}
    try:
        fns = {}
        for p in providers:
            if p in skipped:
                _log(f"M: {p} skipped: {skipped[p]}")
                continue
            _log(f"M: preparing {p}")
            fns[p] = bench.provider(p)
        rounds = args.repeats or (QUICK_ROUNDS if args.quick else FULL_ROUNDS)["M"]
        _log(
            f"M: batch {case.batch}, prompt {case.prompt_len}, {case.new_tokens} new tokens, "
            f"{rounds} rounds"
        )
        results = _time_whole_runs("M", bench, fns, rounds, args, budget, deadline)
    finally:
        bench.close()
    for p, why in skipped.items():
        results[p] = Result("M", p, note=f"skipped: {why}")
    return [results[p] for p in providers]


def run_train_case(
    args: argparse.Namespace,
    dtype: torch.dtype,
    budget: float | None = None,
    deadline: float | None = None,
) -> list[Result]:
    """The training step (personamoe/bench/train.py): forward, backward and AdamW step, timed
    interleaved with grad enabled; each provider's model and optimizer built before timing."""
    from personamoe.bench.train import TRAIN, TRAIN_PROVIDERS, TRAIN_TINY, TrainBench

    case = TRAIN_TINY if args.quick else TRAIN
    wanted = _split(args.providers)
    providers = [p for p in TRAIN_PROVIDERS if wanted is None or p in wanted]
    if not providers:
        raise SystemExit(f"--providers: the train case has {list(TRAIN_PROVIDERS)}")
    _log(
        f"train: {case.name} (hidden {case.hidden_size}, {case.num_hidden_layers} layers, random "
        f"weights), batch {case.batch} x {case.prompt_len} tokens"
    )
    bench = TrainBench(case, dtype=dtype, device=args.device)
    try:
        fns = {}
        for p in providers:
            _log(f"train: preparing {p}")
            fns[p] = bench.provider(p)
        rounds = args.repeats or (QUICK_ROUNDS if args.quick else FULL_ROUNDS)["train"]
        _log(f"train: {rounds} rounds of one optimizer step each")
        results = _time_whole_runs(
            "train", bench, fns, rounds, args, budget, deadline, inference=False
        )
    finally:
        bench.close()
    return list(results.values())


def _time_whole_runs(
    case: str,
    bench: Any,
    fns: dict[str, Any],
    rounds: int,
    args: argparse.Namespace,
    budget: float | None,
    deadline: float | None,
    *,
    inference: bool = True,
) -> dict[str, Result]:
    """The model and train cases' timing: one warm-up, ``rounds`` interleaved rounds, each result
    given the tokens of one call and the provider's note from ``bench``."""
    from personamoe.bench.runner import time_interleaved

    results = time_interleaved(
        case, fns, repeats=rounds, warmup=1, device=args.device, progress=_log,
        clock=args.clock, inference=inference, budget=budget, deadline=deadline,
    )  # fmt: skip
    for r in results.values():
        r.work = bench.tokens_per_call
        r.note = "; ".join(n for n in (r.note, bench.notes.get(r.provider, "")) if n)
    return results


def _ratio(rs: dict[str, Result], a: str, b: str) -> str:
    """``a / b`` of the medians and paired round by round, or ``""`` when either has no samples."""
    if a not in rs or b not in rs or not rs[a].samples or not rs[b].samples:
        return ""
    return (
        f"{a} / {b} = {rs[a].median / rs[b].median:.3f} (paired {paired_ratio(rs[a], rs[b]):.3f})"
    )


# The plain (adapter-free) providers: ratios count against the fastest of these (bl.fastest_base).
BASES = ("base", "base_onednn")


def target_lines(results: list[Result]) -> list[str]:
    """The figures that count (docs/design.md §5.4): personamoe / base (of the medians, and paired
    round by round), personamoe / the fastest base (``base`` or ``base_onednn``, when the latter
    ran), and its overhead against the smallest overhead of the other providers of the same case.
    The train case: personamoe / peft_lora and naive / personamoe."""
    out = []
    cases = dict.fromkeys(r.case for r in results)
    for case in cases:
        rs = {r.provider: r for r in results if r.case == case}
        if case == "train":
            parts = [_ratio(rs, "personamoe", "peft_lora"), _ratio(rs, "naive", "personamoe")]
            parts += [_ratio(rs, "xlora", "personamoe")]
            if any(parts):
                out.append(f"{case}: " + "; ".join(p for p in parts if p))
            continue
        if "base" not in rs or "personamoe" not in rs:
            continue
        if not rs["base"].samples or not rs["personamoe"].samples:
            continue
        base, pm = rs["base"].median, rs["personamoe"].median
        paired = paired_ratio(rs["personamoe"], rs["base"])
        others = {
            p: r.median - base
            for p, r in rs.items()
            if p not in (*BASES, "personamoe", "reference") and r.samples
        }
        line = f"{case}: personamoe / base = {pm / base:.3f} (paired {paired:.3f})"
        fastest = bl.fastest_base(rs)
        if fastest is not None and fastest != "base":
            line += f"; {_ratio(rs, 'personamoe', fastest)} (fastest base)"
        elif "base_onednn" in rs and rs["base_onednn"].samples:
            line += " (base is the fastest base)"
        if others:
            best = min(others, key=lambda p: others[p])
            line += (
                f"; overhead {(pm - base) * 1e3:.3f} ms vs smallest other {best} "
                f"{others[best] * 1e3:.3f} ms"
            )
        out.append(line)
    return out


def plot(results: list[Result], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        _log("matplotlib is not installed: no plot (pip install 'personamoe[bench]')")
        return False
    results = [r for r in results if r.samples]  # skipped providers and cases: table only
    if not results:
        return False
    cases = list(dict.fromkeys(r.case for r in results))
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.5), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        rs = [r for r in results if r.case == case]
        ref = "base" if any(r.provider == "base" for r in rs) else "peft_lora"  # train: no base
        base = next((r.median for r in rs if r.provider == ref), None)
        vals = [r.median / base if base else r.median for r in rs]
        colors = ["tab:green" if r.provider == "personamoe" else "tab:gray" for r in rs]
        bars = ax.bar([r.provider for r in rs], vals, color=colors)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in vals], fontsize=8)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_title(case)
        ax.set_ylabel(f"time / {ref} (median)" if base else "seconds (median)")
        if max(vals) > 4:  # X-LoRA in the model case: a log scale keeps the others readable
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(args: argparse.Namespace) -> int:
    cases = _split(args.cases) or list(DEFAULT_CASES)
    bad = [c for c in cases if c not in ALL_CASES]
    if bad:
        raise SystemExit(f"--cases: expected some of {','.join(ALL_CASES)}, got {','.join(bad)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch here")
    if args.device == "cuda" and args.clock == "cpu":
        raise SystemExit("--clock cpu: the CPU time of the calling thread misses GPU work")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    dtype = getattr(torch, dtype_name)
    info = machine_info()
    print(f"machine: {describe_machine(info)}")
    print(f"mode: {'quick' if args.quick else 'full'}, dtype {dtype_name}, device {args.device}")
    provider_budget, time_budget = budgets(args)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "machine": info,
        "mode": "quick" if args.quick else "full",
        "dtype": dtype_name,
        "device": args.device,
        "clock": args.clock,
        "command": " ".join(sys.argv),
        "provider_budget_s": provider_budget if math.isfinite(provider_budget) else None,
        "time_budget_s": time_budget if math.isfinite(time_budget) else None,
    }
    results: list[Result] = []
    rooflines = measure_rooflines(cases, args.device, dtype)
    if rooflines:
        payload["rooflines"] = rooflines
        for line in roofline_lines(rooflines):
            print(line)
    start = time.perf_counter()
    for i, c in enumerate(cases):
        left = time_budget - (time.perf_counter() - start)
        if left <= 0:
            _log(f"{c}: skipped, the run's time budget of {time_budget:g} s is spent")
            results.append(Result(c, "-", note=f"skipped: run time budget {time_budget:g} s spent"))
        else:
            # This case's share of what is left; time a case does not use rolls on to the next.
            deadline = time.perf_counter() + left / (len(cases) - i)
            budget = None if math.isinf(provider_budget) else provider_budget
            dl = None if math.isinf(deadline) else deadline
            if c == "M":
                results += run_model_case(args, dtype, budget, dl)
            elif c == "train":
                results += run_train_case(args, dtype, budget, dl)
            else:
                results += run_layer_case(c, args, dtype, budget, dl)
        payload.update(
            seconds=time.time() - t0,
            complete=i == len(cases) - 1,
            results=[r.as_dict() for r in results],
        )
        write_json(out / "results.json", payload)
        print()
        print(ratio_table(results), flush=True)
    print()
    for line in target_lines(results):
        print(line)
    for line in roofline_lines(rooflines, results):
        print(line)
    wrote_png = plot(results, out / "results.png")
    print(f"\nwrote {out / 'results.json'}" + (f" and {out / 'results.png'}" if wrote_png else ""))
    print(f"total {time.time() - t0:.0f} s")
    return 0


def measure_rooflines(
    cases: list[str], device: str, dtype: torch.dtype
) -> dict[str, dict[str, float]]:
    """Per layer case: the bytes it must move at least once (``bench.layer.roofline_bytes``), this
    machine's streaming bandwidth (a large copy, measured once now) and their quotient, the memory
    floor of one call. CPU only (the GPU check measures its own card's)."""
    import dataclasses

    layer_cases = [c for c in cases if c in bl.CASES]
    if device != "cpu" or not layer_cases:
        return {}
    bw = bl.stream_bandwidth()
    out = {}
    for c in layer_cases:
        n = bl.roofline_bytes(dataclasses.replace(bl.CASES[c], dtype=dtype))
        out[c] = {"bytes": float(n), "bandwidth_Bps": bw, "seconds": n / bw}
    return out


def roofline_lines(
    rooflines: dict[str, dict[str, float]], results: list[Result] | None = None
) -> list[str]:
    """One line per layer case: its memory floor, and personamoe's median against it."""
    lines = []
    for c, r in rooflines.items():
        line = (
            f"{c}: roofline {r['bytes'] / 2**20:.1f} MiB at {r['bandwidth_Bps'] / 1e9:.1f} GB/s "
            f"(measured copy) = {r['seconds'] * 1e3:.3f} ms"
        )
        pm = next(
            (x for x in results or [] if x.case == c and x.provider == "personamoe" and x.samples),
            None,
        )
        if pm is not None:
            line += f"; personamoe {pm.median * 1e3:.3f} ms = {pm.median / r['seconds']:.2f}x of it"
        lines.append(line)
    return lines


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``path`` atomically: a temporary file in the same folder, then ``os.replace``, so a
    run killed mid-write leaves the previous complete file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
