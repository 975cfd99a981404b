"""``python -m personamoe``: command-line entry point."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="personamoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the version and which backends are available here")
    from personamoe.bench import cli as bench_cli

    bench_cli.add_arguments(
        sub.add_parser("bench", help="benchmark every standard case against the baselines")
    )
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench_cli.main(args)
    if args.command == "info":
        import torch

        import personamoe

        print(f"personamoe {personamoe.__version__}, torch {torch.__version__}")
        for name, status in personamoe.available_backends().items():
            print(f"  {name:10s} {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
