"""What the sampling methods (RS, RAFT, RFT, ReST-EM, ReST) share around a task of the registry
(`alignkit.tasks`): their sampling defaults, few-shot exemplars, and evaluation (greedy accuracy
on tasks with answers, the greedy replies' mean reward on tasks without; pass@k and maj@k from
samples)."""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.algorithms.sampling.stages import collect, pass_maj_at_k, score
from alignkit.config import opt
from alignkit.rollout.base import Generator, SamplingConfig, SamplingParams
from alignkit.rollout.backends import make_generator
from alignkit.tasks import Task


@dataclass
class ShotsConfig:
    exemplars: list[list[str]] = opt(factory=list, help="few-shot exemplars, [question, reply] pairs: earlier chat turns "
                                                         "of the prompts sampled for training (never of evaluation or training prompts)")
    iterations: int = opt(1, "iterations whose sampling uses the exemplars: the first this many (1: only the "
                             "first, from the initial model; one-round methods count as iteration 1)")

    def __post_init__(self):
        for i, shot in enumerate(self.exemplars):
            if len(shot) != 2 or not all(isinstance(t, str) and t.strip() for t in shot):
                raise ValueError(f"shots.exemplars[{i}]: expected a [question, reply] pair of non-empty texts, got {shot!r}")
        if self.iterations < 0:
            raise ValueError(f"shots.iterations must be >= 0, got {self.iterations}")


def sampling_defaults(**changes) -> SamplingConfig:
    """The sampling methods' defaults: 8 samples per prompt, top-k 40 (the paper's), short
    replies (answers are short in the 'answer' style), 64 prompts decoded together."""
    return SamplingConfig(**{"n": 8, "top_k": 40, "max_new_tokens": 16, "batch_size": 64, **changes})


@dataclass
class MetricsConfig:
    eval_samples: int = opt(8, "samples per held-out problem for pass@k and maj@k (0 = skip)")
    ks: list[int] = opt(factory=lambda: [1, 4, 8], help="k values of pass@k and maj@k")
    train_problems: int = opt(128, "training problems scored greedily for train accuracy")
    baseline: bool = opt(True, "evaluate the base model first (iteration 0 of the table)")
    baseline_samples: bool = opt(False, "also sample the base model's held-out pass@k and maj@k (slow when it writes long replies)")


def greedy_score(generator, tokenizer, task: Task, prompts: list[str], max_new_tokens: int) -> float:
    """Greedy replies to `prompts` scored by the task's verifier (binary: the share answered
    correctly) or, for a task without answers, by its reward (the mean)."""
    if not prompts:
        return float("nan")
    samples = collect(generator, tokenizer, prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    reward = task.verifier() if task.has_answers else task.reward
    return sum(x.reward for x in score(samples, reward)) / len(samples)


def sampled_metrics(generator, tokenizer, task: Task, prompts: list[str], ks: list[int], params: SamplingParams) -> dict:
    """pass@k and maj@k for each k in ks from `params.n` samples per problem."""
    if not prompts:
        return {}
    samples = collect(generator, tokenizer, prompts, params)
    return pass_maj_at_k(samples, task.answer_for, [k for k in ks if k <= params.n])


def generator_for(model, tokenizer, s: SamplingConfig, precision: str) -> Generator:
    """The sampler's generator: batch_size prompts of n rows each, and as many rows per batch for
    any other n (greedy evaluation decodes batch_size * n prompts at once)."""
    return make_generator(model, tokenizer, s.batch_size, precision, s.backend, max_rows=s.batch_size * s.n)


def _samples_heldout(task: Task, m: MetricsConfig, base: bool) -> bool:
    return bool(task.has_answers and m.eval_samples and (m.baseline_samples or not base))


def eval_prompts(task: Task, m: MetricsConfig, base: bool = False, val: float | None = None) -> int:
    """How many prompts `iteration_row` decodes (greedy train, validation and held-out problems,
    then the held-out ones again for pass@k): the total of its progress."""
    greedy = len(task.train[: m.train_problems]) + len(task.heldout) + (len(task.val) if val is None else 0)
    return greedy + (len(task.heldout) if _samples_heldout(task, m, base) else 0)


def iteration_row(model, tokenizer, task: Task, s: SamplingConfig, m: MetricsConfig, precision: str, seed: int,
                  base: bool = False, val: float | None = None, progress=None) -> dict:
    """Greedy train / validation / held-out accuracy (`*_acc`; the mean reward `*_reward` for a
    task without answers) and held-out pass@k, maj@k of a policy (for the base model only with
    `m.baseline_samples`). `val`: the policy's validation score when already measured (by the
    train stage's early stopping). `progress`: called with the prompts of each decoded batch
    (the generator's hook; `eval_prompts` in all)."""
    gen = generator_for(model, tokenizer, s, precision)
    gen.progress = progress
    unit = "acc" if task.has_answers else "reward"
    if val is None:
        val = greedy_score(gen, tokenizer, task, task.val, s.max_new_tokens)
    row = {f"train_{unit}": greedy_score(gen, tokenizer, task, task.train[: m.train_problems], s.max_new_tokens),
           f"val_{unit}": val,
           f"heldout_{unit}": greedy_score(gen, tokenizer, task, task.heldout, s.max_new_tokens)}
    if _samples_heldout(task, m, base):
        row.update(sampled_metrics(gen, tokenizer, task, task.heldout, m.ks, s.params(seed + 777, n=m.eval_samples)))
    return row


def print_table(rows: list[dict], title: str) -> str:
    """A markdown table of the per-iteration rows (printed and returned)."""
    present = {k for r in rows for k in r}
    keys = [k for k in ("iteration", "temperature", "threshold", "kept", "sample_acc", "train_acc", "val_acc", "heldout_acc",
                        "train_reward", "val_reward", "heldout_reward") if k in present]
    keys += sorted((k for k in present if k.startswith(("pass@", "maj@"))), key=lambda k: (k[0] != "p", int(k.split("@")[1])))
    keys += ["minutes"]
    lines = [title, "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [r.get(k, "") for k in keys]
        lines.append("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text
