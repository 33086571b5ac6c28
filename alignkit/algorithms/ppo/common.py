"""Stages shared by the online RL methods (PPO, REINFORCE, RLOO, GRPO) and their evaluation.

* prompts and reward: the task registry (`alignkit.tasks.build_task`) with PPO's defaults
  (`PromptsConfig`, `RewardConfig`, which adds PPO's shaping of the scores over each batch);
* collect: the sampling methods' `collect` stage, then the tensors assembled from the samples
  (`alignkit.rollout.batch`); score: their `score` stage, then whitening, clipping, penalties;
  `collect_shared`: an iteration's prompts in shards of sampling.batch_size, each with its own
  seed, sampled and scored by the processes in turn and gathered in shard order (data parallel);
* `measure_policy`: held-out reward and KL(π‖π_ref) of any policy against any reference, the
  two axes of a reward-vs-KL frontier (used for early stopping and by benchmarks/frontier.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from alignkit.algorithms.sampling.run_state import shard_seed
from alignkit.algorithms.sampling.stages import Sample, collect, sample_digest, score
from alignkit.algorithms.sft import SFTExamplesConfig
from alignkit.config import opt
from alignkit.data.chat import prompt_text
from alignkit.data.records import user_prompt
from alignkit.engine import distributed
from alignkit.rewards.base import RewardFn
from alignkit.rollout.base import Generator, SamplingParams
from alignkit.rollout.batch import assemble, select_rows
from alignkit.tasks import RewardConfig as TaskRewardConfig
from alignkit.tasks import PromptSetConfig

log = logging.getLogger("alignkit")

@dataclass
class PromptsConfig(PromptSetConfig):
    """PPO's prompts (`alignkit.tasks.PromptSetConfig`) with PPO's defaults: the built-in preference
    prompts, 1024 training and 64 held-out ones, both drawn with `seed`."""

    source: str = opt("preferences", PromptSetConfig.__dataclass_fields__["source"].metadata["help"])
    train: int = opt(1024, "training prompts drawn from a built-in source")
    heldout: int = opt(64, "held-out prompts (evaluation, early stopping)")
    heldout_seed: int | None = opt(None, "seed of the built-in held-out set (null: the same as seed)")
    word_problems: bool = opt(True, "arithmetic: short stories instead of 'What is 47 + 38?'")


@dataclass
class RewardConfig(TaskRewardConfig):
    """The reward (`alignkit.tasks.RewardConfig`, default the gold rules) and how PPO shapes its
    scores over each batch."""

    kind: str = opt("gold", TaskRewardConfig.__dataclass_fields__["kind"].metadata["help"])
    whiten: bool = opt(True, "whiten scores over each batch (Llama 2; kind=combined always does): a reward with a nonzero mean "
                             "and a fresh critic blame the last token, often eos, and replies grow")
    clip: float = opt(0.0, "clip scores to [-clip, clip] after whitening (0 = off)")
    missing_eos_penalty: float = opt(0.0, "subtract this from the score of a response cut at max_new_tokens")


def shape_scores(samples: list[Sample], cfg: RewardConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores after whitening/clipping/penalties, raw scores) of scored samples, float32 [N] in
    sample order. Whitening (reward.whiten, or kind=combined) uses the population std, as Llama
    2's WHITEN, over the whole batch (all the processes' shards). Batch whitening is applied here,
    so the RewardFn's own values stay comparable across batches (logged as `reward`, used for
    evaluation)."""
    from alignkit.rewards.combine import whiten

    raw = torch.tensor([x.reward for x in samples], dtype=torch.float32)
    out = torch.tensor(whiten(raw.tolist())) if cfg.whiten or cfg.kind == "combined" else raw.clone()
    if cfg.clip > 0:
        out = out.clamp(-cfg.clip, cfg.clip)
    if cfg.missing_eos_penalty:
        cut = torch.tensor([x.finish_reason == "length" for x in samples])
        out = out - cfg.missing_eos_penalty * cut.float()
    return out, raw


def collect_batch(generator: Generator, tokenizer, prompts: list[str], params: SamplingParams,
                  iteration: int = 0) -> tuple[dict, list[Sample]]:
    """`params.n` replies per user prompt text (`stages.collect`) and their tensor batch
    (`rollout.batch.assemble`); returns (batch, samples)."""
    samples = collect(generator, tokenizer, prompts, params, iteration=iteration)
    return _assemble(tokenizer, prompts, samples), samples


def collect_shared(generator: Generator, tokenizer, prompts: list[str], params: SamplingParams, reward_fn: RewardFn,
                   shard_size: int, iteration: int = 0) -> tuple[dict, list[Sample], list[dict]]:
    """`collect_batch` over every process: the prompts in shards of `shard_size` (shard i sampled
    with `shard_seed(params.seed, i)`, so shard 0 keeps the seed), each sampled and scored (raw
    rewards, `stages.score`) by one process, the k-th of N taking shards k, k+N, ...; the scored
    samples are gathered onto every process in shard order and the batch is assembled from them,
    so it does not depend on the process count. Returns (batch, samples, one record a shard:
    `shard`, `rank` that sampled it, `first` prompt, `prompts`, `samples`, `digest`)."""
    starts = list(range(0, len(prompts), shard_size))

    def sample_shard(i: int) -> dict:
        start = starts[i]
        got = score(collect(generator, tokenizer, prompts[start:start + shard_size], replace(params, seed=shard_seed(params.seed, i)),
                            iteration=iteration), reward_fn)
        for x in got:
            x.prompt_index += start
        return {"shard": i, "rank": distributed.rank(), "first": start, "prompts": len(prompts[start:start + shard_size]),
                "samples": len(got), "digest": sample_digest(got), "got": got}

    shards = distributed.map_shared(sample_shard, len(starts))
    samples = [x for shard in shards for x in shard.pop("got")]
    return _assemble(tokenizer, prompts, samples), samples, shards


def _assemble(tokenizer, prompts: list[str], samples: list[Sample]) -> dict:
    prompt_ids = tokenizer([prompt_text(tokenizer, user_prompt(p)) for p in prompts], add_special_tokens=False)["input_ids"]
    return assemble([prompt_ids[x.prompt_index] for x in samples], [x.token_ids for x in samples], tokenizer.pad_token_id)


@torch.no_grad()
def per_token(fn: Callable[[dict], torch.Tensor | tuple], batch: dict, chunk: int, shared: bool = False):
    """fn(sub-batch) -> [b, t] (or a tuple of them) over row chunks of `chunk`, reassembled to
    [B, T] on the CPU (zero padded). `shared`: every process calls it on the same batch, each
    computes its share of the chunks (`distributed.map_shared`) and all get the whole result."""
    B, T = batch["response_ids"].shape
    starts = list(range(0, B, chunk))

    def run(i: int) -> tuple:
        parts = fn(select_rows(batch, list(range(starts[i], min(B, starts[i] + chunk)))))
        return tuple(p.float().cpu() for p in (parts if isinstance(parts, tuple) else (parts,)))

    if shared:
        results = distributed.map_shared(run, len(starts))
    else:
        results = [run(i) for i in range(len(starts))]
    outs = [torch.zeros(B, T) for _ in results[0]]
    for start, parts in zip(starts, results):
        for out, part in zip(outs, parts):
            out[start:start + part.shape[0], :part.shape[1]] = part
    return outs[0] if len(outs) == 1 else tuple(outs)


def measure_policy(generator: Generator, tokenizer, prompts: list[str], reward_fn: RewardFn,
                   params: SamplingParams, policy_logp: Callable, reference_logp: Callable,
                   chunk: int = 16, device: torch.device | str = "cpu") -> dict:
    """Mean reward and mean KL(π‖π_ref) per response (sum over tokens of log π − log π_ref,
    an unbiased estimate on samples from π) on `prompts`, plus length and reward std."""
    batch, samples = collect_batch(generator, tokenizer, prompts, params)
    raw = torch.tensor([x.reward for x in score(samples, reward_fn)], dtype=torch.float32)
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
    data: SFTExamplesConfig = opt(factory=SFTExamplesConfig, help="the SFT data mixed in (the keys of `alignkit sft`'s data but packing: PTX rows are always packed)")


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


def ptx_stream(cfg: PTXConfig, tokenizer, seed: int, max_tokens: int, start: int = 0, skipped: list[dict] | None = None):
    """An endless stream of packed SFT micro-batches, starting at micro-batch `start`; the data is
    loaded now (rows dropped by data.on_invalid=skip go to `skipped`)."""
    from alignkit.algorithms.sft import load_examples, tokenize_examples
    from alignkit.data.collate import epoch_batches_fn

    examples, _ = load_examples(cfg.data, seed, skipped)
    tokenized = tokenize_examples(tokenizer, examples, cfg.data.max_length, cfg.data.targets, cfg.data.on_overlong)
    batches = epoch_batches_fn(tokenized, tokenizer.pad_token_id, seed, True, 1, max_tokens)

    def endless():
        epoch, index = divmod(start, len(batches(0)))
        while True:
            yield from batches(epoch)[index:]
            epoch, index = epoch + 1, 0

    return endless()


def mean_stats(stats: list[dict]) -> dict:
    """Averages of the engine's per-step statistics over an iteration's optimizer steps."""
    keys = {k for s in stats for k in s} - {"units", "tokens", "step_s"}
    out = {k: sum(s.get(k, 0.0) for s in stats) / len(stats) for k in keys}
    out["train_tokens_per_s"] = out.pop("tokens_per_s", 0.0)
    return out


def trim_samples(path, iteration: int, iteration_of: Callable[[dict], int] = lambda row: row["iteration"]) -> None:
    """On resume: drop rows (samples, or shard records) written after the checkpoint's iteration
    (all of them at iteration 0)."""
    path = Path(path)
    if path.is_file():
        rows = [ln for ln in path.read_text().splitlines() if ln and iteration_of(json.loads(ln)) <= iteration]
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
