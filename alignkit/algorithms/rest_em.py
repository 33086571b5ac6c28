"""ReST-EM (Singh et al. 2023, "Beyond Human Data"): expectation-maximisation self-training.

Iteration i:
  E-step  sample N responses per training problem from the current policy, score them with a
          binary verifier reward, keep the correct ones (at most `cap_per_problem` per problem;
          identical responses once when `dedupe`).
  M-step  fine-tune the BASE model (not the previous iterate) on J = E[r(x,y) log p(y|x)], the
          reward-weighted NLL, until the validation reward stops improving (best epoch kept).
Each iteration logs greedy train / held-out accuracy, pass@k (unbiased) and maj@k to
`metrics.jsonl` and prints a table. Iterations stop early when validation accuracy falls.

`alignkit rest` (ReST, Gulcehre et al. 2023: Grow, then Improve steps at rising thresholds) is
in `rest.py`; both share `iteration_row` and the table here.
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
    greedy_accuracy,
    iteration_row,
    load_task,
    print_table,
    sampling,
)
from alignkit.algorithms.stages import (
    above_threshold,
    cap_per_prompt,
    collect,
    dedupe,
    pass_maj_at_k,
    score,
    tokenize_samples,
    write_samples,
)
from alignkit.algorithms.train_stage import train_stage
from alignkit.config import opt
from alignkit.engine.config import TrainConfig
from alignkit.engine.logging import MetricsLogger
from alignkit.models.load import ModelConfig, load_model, save_model
from alignkit.rollout.hf import HFGenerator

log = logging.getLogger("alignkit")


@dataclass
class RestEMConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the base model (every M-step starts from it)")
    train: TrainConfig = opt(factory=lambda: TrainConfig(output_dir="runs/rest_em", lr=2e-5, epochs=2.0),
                             help="M-step training (epochs = most epochs; early stopping on validation)")
    task: ProblemsConfig = opt(factory=ProblemsConfig, help="problems and their verifier")
    sampler: SamplerConfig = opt(factory=SamplerConfig, help="E-step sampling")
    metrics: MetricsConfig = opt(factory=MetricsConfig, help="per-iteration evaluation")
    iterations: int = opt(2, "EM iterations")
    cap_per_problem: int = opt(10, "most correct responses kept per problem")
    dedupe: bool = opt(True, "keep identical correct responses once")
    patience: int = opt(1, "M-step epochs without validation improvement before stopping")
    stop_when_worse: bool = opt(True, "stop iterating when validation accuracy falls")
    packing: str = opt("prefix", "prefix (rows share the prompt prefix: cheapest), pack (padding-free) or pad")
    max_length: int = opt(256, "tokens per training example")


def run(cfg: RestEMConfig) -> dict:
    start = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task = load_task(cfg.task)
    reward = task.reward("binary")
    run_dir = Path(cfg.train.output_dir)
    logger = MetricsLogger(run_dir, config=asdict(cfg))
    policy, tokenizer, _ = load_model(cfg.model, train=False)
    rows: list[dict] = []
    minutes = lambda: round((time.time() - start) / 60, 2)
    if cfg.metrics.baseline:
        rows.append({"iteration": 0, **iteration_row(policy, tokenizer, task, cfg.sampler, cfg.metrics, cfg.train.seed, base=True),
                     "minutes": minutes()})
        logger.log(0, rows[-1])
        log.info("base: %s", rows[-1])
    best_val, best_policy, best_iteration = rows[0]["val_acc"] if rows else -1.0, policy, 0
    for it in range(1, cfg.iterations + 1):
        # E-step: sample from the current policy, keep the correct responses.
        t0 = time.time()
        gen = HFGenerator(policy, tokenizer, cfg.sampler.batch_size, cfg.sampler.dtype)
        n = cfg.sampler.samples_per_problem
        samples = score(collect(gen, tokenizer, task.prompts(task.train), sampling(cfg.sampler, n, cfg.train.seed + it),
                                iteration=it), reward, truncated=0.0)
        kept = above_threshold(samples, 1.0)
        kept = cap_per_prompt(dedupe(kept) if cfg.dedupe else kept, cfg.cap_per_problem, cfg.train.seed + it)
        e_step = {"sample_acc": sum(x.reward for x in samples) / len(samples), "kept": len(kept),
                  "problems_solved": len({x.prompt for x in kept}) / len(task.train),
                  **{f"train_{k}": v for k, v in pass_maj_at_k(samples, reward.answer_for, [1, n]).items()}}
        e_step["e_step_s"] = round(time.time() - t0, 1)
        write_samples(run_dir / f"samples-iter-{it}.jsonl", samples)
        log.info("iteration %d E-step: %s", it, e_step)
        if not kept:
            log.warning("iteration %d: no correct samples; stopping", it)
            break
        # M-step: from the base model, reward-weighted NLL, early stopping on validation accuracy.
        del gen
        policy = None
        model, _, _ = load_model(cfg.model, train=True)
        data = tokenize_samples(tokenizer, kept, cfg.max_length, weighted=True)
        train_cfg = TrainConfig(**{**asdict(cfg.train), "output_dir": str(run_dir / f"iter-{it}")})
        val_gen = lambda mdl: {"reward": greedy_accuracy(HFGenerator(mdl, tokenizer, cfg.sampler.batch_size, cfg.sampler.dtype),
                                                          tokenizer, task, task.val, cfg.sampler.max_new_tokens)}
        t0 = time.time()
        model, m_step = train_stage(model, tokenizer, data, train_cfg, cfg.packing, weighted=True,
                                    val_fn=val_gen if task.val else None, patience=cfg.patience)
        policy = model.merge_and_unload() if hasattr(model, "peft_config") else model
        policy.eval()
        m_s, t0 = round(time.time() - t0, 1), time.time()
        row = {"iteration": it, **e_step, "m_epochs": m_step.get("epochs_run", cfg.train.epochs), "m_step_s": m_s,
               **iteration_row(policy, tokenizer, task, cfg.sampler, cfg.metrics, cfg.train.seed + it)}
        row.update(eval_s=round(time.time() - t0, 1), minutes=minutes())
        rows.append(row)
        logger.log(it, row)
        log.info("iteration %d: %s", it, row)
        if row["val_acc"] >= best_val:  # ties go to the later iteration (trained on more correct samples)
            best_val, best_policy, best_iteration = row["val_acc"], policy, it
        elif cfg.stop_when_worse:
            log.info("validation accuracy fell (%.3f < %.3f): stopping after iteration %d", row["val_acc"], best_val, it)
            break
    table = print_table(rows, f"ReST-EM on {len(task.train)} problems, N={cfg.sampler.samples_per_problem}, "
                              f"T={cfg.sampler.temperature} (best iteration: {best_iteration})")
    (run_dir / "table.md").write_text(table + "\n")
    final = save_model(best_policy, tokenizer, run_dir / "final")
    best_row = next((r for r in rows if r["iteration"] == best_iteration), rows[-1] if rows else {})
    result = {"best_iteration": best_iteration, "heldout_acc": best_row.get("heldout_acc"), "iterations": rows,
              "minutes": minutes(), "final_model": str(final)}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
