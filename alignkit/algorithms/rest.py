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
from alignkit.algorithms.stages import above_threshold, collect, dedupe, make_reward, reward_stats, score, tokenize_samples
from alignkit.algorithms.train_stage import train_stage
from alignkit.config import opt
from alignkit.engine.config import TrainConfig
from alignkit.engine.logging import MetricsLogger
from alignkit.models.load import ModelConfig, add_lora, load_model, save_model
from alignkit.rollout.hf import HFGenerator

log = logging.getLogger("alignkit")


@dataclass
class RestConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the initial policy")
    train: TrainConfig = opt(factory=lambda: TrainConfig(output_dir="runs/rest", lr=3e-5, epochs=1.0), help="each Improve step")
    task: ProblemsConfig = opt(factory=ProblemsConfig, help="problems and the verifier")
    reward: str = opt("graded", "graded (partial credit: thresholds matter), verifier, or a reward-model directory")
    sampler: SamplerConfig = opt(factory=lambda: SamplerConfig(temperature=0.8), help="Grow sampling")
    metrics: MetricsConfig = opt(factory=lambda: MetricsConfig(eval_samples=0), help="evaluation after every Improve step")
    grow_steps: int = opt(1, "Grow steps")
    thresholds: list[float] = opt(factory=lambda: [0.25, 0.45, 1.0], help="increasing Improve thresholds")
    weighted: bool = opt(False, "weight each sample's NLL by its reward")
    packing: str = opt("prefix", "prefix (rows share the prompt prefix: cheapest), pack (padding-free) or pad")
    max_length: int = opt(256, "tokens per training example")


def run(cfg: RestConfig) -> dict:
    start = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if list(cfg.thresholds) != sorted(set(cfg.thresholds)):
        raise ValueError(f"thresholds must be strictly increasing, got {cfg.thresholds}")
    task = load_task(cfg.task)
    reward_fn = make_reward(cfg.reward, task.reward("binary"))
    run_dir = Path(cfg.train.output_dir)
    logger = MetricsLogger(run_dir, config=asdict(cfg))
    policy, tokenizer, _ = load_model(cfg.model, train=False)
    minutes = lambda: round((time.time() - start) / 60, 2)
    rows, data, step = [], [], 0
    if cfg.metrics.baseline:
        rows.append({"iteration": "0", **iteration_row(policy, tokenizer, task, cfg.sampler, cfg.metrics, cfg.train.seed, base=True), "minutes": minutes()})
        logger.log(0, rows[-1])
    for g in range(1, cfg.grow_steps + 1):
        gen = HFGenerator(policy, tokenizer, cfg.sampler.batch_size, cfg.sampler.dtype)
        new = score(collect(gen, tokenizer, task.prompts(task.train), sampling(cfg.sampler, cfg.sampler.samples_per_problem,
                                                                              cfg.train.seed + g), iteration=g), reward_fn)
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
            model = policy if cfg.model.lora is None else add_lora(policy, cfg.model.lora)
            train_cfg = TrainConfig(**{**asdict(cfg.train), "output_dir": str(run_dir / f"grow-{g}-improve-{i}")})
            model, _ = train_stage(model, tokenizer, tokenize_samples(tokenizer, subset, cfg.max_length, weighted=cfg.weighted),
                                   train_cfg, cfg.packing, weighted=cfg.weighted)
            policy = model.merge_and_unload() if hasattr(model, "peft_config") else model
            rows.append({"iteration": f"G{g}.I{i}", **info,
                         **iteration_row(policy, tokenizer, task, cfg.sampler, cfg.metrics, cfg.train.seed + step), "minutes": minutes()})
            logger.log(step, rows[-1])
            log.info("grow %d improve %d: %s", g, i, rows[-1])
    table = print_table(rows, f"ReST: {cfg.grow_steps} Grow step(s), thresholds {cfg.thresholds}")
    (run_dir / "table.md").write_text(table + "\n")
    final = save_model(policy, tokenizer, run_dir / "final")
    result = {"steps": rows, "minutes": minutes(), "final_model": str(final)}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
