"""`alignkit score`: score {prompt, response} rows with a reward model or Llama 2's combined reward.

With `model` set, each row gets the reward model's raw scalar (or σ of it). With
`helpful_model` and `safety_model` set, each row gets Llama 2's combined reward:
R_c = R_s when the prompt is flagged unsafe or R_s < threshold, else R_h (both read as σ of
the raw scalar), written as LOGIT(R_c); `whiten` standardises the scores over the file as
Llama 2 does over each PPO batch. Output rows are {prompt, response, score}, written
atomically.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import at_least, one_of, opt
from alignkit.data.io import DataError, read_rows
from alignkit.files import write_jsonl_atomic
from alignkit.rewards.combine import CombinedReward, SingleReward
from alignkit.rewards.gold import is_unsafe_prompt
from alignkit.rewards.model import RewardModel


@dataclass
class ScoreConfig:
    input: str = opt("", "rows with 'prompt' (user text) and 'response' (JSONL, JSON, Parquet); optional 'prompt_unsafe' flag")
    output: str = opt("runs/score/scores.jsonl", "where the {prompt, response, score} rows go")
    model: str = opt("", "a reward-model directory (single reward)")
    helpful_model: str = opt("", "helpfulness reward model (combined reward, with safety_model)")
    safety_model: str = opt("", "safety reward model (combined reward, with helpful_model)")
    threshold: float = opt(0.15, "combined reward: use the safety model when its probability is below this")
    unsafe_prompts: str = opt("builtin", "prompts routed to the safety model: builtin (rows flagged prompt_unsafe, and the built-in task's harmful asks) or flagged (rows flagged prompt_unsafe only)")
    probabilities: bool = opt(False, "single model: write σ(r) instead of the raw scalar")
    whiten: bool = opt(False, "standardise the scores over the file (mean 0, std 1)")
    dtype: str = opt("float32", "weight dtype")
    precision: str = opt("fp32", "fp32, or bf16 autocast, or auto (bf16 where the device computes it natively)")
    max_length: int = opt(1024, "tokens per prompt + response")
    max_tokens: int = opt(2048, "tokens per packed scoring row")
    threads: int = opt(0, "torch CPU threads (0 = torch default)")

    def __post_init__(self):
        if not self.input:
            raise ValueError("input is required: a file of {prompt, response} rows")
        if bool(self.model) == bool(self.helpful_model or self.safety_model):
            raise ValueError("set either model (one reward model) or helpful_model and safety_model (combined reward)")
        if not self.model and not (self.helpful_model and self.safety_model):
            raise ValueError("the combined reward needs both helpful_model and safety_model")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be a probability in (0, 1), not {self.threshold}")
        if self.unsafe_prompts not in ("builtin", "flagged"):
            raise ValueError(f"unsafe_prompts must be builtin or flagged, not {self.unsafe_prompts!r}")
        one_of(self, "precision", "fp32", "bf16", "auto")
        at_least(self, 1, "max_length", "max_tokens")
        at_least(self, 0, "threads")


def read_scoring_rows(path: str) -> list[dict]:
    """Rows with a non-empty prompt text, a response text and an optional boolean prompt_unsafe."""
    rows, problems = read_rows(path), []
    for where, row in rows:
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            problems.append(f"{where}: prompt: missing or not a non-empty string")
        if not isinstance(row.get("response"), str):
            problems.append(f"{where}: response: missing or not a string")
        if row.get("prompt_unsafe") is not None and not isinstance(row["prompt_unsafe"], bool):
            problems.append(f"{where}: prompt_unsafe: expected true or false")
    if problems:
        raise DataError(problems, path)
    return [row for _, row in rows]


def run(cfg: ScoreConfig) -> dict:
    rows = read_scoring_rows(cfg.input)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    load = lambda path, probs=False: RewardModel.from_pretrained(  # noqa: E731
        path, dtype=cfg.dtype, probabilities=probs, max_length=cfg.max_length, max_tokens=cfg.max_tokens, precision=cfg.precision)
    if cfg.model:
        reward = SingleReward(load(cfg.model, cfg.probabilities), whiten_output=cfg.whiten)
    else:
        flagged = {r["prompt"] for r in rows if r.get("prompt_unsafe")}
        builtin = cfg.unsafe_prompts == "builtin"
        reward = CombinedReward(load(cfg.helpful_model), load(cfg.safety_model),
                                lambda p: p in flagged or (builtin and is_unsafe_prompt(p)),
                                threshold=cfg.threshold, whiten_output=cfg.whiten)
    scores = reward([r["prompt"] for r in rows], [r["response"] for r in rows])
    out = Path(cfg.output)
    write_jsonl_atomic(out, [{"prompt": r["prompt"], "response": r["response"], "score": s} for r, s in zip(rows, scores)])
    summary = {"rows": len(rows), "mean": statistics.fmean(scores),
               "std": statistics.pstdev(scores), "output": str(out)}
    return {**summary, **getattr(reward, "last_stats", {})}
