"""Train-stage step time of the sampling methods (ReST-EM's M-step), two features on and off:

- attention: shared-prefix rows run as a batch of segments (`models/segment_attention.py`)
  against SDPA with the dense [L, L] visibility mask;
- allocator: glibc malloc tuned (`engine/allocator.py`, what the CLI does) against its defaults.

The allocator is set when a process starts, so each allocator setting runs in its own child
process; inside a child the two attention paths alternate step blocks on the same model
(the machine's speed drifts, so only interleaved runs compare). Data: the recipe's reply format
("47 + 38 = 85") on the built-in arithmetic prompts, packed as the train stage packs them
(`data.packing.shared_prefix_rows`, recipes/rest_em.yaml's 512 tokens per row), bf16 autocast.

    python benchmarks/train_step.py --steps 5 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(args) -> dict:
    import torch

    import alignkit.models.segment_attention as segment_attention
    from alignkit.algorithms.sampling.stages import Sample, tokenize_samples
    from alignkit.algorithms.sft import sft_step
    from alignkit.data.packing import shared_prefix_rows
    from alignkit.engine.allocator import tune_malloc
    from alignkit.engine.config import TrainConfig
    from alignkit.engine.trainer import Engine
    from alignkit.models.load import ModelConfig, load_model
    from alignkit.tasks import RewardConfig, TaskConfig, build_task

    tuned = tune_malloc() if args.allocator == "tuned" else False
    torch.set_num_threads(args.threads)
    task = build_task(TaskConfig(train=args.problems, val=0, heldout=0), RewardConfig())
    samples = [Sample(p, f"{task.problems[p].question.removeprefix('What is ').rstrip('?')} = {task.answer_for(p)}", reward=1.0)
               for p in task.train]
    model, tok, _ = load_model(ModelConfig(path=args.model))
    rows = shared_prefix_rows(tokenize_samples(tok, samples, weighted=True), args.max_tokens)
    cfg = TrainConfig(output_dir=str(Path(args.workdir) / args.allocator), lr=5e-5, precision="bf16",
                      threads=args.threads, progress=False)
    engine = Engine(model, cfg, 10**6, None)
    step = sft_step(engine.model, weighted=True)
    pays = segment_attention.SegmentLayout.pays
    sides = {"segments": pays, "dense mask": property(lambda self: False)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    at = 0
    for _ in range(2):  # warm-up
        engine.train_step([rows[at % len(rows)]], step)
        at += 1
    for _ in range(args.repeats):
        for name, switch in sides.items():
            segment_attention.SegmentLayout.pays = switch
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.train_step([rows[at % len(rows)]], step)
                at += 1
            times[name].append((time.perf_counter() - start) / args.steps)
    tokens = statistics.mean(r["input_ids"].shape[1] for r in rows)
    return {"allocator": args.allocator, "applied": tuned, "times": times, "rows": len(rows), "tokens_per_row": tokens,
            "replies_per_row": len(samples) / len(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--problems", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per timed block")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/alignkit_train_step")
    p.add_argument("--allocator", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.allocator:
        print(json.dumps(child(args)), flush=True)
        return
    from benchmarks._common import machine

    results = []
    for allocator in ("default", "tuned"):
        env = {k: v for k, v in os.environ.items() if k != "ALIGNKIT_MALLOC"}
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--allocator", allocator], env=env,
                             check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    first = results[0]
    print(f"{machine(args.threads)}; {first['rows']} rows of {first['tokens_per_row']:.0f} tokens "
          f"({first['replies_per_row']:.1f} replies each), bf16 autocast, {args.steps} steps x {args.repeats} blocks per side")
    print("| allocator | attention | s/step (mean) | blocks |\n|---|---|---|---|")
    for r in results:
        name = "tuned (mallopt)" if r["applied"] else "glibc defaults"
        for side, ts in r["times"].items():
            print(f"| {name} | {side} | {statistics.mean(ts):.3f} | {', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()
