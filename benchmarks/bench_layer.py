"""Ratio table for the layer cases L1/L16/L256 (DESIGN.md §3): medians of interleaved calls.

    python benchmarks/bench_layer.py                 # every case, every provider
    python benchmarks/bench_layer.py --cases L1 --rounds 400 --rotate-mib 256

Prints the machine, then per case the median time of each provider, its ratio to ``base`` (of the
medians, and "paired": the median of per-round ratios, steadier on a shared machine) and its
overhead over ``base``; and the two target figures: ``personamoe / base`` and personamoe's
overhead against the smallest overhead of ``naive``, ``dense`` and ``masked``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from personamoe.bench import layer as bl

DEFAULT_ROUNDS = {"L1": 400, "L16": 200, "L256": 40}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(bl.CASES), choices=list(bl.CASES))
    p.add_argument("--providers", nargs="+", default=list(bl.PROVIDERS), choices=list(bl.PROVIDERS))
    p.add_argument("--rounds", type=int, default=0, help="rounds per case (0: per-case default)")
    p.add_argument(
        "--rotate-mib", type=int, default=640,
        help="weight bytes to rotate through per case (default 640 MiB: above the 480 MiB L3 "
        "the dev machine reports, so weights come from DRAM as in a real model)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall-clock (default) or this process's CPU time (robust to other jobs on a shared "
        "machine; use with --threads 1)",
    )  # fmt: skip
    p.add_argument(
        "--base-in-kernel", action="store_true",
        help="instead: time the base GEMM x W^T through torch (BLAS) against the fused kernel's own "
        "micro-kernel (the measurement behind running the base in BLAS, see csrc/layer.h)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "base" not in args.providers:
        args.providers.insert(0, "base")
    print(f"machine: {bl.machine_info()}")
    print(f"command: python benchmarks/bench_layer.py {' '.join(argv or sys.argv[1:])}".rstrip())
    if args.base_in_kernel:
        return base_in_kernel(args)
    for name in args.cases:
        case = bl.CASES[name]
        n_sets = bl.sets_for_bytes(case, args.rotate_mib << 20)
        sets = bl.make_weight_sets(case, n_sets)
        rounds = args.rounds or DEFAULT_ROUNDS[name]
        samples = bl.measure(case, args.providers, sets, rounds=rounds, clock=args.clock)
        med = bl.medians(samples)
        # Paired: median over rounds of (provider / base) within the same round, which cancels
        # load that drifts slowly on a shared machine.
        paired = {
            q: statistics.median(a / b for a, b in zip(samples[q], samples["base"], strict=True))
            for q in args.providers
        }
        base = med["base"]
        print(
            f"\n{name}: T={case.tokens} d_in={case.d_in} d_out={case.d_out} E={case.experts} "
            f"r={case.rank} k={case.top_k} {str(case.dtype).replace('torch.', '')}; "
            f"{n_sets} weight sets ({n_sets * case.set_bytes() / 2**20:.0f} MiB), {rounds} rounds, "
            f"{args.clock} clock"
        )
        print(
            f"  {'provider':<11} {'median us':>10} {'/ base':>7} {'paired':>7} {'overhead us':>12}"
        )
        for prov in args.providers:
            print(f"  {prov:<11} {med[prov] * 1e6:10.1f} {med[prov] / base:7.3f} "
                  f"{paired[prov]:7.3f} {(med[prov] - base) * 1e6:12.1f}")  # fmt: skip
        others = [med[q] - base for q in ("naive", "dense", "masked") if q in med]
        if "personamoe" in med and others:
            ov = med["personamoe"] - base
            print(
                f"  personamoe/base = {med['personamoe'] / base:.3f}; overhead / smallest other "
                f"overhead = {ov / min(others):.3f}"
            )
    return 0


def base_in_kernel(args: argparse.Namespace) -> int:
    """Median of x W^T by torch.nn.functional.linear vs by the kernel's shrink micro-kernel."""
    import statistics
    import time

    from personamoe.backends.cpp_backend import _ext

    C = _ext()
    for name in args.cases:
        case = bl.CASES[name]
        sets = bl.make_weight_sets(case, bl.sets_for_bytes(case, args.rotate_mib << 20))
        x = bl.make_input(case)
        out = torch.empty(case.tokens, case.d_out)
        nt = torch.get_num_threads()
        times: dict[str, list[float]] = {"torch linear (BLAS)": [], "kernel micro-kernel": []}
        rounds = args.rounds or DEFAULT_ROUNDS[name]
        for i in range(rounds + 3):
            w = sets[i % len(sets)].weight
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            t1 = time.perf_counter()
            C.shrink_only(0, x.data_ptr(), case.d_in, w.data_ptr(), case.tokens, case.d_in,
                          case.d_out, out.data_ptr(), nt)  # fmt: skip
            t2 = time.perf_counter()
            if i >= 3:
                times["torch linear (BLAS)"].append(t1 - t0)
                times["kernel micro-kernel"].append(t2 - t1)
        print(f"\n{name}: x W^T, T={case.tokens}, {rounds} interleaved rounds")
        for k, v in times.items():
            print(f"  {k:<22} {statistics.median(v) * 1e6:10.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
