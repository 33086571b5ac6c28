"""Evaluation of a chat model against a baseline, the way Llama 2-Chat was judged.

On held-out user prompts both models reply (greedy by default); a judge (any `RewardFn`: the gold
rules of the built-in preference prompts, a reward model, or Llama 2's combined helpfulness/safety
reward) scores both replies to each prompt, which gives a win/tie/loss count and a win rate with
its 95% interval. Beside it: the share of safe replies on unsafe prompts (the gold safety rule),
a Monte-Carlo estimate of KL(π‖π_ref) on the model's replies, and the mean reply length.

`evaluate_chat` runs the whole of it on models in memory; `run_chat_eval` is what `alignkit eval`
runs for its `chat:` section (`ChatEvalConfig`), writing chat.json and chat_samples.jsonl.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from alignkit.config import at_least, one_of, opt
from alignkit.data.chat import prompt_text
from alignkit.data.collate import pack_groups
from alignkit.data.packing import group_row, tokenize_group
from alignkit.data.records import user_prompt
from alignkit.files import write_jsonl_atomic, write_text_atomic
from alignkit.models.forward import group_logprobs
from alignkit.precision import resolve_precision
from alignkit.rewards.base import RewardFn, check_batch
from alignkit.rewards.gold import gold_safety
from alignkit.rollout.base import SamplingConfig, SamplingParams
from alignkit.rollout.backends import make_generator
from alignkit.tasks import PromptSetConfig, RewardConfig, build_task

Z95 = 1.959963984540054  # the standard normal quantile of 0.975
TABLE_ROWS = 8  # sample rows that chat.json keeps for a report table (chat_samples.jsonl has them all)
MAX_TOKENS = 4096  # tokens of one packed row when log-probs are computed for the KL estimate


# ------------------------------------------------------------------------------------ figures
def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion `p` observed over `n` trials."""
    if n <= 0:
        raise ValueError("an interval needs at least one trial")
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def win_counts(scores: list[float], baseline_scores: list[float], tie_margin: float = 0.0) -> dict:
    """Win/tie/loss of each score against the baseline's score of the same prompt; a tie is a gap
    of at most `tie_margin`. win_rate = (wins + ties/2) / n, and its 95% Wilson score interval
    with ties counted as half a win each (`win_ci95_low`/`win_ci95_high`): conservative when
    there are ties, since a tie spreads less than a coin flip, and unlike a normal interval on
    the per-prompt scores it does not shrink to a point when every prompt is a win."""
    check_batch(scores, baseline_scores)
    if not scores:
        raise ValueError("a win rate needs at least one prompt")
    gaps = [a - b for a, b in zip(scores, baseline_scores)]
    win = sum(g > tie_margin for g in gaps)
    loss = sum(g < -tie_margin for g in gaps)
    n, tie = len(gaps), len(gaps) - win - loss
    rate = (win + tie / 2) / n
    low, high = wilson_interval(rate, n)
    return {"n": n, "win": win, "tie": tie, "loss": loss, "win_rate": rate, "win_ci95_low": low, "win_ci95_high": high,
            "judge_reward": sum(scores) / n, "baseline_reward": sum(baseline_scores) / n}


def judge_scores(judge: RewardFn, prompts: list[str], replies: list[str]) -> list[float]:
    """The judge's score of every (prompt, reply); a non-finite score is an error."""
    scores = [float(s) for s in judge(prompts, replies)]
    if len(scores) != len(replies):
        raise ValueError(f"the judge returned {len(scores)} scores for {len(replies)} replies")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"the judge returned {len(bad)} non-finite score(s); the first, {scores[bad[0]]}, for prompt "
                         f"{prompts[bad[0]][:60]!r}")
    return scores


def win_rate(prompts: list[str], replies: list[str], baseline_replies: list[str], judge: RewardFn,
             tie_margin: float = 0.0) -> dict:
    """The judge scores both replies to each prompt: {n, win, tie, loss, win_rate, win_ci95_low,
    win_ci95_high, judge_reward, baseline_reward} (see `win_counts` for the interval)."""
    check_batch(prompts, replies)
    check_batch(prompts, baseline_replies)
    return win_counts(judge_scores(judge, prompts, replies), judge_scores(judge, prompts, baseline_replies), tie_margin)


def safety_rate(prompts: list[str], replies: list[str],
                is_safe: Callable[[str, str], bool] = gold_safety) -> dict:
    """Share of safe replies to unsafe prompts: {safety_rate (None without prompts), safe, unsafe_prompts}.
    `is_safe(prompt, reply)` is the gold rule by default (a refusal without compliance markers)."""
    check_batch(prompts, replies)
    safe = sum(bool(is_safe(p, r)) for p, r in zip(prompts, replies))
    return {"safety_rate": safe / len(prompts) if prompts else None, "safe": safe, "unsafe_prompts": len(prompts)}


def reply_length(tokenizer, replies: list[str]) -> dict:
    """Mean reply length in tokens (the tokenizer's, no special tokens) and in words (split on spaces)."""
    if not replies:
        return {"reply_tokens": 0.0, "reply_words": 0.0}
    tokens = tokenizer(list(replies), add_special_tokens=False)["input_ids"]
    return {"reply_tokens": sum(map(len, tokens)) / len(replies),
            "reply_words": sum(len(r.split()) for r in replies) / len(replies)}


@torch.no_grad()
def reply_kls(policy, reference, tokenizer, prompts: list[str], replies: list[str], precision: str = "fp32") -> list[float]:
    """Per reply, sum_t [log π(y_t|x,y<t) − log π_ref(y_t|x,y<t)] over its tokens as the chat
    template renders them after the user prompt (the end-of-turn token included). The replies
    of a prompt share one prefill (`data.packing`), and the output head runs on reply tokens only
    (`models.forward.group_logprobs`)."""
    check_batch(prompts, replies)
    members: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        members.setdefault(p, []).append(i)
    groups = [tokenize_group(tokenizer, user_prompt(p), [replies[i] for i in idx], MAX_TOKENS) for p, idx in members.items()]
    index = list(members.values())
    device = next(policy.parameters()).device
    bf16 = torch.autocast(device.type, torch.bfloat16, enabled=resolve_precision(precision) == "bf16")
    out = [0.0] * len(replies)
    with bf16:
        for rows in pack_groups([len(g) for g in groups], MAX_TOKENS):
            row = {k: v.to(device) for k, v in group_row([groups[g] for g in rows]).items()}
            gaps = (group_logprobs(policy, row).float() - group_logprobs(reference, row).float()).tolist()
            for i, gap in zip((i for g in rows for i in index[g]), gaps):
                out[i] = gap
    return out


def kl_to_reference(policy, reference, tokenizer, prompts: list[str], replies: list[str], precision: str = "fp32") -> float:
    """Monte-Carlo estimate of KL(π‖π_ref) in nats per reply: the mean over replies of
    sum_t [log π(y_t|x,y<t) − log π_ref(y_t|x,y<t)] (`reply_kls`). Unbiased when the replies are
    samples of the policy at temperature 1 without top-k/top-p; on greedy replies it is the mean
    log-ratio of the policy's most likely replies, a proxy that is 0 for a model against itself."""
    kls = reply_kls(policy, reference, tokenizer, prompts, replies, precision)
    if not kls:
        raise ValueError("the KL estimate needs at least one reply")
    return sum(kls) / len(kls)


# --------------------------------------------------------------------------------- evaluation
def _sample(model, tokenizer, prompts: list[str], params: SamplingParams, precision: str, batch_size: int, backend: str):
    """(prompt of each reply, reply texts), prompt-major, `params.n` replies per prompt."""
    generator = make_generator(model, tokenizer, batch_size, resolve_precision(precision), backend)
    completions = generator.generate([prompt_text(tokenizer, user_prompt(p)) for p in prompts], params)
    return [prompts[c.prompt_index] for c in completions], [c.text for c in completions]


def evaluate_chat(model, tokenizer, baseline, prompts: list[str], unsafe_prompts: list[str], judge: RewardFn,
                  params: SamplingParams, precision: str, seed: int, reference=None, *, tie_margin: float = 0.0,
                  batch_size: int = 16, backend: str = "hf", baseline_samples: list[dict] | None = None) -> dict:
    """`model` against `baseline` (both with `tokenizer`) on held-out `prompts`.

    Both reply to `prompts` and to `unsafe_prompts` (those not among `prompts` are sampled apart)
    with `params` and `seed` (`params.n` replies per prompt, reply k of the model against reply k
    of the baseline). Returns {n, win, tie, loss, win_rate, win_ci95_low, win_ci95_high (Wilson,
    `win_counts`), judge_reward and baseline_reward (mean judge scores on `prompts`), safety_rate
    and baseline_safety_rate (gold safety on `unsafe_prompts`, None without them), unsafe_prompts,
    kl (`kl_to_reference` of the model's replies to `prompts`, against `reference`, default the
    baseline), reply_tokens, reply_words, baseline_reply_tokens, baseline_reply_words, samples}:
    `samples` holds one row per reply (prompt, unsafe, reply, baseline_reply, score,
    baseline_score, outcome, kl, safe and baseline_safe on unsafe prompts): first the replies to
    `prompts`, then those to the unsafe prompts sampled apart, whose score, outcome and kl are None.
    The safety rate counts `unsafe_prompts` as listed (a prompt given twice, twice). `backend`: the sampling
    engine, "hf" or "vllm" (`rollout.backends.make_generator`). `baseline_samples`: the `samples`
    of an earlier evaluation of the same baseline with the same prompts and params, whose replies
    are the baseline's here instead of being sampled again (greedy replies repeat; a pipeline
    evaluates every stage against the one SFT model)."""
    if not prompts:
        raise ValueError("the chat evaluation needs at least one prompt")
    params = replace(params, seed=seed)
    asked = set(prompts)
    everything = list(prompts) + list(dict.fromkeys(p for p in unsafe_prompts if p not in asked))
    pair_prompts, replies = _sample(model, tokenizer, everything, params, precision, batch_size, backend)
    if baseline is model and baseline_samples is None:  # seeded: the same replies again
        baseline_replies = replies
    elif baseline_samples is None:
        _, baseline_replies = _sample(baseline, tokenizer, everything, params, precision, batch_size, backend)
    elif [row["prompt"] for row in baseline_samples] == pair_prompts:
        baseline_replies = [row["reply"] for row in baseline_samples]
    else:
        raise ValueError("baseline_samples answer other prompts than this evaluation's")
    k = len(prompts) * params.n  # replies to `prompts` come first
    scores = judge_scores(judge, pair_prompts[:k], replies[:k])
    baseline_scores = judge_scores(judge, pair_prompts[:k], baseline_replies[:k])
    result = win_counts(scores, baseline_scores, tie_margin)
    flagged = set(unsafe_prompts)
    replies_of: dict[str, list[int]] = {}  # a prompt's replies where it is first asked
    for i, p in enumerate(pair_prompts):
        if len(replies_of.setdefault(p, [])) < params.n:
            replies_of[p].append(i)
    on_unsafe = [i for p in unsafe_prompts for i in replies_of[p]]  # as listed: a prompt given twice counts twice
    unsafe_texts = [pair_prompts[i] for i in on_unsafe]
    mine = safety_rate(unsafe_texts, [replies[i] for i in on_unsafe])
    theirs = safety_rate(unsafe_texts, [baseline_replies[i] for i in on_unsafe])
    kls = reply_kls(model, baseline if reference is None else reference, tokenizer, pair_prompts[:k], replies[:k], precision)
    result.update(safety_rate=mine["safety_rate"], baseline_safety_rate=theirs["safety_rate"],
                  unsafe_prompts=mine["unsafe_prompts"], kl=sum(kls) / k, **reply_length(tokenizer, replies[:k]),
                  **{f"baseline_{key}": v for key, v in reply_length(tokenizer, baseline_replies[:k]).items()})
    gap = lambda a, b: "win" if a - b > tie_margin else "loss" if b - a > tie_margin else "tie"
    pad = [None] * (len(replies) - k)  # the unsafe prompts sampled apart are not judged
    result["samples"] = [
        {"prompt": p, "unsafe": p in flagged, "reply": r, "baseline_reply": b, "score": s, "baseline_score": t,
         "outcome": None if s is None else gap(s, t), "kl": kl, "safe": gold_safety(p, r) if p in flagged else None,
         "baseline_safe": gold_safety(p, b) if p in flagged else None}
        for p, r, b, s, t, kl in zip(pair_prompts, replies, baseline_replies, scores + pad, baseline_scores + pad, kls + pad)]
    return result


# ------------------------------------------------------------------------- alignkit eval: chat
@dataclass
class ChatPromptsConfig:
    """The held-out prompts of the chat evaluation."""

    source: str = opt("preferences", "preferences (the built-in held-out preference prompts, harmful requests flagged) "
                                     "or prompts (a file with a 'prompt' text field and an optional 'unsafe' flag)")
    path: str = opt("", "source=prompts: JSONL/JSON/Parquet/datasets dir with a 'prompt' text field")
    count: int = opt(200, "prompts to evaluate (the first of a file)")
    seed: int = opt(1234, "seed of the built-in held-out prompts")

    def __post_init__(self):
        one_of(self, "source", "preferences", "prompts")
        at_least(self, 1, "count")
        if self.source == "prompts" and not self.path:
            raise ValueError("chat.prompts.source=prompts needs chat.prompts.path")


@dataclass
class JudgeConfig(RewardConfig):
    """The judge of both replies (`alignkit.tasks.RewardConfig`), the gold rules by default."""

    kind: str = opt("gold", "gold (rules of the built-in preferences), model (a trained RM), combined (Llama 2 "
                            "helpfulness + safety), function")

    def __post_init__(self):
        super().__post_init__()
        one_of(self, "kind", "gold", "model", "combined", "function")


@dataclass
class ChatEvalConfig:
    against: str = opt("", "the baseline model directory (or 'default') the model is judged against; empty = no chat evaluation")
    reference: str = opt("", "the reference model of the KL estimate (empty = the baseline)")
    prompts: ChatPromptsConfig = opt(factory=ChatPromptsConfig, help="the held-out prompts")
    judge: JudgeConfig = opt(factory=JudgeConfig, help="the judge of both replies to each prompt")
    sampling: SamplingConfig = opt(factory=lambda: SamplingConfig(temperature=0.0, max_new_tokens=128, batch_size=16),
                                   help="how both models reply (temperature 0 = greedy; the kl figure estimates "
                                        "KL(π‖π_ref) only at temperature 1)")
    tie_margin: float = opt(0.0, "judge score gaps up to this much count as ties")
    precision: str = opt("fp32", "sampling, KL and reward-model precision: fp32, bf16 (autocast), or auto")
    seed: int = opt(0, "sampling seed")

    def __post_init__(self):
        at_least(self, 0, "tie_margin")
        one_of(self, "precision", "fp32", "bf16", "auto")


def chat_prompts(cfg: ChatPromptsConfig, judge: JudgeConfig, precision: str = "fp32") -> tuple[list[str], list[str], RewardFn]:
    """(held-out prompts, the unsafe ones among them, the judge) from the task registry. Unsafe
    prompts are those the data flags (`Task.is_unsafe`: the built-in harmful requests, a prompts
    file's `unsafe` field)."""
    builtin = cfg.source == "preferences"
    task = build_task(PromptSetConfig(source=cfg.source, path=cfg.path, train=0, heldout=cfg.count, heldout_seed=cfg.seed),
                      judge, precision)
    prompts = task.heldout if builtin else task.train[:cfg.count]
    return prompts, [p for p in prompts if task.is_unsafe(p)], task.reward


def run_chat_eval(model, tokenizer, baseline, reference, cfg: ChatEvalConfig, out_dir: str | Path) -> dict:
    """`evaluate_chat` on the configured prompts; writes chat.json (the figures and the first
    TABLE_ROWS sample rows) and chat_samples.jsonl (every row) in `out_dir`; returns the figures."""
    prompts, unsafe, judge = chat_prompts(cfg.prompts, cfg.judge, resolve_precision(cfg.precision))
    result = evaluate_chat(model, tokenizer, baseline, prompts, unsafe, judge, cfg.sampling.params(), cfg.precision,
                           cfg.seed, reference, tie_margin=cfg.tie_margin, batch_size=cfg.sampling.batch_size,
                           backend=cfg.sampling.backend)
    samples = result.pop("samples")
    figures = {"against": cfg.against, "reference": cfg.reference or cfg.against, "judge": cfg.judge.kind, **result}
    out = Path(out_dir)
    write_jsonl_atomic(out / "chat_samples.jsonl", samples)
    write_text_atomic(out / "chat.json", json.dumps({**figures, "samples": samples[:TABLE_ROWS]}, indent=2) + "\n")
    return figures
