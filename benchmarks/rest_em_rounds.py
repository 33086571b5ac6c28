"""A/B of ReST-EM's `e_step_round_size`: one E-step of the recipe (recipes/rest_em.yaml: its
training problems x N samples) from one policy, with the N samples drawn at once (size 0) and in rounds
(a problem with `cap_per_problem` correct answers is not sampled again), in one process and in
the order given (the machine's speed drifts by the hour). Prints seconds, samples drawn and
problems solved for each.

    python benchmarks/rest_em_rounds.py --model default --sizes 4,0
    python benchmarks/rest_em_rounds.py --model runs/rest_em/final --sizes 0,4,2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alignkit.algorithms.sampling.frame import SamplingRun  # noqa: E402
from alignkit.algorithms.sampling.rest_em import RestEMConfig, _correct, e_step  # noqa: E402
from alignkit.algorithms.sampling.stages import by_prompt  # noqa: E402
from alignkit.config import load_config  # noqa: E402
from benchmarks._common import machine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="the policy that samples")
    p.add_argument("--sizes", default="0,4", help="e_step_round_size values, run in this order")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "rest_em.yaml"))
    p.add_argument("--output-dir", default="/tmp/alignkit-rest-em-rounds")
    args = p.parse_args()
    for size in [int(r) for r in args.sizes.split(",")]:
        cfg = load_config(RestEMConfig, args.recipe, [f"model.path={args.model}", f"e_step_round_size={size}",
                                                      f"train.output_dir={args.output_dir}"])
        job = SamplingRun(cfg)
        start = time.perf_counter()
        samples, _ = e_step(job, job.task.verifier("binary"), seed=3, it=1)
        seconds = time.perf_counter() - start
        solved = len(by_prompt(_correct(samples, cfg)))
        print(f"e_step_round_size={size}: {seconds:6.1f} s  {len(samples)} samples  {solved} of "
              f"{len(job.task.train)} problems solved", flush=True)
    print(f"{machine(cfg.train.threads)}; policy {args.model}; {len(job.task.train)} problems x "
          f"{cfg.sampling.n} samples, {cfg.sampling.max_new_tokens} tokens, {cfg.train.precision}")


if __name__ == "__main__":
    main()
