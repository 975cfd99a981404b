"""``python -m personamoe export``: the command line of :func:`personamoe.integrations.export.export`."""

from __future__ import annotations

from typing import Any

from personamoe.options import CALIBRATIONS, NORMALIZE_MODES

__all__ = ["CLI_HELP", "add_arguments", "main"]

CLI_HELP = "write a servable checkpoint (base weights + persona bank) for transformers and vLLM"


def add_arguments(p: Any) -> None:
    """The ``python -m personamoe export`` options."""
    p.add_argument("--base", required=True, help="the base model folder (transformers)")
    p.add_argument("--adapters", required=True, nargs="+", metavar="NAME=DIR",
                   help="one expert per PEFT LoRA adapter folder")  # fmt: skip
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--normalize", default="topk", choices=NORMALIZE_MODES)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--calibration", default="none", choices=CALIBRATIONS)
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="restrict the targets (names or suffixes, as in PEFT)")  # fmt: skip


def _adapter_folders(items: list[str]) -> dict[str, str]:
    """``NAME=DIR`` arguments as ``{name: folder}``; a malformed or repeated name exits."""
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--adapters: expected NAME=DIR, got {item!r}")
        if name in adapters:
            raise SystemExit(f"--adapters: the name {name!r} is given twice")
        adapters[name] = folder
    return adapters


def main(args: Any) -> int:
    from personamoe.integrations.checkpoint.writer import export

    adapters = _adapter_folders(args.adapters)
    out = export(args.base, adapters, args.out, top_k=args.top_k, normalize=args.normalize,
                 temperature=args.temperature, calibration=args.calibration,
                 target_modules=args.target_modules)  # fmt: skip
    print(f"wrote {out} ({len(adapters)} experts, top_k={args.top_k})")
    return 0
