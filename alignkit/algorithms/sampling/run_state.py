"""What a sampling method's run keeps on disk so that `--resume` continues it after a kill.

A sampling run (`frame.SamplingRun`) is a deterministic sequence of phases: sample (and score),
train, evaluate. Each phase stores its result under `<run>/resume/` when it ends, in a folder
numbered in call order (`001-sample`, `002-train-iter-1`, ...). A run started with `--resume`
replays the method from its beginning: every phase found on disk returns what it stored instead
of running again, so the run goes on from the phase it was killed in with the same samples,
models, random state and rows as a run that was never stopped.

- Sampling is stored per shard of prompts, each shard sampled with its own seed (`shard_seed`):
  an E-step killed half-way samples only the shards it lacks, and a run that is never killed
  samples exactly the same.
- A train stage stores the trained model (a Hugging Face directory) and the global RNG state
  after it; one killed half-way resumes from its newest checkpoint (`train.save_every` > 0: the
  engine's checkpoints, early stopping's state included), else runs again from its stored samples.
- `config.json` is the run's config: resuming with a config that differs in anything that
  changes results is an error, before any work.
- The folder is removed once the run has written `final/` and `result.json`.
- With several processes (`engine/distributed.py`) the main process writes every phase; each
  shard is sampled by one process and stored by the main one once gathered, and a train stage
  stores every process's RNG state (`rng-<rank>.pt` beside `rng.pt`). A run resumes at the same
  process count; the samples do not depend on it.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from alignkit.algorithms.sampling.stages import Sample
from alignkit.engine.logging import flatten
from alignkit.files import read_jsonl, write_jsonl_atomic, write_text_atomic

log = logging.getLogger("alignkit")

SHARD_PROMPTS = 32
"""Prompts per stored shard of samples (at least sampling.batch_size: a shard is whole batches)."""

# keys that may change between a killed run and its resume: they do not change any result
NOT_COMPARED = ("train.resume", "train.progress", "train.threads", "train.trackers")


def shard_seed(seed: int, shard: int) -> int:
    """The sampling seed of one shard of a call's prompts (shard 0 keeps the call's seed)."""
    return seed if shard == 0 else (seed * 1_000_003 + shard) % 2**63


def config_differences(saved: dict, config: dict) -> list[str]:
    """`key: saved -> now` for every key (but NOT_COMPARED) whose value differs."""
    old, new = flatten(saved), flatten(json.loads(json.dumps(config)))
    keys = sorted((set(old) | set(new)) - set(NOT_COMPARED))
    return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in keys if old.get(k) != new.get(k)]


class RunState:
    """The `resume/` folder of one sampling run. `resumed`: phases may be found on disk. With
    `write=False` (a process other than the main one of several) it checks and reads, never writes."""

    def __init__(self, run_dir: Path, config: dict, resume: bool, write: bool = True):
        self.root = Path(run_dir) / "resume"
        self.count = 0
        self.write = write
        saved = self.root / "config.json"
        self.resumed = resume and saved.is_file()
        if self.resumed:
            diff = config_differences(json.loads(saved.read_text()), config)
            if diff:
                raise ValueError(f"--resume: the config differs from the one the run in {run_dir} started with "
                                 f"({saved}): {'; '.join(diff)}. Resume with the same settings, or start a new run "
                                 f"(another train.output_dir, or without --resume)")
            log.info("resuming the run in %s: phases already done are read from %s", run_dir, self.root)
            return
        if resume and (Path(run_dir) / "result.json").is_file():
            raise ValueError(f"--resume: the run in {run_dir} has finished (result.json); there is nothing to resume. "
                             "Run without --resume to start it again")
        if resume:
            log.warning("resume requested but %s holds no saved run; starting fresh", self.root)
        if not write:
            return
        if self.root.exists():
            shutil.rmtree(self.root)
        write_text_atomic(saved, json.dumps(config))

    def next(self, label: str) -> Path:
        """The folder of the next phase (numbered in call order)."""
        self.count += 1
        return self.root / f"{self.count:03d}-{label}"

    def close(self) -> None:
        """The run is finished (final/ and result.json written): nothing is left to resume."""
        if self.write:
            shutil.rmtree(self.root, ignore_errors=True)


def save_samples(path: Path, samples: list[Sample]) -> None:
    write_jsonl_atomic(path, (asdict(x) for x in samples))


def load_samples(path: Path) -> list[Sample]:
    return [Sample(**row) for row in read_jsonl(path)]
