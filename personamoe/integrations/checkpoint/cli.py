"""``python -m personamoe export``: the command line of :func:`personamoe.integrations.export.export`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from personamoe.options import CALIBRATIONS, NORMALIZE_MODES
from personamoe.personas import Persona

__all__ = ["CLI_HELP", "add_arguments", "main", "parse_persona"]

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
    p.add_argument("--calibration", default="none", choices=CALIBRATIONS,
                   help="'data' measures per-expert statistics on --calibration-text")  # fmt: skip
    p.add_argument("--calibration-text", default=None, metavar="FILE_OR_FOLDER",
                   help="text for --calibration data (a file, or a folder of text files)")  # fmt: skip
    p.add_argument("--calibration-tokens", type=int, default=None, metavar="N",
                   help="at most N calibration tokens (default: all)")  # fmt: skip
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="restrict the targets (names or suffixes, as in PEFT)")  # fmt: skip
    p.add_argument("--persona", action="append", default=[], metavar="SPEC",
                   help="a persona served by name (repeatable): NAME:allow=a,b | "
                        "NAME:bias=a=0.5,b=-1 | NAME:weights=a=0.7,b=0.3; allow and bias "
                        "combine with ';' (NAME:allow=a,b;bias=a=1)")  # fmt: skip


def name_value_pairs(items: Sequence[str], option: str, what: str = "DIR") -> dict[str, str]:
    """``NAME=VALUE`` arguments of ``option`` as ``{name: value}``; a malformed or repeated name
    exits naming the option (``what`` names the value in the message). Shared by the commands."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{option}: expected NAME={what}, got {item!r}")
        if name in out:
            raise SystemExit(f"{option}: the name {name!r} is given twice")
        out[name] = value
    return out


def _numbers(spec: str, key: str, value: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in value.split(","):
        name, sep, num = item.partition("=")
        try:
            out[name] = float(num)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise SystemExit(f"--persona {spec!r}: {key}: expected EXPERT=NUMBER,..., got {item!r}")
    return out


def parse_persona(spec: str) -> Persona:
    """One ``--persona`` argument as a :class:`~personamoe.Persona`; a malformed one exits naming
    the option and the part that is wrong (expert names are checked against the adapters later)."""
    name, sep, body = spec.partition(":")
    if not sep or not name or not body:
        raise SystemExit(f"--persona: expected NAME:allow=...|bias=...|weights=..., got {spec!r}")
    fields: dict[str, Any] = {}
    for part in body.split(";"):
        key, sep, value = part.partition("=")
        if key not in ("allow", "bias", "weights") or not sep or not value:
            raise SystemExit(
                f"--persona {spec!r}: expected allow=..., bias=... or weights=..., got {part!r}"
            )
        if key in fields:
            raise SystemExit(f"--persona {spec!r}: {key} is given twice")
        fields[key] = value.split(",") if key == "allow" else _numbers(spec, key, value)
    try:
        return Persona(name, **fields)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--persona {spec!r}: {e}") from None


def main(args: Any) -> int:
    from personamoe.integrations.checkpoint.writer import export

    adapters = name_value_pairs(args.adapters, "--adapters")
    personas = [parse_persona(s) for s in args.persona]
    batches = None
    if (args.calibration == "data") != (args.calibration_text is not None):
        raise SystemExit("--calibration-text: needed with --calibration data, and only then")
    if args.calibration_text is not None:
        from transformers import AutoTokenizer

        from personamoe.integrations.text_data import read_texts, token_chunks

        tok = AutoTokenizer.from_pretrained(args.base)
        batches = token_chunks(tok, read_texts(args.calibration_text, "--calibration-text"), 256)
    out = export(args.base, adapters, args.out, top_k=args.top_k, normalize=args.normalize,
                 temperature=args.temperature, calibration=args.calibration,
                 target_modules=args.target_modules, personas=personas,
                 calibration_batches=batches,
                 calibration_max_tokens=args.calibration_tokens)  # fmt: skip
    served = f", personas {', '.join(p.name for p in personas)}" if personas else ""
    print(f"wrote {out} ({len(adapters)} experts, top_k={args.top_k}{served})")
    return 0
