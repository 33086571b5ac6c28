"""The frame that the sampling methods' `run` functions share (RS, RAFT, RFT, ReST, ReST-EM).

A `SamplingRun` sets up the task, the run directory with its `metrics.jsonl`, and the policy;
samples and scores (the collect and score stages), trains on selected samples (the train stage),
evaluates and logs one row per iteration, and writes the outputs: `table.md`, `final/` (a plain
Hugging Face directory) and `result.json`. What each method selects, and when, stays in its file.

Every phase stores its result as it ends (`run_state.RunState`), so `--resume` replays a killed
run up to where it stopped and goes on from there; rows logged before the kill stay in
`metrics.jsonl` and are not logged twice.

Launched as several processes (`engine/distributed.py`), each process samples and scores its
share of every call's shards of prompts, and the scored shards are gathered onto every process
in shard order, so that selection and the train stage (the engine's data-parallel loop) see the
pool one process would have: shards and their seeds do not depend on the process count. The
main process evaluates, stores the phases and writes every file; `shards.jsonl` records, for
each sampling phase, which process sampled each shard and a digest of it, and the digest of each
shard's slice of the gathered pool.

Each long phase (sample, score, train, evaluate) shows: with train.progress on and stderr a
terminal, as a progress bar with rate and ETA (training's is the engine's); otherwise as one
INFO line on the "alignkit" logger when it ends: what, how many, seconds, rate (`Phase`).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from dataclasses import asdict, replace

import torch
from tqdm.auto import tqdm

from alignkit.algorithms.sampling.problems import eval_prompts, generator_for, iteration_row, print_table
from alignkit.algorithms.sampling.run_state import SHARD_PROMPTS, RunState, load_samples, save_samples, shard_seed
from alignkit.algorithms.sampling.stages import Sample, collect, record_shards, sample_digest, score, tokenize_samples
from alignkit.algorithms.sampling.train_stage import train_stage
from alignkit.data.io import write_skipped
from alignkit.engine import distributed
from alignkit.engine.checkpoint import rng_state, set_rng_state
from alignkit.engine.logging import MetricsLogger, read_metrics
from alignkit.files import write_text_atomic
from alignkit.engine.trainer import resolve_device
from alignkit.models.load import ModelConfig, add_lora, load_model, save_model
from alignkit.rollout.base import Generator
from alignkit.tasks import RewardConfig, build_task

log = logging.getLogger("alignkit")


class Phase:
    """One long phase of a run: a progress bar (`bar`: train.progress on and stderr a terminal),
    or, when it ends, one INFO line: `<what>: <count> <unit> in <s>s (<rate> <unit>/s)`.
    `update(k)` counts k more done; the seconds are those spent inside `timing()` blocks (a phase
    may run in pieces, as sampling and scoring alternate shard by shard); `shown` is False when
    something else shows it on a terminal (the engine's training bar)."""

    def __init__(self, what: str, total: int, unit: str, progress: bool, shown: bool = True):
        self.what, self.total, self.unit, self.count, self.seconds = what, total, unit, 0, 0.0
        terminal = progress and sys.stderr.isatty()
        self.logged = not terminal
        self.bar = tqdm(total=total, desc=what, unit=unit, dynamic_ncols=True) if terminal and shown else None

    @contextmanager
    def timing(self):
        start = time.time()
        try:
            yield self
        finally:
            self.seconds += time.time() - start

    def update(self, k: int) -> None:
        self.count += k
        if self.bar is not None:
            self.bar.update(k)

    def end(self, ok: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()
        if ok and self.logged:
            log.info("%s: %d %s in %.1fs (%.1f %s/s)", self.what, self.count, self.unit, self.seconds,
                     self.count / max(self.seconds, 1e-9), self.unit)


@contextmanager
def phase(what: str, total: int, unit: str, progress: bool, shown: bool = True):
    """A `Phase` timed and ended with the block (logging nothing when the block raises)."""
    p = Phase(what, total, unit, progress, shown)
    try:
        with p.timing():
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
        self.device = resolve_device(cfg.train.device)  # sampling runs where training runs
        distributed.start(self.device)
        self.main = distributed.is_main()
        self.progress = cfg.train.progress and self.main  # one process shows the bars
        torch.manual_seed(cfg.train.seed)  # fresh LoRA adapters draw from the global generator
        self.task = build_task(cfg.task, getattr(cfg, "reward", None) or RewardConfig(kind="verifier"), cfg.train.precision)
        self.run_dir = Path(cfg.train.output_dir)
        for writer in (False, True):  # the other processes read the run directory before the main one changes it
            if writer == self.main:
                self.state = RunState(self.run_dir, asdict(cfg), cfg.train.resume, write=writer)
                self.logged = read_metrics(self.run_dir) if self.state.resumed else []  # rows of the run before its kill
            distributed.barrier()
        self.logger = MetricsLogger(self.run_dir, cfg.train.trackers, config=asdict(cfg),
                                    keep_lines=len(self.logged) if self.state.resumed else None, write=self.main)
        if self.main:
            write_skipped(self.run_dir, self.task.skipped)  # rows of a prompts/problems file dropped by task.on_invalid=skip
            if not self.state.resumed:
                (self.run_dir / "shards.jsonl").unlink(missing_ok=True)
        distributed.barrier()  # the run directory is ready before any process reads it
        self.policy, self.tokenizer, _ = load_model(cfg.model, train=False)
        self.policy.to(self.device)
        self.rows: list[dict] = []

    def sampler_model(self, path: str):
        """Another model that samples (a teacher, one of RFT's sampler models), on the run's device."""
        return load_model(ModelConfig(path=path), train=False)[0].to(self.device)

    def minutes(self) -> float:
        return round((time.time() - self.start) / 60, 2)

    def generator(self, model) -> Generator:
        return generator_for(model, self.tokenizer, self.cfg.sampling, self.cfg.train.precision)

    def sample(self, model, prompts: list[str], reward_fn, seed: int, temperature: float | None = None,
               truncated: float | None = None, iteration: int = 0, source: str = "", n: int | None = None,
               system: str | None = None) -> list[Sample]:
        """Collect `n` (default sampling.n) responses per prompt from `model` (at `temperature`
        instead of sampling.temperature when given) and score them (`stages.score`). `system`: a
        system message the model samples with, which the samples' prompts leave out. Iterations up
        to shots.iterations prompt with the few-shot exemplars. The prompts go in shards, each
        sampled with its own seed and stored as soon as it is scored; a resumed run reads the
        shards it has instead of sampling them again. With several processes, each samples and
        scores its share of the shards (`distributed.map_shared`) and every process returns the
        whole pool, in shard order."""
        cfg = self.cfg
        params = cfg.sampling.params(seed, n=n, temperature=temperature)
        shots = self.task.shot_turns(cfg.shots.exemplars) if max(iteration, 1) <= cfg.shots.iterations else ()
        size = max(SHARD_PROMPTS, cfg.sampling.batch_size)
        folder = self.state.next("sample")
        shards = [(start, prompts[start:start + size], folder / f"shard-{i:05d}.jsonl")
                  for i, start in enumerate(range(0, len(prompts), size))]
        have = distributed.broadcast([path.is_file() for _, _, path in shards])  # the main process's view
        missing = [i for i, stored in enumerate(have) if not stored]
        todo = sum(len(shards[i][1]) for i in missing) * params.n
        gen, what = self.generator(model), f"sample{f' (iteration {iteration})' if iteration else ''}"
        sampling, scoring = Phase(what, todo, "samples", self.progress), Phase("score", todo, "samples", self.progress)
        gen.progress = lambda k: sampling.update(k * params.n)

        def sample_shard(j: int) -> dict:
            i = missing[j]
            start, shard, _ = shards[i]
            with sampling.timing():
                got = collect(gen, self.tokenizer, shard, replace(params, seed=shard_seed(seed, i)),
                              iteration=iteration, source=source, system=system, shots=shots)
            with scoring.timing():
                score(got, reward_fn, truncated=truncated)
                scoring.update(len(got))
            for x in got:
                x.prompt_index += start
            return {"samples": got, "rank": distributed.rank(), "digest": sample_digest(got)}

        def store(j: int, out: dict) -> None:
            if self.main:
                save_samples(shards[missing[j]][2], out["samples"])

        try:
            new = dict(zip(missing, distributed.map_shared(sample_shard, len(missing), store)))
        except BaseException:
            sampling.end(ok=False)
            scoring.end(ok=False)
            raise
        samples, records = [], []
        for i, (start, shard, path) in enumerate(shards):
            got = new[i]["samples"] if i in new else load_samples(path)
            samples += got
            records.append({"shard": i, "rank": new[i]["rank"] if i in new else None, "first": start, "prompts": len(shard),
                            "samples": len(got), "digest": new[i]["digest"] if i in new else sample_digest(got)})
        stored = len(samples) - sum(len(out["samples"]) for out in new.values())
        if stored:
            log.info("%s: %d scored samples read from %s", what, stored, folder)
        if self.main:
            record_shards(self.run_dir / "shards.jsonl", folder.name, records, samples)
        sampling.end(ok=todo > 0)
        scoring.end(ok=todo > 0)
        return samples

    def load_policy(self, path: Path | None):
        """A policy read again: a train stage's stored model (`trained_dir`), or the initial
        model when `path` is None."""
        model = self.cfg.model if path is None else replace(self.cfg.model, path=str(path), lora=None, quantization="none")
        return load_model(model, train=False)[0].to(self.device)

    def continue_from(self, policy):
        """The model that trains on from `policy` (with a fresh LoRA adapter when LoRA is on)."""
        return policy if self.cfg.model.lora is None else add_lora(policy, self.cfg.model.lora)

    def train(self, model, samples: list[Sample], name: str, weighted: bool = False, **options) -> dict:
        """The train stage on `samples` (reward-weighted NLL when `weighted`), logged under
        run_dir/name; `policy` becomes the trained model (LoRA merged). Returns its metrics;
        `options` go to `train_stage` (val_fn, patience). The trained model, the metrics and the
        global RNG state after training are stored; a resumed run loads them instead."""
        cfg = self.cfg
        folder = self.state.next(f"train-{name}")
        if distributed.broadcast((folder / "stage.json").is_file()):
            del model
            stored = json.loads((folder / "stage.json").read_text())
            self.policy = self.load_policy(folder / "model")
            own = folder / f"rng-{distributed.rank()}.pt"  # another process's RNG state, beside the main one's rng.pt
            set_rng_state(torch.load(own if own.is_file() else folder / "rng.pt", weights_only=False))
            self.trained_dir = folder / "model"
            log.info("train (%s): the trained model is read from %s", name, folder)
            return stored["metrics"]
        train_cfg = replace(cfg.train, output_dir=str(self.run_dir / name))
        started = folder / "started"  # this run began the stage: its checkpoints (train.save_every) are this run's
        resume = distributed.broadcast(started.is_file())
        if not resume and self.main:
            shutil.rmtree(self.run_dir / name / "checkpoints", ignore_errors=True)
            write_text_atomic(started, "")
        distributed.barrier()
        data = tokenize_samples(self.tokenizer, samples, cfg.max_length, weighted=weighted)
        with phase(f"train ({name})", len(data), "examples", self.progress, shown=False) as p:
            model, metrics = train_stage(model, self.tokenizer, data, train_cfg, cfg.packing, weighted=weighted,
                                         resume=resume, **options)
            epochs = metrics.get("epochs_run", cfg.train.epochs)
            p.what = f"train ({name}, {epochs} epoch(s) of {len(data)} examples)"
            p.update(len(data) * epochs)
        self.policy = model.merge_and_unload() if hasattr(model, "peft_config") else model
        self.trained_dir = folder / "model"
        rngs = distributed.gather(rng_state())
        if self.main:
            save_model(self.policy, self.tokenizer, folder / "model")
            torch.save(rngs[0], folder / "rng.pt")
            for r, state in enumerate(rngs[1:], start=1):
                torch.save(state, folder / f"rng-{r}.pt")
            write_text_atomic(folder / "stage.json", json.dumps({"metrics": metrics}))  # written last: the stage is stored
            shutil.rmtree(self.run_dir / name / "checkpoints", ignore_errors=True)  # the stored model replaces them
        distributed.barrier()
        return metrics

    def evaluate(self, policy, seed: int, base: bool = False, val: float | None = None) -> dict:
        """`problems.iteration_row` of `policy` under the run's sampling and metrics settings
        (stored; a resumed run reads it). The main process evaluates; every process gets the row."""
        path = self.state.next("evaluate").with_suffix(".json")

        def evaluate() -> dict:
            if path.is_file():
                return json.loads(path.read_text())
            total = eval_prompts(self.task, self.cfg.metrics, base=base, val=val)
            with phase("evaluate", total, "prompts", self.progress) as p:
                row = iteration_row(policy, self.tokenizer, self.task, self.cfg.sampling, self.cfg.metrics,
                                    self.cfg.train.precision, seed, base=base, val=val, progress=p.update)
            write_text_atomic(path, json.dumps(row))
            return row

        return distributed.broadcast(distributed.on_main(evaluate))

    def log_row(self, step: int, row: dict, context: dict | None = None) -> dict:
        """Add the minutes so far to `row`, keep it for the table and the result, and log it
        (after `context`, which only the log gets) at `step`. A row that a resumed run logged
        before its kill keeps its minutes and is not logged again; the clock goes on from it."""
        if len(self.rows) < len(self.logged):
            row["minutes"] = self.logged[len(self.rows)]["minutes"]
            self.start = time.time() - 60 * row["minutes"]
            self.rows.append(row)
            return row
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
        minutes and the final model's path) to result.json; returns it. The main process writes;
        every process returns the result."""
        self.logger.close()  # every row is logged: flush and close the trackers
        result = {**result, "minutes": self.minutes(), "final_model": str(self.run_dir / "final")}
        if self.main:
            table = print_table([{"iteration": r[self.key], **r} for r in self.rows], title)
            (self.run_dir / "table.md").write_text(table + "\n")
            result["final_model"] = str(save_model(policy, self.tokenizer, self.run_dir / "final"))
            write_text_atomic(self.run_dir / "result.json", json.dumps(result, indent=2) + "\n")
            self.state.close()
        return distributed.broadcast(result)
