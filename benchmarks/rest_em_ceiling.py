"""The ReST-EM M-step's ceiling on the built-in arithmetic task: the recipe's M-step (from the
base model, its epochs, lr and early stopping) on a gold reply for EVERY training problem, as if
an E-step had solved them all. The reply has the form the policy learns to write ("a - b = c").
Prints the recipe's table (greedy held-out accuracy, pass@k, maj@k) and the accuracy by kind
of problem (additions, subtractions with a result >= 0 and < 0).

    python benchmarks/rest_em_ceiling.py                      # recipes/rest_em.yaml
    python benchmarks/rest_em_ceiling.py task.train=640
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alignkit.algorithms import rest_em  # noqa: E402
from alignkit.algorithms.sampling.problems import greedy_score  # noqa: E402
from alignkit.algorithms.sampling.stages import Sample  # noqa: E402
from alignkit.cli import main  # noqa: E402

KINDS = {"add": lambda a, op, b: op == "+", "a-b>=0": lambda a, op, b: op == "-" and a >= b,
         "a-b<0": lambda a, op, b: op == "-" and a < b}


def operands(question: str) -> tuple[int, str, int]:
    a, op, b = re.search(r"(\d+) ([+-]) (\d+)", question).groups()
    return int(a), op, int(b)


def gold_e_step(job, reward, seed, it):
    """Every training problem 'solved', with the reply 'a op b = answer'."""
    samples = []
    for i, prompt in enumerate(job.task.train):
        a, op, b = operands(prompt)
        samples.append(Sample(prompt, f"{a} {op} {b} = {job.task.answer_for(prompt)}", prompt_index=i, reward=1.0))
    return samples, samples


def by_kind(job) -> None:
    gen = job.generator(job.policy)
    for kind, test in KINDS.items():
        problems = [p for p in job.task.heldout if test(*operands(p))]
        acc = greedy_score(gen, job.tokenizer, job.task, problems, job.cfg.sampling.max_new_tokens)
        print(f"held-out {kind}: {round(acc * len(problems))}/{len(problems)}")


if __name__ == "__main__":
    rest_em.e_step = gold_e_step
    finish = rest_em.SamplingRun.finish

    def finish_and_split(job, policy, title, result):
        by_kind(job)
        return finish(job, policy, title, result)

    rest_em.SamplingRun.finish = finish_and_split
    sys.exit(main(["rest-em", "recipes/rest_em.yaml", "iterations=1", "metrics.baseline=false",
                   "train.output_dir=runs/rest_em_ceiling", *sys.argv[1:]]))
