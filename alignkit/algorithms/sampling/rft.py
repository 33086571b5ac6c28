"""RFT: rejection-sampling fine-tuning for reasoning (Yuan et al. 2023) (`alignkit rft`).

Sample k reasoning paths per training question (T=0.7) from one or several sampler models,
keep those whose final answer is correct, deduplicate by distinct reasoning path (the list of
equations 'a op b = c' in the reply, normalised; the normalised text for answer-only replies),
take the union over the sampler models, optionally add the reference solutions (the SFT data
the paper mixes in), and fine-tune the model once on the result. The paper's finding: more
distinct paths help, and the union of several models' paths helps most.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from alignkit.algorithms.sampling.problems import MetricsConfig, ShotsConfig, sampling_defaults
from alignkit.algorithms.sampling.frame import SamplingRun
from alignkit.algorithms.sampling.stages import (
    Sample,
    above_threshold,
    cap_per_prompt,
    dedupe,
    reasoning_path,
)
from alignkit.algorithms.sampling.train_stage import PACKINGS
from alignkit.config import at_least, one_of, opt
from alignkit.engine.config import SamplingTrainConfig
from alignkit.models.load import ModelConfig, load_model
from alignkit.rollout.base import SamplingConfig
from alignkit.tasks import TaskConfig

log = logging.getLogger("alignkit")


@dataclass
class RFTConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the model to fine-tune (and the default sampler)")
    sampler_models: list[str] = opt(factory=list, help="model directories whose correct paths are pooled ('self' = model.path); empty = [self]")
    train: SamplingTrainConfig = opt(factory=lambda: SamplingTrainConfig(output_dir="runs/rft", lr=5e-5, epochs=3.0), help="fine-tuning")
    task: TaskConfig = opt(factory=TaskConfig, help="problems (with answers: the verifier keeps the correct paths)")
    sampling: SamplingConfig = opt(factory=lambda: sampling_defaults(temperature=0.7), help="sampling (k = n; paper T=0.7)")
    shots: ShotsConfig = opt(factory=ShotsConfig, help="few-shot exemplars before the prompts of the first iterations' sampling")
    metrics: MetricsConfig = opt(factory=MetricsConfig, help="evaluation before and after")
    dedupe_by: str = opt("path", "path (distinct equation lists / normalised text), text (exact text) or none")
    max_paths_per_problem: int = opt(0, "cap on distinct paths per problem (0 = no cap)")
    include_reference: bool = opt(False, "also train on the problems' reference solutions (the paper's SFT data)")
    packing: str = opt("prefix", "prefix (rows share the prompt prefix: cheapest), pack (padding-free) or pad")
    max_length: int = opt(256, "tokens per training example")

    def __post_init__(self):
        one_of(self, "dedupe_by", "path", "text", "none")
        at_least(self, 0, "max_paths_per_problem")
        at_least(self, 1, "max_length")
        one_of(self, "packing", *PACKINGS)


def correct_paths(samples: list[Sample], dedupe_by: str) -> list[Sample]:
    kept = above_threshold(samples, 1.0)
    if dedupe_by == "path":
        return dedupe(kept, key=reasoning_path)
    if dedupe_by == "text":
        return dedupe(kept, key=lambda t: t)
    if dedupe_by == "none":
        return kept
    raise ValueError(f"dedupe_by must be path, text or none, not {dedupe_by!r}")


def run(cfg: RFTConfig) -> dict:
    job = SamplingRun(cfg)
    task, base = job.task, job.policy
    reward = task.verifier("binary")
    job.baseline()
    prompts = task.train
    union: list[Sample] = []
    per_model = {}
    for i, spec in enumerate(cfg.sampler_models or ["self"]):
        sampler = base if spec in ("self", cfg.model.path) else job.sampler_model(spec)
        samples = job.sample(sampler, prompts, reward, cfg.train.seed + i, truncated=0.0, source=spec)
        paths = correct_paths(samples, cfg.dedupe_by)
        per_model[spec] = {"correct": sum(x.reward for x in samples) / len(samples), "paths": len(paths)}
        union = correct_paths(union + paths, cfg.dedupe_by)  # union, deduplicated across models too
        if sampler is not base:
            del sampler
    if cfg.max_paths_per_problem:
        union = cap_per_prompt(union, cfg.max_paths_per_problem, cfg.train.seed)
    data = list(union)
    if cfg.include_reference:
        data += [Sample(p, task.reference(p), reward=1.0, source="reference") for p in task.train]
    info = {"paths": len(union), "problems_covered": len({x.prompt for x in union}) / len(prompts),
            "paths_per_covered_problem": len(union) / max(1, len({x.prompt for x in union})),
            **{f"{k}/{m}": v for k, d in per_model.items() for m, v in d.items()}}
    log.info("RFT data: %s", info)
    if not data:
        raise ValueError("no correct reasoning path was sampled: raise sampling.n or the temperature")
    job.train(load_model(cfg.model, train=True)[0], data, "train")
    job.log_row(1, {"iteration": 1, "kept": len(data), **job.evaluate(job.policy, cfg.train.seed + 1)}, context=info)
    return job.finish(job.policy, f"RFT, k={cfg.sampling.n}, samplers={cfg.sampler_models or ['self']}",
                      {"data": info, "iterations": job.rows})
