"""Stages of a pipeline run: each stage's output in `<run>/<stage>/`, a fingerprint per stage, and
resume at two levels.

A stage's fingerprint is a hash of its full config (the command's config after the pipeline has
set its paths) and of the fingerprints of the stages it reads from. When a stage ends, its
fingerprint and result go to `<run>/<stage>/pipeline-stage.json`; a re-run finds it and skips the
stage. A stage whose config changed, or one of whose inputs changed, gets another fingerprint: its
folder is removed and it runs again, and so, through their fingerprints, do the stages after it.
A stage that started (`pipeline-started.json` with the same fingerprint) but did not end was
killed: it runs again with its command's `train.resume`, so it goes on from its own checkpoints
or stored phases instead of starting over. A command stage that ends removes its `checkpoints/`
(they serve only to resume it, and an ended stage never runs again with the same fingerprint)
unless the pipeline keeps them: a full fine-tune's two kept checkpoints are ~3 GB on the default
model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from alignkit.config import build, defaults
from alignkit.files import write_text_atomic

log = logging.getLogger("alignkit")

DONE, STARTED = "pipeline-stage.json", "pipeline-started.json"


def merged(section: dict, fixed: dict) -> dict:
    """`section` (a recipe's keys for a command) with `fixed` (what the pipeline sets) on top,
    nested mappings merged key by key."""
    out = dict(section)
    for key, value in fixed.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def command_config(cls: type, where: str, section: dict, fixed: dict) -> Any:
    """The command config of a stage: the recipe's section for it, with the pipeline's paths."""
    return build(cls, merged(section, fixed), where, base=defaults(cls))


def fingerprint(config: Any, inputs: list[str]) -> str:
    blob = json.dumps({"config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Stages:
    """The stages of one run directory, run in call order. `results[name]` holds each stage's
    result once it is done (run or read back)."""

    def __init__(self, root: Path, keep_checkpoints: bool = False):
        self.root = Path(root)
        self.keep_checkpoints = keep_checkpoints
        self.prints: dict[str, str] = {}
        self.results: dict[str, dict] = {}
        self.ran: list[str] = []  # stages this process ran (the others were read back)

    def run(self, name: str, config: Any, inputs: list[str], fn: Callable[[Path, bool], dict]) -> dict:
        """Run stage `name` as `fn(folder, resume)` unless it is done with the same fingerprint.
        `config` is a JSON-able description of everything the stage does besides its `inputs`
        (names of earlier stages)."""
        folder = self.root / name
        mark = fingerprint(config, [self.prints[i] for i in inputs])
        self.prints[name] = mark
        done = folder / DONE
        if done.is_file():
            stored = json.loads(done.read_text())
            if stored["fingerprint"] == mark:
                log.info("stage %s: done (%s), skipped", name, folder)
                self.results[name] = stored["result"]
                return stored["result"]
            log.info("stage %s: its config or an input changed; it runs again", name)
        started = folder / STARTED
        resume = started.is_file() and json.loads(started.read_text())["fingerprint"] == mark
        if not resume and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(started, json.dumps({"fingerprint": mark}))
        log.info("stage %s: %s", name, "resuming the killed stage" if resume else "running")
        start = time.time()
        result = fn(folder, resume)
        result = {**result, "stage_minutes": round((time.time() - start) / 60, 2)}
        write_text_atomic(done, json.dumps({"fingerprint": mark, "result": result}, default=str))
        self.results[name] = result
        self.ran.append(name)
        return result

    def command(self, name: str, cfg: Any, inputs: list[str], run: Callable[[Any], dict]) -> dict:
        """A stage that is one alignkit command (`run(cfg)`, its output in train.output_dir): a
        killed stage resumes through the command's own train.resume."""
        description = asdict(cfg)
        description["train"].pop("resume", None)

        def go(folder: Path, resume: bool) -> dict:
            if resume and (folder / "result.json").is_file():  # killed after the command finished
                result = json.loads((folder / "result.json").read_text())
            else:
                result = run(replace(cfg, train=replace(cfg.train, resume=resume)))
            if not self.keep_checkpoints:
                shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            return result

        return self.run(name, description, inputs, go)
