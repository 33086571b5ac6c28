"""RAFT: reward-ranked fine-tuning (Dong et al. 2023) (`alignkit raft`).

Stage s: take the next b prompts, sample K responses each from the current policy, rank them by
reward and keep
  local   the top-1 of each prompt (acceptance 1/K), or
  global  the top `fraction` of all b*K samples, whatever their prompt,
then fine-tune the current policy on the kept samples and go on. Generation needs no gradient,
so any black-box generator works. `online: false` is the offline variant: all samples are drawn
once from the initial model, and the stages rank and train on those fixed samples.
LMFlow defaults: b=1024, top 1/8, T=0.85.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from alignkit.algorithms.sampling.problems import MetricsConfig, ShotsConfig, sampling_defaults
from alignkit.algorithms.sampling.frame import SamplingRun
from alignkit.algorithms.sampling.stages import (
    above_threshold,
    best_per_prompt,
    reward_stats,
    top_fraction,
)
from alignkit.algorithms.sampling.train_stage import PACKINGS
from alignkit.config import at_least, in_range, one_of, opt
from alignkit.engine.config import SamplingTrainConfig
from alignkit.models.load import ModelConfig, load_model
from alignkit.rollout.base import SamplingConfig
from alignkit.tasks import RewardConfig, TaskConfig

log = logging.getLogger("alignkit")


@dataclass
class RAFTConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the policy")
    train: SamplingTrainConfig = opt(factory=lambda: SamplingTrainConfig(output_dir="runs/raft", lr=5e-5, epochs=1.0), help="SFT of each stage")
    task: TaskConfig = opt(factory=TaskConfig, help="prompts (problems) and their splits (alignkit.tasks)")
    reward: RewardConfig = opt(factory=lambda: RewardConfig(kind="graded"), help="the reward of the samples")
    sampling: SamplingConfig = opt(factory=lambda: sampling_defaults(temperature=0.85), help="sampling (LMFlow: T=0.85)")
    shots: ShotsConfig = opt(factory=ShotsConfig, help="few-shot exemplars before the prompts of the first iterations' sampling")
    metrics: MetricsConfig = opt(factory=lambda: MetricsConfig(eval_samples=0), help="per-stage evaluation")
    stages: int = opt(2, "RAFT stages")
    prompts_per_stage: int = opt(256, "b: prompts per stage (cycled through the training problems)")
    selection: str = opt("local", "local (top-1 per prompt) or global (top fraction of all b*K)")
    fraction: float = opt(0.125, "global selection: fraction of the b*K samples kept (LMFlow: 1/8)")
    online: bool = opt(True, "re-sample from the current policy every stage (false: fixed samples of the initial model)")
    min_reward: float | None = opt(None, "also drop kept samples below this reward (null = keep the ranking's choice)")
    packing: str = opt("prefix", "prefix (rows share the prompt prefix: cheapest), pack (padding-free) or pad")
    max_length: int = opt(256, "tokens per training example")

    def __post_init__(self):
        at_least(self, 1, "stages", "prompts_per_stage", "max_length")
        one_of(self, "selection", "local", "global")
        in_range(self, "fraction", 0.0, 1.0, low_open=True)
        one_of(self, "packing", *PACKINGS)


def select(samples, cfg: RAFTConfig):
    if cfg.selection == "local":
        kept = best_per_prompt(samples)
    elif cfg.selection == "global":
        kept = top_fraction(samples, cfg.fraction)
    else:
        raise ValueError(f"selection must be local or global, not {cfg.selection!r}")
    return kept if cfg.min_reward is None else above_threshold(kept, cfg.min_reward)


def run(cfg: RAFTConfig) -> dict:
    job = SamplingRun(cfg, key="stage")
    reward_fn = job.task.reward
    prompts = job.task.train
    b = min(cfg.prompts_per_stage, len(prompts))
    batches = [[prompts[(s * b + i) % len(prompts)] for i in range(b)] for s in range(cfg.stages)]
    job.baseline()
    fixed = None
    if not cfg.online:  # offline: every prompt of every stage sampled once, from the initial model
        unique = list(dict.fromkeys(p for batch in batches for p in batch))
        fixed = job.sample(job.policy, unique, reward_fn, cfg.train.seed)
    model = load_model(cfg.model, train=True)[0]
    for s, batch in enumerate(batches, start=1):
        if fixed is None:
            samples = job.sample(job.policy, batch, reward_fn, cfg.train.seed + s, iteration=s)
        else:
            wanted = set(batch)
            samples = [x for x in fixed if x.prompt in wanted]
        kept = select(samples, cfg)
        info = {"sample_reward": reward_stats(samples)["mean"], "kept": len(kept),
                "kept_reward": reward_stats(kept).get("mean", float("nan")),
                "kept_prompts": len({x.prompt for x in kept})}
        log.info("stage %d: %s", s, info)
        if not kept:
            log.warning("stage %d: nothing selected; skipping its training", s)
            continue
        job.train(model, kept, f"stage-{s}")
        model = job.continue_from(job.policy)  # the next stage continues from the merged policy
        job.log_row(s, {"stage": s, **info, **job.evaluate(job.policy, cfg.train.seed + s)})
    return job.finish(job.policy, f"RAFT ({cfg.selection}, {'online' if cfg.online else 'offline'}), b={b}, "
                                  f"K={cfg.sampling.n}", {"stages": job.rows})
