"""Interleaved timing and machine facts, shared by every benchmark (layer and model cases).

Providers run interleaved (A B C, A B C, ...) so that drift on a noisy machine lands on all of them
alike; results are medians and ratios against ``base`` measured in the same run, never lone times.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Result:
    """Every sample of one provider in one case (seconds per call)."""

    case: str
    provider: str
    samples: list[float] = field(default_factory=list)
    note: str = ""
    work: float = 0.0  # tokens per call, for throughput (0 = not a throughput case)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> tuple[float, float]:
        """The 25th and 75th percentiles."""
        if len(self.samples) < 2:
            return self.median, self.median
        q = statistics.quantiles(self.samples, n=4)
        return q[0], q[2]

    def as_dict(self) -> dict[str, Any]:
        lo, hi = self.spread
        out = {
            "case": self.case,
            "provider": self.provider,
            "median_s": self.median,
            "p25_s": lo,
            "p75_s": hi,
            "samples_s": self.samples,
            "note": self.note,
        }
        if self.work:
            out["tokens_per_s"] = self.work / self.median
        return out


# What a sample measures: wall-clock time, or the CPU time of the calling thread, which leaves out
# the time it sat descheduled on a machine shared with other jobs (meaningful only when all the
# work runs on the calling thread: one torch thread, CPU device).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(
    case: str,
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    clock: str = "wall",
    inference: bool = True,
    budget: float | None = None,
    deadline: float | None = None,
) -> dict[str, Result]:
    """Time every provider ``repeats`` times, interleaved; ``warmup`` untimed rounds first.

    Sample ``i`` of every provider comes from round ``i``, so per-round ratios pair them
    (:func:`paired_ratio`). ``clock`` is a key of :data:`CLOCKS`. The calls run under
    ``torch.inference_mode``; ``inference=False`` leaves the caller's grad mode as it is (to time
    a backward pass).

    ``budget`` bounds the wall-clock seconds each provider may spend (warmup included): once its
    calls add up to more, it gets no further rounds and keeps the samples taken, with a note; a
    provider whose single call takes longer than ``budget`` before any timed sample is dropped
    (no samples, note ``skipped: one call took ...``). Every other provider gets at least one timed
    round. ``deadline`` (a :func:`time.perf_counter` value) stops every provider: no round starts
    after it (providers without samples then get a note instead).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock: expected one of {sorted(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    wall = time.perf_counter
    results = {name: Result(case, name) for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    active = dict.fromkeys(fns, True)  # still gets rounds
    limit = math.inf if budget is None else budget
    end = math.inf if deadline is None else deadline

    def drop_if_too_slow(name: str, took: float) -> None:
        if took > limit and not results[name].samples:
            active[name] = False
            results[name].note = f"skipped: one call took {took:.1f} s > budget {limit:g} s"

    with torch.inference_mode() if inference else contextlib.nullcontext():
        for _ in range(warmup):
            for name, fn in fns.items():
                if not active[name] or spent[name] > limit or wall() > end:
                    continue
                w0 = wall()
                fn()
                _sync(device)
                took = wall() - w0
                spent[name] += took
                drop_if_too_slow(name, took)
        _sync(device)
        for i in range(repeats):
            if wall() > end:
                for r in results.values():
                    if active[r.provider]:
                        r.note = r.note or (
                            f"run time budget ran out after {len(r.samples)}/{repeats} rounds"
                        )
                break
            # Rotate the start each round so no provider always runs right after the same one.
            names = list(fns)
            names = names[i % len(names) :] + names[: i % len(names)]
            ran = 0
            for name in names:
                r = results[name]
                if not active[name]:
                    continue
                if r.samples and spent[name] > limit:
                    active[name] = False
                    r.note = f"budget {limit:g} s ran out after {len(r.samples)}/{repeats} rounds"
                    continue
                _sync(device)
                w0 = wall()
                t0 = now()
                fns[name]()
                _sync(device)
                t1 = now()
                took = wall() - w0
                spent[name] += took
                drop_if_too_slow(name, took)
                if active[name]:
                    r.samples.append(t1 - t0)
                ran += 1
            if progress is not None:
                progress(f"{case}: round {i + 1}/{repeats}")
            if not ran:
                break
    return results


def paired_ratio(result: Result, base: Result) -> float:
    """Median over rounds of ``result / base`` within the same round: steadier than the ratio of
    medians on a shared machine, since load that drifts slowly cancels within a round.
    Pairs the rounds both have samples of (a provider stopped by its budget has the first ones);
    NaN when there are none."""
    pairs = [a / b for a, b in zip(result.samples, base.samples, strict=False)]
    return statistics.median(pairs) if pairs else float("nan")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, threads, library versions, GPU."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    for mod in ("triton", "transformers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # not installed, or fails to import here: report, don't fail
            info[mod] = None
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        from personamoe.backends.cpp_backend import active_isa

        info["cpp_isa"] = active_isa()
    except Exception as e:  # the extension may be missing on a broken install: report it
        info["cpp_isa"] = f"unavailable ({e})"
    return info


def describe_machine(info: dict[str, Any] | None = None) -> str:
    """:func:`machine_info` (measured now when not given) in one line, printed by every benchmark."""
    info = machine_info() if info is None else info
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (
        f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads, C++ path "
        f"{info['cpp_isa']}){gpu}; "
        f"torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}, "
        f"peft {info['peft']}, Python {info['python']}"
    )


def ratio_table(results: list[Result], base: str = "base") -> str:
    """A markdown table: median, spread, ratio to ``base`` and overhead over it, per case."""
    lines = [
        "| case | provider | median | p25-p75 | / base | overhead | tokens/s | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    by_case: dict[str, list[Result]] = {}
    for r in results:
        by_case.setdefault(r.case, []).append(r)
    for case, rs in by_case.items():
        b = next((r for r in rs if r.provider == base), None)
        has_base = b is not None and bool(b.samples)
        for r in rs:
            if not r.samples:  # skipped by a time budget: only the note
                lines.append(f"| {case} | {r.provider} | - | - | - | - | - | {r.note} |")
                continue
            lo, hi = r.spread
            ratio = f"{r.median / b.median:.3f}" if b and has_base else "-"
            over = f"{(r.median - b.median) * 1e3:+.3f} ms" if b and has_base else "-"
            tps = f"{r.work / r.median:,.1f}" if r.work else "-"
            lines.append(
                f"| {case} | {r.provider} | {_fmt(r.median)} | {_fmt(lo)}-{_fmt(hi)} | {ratio} "
                f"| {over} | {tps} | {r.note} |"
            )
    return "\n".join(lines)


def _fmt(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    return f"{seconds * 1e3:.3f} ms"
