"""A/B of one generator feature, on and off, in one process, interleaved (the machine's speed
drifts by the hour, so only interleaved runs compare):

- decode-attention: single-query decoding attention against transformers' SDPA;
- shared-root: the prompt prefix common to a batch prefilled once, against once per prompt;
- root-kept-once: that prefix's keys/values kept once for the batch, against copied into
  every row (with `--shots K`, the first K few-shot exemplars of recipes/rest_em.yaml lengthen it);
- shared-prefixes: the samples of a prompt that have drawn the same tokens so far decoded as one
  row, against every sample in its own row (the same samples either way);
- packed-linears: in fp32, the linears through oneDNN on reordered weights, against F.linear (MKL).

The process tunes glibc malloc as the CLI does (`engine/allocator.py`). Default shape: a ReST-EM
E-step (built-in arithmetic prompts, answer only, 8 samples each, 12 new tokens, T=0.7, top-k 40,
bf16, 64 prompts per batch); `--n 1 --temperature 0` with `--max-rows 512` is its greedy evaluation.

    python benchmarks/generator_ab.py --feature decode-attention --problems 128 --repeats 4
    python benchmarks/generator_ab.py --feature shared-root --problems 128 --repeats 4
    python benchmarks/generator_ab.py --feature shared-root --problems 512 --n 1 --temperature 0 --max-rows 512
    python benchmarks/generator_ab.py --feature root-kept-once --problems 256 --shots 4 --repeats 2
    python benchmarks/generator_ab.py --feature shared-prefixes --problems 128 --n 16 --shots 4 --temperature 1 --dtype fp32 --repeats 2
    python benchmarks/generator_ab.py --feature packed-linears --problems 128 --n 16 --shots 4 --temperature 1 --dtype fp32 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import alignkit.rollout.hf as hf  # noqa: E402
from alignkit.algorithms.sampling.rest_em import RestEMConfig  # noqa: E402
from alignkit.config import load_config  # noqa: E402
from alignkit.data.records import user_prompt  # noqa: E402
from alignkit.engine.allocator import tune_malloc  # noqa: E402
from alignkit.models.load import ModelConfig, load_model  # noqa: E402
from alignkit.rollout.base import SamplingParams, chat_prompts  # noqa: E402
from alignkit.tasks import RewardConfig, TaskConfig, build_task  # noqa: E402
from benchmarks._common import machine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--problems", type=int, default=128)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64, help="prompts per batch")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--feature", choices=["decode-attention", "shared-root", "root-kept-once", "shared-prefixes", "packed-linears"],
                   default="decode-attention")
    p.add_argument("--shots", type=int, default=0, help="few-shot exemplars (recipes/rest_em.yaml's) before each prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-rows", type=int, default=None, help="rows per batch (HFGenerator max_rows)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_malloc()
    model, tok, _ = load_model(ModelConfig(path=args.model), train=False)
    task = build_task(TaskConfig(train=args.problems, val=0, heldout=0), RewardConfig())
    shots = task.shot_turns(load_config(RestEMConfig, str(ROOT / "recipes" / "rest_em.yaml")).shots.exemplars[:args.shots])
    prompts = chat_prompts(tok, [user_prompt(q, None, shots) for q in task.train])
    params = SamplingParams(n=args.n, temperature=args.temperature, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, seed=0)
    options = {}  # HFGenerator keyword arguments of the side that runs
    if args.feature == "decode-attention":
        on, off = hf.decode_attention, (lambda m: contextlib.nullcontext())
        sides = {"single-query attention": lambda: setattr(hf, "decode_attention", on),
                 "transformers SDPA": lambda: setattr(hf, "decode_attention", off)}
    elif args.feature == "shared-prefixes":
        sides = {"shared prefixes, one row": lambda: options.update(share_prefixes=True),
                 "every sample its own row": lambda: options.update(share_prefixes=False)}
    elif args.feature == "packed-linears":
        sides = {"oneDNN, reordered weights": lambda: options.update(pack_linears=True),
                 "F.linear (MKL)": lambda: options.update(pack_linears=False)}
    elif args.feature == "root-kept-once":
        split = hf._splits_root
        sides = {"root kept once": lambda: setattr(hf, "_splits_root", split),
                 "root copied to every row": lambda: setattr(hf, "_splits_root", lambda model, cache: False)}
    else:
        root = hf.MIN_SHARED_ROOT
        sides = {"shared root prefilled once": lambda: setattr(hf, "MIN_SHARED_ROOT", root),
                 "every prompt prefilled whole": lambda: setattr(hf, "MIN_SHARED_ROOT", 10**9)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, switch in sides.items():
            switch()
            gen = hf.HFGenerator(model, tok, args.batch_size, args.dtype, max_rows=args.max_rows, **options)
            start = time.perf_counter()
            out = gen.generate(prompts, params)
            times[name].append(time.perf_counter() - start)
            print(f"{name:28s} {times[name][-1]:7.2f} s  {sum(len(c.token_ids) for c in out)} tokens", flush=True)
    print(f"{machine(args.threads)}; {args.problems} prompts x n={args.n}, {args.max_new_tokens} tokens, "
          f"{args.shots} exemplars, T={args.temperature}, top-k {args.top_k}, {args.dtype}, "
          f"{args.max_rows or args.batch_size * args.n} rows per batch")
    for name, ts in times.items():
        print(f"{name:28s} mean {statistics.mean(ts):.2f} s  runs {[round(t, 2) for t in ts]}")


if __name__ == "__main__":
    main()
