"""Rejection-sampling fine-tuning, Llama 2 style (`alignkit rs`).

Iteration i:
  1. temperature: sample K responses for a few prompts at each candidate temperature and keep
     the one with the highest mean best-of-K reward (Llama 2 re-tunes T every iteration);
  2. collect: K responses per training prompt from the newest model (or from `sampler_model`:
     distillation, sample with model A and train model B), scored by the reward; with `greedy`,
     also that model's greedy reply, so the selected reply never scores below it (a small model's
     samples can be worse than its greedy reply: then best-of-K alone fine-tunes it on replies
     worse than its own); with `safety_preprompt`, Llama 2's safety context distillation (§4.2.4):
     K more responses to each prompt the task flags unsafe, sampled with that system message and
     scored and trained on without it, so a preprompted reply is kept only where the reward
     scores it above the plain ones (Llama 2 keeps a distilled answer only when the safety reward
     model prefers it to the original);
  3. select: for every prompt the best response among the samples of ALL iterations so far
     (pooling avoids the regressions of last-iteration-only bags), dropping prompts whose best
     is below `min_reward`;
  4. train: SFT of the newest model on the selected responses (`from_base` restarts from the
     initial model instead).

The pool is written to `samples.jsonl`; a later run (the next RLHF version of a pipeline, with
retrained reward models) takes it through `pool_files` and scores it again with its own reward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from alignkit.algorithms.sampling.problems import MetricsConfig, ShotsConfig, sampling_defaults
from alignkit.algorithms.sampling.frame import SamplingRun
from alignkit.algorithms.sampling.run_state import load_samples, save_samples
from alignkit.algorithms.sampling.stages import (
    above_threshold,
    best_per_prompt,
    reward_stats,
    score,
)
from alignkit.algorithms.sampling.train_stage import PACKINGS
from alignkit.config import at_least, non_empty, one_of, opt
from alignkit.engine.config import SamplingTrainConfig
from alignkit.models.load import ModelConfig, load_model
from alignkit.rollout.base import SamplingConfig
from alignkit.tasks import RewardConfig, TaskConfig

log = logging.getLogger("alignkit")


@dataclass
class RSConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the model to fine-tune")
    sampler_model: str = opt("", "model directory that samples (distillation); empty = the newest trained model")
    train: SamplingTrainConfig = opt(factory=lambda: SamplingTrainConfig(output_dir="runs/rs", lr=5e-5, epochs=2.0), help="SFT of each iteration")
    task: TaskConfig = opt(factory=TaskConfig, help="prompts (problems) and their splits (alignkit.tasks)")
    reward: RewardConfig = opt(factory=lambda: RewardConfig(kind="graded"), help="the reward of the samples")
    sampling: SamplingConfig = opt(factory=sampling_defaults, help="sampling (sampling.temperature: the first candidate temperature)")
    shots: ShotsConfig = opt(factory=ShotsConfig, help="few-shot exemplars before the prompts of the first iterations' sampling")
    metrics: MetricsConfig = opt(factory=lambda: MetricsConfig(eval_samples=0), help="per-iteration evaluation")
    iterations: int = opt(2, "rejection-sampling iterations")
    temperatures: list[float] = opt(factory=lambda: [0.7], help="candidate temperatures besides sampling.temperature, "
                                                                "re-tuned every iteration")
    temperature_prompts: int = opt(32, "training prompts used to pick the temperature")
    greedy: bool = opt(False, "add the sampling model's greedy reply to every prompt's candidates")
    safety_preprompt: str = opt("", "safety context distillation: a system message that K more replies to each prompt "
                                    "flagged unsafe are sampled with; they are scored and trained on without it "
                                    "(empty = off)")
    pool: bool = opt(True, "select among the samples of all iterations (false: the newest only)")
    pool_files: list[str] = opt(factory=list, help="samples.jsonl files of earlier rs runs (an iterative pipeline): their "
                                                   "samples are scored again by this run's reward and join the pool")
    min_reward: float | None = opt(1.0, "drop prompts whose best sample scores below this (null = keep all)")
    from_base: bool = opt(False, "train each iteration from the initial model instead of the newest")
    packing: str = opt("prefix", "prefix (rows share the prompt prefix: cheapest), pack (padding-free) or pad")
    max_length: int = opt(256, "tokens per training example")

    def __post_init__(self):
        at_least(self, 1, "iterations", "temperature_prompts", "max_length")
        non_empty(self, "temperatures")
        one_of(self, "packing", *PACKINGS)


def pick_temperature(job: SamplingRun, sampler, prompts: list[str], reward_fn, seed: int,
                     iteration: int) -> tuple[float, dict]:
    """The candidate temperature (sampling.temperature and `temperatures`) with the highest mean
    best-of-K reward of `sampler` on `prompts`."""
    scores = {}
    for t in sorted({*job.cfg.temperatures, job.cfg.sampling.temperature}):
        best = best_per_prompt(job.sample(sampler, prompts, reward_fn, seed, temperature=t, iteration=iteration))
        scores[t] = reward_stats(best)["mean"]
    return max(scores, key=scores.__getitem__), scores


def run(cfg: RSConfig) -> dict:
    job = SamplingRun(cfg)
    reward_fn = job.task.reward
    teacher = job.sampler_model(cfg.sampler_model) if cfg.sampler_model else None
    pool = score([x for path in cfg.pool_files for x in load_samples(Path(path))], reward_fn)
    for x in pool:
        x.iteration = 0  # older than every iteration of this run
    job.baseline()
    prompts = job.task.train
    for it in range(1, cfg.iterations + 1):
        sampler = teacher if teacher is not None else job.policy
        t, t_scores = pick_temperature(job, sampler, prompts[: cfg.temperature_prompts], reward_fn, cfg.train.seed + 100 * it, it)
        source = cfg.sampler_model or f"iter-{it - 1}"
        new = job.sample(sampler, prompts, reward_fn, cfg.train.seed + it, temperature=t, iteration=it, source=source)
        if cfg.greedy:
            new += job.sample(sampler, prompts, reward_fn, cfg.train.seed + it, temperature=0.0, iteration=it,
                              source=f"{source}-greedy", n=1)
        unsafe = [p for p in prompts if job.task.is_unsafe(p)] if cfg.safety_preprompt else []
        if cfg.safety_preprompt and not unsafe:
            log.warning("safety_preprompt: no training prompt is flagged unsafe, so none is sampled with it")
        if unsafe:
            new += job.sample(sampler, unsafe, reward_fn, cfg.train.seed + it, temperature=t, iteration=it,
                              source=f"{source}-preprompt", system=cfg.safety_preprompt)
        pool = pool + new if cfg.pool else new
        chosen = best_per_prompt(pool)
        if cfg.min_reward is not None:
            chosen = above_threshold(chosen, cfg.min_reward)
        info = {"temperature": t, **{f"best_of_k@T={k}": v for k, v in t_scores.items()},
                "sample_reward": reward_stats(new)["mean"], "kept": len(chosen),
                **({"kept_greedy": sum(x.source.endswith("-greedy") for x in chosen)} if cfg.greedy else {}),
                **({"kept_preprompt": sum(x.source.endswith("-preprompt") for x in chosen),
                    "preprompted": len(unsafe)} if cfg.safety_preprompt else {}),
                "kept_from_older": sum(x.iteration < it for x in chosen)}
        log.info("iteration %d: %s", it, info)
        if not chosen:
            log.warning("iteration %d: no sample reached min_reward=%s; stopping", it, cfg.min_reward)
            break
        # from the initial model, or on from the newest (a fresh LoRA adapter on it when LoRA is on)
        model = load_model(cfg.model, train=True)[0] if cfg.from_base or it == 1 else job.continue_from(job.policy)
        job.train(model, chosen, f"iter-{it}")
        job.log_row(it, {"iteration": it, **info, **job.evaluate(job.policy, cfg.train.seed + it)})
    if job.main:
        save_samples(job.run_dir / "samples.jsonl", pool)  # the pool, for a later run's pool_files
    return job.finish(job.policy, f"Rejection sampling, K={cfg.sampling.n}, pooled={cfg.pool}",
                      {"iterations": job.rows})
