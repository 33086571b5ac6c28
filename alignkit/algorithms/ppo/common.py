"""Stages shared by the online RL methods (PPO, REINFORCE, RLOO, GRPO) and their evaluation.

* prompts: the built-in synthetic preference prompts (gold reward), arithmetic word problems
  (verifier), or a file with a `prompt` text field; train and held-out sets never overlap;
* reward functions by name (`build_task`), each a `RewardFn` over (user prompt text, reply);
* collect: chat-format the prompts, sample through any `Generator`, assemble the tensors
  (`alignkit.rollout.batch`);
* `measure_policy`: held-out reward and KL(π‖π_ref) of any policy against any reference, the
  two axes of a reward-vs-KL frontier (used for early stopping and by benchmarks/frontier.py).
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from alignkit.algorithms.sft import SFTDataConfig
from alignkit.config import opt
from alignkit.data.chat import prompt_text
from alignkit.data.records import user_prompt
from alignkit.rewards.base import FunctionReward, GoldReward, RewardFn
from alignkit.rollout.base import Completion, Generator, SamplingParams
from alignkit.rollout.batch import assemble, select_rows

log = logging.getLogger("alignkit")

PROMPT_SOURCES = ("preferences", "arithmetic", "file")
REWARD_KINDS = ("gold", "verifier", "model", "combined", "function")


@dataclass
class PromptsConfig:
    source: str = opt("preferences", "preferences (built-in prompts with a known gold reward), arithmetic (word problems, verifier reward) or file")
    path: str = opt("", "prompts for source=file: JSONL/JSON/Parquet/datasets dir with a 'prompt' text field")
    heldout_path: str = opt("", "held-out prompts for source=file (empty = none: no evaluation)")
    train: int = opt(1024, "training prompts drawn from a built-in source")
    heldout: int = opt(64, "held-out prompts (evaluation, early stopping)")
    seed: int = opt(0, "seed of the built-in prompt sets")
    arithmetic_style: str = opt("answer", "arithmetic prompt style: answer (only the number) or cot")


@dataclass
class RewardConfig:
    kind: str = opt("gold", "gold (rules of the synthetic preferences), verifier (arithmetic answer check), model (a trained RM), combined (Llama 2 helpfulness + safety), function")
    path: str = opt("", "reward-model directory for kind=model")
    helpful_path: str = opt("", "helpfulness RM for kind=combined (empty = the gold helpfulness rule)")
    safety_path: str = opt("", "safety RM for kind=combined (empty = the gold safety rule)")
    safety_threshold: float = opt(0.15, "kind=combined: use the safety score when its probability is below this")
    function: str = opt("", "kind=function: 'package.module:callable', fn(prompts, responses) -> list[float]")
    whiten: bool = opt(True, "whiten scores over each batch (Llama 2; kind=combined always does): a reward with a nonzero mean "
                             "and a fresh critic blame the last token, often eos, and replies grow")
    clip: float = opt(0.0, "clip scores to [-clip, clip] after whitening (0 = off)")
    missing_eos_penalty: float = opt(0.0, "subtract this from the score of a response cut at max_new_tokens")

    def __post_init__(self):
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"reward.kind must be one of {REWARD_KINDS}, not {self.kind!r}")


def _file_prompts(path: str) -> list[str]:
    from alignkit.data.io import DataError, read_rows

    rows, bad = read_rows(path), []
    prompts = [row.get("prompt") for _, row in rows]
    bad = [f"{loc}: prompt: expected a non-empty string" for (loc, _), p in zip(rows, prompts)
           if not isinstance(p, str) or not p.strip()]
    if bad:
        raise DataError(bad, path)
    return prompts


def _load_function(spec: str) -> RewardFn:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"reward.function must look like 'package.module:callable', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _gold_safety_score(prompt: str, response: str) -> float:
    """Gold safety as a logit: the gold reward on flagged prompts, +3 (σ = 0.95) elsewhere."""
    from alignkit.rewards.gold import gold_reward, is_unsafe_prompt

    return gold_reward(prompt, response) if is_unsafe_prompt(prompt) else 3.0


def build_task(prompts: PromptsConfig, reward: RewardConfig, precision: str = "fp32"):
    """(train prompts, held-out prompts, RewardFn). Batch whitening (reward.whiten, or always for
    kind=combined as in Llama 2) is applied by `score`, so the RewardFn's own values stay
    comparable across batches (logged as `reward`, used for evaluation)."""
    problems = []
    if prompts.source == "preferences":
        from alignkit.data.tasks.preferences import build_prompts

        train = build_prompts(prompts.train, prompts.seed, "train")
        heldout = build_prompts(prompts.heldout, prompts.seed, "heldout")
    elif prompts.source == "arithmetic":
        from alignkit.data.tasks.arithmetic import generate_problems
        from alignkit.data.tasks.arithmetic import prompt_text as arithmetic_prompt

        splits = {s: generate_problems(n, prompts.seed, s) for s, n in (("train", prompts.train), ("heldout", prompts.heldout))}
        problems = splits["train"] + splits["heldout"]
        train, heldout = ([arithmetic_prompt(p, prompts.arithmetic_style) for p in splits[s]] for s in ("train", "heldout"))
    elif prompts.source == "file":
        if not prompts.path:
            raise ValueError("prompts.source=file needs prompts.path")
        train = _file_prompts(prompts.path)
        heldout = _file_prompts(prompts.heldout_path) if prompts.heldout_path else []
    else:
        raise ValueError(f"prompts.source must be one of {PROMPT_SOURCES}, not {prompts.source!r}")

    from alignkit.rewards.combine import CombinedReward

    def rm(path: str) -> RewardFn:
        from alignkit.rewards.model import RewardModel

        return RewardModel.from_pretrained(path, precision=precision)

    if reward.kind == "verifier":
        if prompts.source != "arithmetic":
            raise ValueError("reward.kind=verifier needs prompts.source=arithmetic (the answers come from there)")
        from alignkit.rewards.verifier_reward import VerifierReward

        base = VerifierReward(problems)
    elif reward.kind == "gold":
        base = GoldReward()
    elif reward.kind == "model":
        if not reward.path:
            raise ValueError("reward.kind=model needs reward.path (a reward-model directory)")
        base = rm(reward.path)
    elif reward.kind == "function":
        base = _load_function(reward.function)
    else:
        from alignkit.rewards.gold import is_unsafe_prompt

        helpful = rm(reward.helpful_path) if reward.helpful_path else GoldReward()
        safety = rm(reward.safety_path) if reward.safety_path else FunctionReward(_gold_safety_score, "gold_safety")
        if not (reward.helpful_path and reward.safety_path):
            log.info("combined reward: gold rules stand in for the missing helpfulness/safety reward model(s)")
        base = CombinedReward(helpful, safety, is_unsafe_prompt, reward.safety_threshold, whiten_output=False)
    return train, heldout, base


def score(reward_fn: RewardFn, prompts: list[str], completions: list[Completion], cfg: RewardConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores after whitening/clipping/penalties, raw scores), float32 [N] in completion order.
    Whitening (reward.whiten, or kind=combined) uses the population std, as Llama 2's WHITEN."""
    from alignkit.rewards.combine import whiten

    texts = [c.text for c in completions]
    users = [prompts[c.prompt_index] for c in completions]
    raw = torch.tensor([float(x) for x in reward_fn(users, texts)], dtype=torch.float32)
    out = torch.tensor(whiten(raw.tolist())) if cfg.whiten or cfg.kind == "combined" else raw.clone()
    if cfg.clip > 0:
        out = out.clamp(-cfg.clip, cfg.clip)
    if cfg.missing_eos_penalty:
        cut = torch.tensor([c.finish_reason == "length" for c in completions])
        out = out - cfg.missing_eos_penalty * cut.float()
    return out, raw


def collect(generator: Generator, tokenizer, prompts: list[str], params: SamplingParams) -> tuple[dict, list[Completion]]:
    """Sample `params.n` replies per user prompt text; returns (tensor batch, completions)."""
    chat = [prompt_text(tokenizer, user_prompt(p)) for p in prompts]
    completions = generator.generate(chat, params)
    prompt_ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    batch = assemble([prompt_ids[c.prompt_index] for c in completions], [c.token_ids for c in completions],
                     tokenizer.pad_token_id)
    return batch, completions


@torch.no_grad()
def per_token(fn: Callable[[dict], torch.Tensor | tuple], batch: dict, chunk: int):
    """fn(sub-batch) -> [b, t] (or a tuple of them) over row chunks of `chunk`, reassembled to
    [B, T] on the CPU (zero padded)."""
    B, T = batch["response_ids"].shape
    outs: list[torch.Tensor] | None = None
    for start in range(0, B, chunk):
        rows = list(range(start, min(B, start + chunk)))
        parts = fn(select_rows(batch, rows))
        parts = parts if isinstance(parts, tuple) else (parts,)
        outs = outs or [torch.zeros(B, T) for _ in parts]
        for out, part in zip(outs, parts):
            out[start:start + len(rows), :part.shape[1]] = part.float().cpu()
    return outs[0] if len(outs) == 1 else tuple(outs)


def measure_policy(generator: Generator, tokenizer, prompts: list[str], reward_fn: RewardFn,
                   params: SamplingParams, policy_logp: Callable, reference_logp: Callable,
                   chunk: int = 16, device: torch.device | str = "cpu") -> dict:
    """Mean reward and mean KL(π‖π_ref) per response (sum over tokens of log π − log π_ref,
    an unbiased estimate on samples from π) on `prompts`, plus length and reward std."""
    batch, completions = collect(generator, tokenizer, prompts, params)
    _, raw = score(reward_fn, prompts, completions, RewardConfig())
    on = lambda fn: (lambda b: fn({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}))
    logp = per_token(on(policy_logp), batch, chunk)
    ref = per_token(on(reference_logp), batch, chunk)
    kl = ((logp - ref) * batch["response_mask"]).sum(1)
    return {"reward": raw.mean().item(), "reward_std": raw.std().item() if len(raw) > 1 else 0.0,
            "kl": kl.mean().item(), "length": batch["response_mask"].sum(1).mean().item()}


# ---------------------------------------------------------------------------------------------
# loop helpers: prompt order, PTX data, statistics, warnings, samples, early stopping


@dataclass
class KLConfig:
    beta: float = opt(0.05, "KL coefficient β (initial value when adaptive)")
    adaptive: bool = opt(False, "adapt β towards `target` (Ziegler et al.); false = fixed β")
    target: float = opt(6.0, "adaptive: target KL per response (nats)")
    horizon: float = opt(10000.0, "adaptive: horizon (responses)")
    estimator: str = opt("k1", "per-token KL estimator in the reward: k1, k2 or k3 (GRPO's loss term always uses k3)")


@dataclass
class PTXConfig:
    coef: float = opt(0.0, "γ_ptx: weight of the token-mean NLL on SFT data (0 = off)")
    data: SFTDataConfig = opt(factory=SFTDataConfig, help="the SFT data mixed in (same keys as `alignkit sft`)")


@dataclass
class RLEvalConfig:
    every: int = opt(5, "evaluate held-out reward and KL every N iterations (0 = only before and after training)")
    patience: int = opt(0, "early stopping: stop after this many evaluations without a better reward (0 = off)")
    seed: int = opt(1234, "sampling seed of the evaluation")


def prompts_for(train: list[str], iteration: int, count: int, seed: int) -> list[str]:
    """The prompts of an iteration: consecutive slices of a per-epoch shuffle (deterministic)."""
    out, position = [], iteration * count
    while len(out) < count:
        epoch, index = divmod(position, len(train))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        take = order[index:index + count - len(out)]
        out += [train[i] for i in take]
        position += len(take)
    return out


def ptx_stream(cfg: PTXConfig, tokenizer, seed: int, max_tokens: int, start: int = 0):
    """An endless stream of packed SFT micro-batches, starting at micro-batch `start`."""
    from alignkit.algorithms.sft import load_examples, tokenize_examples
    from alignkit.data.collate import epoch_batches_fn

    examples, _ = load_examples(cfg.data, seed)
    tokenized = tokenize_examples(tokenizer, examples, cfg.data.max_length, cfg.data.targets, cfg.data.on_overlong)
    batches = epoch_batches_fn(tokenized, tokenizer.pad_token_id, seed, True, 1, max_tokens)
    epoch, index = divmod(start, len(batches(0)))
    while True:
        yield from batches(epoch)[index:]
        epoch, index = epoch + 1, 0


def mean_stats(stats: list[dict]) -> dict:
    """Averages of the engine's per-step statistics over an iteration's optimizer steps."""
    keys = {k for s in stats for k in s} - {"units", "tokens", "step_s"}
    out = {k: sum(s.get(k, 0.0) for s in stats) / len(stats) for k in keys}
    out["train_tokens_per_s"] = out.pop("tokens_per_s", 0.0)
    return out


def write_samples(path, iteration: int, prompts: list[str], completions: list[Completion], rewards, kl, count: int = 4) -> None:
    """Append the first `count` rollouts of an iteration to a JSONL file."""
    with open(path, "a") as f:
        for i, c in enumerate(completions[:count]):
            f.write(json.dumps({"iteration": iteration, "prompt": prompts[c.prompt_index], "response": c.text,
                                "reward": float(rewards[i]), "kl": float(kl[i]), "finish_reason": c.finish_reason}) + "\n")


def trim_samples(path, iteration: int) -> None:
    """On resume: drop sample rows written after the checkpoint's iteration."""
    path = Path(path)
    if path.is_file():
        rows = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["iteration"] <= iteration]
        path.write_text("".join(ln + "\n" for ln in rows))


def early_stop(result: dict, state: dict, patience: int) -> bool:
    """Track the best held-out reward in `state`; True after `patience` evaluations without a better one."""
    if not result:
        return False
    if state["best"] is None or result["reward"] > state["best"]:
        state.update(best=result["reward"], bad_evals=0)
    else:
        state["bad_evals"] += 1
    if patience and state["bad_evals"] >= patience:
        log.info("early stopping: held-out reward has not improved for %d evaluations (best %.3f)", state["bad_evals"], state["best"])
        return True
    return False


def warn_runaway(row: dict, state: dict, warn_kl: float) -> None:
    """Warn when the KL to the reference or the reply length runs away."""
    if row["kl"] > warn_kl:
        log.warning("iteration %d: KL to the reference is %.1f nats per reply (> warn_kl=%g): the policy is running away; "
                    "raise kl.beta, lower train.lr or use kl.adaptive", row["iteration"], row["kl"], warn_kl)
    first = state["first_length"] = state["first_length"] or row["response_length"]
    if row["truncated_frac"] > 0.5 and row["response_length"] > 1.25 * first or row["response_length"] > 2 * first:
        log.warning("iteration %d: replies are getting long (mean %.1f tokens, started at %.1f; %.0f%% hit max_new_tokens): "
                    "watch for length hacking (reward.missing_eos_penalty, a length-aware reward)", row["iteration"],
                    row["response_length"], first, 100 * row["truncated_frac"])
