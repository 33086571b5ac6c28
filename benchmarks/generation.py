"""Sampling throughput: alignkit's HFGenerator against plain `transformers` `model.generate`.

Both backends sample n completions for the same arithmetic chat prompts with the same model,
precision, temperature and prompt batches, in one run. Throughput counts only real generated
tokens: each completion up to and including its eos token (padding after eos is not counted).

    python benchmarks/generation.py --model /tmp/smol --prompts 8 --n 8 --max-new-tokens 32
    python benchmarks/generation.py --dtype bf16 --record     # appends a row to benchmarks/RESULTS.md
    python benchmarks/generation.py --device cuda --random-init --model DIR   # DIR: config + tokenizer only
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alignkit.data.records import user_prompt  # noqa: E402
from alignkit.rollout.base import SamplingParams, chat_prompts  # noqa: E402
from alignkit.rollout.hf import HFGenerator  # noqa: E402


def arithmetic_questions(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-")
        out.append(f"What is {a} {op} {b}? Think step by step, then give the answer.")
    return out


def load(spec: str, random_init: bool = False):
    """The model and tokenizer of `spec`; random_init: the model's architecture from its config
    with random weights (a GPU machine that cannot hold the weights' files still times it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if spec == "default":
        try:
            from alignkit.models.load import resolve_model_path
        except ImportError:
            sys.exit("alignkit.models.load.resolve_model_path is not available: pass --model PATH")
        path = resolve_model_path(spec)
    else:
        path = spec
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if random_init:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                                     attn_implementation="sdpa")
    model.eval()
    return path, model, tokenizer


def eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    extra = model.generation_config.eos_token_id
    ids.update([extra] if isinstance(extra, int) else (extra or []))
    return {i for i in ids if i is not None}


def run_transformers(model, tokenizer, prompts, args, autocast) -> int:
    """Plain `model.generate` with num_return_sequences=n; returns the real generated tokens."""
    tokenizer.padding_side = "left"
    stop = eos_ids(model, tokenizer)
    total = 0
    for start in range(0, len(prompts), args.batch_size):
        batch = tokenizer(prompts[start:start + args.batch_size], add_special_tokens=False,
                          return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad(), autocast():  # no_grad, as generate() itself: autocast caches bf16 weights
            out = model.generate(
                **batch, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                num_return_sequences=args.n, max_new_tokens=args.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop),
            )
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            ends = [i for i, t in enumerate(row) if t in stop]
            total += ends[0] + 1 if ends else len(row)
    return total


def run_alignkit(model, tokenizer, prompts, args) -> int:
    gen = HFGenerator(model, tokenizer, batch_size=args.batch_size,
                      dtype=torch.bfloat16 if args.dtype == "bf16" else None)
    params = SamplingParams(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            seed=args.seed)
    return sum(len(c.token_ids) for c in gen.generate(prompts, params))


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="HF model directory, or 'default'")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: both backends run under torch.autocast(bfloat16)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (n rows each), both backends")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--random-init", action="store_true",
                   help="the model's architecture with random weights (only config and tokenizer are read)")
    p.add_argument("--record", action="store_true", help="append a row to benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    path, model, tokenizer = load(args.model, args.random_init)
    device = torch.device(args.device)
    model.to(device)
    prompts = chat_prompts(tokenizer, [user_prompt(q) for q in arithmetic_questions(args.prompts, args.seed)])
    torch.manual_seed(args.seed)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()

    # warm-up (one-time allocations, autocast and kernel selection) for both, untimed
    warm = argparse.Namespace(**{**vars(args), "n": 2, "max_new_tokens": 4})
    run_transformers(model, tokenizer, prompts[:2], warm, autocast)
    run_alignkit(model, tokenizer, prompts[:2], warm)

    rows = []
    for name, fn in [("transformers generate", lambda: run_transformers(model, tokenizer, prompts, args, autocast)),
                     ("alignkit HFGenerator", lambda: run_alignkit(model, tokenizer, prompts, args))]:
        t0 = time.perf_counter()
        tokens = fn()  # counting the tokens copies them to the host: the GPU has finished
        seconds = time.perf_counter() - t0
        rows.append((name, tokens, seconds, tokens / seconds))

    peer_tps = rows[0][3]
    print(f"model {path}, {args.dtype}, {args.prompts} prompts x n={args.n}, max_new_tokens={args.max_new_tokens}, "
          f"temperature {args.temperature}, batch {args.batch_size} prompts; {machine(device)}")
    print(f"{'backend':<24}{'gen tokens':>12}{'seconds':>10}{'tokens/s':>11}{'speed-up':>10}")
    for name, tokens, seconds, tps in rows:
        print(f"{name:<24}{tokens:>12}{seconds:>10.2f}{tps:>11.1f}{tps / peer_tps:>9.2f}x")

    if args.record:
        results = ROOT / "benchmarks" / "RESULTS.md"
        command = "python benchmarks/generation.py " + " ".join(sys.argv[1:] if argv is None else argv)
        if not results.exists():
            results.write_text(
                "# Benchmark results\n\n"
                "| date | method | precision | setup | peer | peer figure | alignkit figure | speed-up | command | machine |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n")
        setup = (f"{Path(path).name}{' (random weights)' if args.random_init else ''}, {args.prompts} prompts x n={args.n}, max_new_tokens={args.max_new_tokens}, "
                 f"T={args.temperature}, batch {args.batch_size}")
        row = (f"| {datetime.date.today()} | generation | {args.dtype} | {setup} | transformers generate "
               f"| {peer_tps:.1f} tok/s | {rows[1][3]:.1f} tok/s | {rows[1][3] / peer_tps:.2f}x "
               f"| `{command}` | {machine(device)} |\n")
        with results.open("a") as f:
            f.write(row)
        print(f"recorded in {results}")


if __name__ == "__main__":
    main()
