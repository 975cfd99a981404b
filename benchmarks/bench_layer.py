"""The measurement behind computing the base GEMM inside the C++ kernel at small T (csrc/layer.h,
``BASE_IN_KERNEL_MAX_TOKENS``): ``x W^T`` through torch (BLAS) against the kernel's own
micro-kernel, on the weights of the layer cases L1/L16/L256, interleaved, medians.

    python benchmarks/bench_layer.py --base-in-kernel --threads 1

The layer cases themselves (every provider, ratio table, results.json, results.png) are
``python -m personamoe bench``; this script only holds what that command does not measure. Both
use the same cases, weight sets, timing loop and machine description (``personamoe.bench``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from personamoe.bench import layer as bl
from personamoe.bench.runner import describe_machine, time_interleaved

DEFAULT_ROUNDS = {"L1": 400, "L16": 200, "L256": 40}
FP32_CODE = 0  # the dtype code shrink_only takes (csrc/bindings.cpp): the cases run in fp32


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(bl.CASES), choices=list(bl.CASES))
    p.add_argument("--rounds", type=int, default=0, help="rounds per case (0: per-case default)")
    p.add_argument(
        "--rotate-mib",
        type=int,
        default=640,
        help="weight bytes to rotate through per case (default 640 MiB: above the 480 MiB L3 "
        "the dev machine reports, so weights come from DRAM as in a real model)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument(
        "--base-in-kernel",
        action="store_true",
        help="the one measurement of this script (accepted so that the command quoted in "
        "csrc/layer.h and benchmarks/README.md keeps working)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {describe_machine()}")
    print(f"command: python benchmarks/bench_layer.py {' '.join(argv or sys.argv[1:])}".rstrip())
    for name in args.cases:
        base_in_kernel(name, args.rounds or DEFAULT_ROUNDS[name], args.rotate_mib << 20)
    return 0


def base_in_kernel(name: str, rounds: int, rotate_bytes: int) -> None:
    """Median of x W^T by torch.nn.functional.linear vs by the kernel's shrink micro-kernel."""
    from personamoe.backends.cpp_backend import _ext

    C = _ext()
    case = bl.CASES[name]
    if case.dtype != torch.float32:
        raise SystemExit(f"{name}: shrink_only is timed in fp32 here, the case is {case.dtype}")
    sets = bl.make_weight_sets(case, bl.sets_for_bytes(case, rotate_bytes))
    x = bl.make_input(case)
    out = torch.empty(case.tokens, case.d_out)
    threads = torch.get_num_threads()

    def rotating(offset: int, gemm: str) -> Callable[[], None]:
        calls = offset

        def call() -> None:
            nonlocal calls
            w = sets[calls % len(sets)].weight
            calls += 2  # as in bl.measure: never the weights the other one has just read
            if gemm == "blas":
                torch.nn.functional.linear(x, w)
            else:
                C.shrink_only(FP32_CODE, x.data_ptr(), case.d_in, w.data_ptr(), case.tokens,
                              case.d_in, case.d_out, out.data_ptr(), threads)  # fmt: skip

        return call

    fns: dict[str, Callable[[], object]] = {
        "torch linear (BLAS)": rotating(0, "blas"),
        "kernel micro-kernel": rotating(1, "kernel"),
    }
    results = time_interleaved(name, fns, repeats=rounds, warmup=3)
    print(f"\n{name}: x W^T, T={case.tokens}, {len(sets)} weight sets, {rounds} interleaved rounds")
    for label, r in results.items():
        print(f"  {label:<22} {r.median * 1e6:10.1f} us")


if __name__ == "__main__":
    sys.exit(main())
