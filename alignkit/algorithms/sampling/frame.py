"""The frame that the sampling methods' `run` functions share (RS, RAFT, RFT, ReST, ReST-EM).

A `SamplingRun` sets up the task, the run directory with its `metrics.jsonl`, and the policy;
samples and scores (the collect and score stages), trains on selected samples (the train stage),
evaluates and logs one row per iteration, and writes the outputs: `table.md`, `final/` (a plain
Hugging Face directory) and `result.json`. What each method selects, and when, stays in its file.

Each long phase (sample, score, train, evaluate) shows: with train.progress on and stderr a
terminal, as a progress bar with rate and ETA (training's is the engine's); otherwise as one
INFO line on the "alignkit" logger when it ends: what, how many, seconds, rate (`Phase`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignkit.algorithms.sampling.problems import eval_prompts, generator_for, iteration_row, print_table
from alignkit.algorithms.sampling.stages import Sample, collect, score, tokenize_samples
from alignkit.algorithms.sampling.train_stage import train_stage
from alignkit.engine.logging import MetricsLogger
from alignkit.engine.trainer import resolve_device
from alignkit.models.load import ModelConfig, add_lora, load_model, save_model
from alignkit.rollout.hf import HFGenerator
from alignkit.tasks import RewardConfig, build_task

log = logging.getLogger("alignkit")


class Phase:
    """One long phase of a run: a progress bar (`bar`: train.progress on and stderr a terminal),
    or, when it ends, one INFO line: `<what>: <count> <unit> in <s>s (<rate> <unit>/s)`.
    `update(k)` counts k more done; `shown` is False when something else shows it on a terminal
    (the engine's training bar)."""

    def __init__(self, what: str, total: int, unit: str, progress: bool, shown: bool = True):
        self.what, self.total, self.unit, self.count = what, total, unit, 0
        terminal = progress and sys.stderr.isatty()
        self.logged = not terminal
        self.bar = tqdm(total=total, desc=what, unit=unit, dynamic_ncols=True) if terminal and shown else None
        self.start = time.time()

    def update(self, k: int) -> None:
        self.count += k
        if self.bar is not None:
            self.bar.update(k)

    def end(self, ok: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()
        if ok and self.logged:
            seconds = time.time() - self.start
            log.info("%s: %d %s in %.1fs (%.1f %s/s)", self.what, self.count, self.unit, seconds,
                     self.count / max(seconds, 1e-9), self.unit)


@contextmanager
def phase(what: str, total: int, unit: str, progress: bool, shown: bool = True):
    """A `Phase` that ends with the block (logging nothing when the block raises)."""
    p = Phase(what, total, unit, progress, shown)
    try:
        yield p
    except BaseException:
        p.end(ok=False)
        raise
    p.end()


class SamplingRun:
    """`cfg` is a method's config with the keys these methods share: model, train, task, sampling,
    shots, metrics, packing and max_length, and `reward` for the methods that choose one (RFT and
    ReST-EM keep correct answers: the task's verifier). `key` names the rows' first column (RAFT
    counts stages). `policy` is the newest policy: the initial model, then the model each `train`
    returns. The task's reward is `self.task.reward`."""

    def __init__(self, cfg, key: str = "iteration"):
        self.cfg, self.key, self.start = cfg, key, time.time()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)  # fresh LoRA adapters draw from the global generator
        self.task = build_task(cfg.task, getattr(cfg, "reward", None) or RewardConfig(kind="verifier"), cfg.train.precision)
        self.run_dir = Path(cfg.train.output_dir)
        self.logger = MetricsLogger(self.run_dir, cfg.train.trackers, config=asdict(cfg))
        self.device = resolve_device(cfg.train.device)  # sampling runs where training runs
        self.policy, self.tokenizer, _ = load_model(cfg.model, train=False)
        self.policy.to(self.device)
        self.rows: list[dict] = []

    def sampler_model(self, path: str):
        """Another model that samples (a teacher, one of RFT's sampler models), on the run's device."""
        return load_model(ModelConfig(path=path), train=False)[0].to(self.device)

    def minutes(self) -> float:
        return round((time.time() - self.start) / 60, 2)

    def generator(self, model) -> HFGenerator:
        return generator_for(model, self.tokenizer, self.cfg.sampling, self.cfg.train.precision)

    def sample(self, model, prompts: list[str], reward_fn, seed: int, temperature: float | None = None,
               truncated: float | None = None, iteration: int = 0, source: str = "", n: int | None = None) -> list[Sample]:
        """Collect `n` (default sampling.n) responses per prompt from `model` (at `temperature`
        instead of sampling.temperature when given) and score them (`stages.score`). Iterations up
        to shots.iterations prompt with the few-shot exemplars."""
        shots = self.cfg.shots
        params = self.cfg.sampling.params(seed, n=n, temperature=temperature)
        shots = self.task.shot_turns(shots.exemplars) if max(iteration, 1) <= shots.iterations else ()
        gen, what = self.generator(model), f"sample{f' (iteration {iteration})' if iteration else ''}"
        with phase(what, len(prompts) * params.n, "samples", self.cfg.train.progress) as p:
            gen.progress = lambda k: p.update(k * params.n)
            samples = collect(gen, self.tokenizer, prompts, params, iteration=iteration, source=source, shots=shots)
        with phase("score", len(samples), "samples", self.cfg.train.progress) as p:
            score(samples, reward_fn, truncated=truncated)
            p.update(len(samples))
        return samples

    def continue_from(self, policy):
        """The model that trains on from `policy` (with a fresh LoRA adapter when LoRA is on)."""
        return policy if self.cfg.model.lora is None else add_lora(policy, self.cfg.model.lora)

    def train(self, model, samples: list[Sample], name: str, weighted: bool = False, **options) -> dict:
        """The train stage on `samples` (reward-weighted NLL when `weighted`), logged under
        run_dir/name; `policy` becomes the trained model (LoRA merged). Returns its metrics;
        `options` go to `train_stage` (val_fn, patience)."""
        cfg = self.cfg
        train_cfg = replace(cfg.train, output_dir=str(self.run_dir / name))
        data = tokenize_samples(self.tokenizer, samples, cfg.max_length, weighted=weighted)
        with phase(f"train ({name})", len(data), "examples", cfg.train.progress, shown=False) as p:
            model, metrics = train_stage(model, self.tokenizer, data, train_cfg, cfg.packing, weighted=weighted, **options)
            epochs = metrics.get("epochs_run", cfg.train.epochs)
            p.what = f"train ({name}, {epochs} epoch(s) of {len(data)} examples)"
            p.update(len(data) * epochs)
        self.policy = model.merge_and_unload() if hasattr(model, "peft_config") else model
        return metrics

    def evaluate(self, policy, seed: int, base: bool = False, val: float | None = None) -> dict:
        """`problems.iteration_row` of `policy` under the run's sampling and metrics settings."""
        total = eval_prompts(self.task, self.cfg.metrics, base=base, val=val)
        with phase("evaluate", total, "prompts", self.cfg.train.progress) as p:
            return iteration_row(policy, self.tokenizer, self.task, self.cfg.sampling, self.cfg.metrics,
                                 self.cfg.train.precision, seed, base=base, val=val, progress=p.update)

    def log_row(self, step: int, row: dict, context: dict | None = None) -> dict:
        """Add the minutes so far to `row`, keep it for the table and the result, and log it
        (after `context`, which only the log gets) at `step`."""
        row["minutes"] = self.minutes()
        self.rows.append(row)
        self.logger.log(step, {**(context or {}), **row})
        return row

    def baseline(self, label: int | str = 0) -> dict | None:
        """Row 0, the initial policy evaluated, when metrics.baseline is on."""
        if not self.cfg.metrics.baseline:
            return None
        return self.log_row(0, {self.key: label, **self.evaluate(self.policy, self.cfg.train.seed, base=True)})

    def finish(self, policy, title: str, result: dict) -> dict:
        """Print and write the table, save `policy` to run_dir/final, and write `result` (with the
        minutes and the final model's path) to result.json; returns it."""
        self.logger.close()  # every row is logged: flush and close the trackers
        table = print_table([{"iteration": r[self.key], **r} for r in self.rows], title)
        (self.run_dir / "table.md").write_text(table + "\n")
        final = save_model(policy, self.tokenizer, self.run_dir / "final")
        result = {**result, "minutes": self.minutes(), "final_model": str(final)}
        (self.run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        return result
