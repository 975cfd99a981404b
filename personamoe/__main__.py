"""``python -m personamoe``: command-line entry point."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from personamoe._import_path import prefer_installed_kernels

    prefer_installed_kernels()  # before anything imports transformers (run from a clone)
    parser = argparse.ArgumentParser(prog="personamoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the version and which backends are available here")
    from personamoe.bench import cli as bench_cli

    bench_cli.add_arguments(
        sub.add_parser("bench", help="benchmark every standard case against the baselines")
    )
    from personamoe.bench import demo

    demo.add_arguments(
        sub.add_parser("demo", help="three personas over eight adapters in one batched generate")
    )
    from personamoe.integrations.checkpoint import cli as export_cli

    export_cli.add_arguments(sub.add_parser("export", help=export_cli.CLI_HELP))
    from personamoe.integrations import eval_routing

    eval_routing.add_arguments(sub.add_parser("eval-routing", help=eval_routing.CLI_HELP))
    args = parser.parse_args(argv)
    if args.command == "export":
        return export_cli.main(args)
    if args.command == "eval-routing":
        return eval_routing.main(args)
    if args.command == "bench":
        return bench_cli.main(args)
    if args.command == "demo":
        return demo.main(args)
    if args.command == "info":
        import torch

        import personamoe

        print(f"personamoe {personamoe.__version__}, torch {torch.__version__}")
        for name, status in personamoe.available_backends().items():
            print(f"  {name:10s} {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
