"""ReST-EM (Singh et al. 2023, "Beyond Human Data"): expectation-maximisation self-training.

Iteration i:
  E-step  sample N responses per training problem from the current policy, score them with a
          binary verifier reward, keep the correct ones (at most `cap_per_problem` per problem;
          identical responses once when `dedupe`). With `e_step_round_size` the N samples come in
          rounds, and a problem that has its cap of correct responses is not sampled again;
          `e_step_samples` sets N by iteration.
  M-step  fine-tune the BASE model (not the previous iterate) on J = E[r(x,y) log p(y|x)], the
          reward-weighted NLL, until the validation reward stops improving (best epoch kept).
Each iteration writes its samples (`samples-iter-<i>.jsonl`) and the kept ones
(`kept-iter-<i>.jsonl`), logs greedy train / held-out accuracy, pass@k (unbiased) and maj@k to
`metrics.jsonl` and prints a table. Iterations stop early when validation accuracy falls.

`alignkit rest` (ReST, Gulcehre et al. 2023: Grow, then Improve steps at rising thresholds) is
in `rest.py`; both run in a `SamplingRun` (`frame.py`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from alignkit.algorithms.sampling.problems import MetricsConfig, ShotsConfig, greedy_score, sampling_defaults
from alignkit.algorithms.sampling.frame import SamplingRun
from alignkit.algorithms.sampling.stages import (
    Sample,
    above_threshold,
    by_prompt,
    cap_per_prompt,
    dedupe,
    pass_maj_at_k,
    write_samples,
)
from alignkit.algorithms.sampling.train_stage import PACKINGS
from alignkit.config import at_least, one_of, opt
from alignkit.engine.config import SamplingTrainConfig
from alignkit.models.load import ModelConfig, load_model
from alignkit.rollout.base import SamplingConfig
from alignkit.tasks import TaskConfig

log = logging.getLogger("alignkit")


@dataclass
class RestEMConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the base model (every M-step starts from it)")
    train: SamplingTrainConfig = opt(factory=lambda: SamplingTrainConfig(output_dir="runs/rest_em", lr=2e-5, epochs=2.0),
                                     help="M-step training (epochs = most epochs; early stopping on validation)")
    task: TaskConfig = opt(factory=TaskConfig, help="problems (with answers: the verifier is the E-step's reward)")
    sampling: SamplingConfig = opt(factory=sampling_defaults, help="E-step sampling")
    shots: ShotsConfig = opt(factory=ShotsConfig, help="few-shot exemplars before the prompts of the first iterations' sampling")
    metrics: MetricsConfig = opt(factory=MetricsConfig, help="per-iteration evaluation")
    iterations: int = opt(2, "EM iterations")
    cap_per_problem: int = opt(10, "most correct responses kept per problem")
    e_step_round_size: int = opt(0, "draw the N samples of a problem in rounds of this many (0: all at once); "
                                    "a problem with cap_per_problem correct responses already is not sampled again")
    e_step_samples: list[int] = opt(factory=list, help="N of each iteration's E-step, the last one repeating (e.g. "
                                    "[8, 16]); empty: sampling.n in every iteration")
    dedupe: bool = opt(True, "keep identical correct responses once")
    patience: int = opt(1, "M-step epochs without validation improvement before stopping")
    stop_when_worse: bool = opt(True, "stop iterating when validation accuracy falls")
    packing: str = opt("prefix", "prefix (rows share the prompt prefix: cheapest), pack (padding-free) or pad")
    max_length: int = opt(256, "tokens per training example")

    def __post_init__(self):
        at_least(self, 1, "iterations", "cap_per_problem", "patience", "max_length")
        if self.e_step_round_size < 0:
            raise ValueError(f"e_step_round_size must be >= 0 (0: all N samples in one round), got {self.e_step_round_size}")
        for i, n in enumerate(self.e_step_samples):
            if n < 1:
                raise ValueError(f"e_step_samples[{i}] must be an integer >= 1, got {n!r}")
        one_of(self, "packing", *PACKINGS)
        sharding = "train.fsdp" if self.train.fsdp else "train.deepspeed" if self.train.deepspeed else ""
        if sharding and self.task.val > 0:  # refused by fit() too, but only after the first E-step
            raise ValueError(f"{sharding} does not keep early stopping's best weights (the M-step's validation, "
                             f"task.val={self.task.val}): set task.val=0 or train without {sharding}")


def _correct(samples: list[Sample], cfg: RestEMConfig) -> list[Sample]:
    kept = above_threshold(samples, 1.0)
    return dedupe(kept) if cfg.dedupe else kept


def samples_per_problem(cfg: RestEMConfig, it: int) -> int:
    """N of iteration `it`'s E-step (iterations count from 1)."""
    return cfg.e_step_samples[min(it, len(cfg.e_step_samples)) - 1] if cfg.e_step_samples else cfg.sampling.n


def e_step(job: SamplingRun, reward, seed: int, it: int) -> tuple[list[Sample], list[Sample]]:
    """Sample N responses per training problem and score them; with `e_step_round_size` < N in
    rounds, each after the first only for the problems still short of `cap_per_problem` correct
    responses (the same problems end up kept as with N at once, for fewer samples). Returns (all
    samples in round order, the first round's: every problem has the same number there)."""
    cfg = job.cfg
    n = samples_per_problem(cfg, it)
    size = cfg.e_step_round_size or n
    todo, samples, first = job.task.train, [], []
    for r, start in enumerate(range(0, n, size)):
        new = job.sample(job.policy, todo, reward, seed + 7919 * r, truncated=0.0, iteration=it,
                         n=min(size, n - start))
        samples, first = samples + new, first or new
        done = {p for p, group in by_prompt(_correct(samples, cfg)).items() if len(group) >= cfg.cap_per_problem}
        todo = [p for p in todo if p not in done]
        if not todo:
            break
    return samples, first


def run(cfg: RestEMConfig) -> dict:
    job = SamplingRun(cfg)
    task = job.task
    reward = task.verifier("binary")
    if (base := job.baseline()) is not None:
        log.info("base: %s", base)
    # the best iteration's model stays on disk (its stored train stage), not in memory beside the M-step's
    best_val, best_dir, best_iteration = job.rows[0]["val_acc"] if job.rows else -1.0, None, 0
    for it in range(1, cfg.iterations + 1):
        # E-step: sample from the current policy, keep the correct responses.
        t0 = time.time()
        samples, first = e_step(job, reward, cfg.train.seed + it, it)
        kept = cap_per_prompt(_correct(samples, cfg), cfg.cap_per_problem, cfg.train.seed + it)
        n = len(first) // len(task.train)  # first-round samples per problem: sample_acc and train pass@k use those
        e_row = {"sample_acc": sum(x.reward for x in first) / len(first), "samples": len(samples), "kept": len(kept),
                 "problems_solved": len({x.prompt for x in kept}) / len(task.train),
                 **{f"train_{k}": v for k, v in pass_maj_at_k(first, reward.answer_for, [1, n]).items()}}
        e_row["e_step_s"] = round(time.time() - t0, 1)
        if job.main:  # every sample of the E-step, and the kept ones the M-step trains on
            write_samples(job.run_dir / f"samples-iter-{it}.jsonl", samples)
            write_samples(job.run_dir / f"kept-iter-{it}.jsonl", kept)
        log.info("iteration %d E-step: %s", it, e_row)
        if not kept:
            log.warning("iteration %d: no correct samples; stopping", it)
            break
        # M-step: from the base model, reward-weighted NLL, early stopping on validation accuracy.
        job.policy = None
        model, _, _ = load_model(cfg.model, train=True)
        val_gen = lambda mdl: {"reward": greedy_score(job.generator(mdl), job.tokenizer, task, task.val, cfg.sampling.max_new_tokens)}
        t0 = time.time()
        m_step = job.train(model, kept, f"iter-{it}", weighted=True, val_fn=val_gen if task.val else None, patience=cfg.patience)
        job.policy.eval()
        m_s, t0 = round(time.time() - t0, 1), time.time()
        row = {"iteration": it, **e_row, "m_epochs": m_step.get("epochs_run", cfg.train.epochs), "m_step_s": m_s,
               **job.evaluate(job.policy, cfg.train.seed + it, val=m_step.get("val/reward"))}
        row["eval_s"] = round(time.time() - t0, 1)
        job.log_row(it, row)
        log.info("iteration %d: %s", it, row)
        if row["val_acc"] >= best_val:  # ties go to the later iteration (trained on more correct samples)
            best_val, best_dir, best_iteration = row["val_acc"], job.trained_dir, it
        elif cfg.stop_when_worse:
            log.info("validation accuracy fell (%.3f < %.3f): stopping after iteration %d", row["val_acc"], best_val, it)
            break
    best_row = next((r for r in job.rows if r["iteration"] == best_iteration), job.rows[-1] if job.rows else {})
    newest = job.rows[-1]["iteration"] if job.rows else 0
    best_policy = job.policy if job.policy is not None and best_iteration == newest else job.load_policy(best_dir)
    return job.finish(best_policy, f"ReST-EM on {len(task.train)} problems, N={cfg.sampling.n}, "
                                   f"T={cfg.sampling.temperature} (best iteration: {best_iteration})",
                      {"best_iteration": best_iteration, "heldout_acc": best_row.get("heldout_acc"), "iterations": job.rows})
