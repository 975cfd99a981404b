"""``python -m personamoe demo``: the product end to end on the case-M model, in under a minute.

Builds the case-M Llama (random weights, seed 0) and eight random PEFT persona adapters, injects
them as one persona bank (top-2), registers three personas, and generates one batch in which every
row has its own persona. Then prints, per persona, which experts its tokens used, and tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

DEMO_NEW_TOKENS = 16
DEMO_PROMPT = 32


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--new-tokens", type=int, default=DEMO_NEW_TOKENS)
    p.add_argument("--tiny", action="store_true", help="a tiny model instead of case M (tests)")


def main(args: argparse.Namespace) -> int:
    import personamoe
    from personamoe.bench.model import TINY, M, build_base, make_adapters, prompt

    case = TINY if args.tiny else M
    case = dataclasses.replace(
        case, batch=4, new_tokens=args.new_tokens, prompt_len=min(case.prompt_len, DEMO_PROMPT)
    )
    t0 = time.perf_counter()
    print(f"building the case-{case.name} Llama (random weights) and {case.num_experts} adapters")
    base = build_base(case)
    with tempfile.TemporaryDirectory(prefix="personamoe-demo-") as tmp:
        dirs = make_adapters(case, base, Path(tmp))
        model = personamoe.inject(base, {k: str(v) for k, v in dirs.items()}, top_k=case.top_k)
    names = list(dirs)
    personas = [
        personamoe.Persona("counselor", allow=names[:4]),
        personamoe.Persona("critic", allow=names[4:], bias={names[7]: 0.5}),
        personamoe.Persona("storyteller", weights={names[1]: 0.6, names[6]: 0.4}),
    ]
    for p in personas:
        personamoe.add_persona(model, p)
    rows: list[str | None] = ["counselor", "critic", "storyteller", None]
    print(f"ready in {time.perf_counter() - t0:.1f} s; personas per row: {rows}")

    ids = prompt(case)
    mask = torch.ones_like(ids)
    with torch.inference_mode(), personamoe.use_personas(model, rows):
        t1 = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=case.new_tokens,
            min_new_tokens=case.new_tokens,
            do_sample=False,
        )
        seconds = time.perf_counter() - t1
        # One forward over the whole generated batch records the routing of every token.
        model(input_ids=out, attention_mask=torch.ones_like(out))
        stats = personamoe.routing_stats(model)
    generated = case.batch * case.new_tokens
    print(
        f"generated {generated} tokens in {seconds:.2f} s: {generated / seconds:.1f} tokens/s "
        f"(batch {case.batch}, {case.new_tokens} new tokens, backend {personamoe.get_backend()})"
    )
    print("\nexpert usage per persona (token-choices summed over all persona layers):")
    for row in rows:
        usage = stats.usage(row)
        total = sum(usage.values()) or 1
        shown = ", ".join(f"{e} {100 * c / total:.0f}%" for e, c in usage.items() if c)
        label = row if row is not None else "(none: free routing)"
        print(f"  {label:22s} {shown}")
    print(f"\nload-balancing loss summed over layers: {float(stats.loss):.4f}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0
