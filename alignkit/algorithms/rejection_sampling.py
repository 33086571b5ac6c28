"""Rejection-sampling fine-tuning, Llama 2 style (`alignkit rs`).

Iteration i:
  1. temperature: sample K responses for a few prompts at each candidate temperature and keep
     the one with the highest mean best-of-K reward (Llama 2 re-tunes T every iteration);
  2. collect: K responses per training prompt from the newest model (or from `sampler_model`:
     distillation, sample with model A and train model B), scored by the reward;
  3. select: for every prompt the best response among the samples of ALL iterations so far
     (pooling avoids the regressions of last-iteration-only bags), dropping prompts whose best
     is below `min_reward`;
  4. train: SFT of the newest model on the selected responses (`from_base` restarts from the
     initial model instead).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alignkit.algorithms.problems import (
    MetricsConfig,
    ProblemsConfig,
    SamplerConfig,
    iteration_row,
    load_task,
    print_table,
    sampling,
)
from alignkit.algorithms.stages import (
    above_threshold,
    best_per_prompt,
    collect,
    make_reward,
    reward_stats,
    score,
    tokenize_samples,
)
from alignkit.algorithms.train_stage import train_stage
from alignkit.config import opt
from alignkit.engine.config import TrainConfig
from alignkit.engine.logging import MetricsLogger
from alignkit.models.load import ModelConfig, load_model, save_model
from alignkit.rollout.hf import HFGenerator

log = logging.getLogger("alignkit")


@dataclass
class RSConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the model to fine-tune")
    sampler_model: str = opt("", "model directory that samples (distillation); empty = the newest trained model")
    train: TrainConfig = opt(factory=lambda: TrainConfig(output_dir="runs/rs", lr=5e-5, epochs=2.0), help="SFT of each iteration")
    task: ProblemsConfig = opt(factory=ProblemsConfig, help="prompts (problems) and the verifier")
    reward: str = opt("graded", "verifier, graded, or a reward-model directory")
    sampler: SamplerConfig = opt(factory=SamplerConfig, help="sampling (sampler.temperature is unused: see temperatures)")
    metrics: MetricsConfig = opt(factory=lambda: MetricsConfig(eval_samples=0), help="per-iteration evaluation")
    iterations: int = opt(2, "rejection-sampling iterations")
    temperatures: list[float] = opt(factory=lambda: [0.7, 1.0], help="candidate temperatures, re-tuned every iteration")
    temperature_prompts: int = opt(32, "training prompts used to pick the temperature")
    pool: bool = opt(True, "select among the samples of all iterations (false: the newest only)")
    min_reward: float | None = opt(1.0, "drop prompts whose best sample scores below this (null = keep all)")
    from_base: bool = opt(False, "train each iteration from the initial model instead of the newest")
    packing: str = opt("prefix", "prefix (rows share the prompt prefix: cheapest), pack (padding-free) or pad")
    max_length: int = opt(256, "tokens per training example")


def pick_temperature(gen, tokenizer, prompts: list[str], reward_fn, cfg: RSConfig, seed: int) -> tuple[float, dict]:
    """The candidate temperature with the highest mean best-of-K reward on `prompts`."""
    scores = {}
    for t in cfg.temperatures:
        params = sampling(cfg.sampler, cfg.sampler.samples_per_problem, seed)
        params.temperature = t
        best = best_per_prompt(score(collect(gen, tokenizer, prompts, params), reward_fn))
        scores[t] = reward_stats(best)["mean"]
    return max(scores, key=scores.__getitem__), scores


def run(cfg: RSConfig) -> dict:
    start = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task = load_task(cfg.task)
    reward_fn = make_reward(cfg.reward, task.reward("binary"))
    run_dir = Path(cfg.train.output_dir)
    logger = MetricsLogger(run_dir, config=asdict(cfg))
    policy, tokenizer, _ = load_model(cfg.model, train=False)
    teacher = load_model(ModelConfig(path=cfg.sampler_model), train=False)[0] if cfg.sampler_model else None
    rows, pool = [], []
    minutes = lambda: round((time.time() - start) / 60, 2)
    if cfg.metrics.baseline:
        rows.append({"iteration": 0, **iteration_row(policy, tokenizer, task, cfg.sampler, cfg.metrics, cfg.train.seed, base=True),
                     "minutes": minutes()})
        logger.log(0, rows[-1])
    prompts = task.prompts(task.train)
    for it in range(1, cfg.iterations + 1):
        gen = HFGenerator(teacher if teacher is not None else policy, tokenizer, cfg.sampler.batch_size, cfg.sampler.dtype)
        t, t_scores = pick_temperature(gen, tokenizer, prompts[: cfg.temperature_prompts], reward_fn, cfg, cfg.train.seed + 100 * it)
        params = sampling(cfg.sampler, cfg.sampler.samples_per_problem, cfg.train.seed + it)
        params.temperature = t
        new = score(collect(gen, tokenizer, prompts, params, iteration=it, source=cfg.sampler_model or f"iter-{it - 1}"), reward_fn)
        pool = pool + new if cfg.pool else new
        chosen = best_per_prompt(pool)
        if cfg.min_reward is not None:
            chosen = above_threshold(chosen, cfg.min_reward)
        info = {"temperature": t, **{f"best_of_k@T={k}": v for k, v in t_scores.items()},
                "sample_reward": reward_stats(new)["mean"], "kept": len(chosen),
                "kept_from_older": sum(x.iteration < it for x in chosen)}
        log.info("iteration %d: %s", it, info)
        if not chosen:
            log.warning("iteration %d: no sample reached min_reward=%s; stopping", it, cfg.min_reward)
            break
        if cfg.from_base or it == 1:
            model = load_model(cfg.model, train=True)[0]
        else:  # continue from the newest model (a fresh LoRA adapter on it when LoRA is on)
            from alignkit.models.load import add_lora

            model = add_lora(policy, cfg.model.lora) if cfg.model.lora is not None else policy
        train_cfg = TrainConfig(**{**asdict(cfg.train), "output_dir": str(run_dir / f"iter-{it}")})
        model, _ = train_stage(model, tokenizer, tokenize_samples(tokenizer, chosen, cfg.max_length), train_cfg, cfg.packing)
        policy = model.merge_and_unload() if hasattr(model, "peft_config") else model
        row = {"iteration": it, **info,
               **iteration_row(policy, tokenizer, task, cfg.sampler, cfg.metrics, cfg.train.seed + it), "minutes": minutes()}
        rows.append(row)
        logger.log(it, row)
    table = print_table(rows, f"Rejection sampling, K={cfg.sampler.samples_per_problem}, pooled={cfg.pool}")
    (run_dir / "table.md").write_text(table + "\n")
    final = save_model(policy, tokenizer, run_dir / "final")
    result = {"iterations": rows, "minutes": minutes(), "final_model": str(final)}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
