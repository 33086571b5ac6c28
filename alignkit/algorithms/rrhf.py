"""RRHF (rank responses to align with human feedback): `alignkit rrhf`.

The whole story:
1. Candidates: a file of prompts with k scored responses (`load_ranked`), or, built in, k answers
   sampled from the starting policy for each training prompt of a task (`alignkit.tasks`) and
   scored by its reward: arithmetic problems checked by the verifier, with the reference answer
   added as one more candidate (the default), or any other task and reward (the synthetic
   preference prompts and their gold rules, a prompts file and a reward model...). Samples are
   collected once, before training.
2. Every micro-batch is one padding-free row of [prompt, response_1 .. response_k] groups: the
   prompt is prefilled once for its k responses, the output head runs on response tokens only.
3. losses.rrhf: hinge ranking of the length-normalised log-probs by reward, plus SFT on the best
   response; units are prompts. Then held-out arithmetic accuracy, and the model is saved.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alignkit.algorithms.dpo import finish
from alignkit.algorithms.sampling.stages import Sample, collect
from alignkit.config import at_least, one_of, opt
from alignkit.data.formats import load_ranked
from alignkit.data.io import write_skipped
from alignkit.data.packing import pack_rows, shuffled, tokenize_group
from alignkit.data.records import RankedResponses, user_prompt
from alignkit.engine.config import TrainConfig
from alignkit.engine.trainer import Engine, fit, steps_for
from alignkit.eval.arithmetic import TrainingEvalConfig, starting_accuracy
from alignkit.losses.rrhf import rrhf_loss
from alignkit.models.forward import group_logprobs
from alignkit.models.load import ModelConfig, add_lora, load_model
from alignkit.rewards.base import RewardFn
from alignkit.rollout.base import SamplingConfig
from alignkit.rollout.backends import make_generator
from alignkit.tasks import RewardConfig, TaskConfig, build_task

log = logging.getLogger("alignkit")


@dataclass
class CandidatesConfig:
    task: TaskConfig = opt(factory=lambda: TaskConfig(train=256, val=0, heldout=0, word_problems=True),
                           help="the prompts: the task's training split (alignkit.tasks)")
    reward: RewardConfig = opt(factory=RewardConfig, help="the candidates' scores (auto: verifier for problems, gold for preferences)")
    sampling: SamplingConfig = opt(factory=lambda: SamplingConfig(n=4, max_new_tokens=24, batch_size=16),
                                   help="sampling (seeded with train.seed; precision: train.precision)")
    include_gold: bool = opt(True, "tasks with answers: add the reference answer as a candidate")
    drop_ties: bool = opt(True, "leave out prompts whose candidates all score the same (no ranking to learn, no best response)")


@dataclass
class RRHFDataConfig:
    path: str = opt("", "prompts with scored responses (prompt + responses + scores); empty = sample built-in candidates")
    split: str | None = opt(None, "split of a DatasetDict directory")
    on_invalid: str = opt("error", "a row of path that cannot be used is an error (listing every one), or skip: drop it with a "
                                   "warning and list it in <output_dir>/skipped.jsonl (no usable row at all is still an error)")
    max_length: int = opt(512, "tokens of prompt + longest response (prompt cut from the left, then responses)")
    candidates: CandidatesConfig = opt(factory=CandidatesConfig, help="built-in candidates (used when path is empty)")


@dataclass
class RRHFConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the starting policy")
    train: TrainConfig = opt(factory=lambda: TrainConfig(output_dir="runs/rrhf", lr=2e-5, epochs=3.0), help="training loop")
    data: RRHFDataConfig = opt(factory=RRHFDataConfig, help="scored candidates")
    alpha: float = opt(1.0, "length normalisation: p_i = log pi(y_i) / |y_i|^alpha")
    rank_weight: float = opt(1.0, "weight of the ranking loss next to the SFT loss on the best response")
    eval: TrainingEvalConfig = opt(factory=lambda: TrainingEvalConfig(problems=200), help="held-out arithmetic accuracy after training")

    def __post_init__(self):
        at_least(self, 0, "alpha", "rank_weight")
        at_least(self, 1, "data.max_length")
        one_of(self, "data.on_invalid", "error", "skip")


def sample_candidates(model, tokenizer, cfg: CandidatesConfig, seed: int, precision: str,
                      skipped: list[dict] | None = None) -> list[RankedResponses]:
    """k distinct sampled responses per prompt (plus the reference one), scored; prompts with fewer
    than two candidates (or, with drop_ties, all scored the same) are left out. On a task with
    answers a reply cut off by max_new_tokens scores 0, even when its last number happens to match.
    Rows of the task's files dropped by task.on_invalid=skip go to `skipped`."""
    task = build_task(cfg.task, cfg.reward, precision)
    if skipped is not None:
        skipped.extend(task.skipped)
    texts = task.train
    gold = [task.reference(t) for t in texts] if task.has_answers and cfg.include_gold else None
    generator = make_generator(model, tokenizer, cfg.sampling.batch_size, precision, cfg.sampling.backend)
    samples = collect(generator, tokenizer, texts, cfg.sampling.params(seed))
    ranked = rank_candidates(texts, [user_prompt(t) for t in texts], samples, task.reward, gold, cfg.drop_ties,
                             cut_is_wrong=task.has_answers)
    log.info("sampled candidates for %d of %d prompts (%d completions)", len(ranked), len(texts), len(samples))
    return ranked


def rank_candidates(texts: list[str], conversations: list, samples: list[Sample], reward: RewardFn,
                    gold: list[str] | None, drop_ties: bool = True, cut_is_wrong: bool = False) -> list[RankedResponses]:
    """Distinct responses per prompt (gold first when given) with their scores; with
    `cut_is_wrong`, a response only ever sampled cut off by max_new_tokens scores 0."""
    responses: list[dict[str, bool]] = [{g: False} for g in gold] if gold else [{} for _ in texts]  # text -> cut off
    for x in samples:
        text, seen = x.response.strip(), responses[x.prompt_index]
        if text:
            seen[text] = seen.get(text, True) and x.finish_reason == "length"
    flat = [(i, r, cut) for i, rs in enumerate(responses) for r, cut in rs.items()]
    scores = reward([texts[i] for i, _, _ in flat], [r for _, r, _ in flat])
    if cut_is_wrong:
        scores = [0.0 if cut else s for s, (_, _, cut) in zip(scores, flat)]
    ranked, start = [], 0
    for conv, rs in zip(conversations, responses):
        mine = tuple(scores[start: start + len(rs)])
        if len(rs) >= 2 and not (drop_ties and len(set(mine)) == 1):
            ranked.append(RankedResponses(conv, tuple(rs), mine))
        start += len(rs)
    return ranked


def write_ranked(ranked: list[RankedResponses], path: Path) -> None:
    """Candidates as JSONL rows {prompt (messages), responses, scores}, which load_ranked reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": [{"role": m.role, "content": m.content} for m in r.prompt],
             "responses": list(r.responses), "scores": list(r.scores)} for r in ranked]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def to_grid(values: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response values [S] (groups in order) as a right-padded [G, K] grid and its mask."""
    mask = torch.arange(int(counts.max()), device=counts.device)[None] < counts[:, None]
    return values.new_zeros(mask.shape).masked_scatter(mask, values), mask


def rrhf_step(model, cfg: RRHFConfig):
    """Step function: summed per-prompt RRHF losses, units = prompts."""

    def step(batch: dict):
        logps, mask = to_grid(group_logprobs(model, batch), batch["n_responses"])
        lengths, _ = to_grid(batch["lengths"], batch["n_responses"])
        scores, _ = to_grid(batch["scores"], batch["n_responses"])
        losses, metrics = rrhf_loss(logps, lengths, scores, mask, cfg.alpha, cfg.rank_weight)
        n = losses.shape[0]
        return losses.sum(), float(n), {k: v.item() * n for k, v in metrics.items() if k != "num_pairs"}

    return step


def run(cfg: RRHFConfig) -> dict:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    saved = Path(cfg.train.output_dir) / "candidates.jsonl"  # built-in candidates; a resumed run reads them back
    path = cfg.data.path or (str(saved) if cfg.train.resume and saved.is_file() else "")
    skipped: list[dict] = []
    ranked = load_ranked(path, cfg.data.split if cfg.data.path else None, cfg.data.on_invalid, skipped) if path else None
    torch.manual_seed(cfg.train.seed)
    model, tokenizer, _ = load_model(cfg.model, train=False)
    start = starting_accuracy(model, tokenizer, cfg.eval, Path(cfg.train.output_dir))
    if ranked is None:
        ranked = sample_candidates(model, tokenizer, cfg.data.candidates, cfg.train.seed, cfg.train.precision, skipped)
        write_ranked(ranked, saved)
    write_skipped(cfg.train.output_dir, skipped)
    groups = [tokenize_group(tokenizer, r.prompt, list(r.responses), cfg.data.max_length, list(r.scores)) for r in ranked]
    if None in groups:
        log.warning("%d prompt(s) dropped: a response has no token left within data.max_length", groups.count(None))
    groups = [g for g in groups if g is not None]
    if any(g.truncated for g in groups):
        log.warning("%d prompt(s) with a response longer than data.max_length=%d were truncated (prompt tokens from the "
                    "left, then response tokens at the right)", sum(g.truncated for g in groups), cfg.data.max_length)
    if not groups:
        raise ValueError("no usable prompts with scored responses")
    rows = pack_rows(groups, cfg.train.max_tokens_per_batch)
    log.info("RRHF on %d prompts (%d responses) in %d packed rows", len(groups), sum(len(g.responses) for g in groups), len(rows))
    if cfg.model.lora is not None:
        model = add_lora(model, cfg.model.lora)
    engine = Engine(model, cfg.train, steps_for(len(rows), cfg.train), asdict(cfg), cfg.train.resume)
    result = fit(engine, rrhf_step(engine.model, cfg), shuffled(rows, cfg.train.seed))
    return {"prompts": len(groups), **start, **result, **finish(engine, tokenizer, cfg.eval, Path(cfg.train.output_dir), cfg.train.merge_lora)}
