"""A/B of the shared root in `HFGenerator`: the prefix every prompt of a batch shares (the chat
template's system prompt, the recipe's few-shot exemplars) kept once and added by the decoding
attention, against copied into every row (as before 2026-11-28), on ReST-EM's E-step shape
(recipes/rest_em.yaml's sampler: 8 samples per problem, 12 new tokens, bf16, 512 rows per batch)
from the base model, with the recipe's exemplars and without. One process, in the order given.

    python benchmarks/shared_root.py --problems 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alignkit.algorithms.rest_em import RestEMConfig  # noqa: E402
from alignkit.algorithms.sampling_run import SamplingRun  # noqa: E402
from alignkit.config import load_config  # noqa: E402
from alignkit.rollout import hf  # noqa: E402
from benchmarks._common import machine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=256, help="training problems sampled (8 samples each)")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "rest_em.yaml"))
    p.add_argument("--output-dir", default="/tmp/alignkit-shared-root")
    args = p.parse_args()
    cfg = load_config(RestEMConfig, args.recipe, [f"task.train_problems={args.problems}",
                                                  f"train.output_dir={args.output_dir}"])
    job = SamplingRun(cfg)
    reward, prompts, split = job.task.reward("binary"), job.task.prompts(job.task.train), hf._splits_root
    for shots in (len(cfg.sampler.shots), 0):
        job.cfg.sampler.shots = cfg.sampler.shots[:shots]
        for kept_once in (True, False):
            hf._splits_root = split if kept_once else (lambda model, cache: False)
            start = time.perf_counter()
            samples = job.sample(job.policy, prompts, reward, seed=3, iteration=1)
            seconds = time.perf_counter() - start
            print(f"{shots} exemplars, root {'kept once  ' if kept_once else 'in every row'}: {seconds:6.1f} s  "
                  f"sample accuracy {sum(x.reward for x in samples) / len(samples):.3f}", flush=True)
    hf._splits_root = split
    print(f"{machine(cfg.train.threads)}; base model; {len(prompts)} problems x {cfg.sampler.samples_per_problem} "
          f"samples, {cfg.sampler.max_new_tokens} tokens, {cfg.sampler.dtype}")


if __name__ == "__main__":
    main()
