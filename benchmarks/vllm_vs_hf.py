"""Sampling throughput of the vLLM backend against alignkit's HFGenerator and plain `transformers`
`model.generate`, in one run, on the same model, prompts, n, temperature and precision.

Run it where vLLM is installed (`pip install alignkit[vllm]`, in its own venv: it pins its own
torch and transformers). Throughput counts real generated tokens (each completion up to and
including its eos); the vLLM engine's start and its first weight push are timed apart, not in
its tokens/s. On a CPU, vLLM keeps one core for its scheduler and binds its worker to the rest
(`VLLM_CPU_NUM_OF_RESERVED_CPU`, `VLLM_CPU_OMP_THREADS_BIND`); `--vllm-all-cores` gives the
worker every core.

    python benchmarks/vllm_vs_hf.py --prompts 16 --n 8 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation import ROOT, arithmetic_questions, load, machine, run_alignkit, run_transformers  # noqa: E402

sys.path.insert(0, str(ROOT))

from alignkit.data.records import user_prompt  # noqa: E402
from alignkit.rollout.base import SamplingParams, chat_prompts  # noqa: E402


def cpu_flags() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    return "flags unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="HF model directory, or 'default'")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (n rows each), every backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm-all-cores", action="store_true", help="no core kept for vLLM's scheduler (CPU)")
    args = p.parse_args(argv)
    if args.vllm_all_cores:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{os.cpu_count() - 1}"

    from alignkit.rollout.vllm import VLLMGenerator

    path, model, tokenizer = load(args.model)
    prompts = chat_prompts(tokenizer, [user_prompt(q) for q in arithmetic_questions(args.prompts, args.seed)])
    torch.manual_seed(args.seed)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()

    t0 = time.perf_counter()
    vllm = VLLMGenerator(model, tokenizer, args.batch_size, args.dtype)
    started = time.perf_counter() - t0
    t0 = time.perf_counter()
    vllm.load_weights(model)
    pushed = time.perf_counter() - t0
    params = SamplingParams(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)

    # warm-up (one-time allocations and kernel selection) for every backend, untimed
    warm = argparse.Namespace(**{**vars(args), "n": 2, "max_new_tokens": 4})
    run_transformers(model, tokenizer, prompts[:2], warm, autocast)
    run_alignkit(model, tokenizer, prompts[:2], warm)
    vllm.generate(prompts[:2], SamplingParams(n=2, temperature=args.temperature, max_new_tokens=4))

    rows = []
    for name, fn in [("transformers generate", lambda: run_transformers(model, tokenizer, prompts, args, autocast)),
                     ("alignkit HFGenerator", lambda: run_alignkit(model, tokenizer, prompts, args)),
                     ("alignkit VLLMGenerator", lambda: sum(len(c.token_ids) for c in vllm.generate(prompts, params)))]:
        t0 = time.perf_counter()
        tokens = fn()
        seconds = time.perf_counter() - t0
        rows.append((name, tokens, seconds, tokens / seconds))

    import vllm as vllm_package

    print(f"model {path}, {args.dtype}, {args.prompts} prompts x n={args.n}, max_new_tokens={args.max_new_tokens}, "
          f"temperature {args.temperature}, batch {args.batch_size} prompts; {machine(torch.device('cpu'))}; "
          f"CPU flags: {cpu_flags()}; vLLM {vllm_package.__version__}"
          f"{', worker on every core' if args.vllm_all_cores else ''}")
    print(f"vLLM engine start {started:.1f} s, weight push {pushed:.2f} s (not in its tokens/s)")
    print(f"{'backend':<24}{'gen tokens':>12}{'seconds':>10}{'tokens/s':>11}{'vs generate':>13}")
    for name, tokens, seconds, tps in rows:
        print(f"{name:<24}{tokens:>12}{seconds:>10.2f}{tps:>11.1f}{tps / rows[0][3]:>12.2f}x")


if __name__ == "__main__":
    main()
