"""fp32 against bf16 autocast on this machine: sampling (ReST-EM's E-step) and a train step.

Whether bf16 pays depends on the CPU: with AVX-512 BF16 or AMX it computes bf16 natively,
without them PyTorch converts in software. This prints both timings and what `precision: auto`
picks here (`alignkit/precision.py`). Sampling: the recipe's sampler on `--problems`
training problems x `--samples`, once with the first E-step's exemplars and once zero-shot.
Train step: forward, backward and AdamW on one row of the recipe's replies
(`data.packing.shared_prefix_rows`, 512 tokens), after one warm-up step.

    python benchmarks/precision.py --problems 96 --samples 8 --steps 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=96)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed train steps per precision")
    p.add_argument("--workdir", default="/tmp/alignkit-precision")
    args = p.parse_args()

    from alignkit.algorithms.sampling.frame import SamplingRun
    from alignkit.algorithms.sampling.rest_em import RestEMConfig
    from alignkit.algorithms.sampling.stages import Sample, tokenize_samples
    from alignkit.algorithms.sft import sft_step
    from alignkit.config import load_config
    from alignkit.data.packing import shared_prefix_rows
    from alignkit.engine.allocator import tune_malloc
    from alignkit.engine.config import TrainConfig
    from alignkit.engine.trainer import Engine
    from alignkit.models.load import ModelConfig, load_model
    from alignkit.precision import CPU_BF16_FLAGS, resolve_precision

    tune_malloc()
    cfg = load_config(RestEMConfig, str(ROOT / "recipes/rest_em.yaml"),
                      [f"task.train={args.problems}", f"train.output_dir={args.workdir}/run"])
    job = SamplingRun(cfg)
    reward, prompts = job.task.verifier("binary"), job.task.train
    out = {"auto": resolve_precision("auto"), "native_flags": CPU_BF16_FLAGS, "sampling_s": {}, "train_step_s": {}}
    for dtype in ("fp32", "bf16"):
        cfg.train.precision = dtype
        for iteration, name in ((1, "with exemplars"), (2, "zero-shot")):
            start = time.perf_counter()
            samples = job.sample(job.policy, prompts, reward, 3, truncated=0.0, iteration=iteration, n=args.samples)
            out["sampling_s"][f"{dtype}, {name}, {len(samples)} samples"] = round(time.perf_counter() - start, 1)
    task = job.task
    replies = [Sample(q, f"{task.problems[q].question.removeprefix('What is ').rstrip('?')} = {task.answer_for(q)}", reward=1.0)
               for q in task.train]
    model, tokenizer, _ = load_model(ModelConfig(path=cfg.model.path))
    rows = shared_prefix_rows(tokenize_samples(tokenizer, replies, weighted=True), 512)
    for dtype in ("fp32", "bf16"):
        engine = Engine(model, TrainConfig(output_dir=f"{args.workdir}/{dtype}", lr=5e-5, precision=dtype,
                                           threads=cfg.train.threads, progress=False), 10**6, None)
        step = sft_step(engine.model, weighted=True)
        engine.train_step([rows[0]], step)  # warm-up
        start = time.perf_counter()
        for i in range(args.steps):
            engine.train_step([rows[(i + 1) % len(rows)]], step)
        out["train_step_s"][dtype] = round((time.perf_counter() - start) / args.steps, 2)
    out["tokens_per_row"] = rows[0]["input_ids"].shape[1]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
