"""RRHF (rank responses to align with human feedback): `alignkit rrhf`.

The whole story:
1. Candidates: a file of prompts with k scored responses (`load_ranked`), or, built in, k answers
   sampled from the starting policy for each prompt and scored: arithmetic training problems
   checked by the verifier, with the gold answer added as one more candidate (the default), or
   prompts of the synthetic preference task scored by its gold reward function (a RewardFn).
   Samples are collected once, before training.
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

from alignkit.algorithms.dpo import finish, starting_accuracy
from alignkit.config import opt
from alignkit.data.formats import load_ranked
from alignkit.data.packing import pack_rows, shuffled, tokenize_group
from alignkit.data.records import RankedResponses, user_prompt
from alignkit.data.tasks.arithmetic import ArithmeticConfig, generate_problems, prompt_text, target_text
from alignkit.data.tasks.preferences import build_prompts
from alignkit.engine.config import TrainConfig
from alignkit.engine.trainer import Engine, fit, steps_for
from alignkit.eval.arithmetic import ArithmeticEvalConfig
from alignkit.losses.rrhf import rrhf_loss
from alignkit.models.forward import group_logprobs
from alignkit.models.load import ModelConfig, add_lora, load_model
from alignkit.rewards.base import FunctionReward, GoldReward, RewardFn
from alignkit.rewards.verifiers import verify
from alignkit.rollout.base import Completion, SamplingParams, chat_prompts
from alignkit.rollout.hf import HFGenerator

log = logging.getLogger("alignkit")


@dataclass
class CandidatesConfig:
    task: str = opt("arithmetic", "arithmetic (verifier reward, gold answer added) or preferences (synthetic prompts, gold reward function)")
    prompts: int = opt(256, "training prompts")
    samples: int = opt(4, "responses sampled from the policy per prompt")
    temperature: float = opt(1.0, "sampling temperature")
    top_p: float = opt(1.0, "nucleus sampling mass")
    top_k: int = opt(0, "top-k sampling (0 = off)")
    max_new_tokens: int = opt(24, "generation budget per response")
    style: str = opt("answer", "arithmetic prompt style: answer (only the number) or cot")
    include_gold: bool = opt(True, "arithmetic: add the gold answer as a candidate")
    drop_ties: bool = opt(True, "leave out prompts whose candidates all score the same (no ranking to learn, no best response)")
    word_problems: bool = opt(True, "arithmetic: short stories; false gives the plain form 'What is 47 + 38?'")
    batch_size: int = opt(16, "prompts decoded together (each with `samples` rows)")
    dtype: str = opt("fp32", "sampling precision: fp32, or bf16 autocast (faster on CPUs with bf16 matmul), or auto (bf16 where the device computes it natively)")
    seed: int = opt(0, "seed of the prompts and of the sampler")


@dataclass
class RRHFDataConfig:
    path: str = opt("", "prompts with scored responses (prompt + responses + scores); empty = sample built-in candidates")
    split: str | None = opt(None, "split of a DatasetDict directory")
    max_length: int = opt(512, "tokens of prompt + longest response (prompt cut from the left, then responses)")
    candidates: CandidatesConfig = opt(factory=CandidatesConfig, help="built-in candidates (used when path is empty)")


@dataclass
class RRHFConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the starting policy")
    train: TrainConfig = opt(factory=lambda: TrainConfig(output_dir="runs/rrhf", lr=2e-5, epochs=3.0), help="training loop")
    data: RRHFDataConfig = opt(factory=RRHFDataConfig, help="scored candidates")
    alpha: float = opt(1.0, "length normalisation: p_i = log pi(y_i) / |y_i|^alpha")
    rank_weight: float = opt(1.0, "weight of the ranking loss next to the SFT loss on the best response")
    eval: ArithmeticEvalConfig = opt(factory=lambda: ArithmeticEvalConfig(problems=200), help="held-out arithmetic accuracy after training")


def task_prompts(cfg: CandidatesConfig) -> tuple[list[str], RewardFn, list[str] | None]:
    """(user prompts, their reward function, gold answers to add as candidates or None)."""
    if cfg.task == "arithmetic":
        problems = generate_problems(cfg.prompts, seed=cfg.seed, split="train", config=ArithmeticConfig(word_problems=cfg.word_problems))
        texts = [prompt_text(p, cfg.style) for p in problems]
        answer = {t: p.answer for t, p in zip(texts, problems)}
        reward = FunctionReward(lambda prompt, response: verify(response, answer[prompt]), "verifier")
        return texts, reward, [target_text(p, cfg.style) for p in problems] if cfg.include_gold else None
    if cfg.task == "preferences":
        return build_prompts(cfg.prompts, seed=cfg.seed, split="train"), GoldReward(), None
    raise ValueError(f"data.candidates.task must be arithmetic or preferences, not {cfg.task!r}")


def sample_candidates(model, tokenizer, cfg: CandidatesConfig) -> list[RankedResponses]:
    """k distinct sampled responses per prompt (plus the gold one), scored; prompts with fewer
    than two candidates (or, with drop_ties, all scored the same) are left out. On arithmetic a
    reply cut off by max_new_tokens scores 0, even when its last number happens to match."""
    texts, reward, gold = task_prompts(cfg)
    conversations = [user_prompt(t) for t in texts]
    params = SamplingParams(n=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    completions = HFGenerator(model, tokenizer, cfg.batch_size, cfg.dtype).generate(chat_prompts(tokenizer, conversations), params)
    ranked = rank_candidates(texts, conversations, completions, reward, gold, cfg)
    log.info("sampled candidates for %d of %d prompts (%d completions)", len(ranked), len(texts), len(completions))
    return ranked


def rank_candidates(texts: list[str], conversations: list, completions: list[Completion], reward: RewardFn,
                    gold: list[str] | None, cfg: CandidatesConfig) -> list[RankedResponses]:
    """Distinct responses per prompt (gold first when given) with their scores."""
    responses: list[dict[str, bool]] = [{g: False} for g in gold] if gold else [{} for _ in texts]  # text -> cut off
    for c in completions:
        text, seen = c.text.strip(), responses[c.prompt_index]
        if text:
            seen[text] = seen.get(text, True) and c.finish_reason == "length"
    flat = [(i, r, cut) for i, rs in enumerate(responses) for r, cut in rs.items()]
    scores = reward([texts[i] for i, _, _ in flat], [r for _, r, _ in flat])
    if cfg.task == "arithmetic":
        scores = [0.0 if cut else s for s, (_, _, cut) in zip(scores, flat)]
    ranked, start = [], 0
    for conv, rs in zip(conversations, responses):
        mine = tuple(scores[start: start + len(rs)])
        if len(rs) >= 2 and not (cfg.drop_ties and len(set(mine)) == 1):
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
    ranked = load_ranked(path, cfg.data.split if cfg.data.path else None) if path else None
    torch.manual_seed(cfg.train.seed)
    model, tokenizer, _ = load_model(cfg.model, train=False)
    start = starting_accuracy(model, tokenizer, cfg.eval, Path(cfg.train.output_dir))
    if ranked is None:
        ranked = sample_candidates(model, tokenizer, cfg.data.candidates)
        write_ranked(ranked, saved)
    groups = [tokenize_group(tokenizer, r.prompt, list(r.responses), cfg.data.max_length, list(r.scores)) for r in ranked]
    if None in groups:
        log.warning("%d prompt(s) dropped: a response has no token left within data.max_length", groups.count(None))
    groups = [g for g in groups if g is not None]
    if not groups:
        raise ValueError("no usable prompts with scored responses")
    rows = pack_rows(groups, cfg.train.max_tokens_per_batch)
    log.info("RRHF on %d prompts (%d responses) in %d packed rows", len(groups), sum(len(g.responses) for g in groups), len(rows))
    if cfg.model.lora is not None:
        model = add_lora(model, cfg.model.lora)
    engine = Engine(model, cfg.train, steps_for(len(rows), cfg.train), asdict(cfg))
    result = fit(engine, rrhf_step(engine.model, cfg), shuffled(rows, cfg.train.seed))
    return {"prompts": len(groups), **start, **result, **finish(engine, tokenizer, cfg.eval, Path(cfg.train.output_dir), cfg.train.merge_lora)}
