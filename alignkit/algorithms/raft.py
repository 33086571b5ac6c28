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
    top_fraction,
)
from alignkit.algorithms.train_stage import train_stage
from alignkit.config import opt
from alignkit.engine.config import TrainConfig
from alignkit.engine.logging import MetricsLogger
from alignkit.models.load import ModelConfig, add_lora, load_model, save_model
from alignkit.rollout.hf import HFGenerator

log = logging.getLogger("alignkit")


@dataclass
class RAFTConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the policy")
    train: TrainConfig = opt(factory=lambda: TrainConfig(output_dir="runs/raft", lr=5e-5, epochs=1.0), help="SFT of each stage")
    task: ProblemsConfig = opt(factory=ProblemsConfig, help="prompts (problems) and the verifier")
    reward: str = opt("graded", "verifier, graded, or a reward-model directory")
    sampler: SamplerConfig = opt(factory=lambda: SamplerConfig(temperature=0.85), help="sampling (LMFlow: T=0.85)")
    metrics: MetricsConfig = opt(factory=lambda: MetricsConfig(eval_samples=0), help="per-stage evaluation")
    stages: int = opt(2, "RAFT stages")
    prompts_per_stage: int = opt(256, "b: prompts per stage (cycled through the training problems)")
    selection: str = opt("local", "local (top-1 per prompt) or global (top fraction of all b*K)")
    fraction: float = opt(0.125, "global selection: fraction of the b*K samples kept (LMFlow: 1/8)")
    online: bool = opt(True, "re-sample from the current policy every stage (false: fixed samples of the initial model)")
    min_reward: float | None = opt(None, "also drop kept samples below this reward (null = keep the ranking's choice)")
    packing: str = opt("prefix", "prefix (rows share the prompt prefix: cheapest), pack (padding-free) or pad")
    max_length: int = opt(256, "tokens per training example")


def select(samples, cfg: RAFTConfig):
    if cfg.selection == "local":
        kept = best_per_prompt(samples)
    elif cfg.selection == "global":
        kept = top_fraction(samples, cfg.fraction)
    else:
        raise ValueError(f"selection must be local or global, not {cfg.selection!r}")
    return kept if cfg.min_reward is None else above_threshold(kept, cfg.min_reward)


def run(cfg: RAFTConfig) -> dict:
    start = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task = load_task(cfg.task)
    reward_fn = make_reward(cfg.reward, task.reward("binary"))
    run_dir = Path(cfg.train.output_dir)
    logger = MetricsLogger(run_dir, config=asdict(cfg))
    policy, tokenizer, _ = load_model(cfg.model, train=False)
    prompts = task.prompts(task.train)
    b = min(cfg.prompts_per_stage, len(prompts))
    batches = [[prompts[(s * b + i) % len(prompts)] for i in range(b)] for s in range(cfg.stages)]
    minutes = lambda: round((time.time() - start) / 60, 2)
    rows = []
    if cfg.metrics.baseline:
        rows.append({"stage": 0, **iteration_row(policy, tokenizer, task, cfg.sampler, cfg.metrics, cfg.train.seed, base=True), "minutes": minutes()})
        logger.log(0, rows[-1])
    fixed = None
    if not cfg.online:  # offline: every prompt of every stage sampled once, from the initial model
        gen = HFGenerator(policy, tokenizer, cfg.sampler.batch_size, cfg.sampler.dtype)
        unique = list(dict.fromkeys(p for batch in batches for p in batch))
        fixed = score(collect(gen, tokenizer, unique, sampling(cfg.sampler, cfg.sampler.samples_per_problem, cfg.train.seed)), reward_fn)
    model = load_model(cfg.model, train=True)[0]
    for s, batch in enumerate(batches, start=1):
        if fixed is None:
            gen = HFGenerator(policy, tokenizer, cfg.sampler.batch_size, cfg.sampler.dtype)
            samples = score(collect(gen, tokenizer, batch, sampling(cfg.sampler, cfg.sampler.samples_per_problem, cfg.train.seed + s),
                                    iteration=s), reward_fn)
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
        train_cfg = TrainConfig(**{**asdict(cfg.train), "output_dir": str(run_dir / f"stage-{s}")})
        model, _ = train_stage(model, tokenizer, tokenize_samples(tokenizer, kept, cfg.max_length), train_cfg, cfg.packing)
        policy = model.merge_and_unload() if hasattr(model, "peft_config") else model
        if policy is not model and cfg.model.lora is not None:
            model = add_lora(policy, cfg.model.lora)  # the next stage continues from the merged policy
        row = {"stage": s, **info, **iteration_row(policy, tokenizer, task, cfg.sampler, cfg.metrics, cfg.train.seed + s),
               "minutes": minutes()}
        rows.append(row)
        logger.log(s, row)
    table = print_table([{"iteration": r["stage"], **r} for r in rows],
                        f"RAFT ({cfg.selection}, {'online' if cfg.online else 'offline'}), b={b}, K={cfg.sampler.samples_per_problem}")
    (run_dir / "table.md").write_text(table + "\n")
    final = save_model(policy, tokenizer, run_dir / "final")
    result = {"stages": rows, "minutes": minutes(), "final_model": str(final)}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
