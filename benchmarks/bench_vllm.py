"""vLLM throughput with the personamoe plugin against vLLM without adapters and vLLM with one LoRA.

Run in the vLLM venv (``.venv-vllm``, see ``.ci/run``)::

    python benchmarks/bench_vllm.py [--shape wide|narrow] [--layers N] [--new-tokens 64] [--repeats 3]

One invocation builds a random Llama of the standard model case M's shape (``--shape wide``,
docs/design.md §5: hidden 1024, intermediate 2816, 16 heads, 4 KV heads, vocab 32000; ``--layers``
of them, default 4, 8 in case M) or a narrow, deep one where the linear layers dominate
(``--shape narrow``: hidden 576, intermediate 1536, 9 heads, 3 KV heads, vocab 49152, default 30
layers: the shape of a 135M-parameter chat model),
eight random persona adapters (r=16, all seven projections) exported with top_k=2 and eight
personas (:data:`PERSONAS`: allowed sets, biases and two fixed mixtures), and one random LoRA of
the same rank. Each provider then runs in its own vLLM engine (a subprocess; vLLM's CPU build,
fp32, eager): a warm-up, then ``--repeats`` timed batches of 8 requests (prompt 64 tokens,
``--new-tokens`` greedy tokens each, EOS ignored); ``--rounds`` alternate the providers' engines.
The plugin runs three times: every request routing freely; each of the 8 requests naming a
different persona (``SamplingParams.extra_args={"persona": ...}``; two are fixed mixtures, which
cost a second pass of the mixture over the batch); and the 8 requests naming only the six routing
personas.
Reported: the machine (the description every benchmark prints, ``personamoe.bench.runner``),
median tokens/s over all timed batches and the ratios to the no-adapter engine (and, for the
personas, to free routing). ``--save FILE`` writes the results as JSON after every engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 8
PROMPT = 64


# (hidden, intermediate, heads, kv heads, vocab, default layers)
SHAPES = {"wide": (1024, 2816, 16, 4, 32000, 4), "narrow": (576, 1536, 9, 3, 49152, 30)}


def personas() -> list[object]:
    """One persona per request of the batch: four allowed sets, two biases, two fixed mixtures."""
    from personamoe import Persona

    out: list[object] = []
    for i in range(4):
        out.append(Persona(f"allow{i}", allow=[f"p{i}", f"p{i + 4}", f"p{(i + 1) % 8}"]))
    for i in range(4, 6):
        out.append(Persona(f"bias{i}", bias={f"p{i}": 1.0, f"p{i - 4}": 0.5}))
    for i in range(6, 8):
        out.append(Persona(f"fixed{i}", weights={f"p{i}": 0.6, f"p{i - 6}": 0.4}))
    return out


PERSONAS = [p.name for p in personas()]  # type: ignore[attr-defined]
ROUTING = [n for n in PERSONAS if not n.startswith("fixed")]


def build(root: Path, layers: int, shape: str = "wide") -> dict[str, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from personamoe.adapters import write_adapter
    from personamoe.integrations.export import export

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests_vllm"))
    import tiny  # the locally built tokenizer (no downloads)

    torch.manual_seed(0)
    d, f, heads, kv_heads, vocab, _ = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2)  # fmt: skip
    base = root / "base"
    LlamaForCausalLM(cfg).save_pretrained(str(base), safe_serialization=True)
    tiny.build_tokenizer(base)
    kv = kv_heads * (d // heads)
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}  # fmt: skip
    g = torch.Generator().manual_seed(1)

    def adapter(path: Path) -> Path:
        modules = {}
        for i in range(layers):
            for m, (d_in, d_out) in shapes.items():
                part = "self_attn" if m in tiny.ATTN else "mlp"
                a = torch.randn(16, d_in, generator=g) / d_in**0.5
                b = torch.randn(d_out, 16, generator=g) * 0.02
                modules[f"model.layers.{i}.{part}.{m}"] = (a, b, 2.0)
        return write_adapter(path, modules, base_model_name_or_path=str(base))

    experts = {f"p{e}": adapter(root / "adapters" / f"p{e}") for e in range(8)}
    lora = adapter(root / "lora")
    out = export(base, experts, root / "export", top_k=2, personas=personas())  # type: ignore[arg-type]
    return {"base": base, "lora": lora, "export": out}


def worker(
    model: str, lora: str | None, new_tokens: int, repeats: int, with_personas: str = ""
) -> dict[str, object]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    kwargs: dict[str, object] = {}
    if lora:
        kwargs = {"enable_lora": True, "max_loras": 1, "max_lora_rank": 16}
    # On CPU this is the share of RAM vLLM reserves (weights + KV cache); 0.1 is too little here.
    llm = LLM(model=model, enforce_eager=True, dtype="float32", gpu_memory_utilization=0.3,
              max_model_len=512, seed=0, enable_prefix_caching=False, **kwargs)  # fmt: skip
    sp: object = SamplingParams(
        temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False
    )
    if with_personas:  # "all": request i names persona i; "routing": the routing ones only
        names = PERSONAS[:BATCH] if with_personas == "all" else (ROUTING * BATCH)[:BATCH]
        sp = [
            SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                           detokenize=False, extra_args={"persona": name})
            for name in names
        ]  # fmt: skip
    prompts = [TokensPrompt(prompt_token_ids=[1] + [3 + (7 * i + 5 * j) % 120 for j in range(PROMPT - 1)])
               for i in range(BATCH)]  # fmt: skip
    req = LoRARequest("lora", 1, lora) if lora else None
    llm.generate(prompts, sp, lora_request=req, use_tqdm=False)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, lora_request=req, use_tqdm=False)
        dt = time.perf_counter() - t0
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
    return {"tokens_per_s": rates}


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="wide", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's default)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="engine starts per provider, alternating")
    p.add_argument("--out", default=None, help="keep the built checkpoints here (default: temp)")
    p.add_argument("--save", default=None, help="write the results as JSON here as they come")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "LORA"), help=argparse.SUPPRESS)
    p.add_argument("--with-personas", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        model, lora = args.worker
        res = worker(model, lora if lora != "-" else None, args.new_tokens, args.repeats,
                     args.with_personas)  # fmt: skip
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    from personamoe.bench.runner import describe_machine

    print(f"machine: {describe_machine()}", flush=True)
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    root = Path(args.out or tmp.name)  # type: ignore[union-attr]
    root.mkdir(parents=True, exist_ok=True)
    layers = args.layers or SHAPES[args.shape][5]
    print(f"shape {args.shape}, {layers} layers", flush=True)
    paths = build(root, layers, args.shape)
    free, mixed = "vllm + personamoe (E=8, r=16, k=2)", "vllm + personamoe, a persona per request"
    routed = "  ... routing personas only (6 of 8)"
    runs = {
        "vllm (no adapters)": (paths["base"], None, ""),
        "vllm + 1 LoRA": (paths["base"], paths["lora"], ""),
        free: (paths["export"], None, ""),
        mixed: (paths["export"], None, "all"),
        routed: (paths["export"], None, "routing"),
    }
    all_rates: dict[str, list[float]] = {name: [] for name in runs}
    for rnd in range(args.rounds):  # providers alternate, so that drift hits them alike
        for name, (model, lora, named) in runs.items():
            cmd = [sys.executable, __file__, "--worker", str(model), str(lora or "-"),
                   "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                   *(["--with-personas", named] if named else [])]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
            if proc.returncode != 0:
                print(proc.stderr[-6000:], file=sys.stderr)
                raise SystemExit(f"{name}: the vLLM engine failed (exit {proc.returncode})")
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
            rates = json.loads(line[len("RESULT ") :])["tokens_per_s"]
            all_rates[name] += rates
            shown = ", ".join(f"{r:.1f}" for r in rates)
            print(f"round {rnd}: {name:40s} {shown} tokens/s", flush=True)
            if args.save:
                Path(args.save).write_text(json.dumps(
                    {"machine": describe_machine(), "shape": args.shape, "layers": layers,
                     "new_tokens": args.new_tokens, "tokens_per_s": all_rates}, indent=1))  # fmt: skip
    results = {name: statistics.median(r) for name, r in all_rates.items()}
    print()
    for name, rate in results.items():
        print(f"{name:40s} {rate:8.1f} tokens/s (median of {len(all_rates[name])})")
    floor = results["vllm (no adapters)"]
    print(
        f"\nbatch {BATCH} requests, prompt {PROMPT}, {args.new_tokens} new tokens, {layers} layers ({args.shape})"
    )
    for name, rate in results.items():
        print(f"{name:40s} {rate / floor:6.3f} x the no-adapter throughput")
    for name in (mixed, routed):
        print(f"{name:40s} {results[name] / results[free]:6.3f} x free routing")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
