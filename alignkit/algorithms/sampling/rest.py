"""ReST: reinforced self-training (Gulcehre et al. 2023) (`alignkit rest`).

  Grow     sample N responses per training prompt from the current policy, score them, and
           ADD them to the data set (which keeps the samples of every earlier Grow step).
  Improve  for increasing thresholds tau_1 < tau_2 < ..., fine-tune the CURRENT policy on the
           samples of the data set whose reward is >= tau_i (continuing from the policy of the
           previous Improve step): each step trains on fewer, better samples.
With a graded reward (1 for a correct answer, up to 0.5 for a near miss) the thresholds
matter: the first Improve step also learns from near misses, the last from correct answers only.
ReST-EM (`rest_em.py`) is the variant that restarts from the base model every iteration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from alignkit.algorithms.sampling.problems import MetricsConfig, ShotsConfig, sampling_defaults
from alignkit.algorithms.sampling.frame import SamplingRun
from alignkit.algorithms.sampling.stages import (
    above_threshold,
    dedupe,
    reward_stats,
)
from alignkit.algorithms.sampling.train_stage import PACKINGS
from alignkit.config import at_least, non_empty, one_of, opt
from alignkit.engine.config import SamplingTrainConfig
from alignkit.models.load import ModelConfig
from alignkit.rollout.base import SamplingConfig
from alignkit.tasks import RewardConfig, TaskConfig

log = logging.getLogger("alignkit")


@dataclass
class RestConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the initial policy")
    train: SamplingTrainConfig = opt(factory=lambda: SamplingTrainConfig(output_dir="runs/rest", lr=3e-5, epochs=1.0), help="each Improve step")
    task: TaskConfig = opt(factory=TaskConfig, help="prompts (problems) and their splits (alignkit.tasks)")
    reward: RewardConfig = opt(factory=lambda: RewardConfig(kind="graded"), help="the reward (graded: partial credit, so the thresholds matter)")
    sampling: SamplingConfig = opt(factory=lambda: sampling_defaults(temperature=0.8), help="Grow sampling")
    shots: ShotsConfig = opt(factory=ShotsConfig, help="few-shot exemplars before the prompts of the first iterations' sampling")
    metrics: MetricsConfig = opt(factory=lambda: MetricsConfig(eval_samples=0), help="evaluation after every Improve step")
    grow_steps: int = opt(1, "Grow steps")
    thresholds: list[float] = opt(factory=lambda: [0.25, 0.45, 1.0], help="increasing Improve thresholds")
    weighted: bool = opt(False, "weight each sample's NLL by its reward")
    packing: str = opt("prefix", "prefix (rows share the prompt prefix: cheapest), pack (padding-free) or pad")
    max_length: int = opt(256, "tokens per training example")

    def __post_init__(self):
        non_empty(self, "thresholds")
        if list(self.thresholds) != sorted(set(self.thresholds)):
            raise ValueError(f"thresholds must be strictly increasing, got {self.thresholds}")
        at_least(self, 1, "grow_steps", "max_length")
        one_of(self, "packing", *PACKINGS)


def run(cfg: RestConfig) -> dict:
    job = SamplingRun(cfg)
    reward_fn = job.task.reward
    data, step = [], 0
    job.baseline("0")
    for g in range(1, cfg.grow_steps + 1):
        new = job.sample(job.policy, job.task.train, reward_fn, cfg.train.seed + g, iteration=g)
        data = dedupe(data + new)
        log.info("grow %d: %d new samples (mean reward %.3f), data set %d", g, len(new), reward_stats(new)["mean"], len(data))
        for i, tau in enumerate(cfg.thresholds, start=1):
            subset = above_threshold(data, tau)
            info = {"grow": g, "improve": i, "threshold": tau, "kept": len(subset),
                    "kept_reward": reward_stats(subset).get("mean", float("nan"))}
            if not subset:
                log.warning("grow %d improve %d: no sample reaches %.3f; skipped", g, i, tau)
                continue
            step += 1
            job.train(job.continue_from(job.policy), subset, f"grow-{g}-improve-{i}", weighted=cfg.weighted)
            row = job.log_row(step, {"iteration": f"G{g}.I{i}", **info, **job.evaluate(job.policy, cfg.train.seed + step)})
            log.info("grow %d improve %d: %s", g, i, row)
    return job.finish(job.policy, f"ReST: {cfg.grow_steps} Grow step(s), thresholds {cfg.thresholds}", {"steps": job.rows})
