"""Run vLLM (CPU build) on a checkpoint and write greedy generations as JSON.

    python tests_vllm/run_engine.py --model DIR --prompts '[[1,5,9],[1,8]]' --max-tokens 12 \
        --out out.json [--lora DIR] [--lora-rank 8] [--personas '["calm", null]'] \
        [--bad-persona NAME] [--max-num-batched-tokens 32]

Every prompt is generated without LoRA; with ``--lora`` every prompt is generated again with that
LoRA request, as a second batch; with ``--personas`` (one persona name or null per prompt) every
prompt is generated again naming its persona (``SamplingParams.extra_args``), all in one batch;
``--bad-persona`` records the error a request naming that persona gets. vLLM spawns processes,
hence a script.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--out", required=True)
    p.add_argument("--lora", default=None)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    p.add_argument("--personas", default=None, help="JSON list: a persona name or null per prompt")
    p.add_argument("--bad-persona", default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="chunked prefill")
    args = p.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    prompts = [list(map(int, x)) for x in json.loads(args.prompts)]
    t0 = time.perf_counter()
    kwargs = {}
    if args.lora:
        kwargs = {"enable_lora": True, "max_loras": 1, "max_lora_rank": args.lora_rank}
    if args.max_num_batched_tokens:
        kwargs.update(enable_chunked_prefill=True, max_num_seqs=8,
                      max_num_batched_tokens=args.max_num_batched_tokens)  # fmt: skip
    llm = LLM(model=args.model, enforce_eager=True, dtype="float32", gpu_memory_utilization=0.1,
              max_model_len=256, seed=0, tensor_parallel_size=args.tp, **kwargs)  # fmt: skip
    started = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    reqs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
    plain = [list(o.outputs[0].token_ids) for o in llm.generate(reqs, sp)]
    lora = None
    if args.lora:
        # A separate batch: in a batch mixing LoRA and no-LoRA requests, vLLM 0.32's CPU build also
        # applies the LoRA to (some decode steps of) the no-LoRA rows. Seen with the plugin
        # disabled (VLLM_PLUGINS="") and with prefix caching off, so it is vLLM's, not ours.
        req = LoRARequest("extra", 1, args.lora)
        lora = [list(o.outputs[0].token_ids) for o in llm.generate(reqs, sp, lora_request=req)]
    personas = None
    if args.personas:
        names = json.loads(args.personas)
        sps = [
            SamplingParams(
                temperature=0.0,
                max_tokens=args.max_tokens,
                ignore_eos=True,
                extra_args=None if n is None else {"persona": n},
            )
            for n in names
        ]
        reqs_p = [reqs[i % len(reqs)] for i in range(len(names))]  # prompts repeat
        personas = [list(o.outputs[0].token_ids) for o in llm.generate(reqs_p, sps)]
    bad = None
    if args.bad_persona:
        sp_bad = SamplingParams(max_tokens=2, extra_args={"persona": args.bad_persona})
        try:
            llm.generate(reqs[:1], sp_bad)
            bad = {"error": None}
        except Exception as e:  # what the user sees
            bad = {"error": f"{type(e).__name__}: {e}"}
        # The engine still serves after refusing it.
        bad["after"] = [list(o.outputs[0].token_ids) for o in llm.generate(reqs[:1], sp)]
    result = {"plain": plain, "lora": lora, "personas": personas, "bad": bad,
              "start_s": started}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
