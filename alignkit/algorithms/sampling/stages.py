"""The stages every sampling-based method shares (docs/architecture.md, "online methods are stages"):

    collect (generate K per prompt) -> score (a RewardFn) -> select (filter / rank) -> train (SFT)

PPO and its relatives collect and score through the same `collect` and `score` (and assemble
their tensors from the samples' token ids, `ppo.common.collect_batch`).

A `Sample` is one response to one prompt with its reward and where it came from (iteration,
sampler model). Selection functions take and return lists of samples, so methods compose them:
best-of-N is `best_per_prompt`, RAFT-global is `top_fraction`, ReST's Improve steps are
`above_threshold`, RFT is `above_threshold(1)` then `dedupe(key=reasoning_path)`, and Llama 2's
rejection sampling is `best_per_prompt` over the samples of all iterations pooled together.
The train stage (SFT on the selected samples) is `train_stage.train_stage`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from alignkit.data.chat import Tokenized, prompt_text, tokenize_prompt_response, truncate
from alignkit.data.records import Message, SFTExample, user_prompt
from alignkit.files import write_text_atomic
from alignkit.rewards.verifiers import answers_match, extract_answer, majority_vote, pass_at_k
from alignkit.rollout.base import SamplingParams


@dataclass
class Sample:
    prompt: str
    """The user prompt text (what a RewardFn sees; no chat template)."""
    response: str
    prompt_index: int = 0
    sample_index: int = 0
    reward: float | None = None
    iteration: int = 0
    """The iteration (or stage) that produced it."""
    source: str = ""
    """The model that produced it."""
    finish_reason: str = ""
    token_ids: list[int] = field(default_factory=list, repr=False)
    """The generated token ids (what PPO's tensors are assembled from)."""


# ---------------------------------------------------------------------------------- collect
def collect(generator, tokenizer, prompts: list[str], params: SamplingParams, iteration: int = 0,
            source: str = "", system: str | None = None, shots: tuple[Message, ...] = ()) -> list[Sample]:
    """`params.n` samples per user prompt text, prompt-major (the chat template is applied here;
    `shots`, exemplar turns, go before each prompt and are not part of the samples' prompts)."""
    texts = [prompt_text(tokenizer, user_prompt(p, system, shots)) for p in prompts]
    out = generator.generate(texts, params)
    return [Sample(prompts[c.prompt_index], c.text, c.prompt_index, c.sample_index, None, iteration, source,
                   c.finish_reason, c.token_ids) for c in out]


# ------------------------------------------------------------------------------------ score
def score(samples: list[Sample], reward_fn, batch_size: int = 256, truncated: float | None = None) -> list[Sample]:
    """Set `reward` on every sample (in place, batched); returns the samples. With `truncated`, a
    sample cut off by max_new_tokens gets that reward instead: for a verifier, a cut-off reply is
    no answer even when its last number happens to match. A NaN or infinite score is an error
    (naming the first such sample), never something to train on; no sample is changed then."""
    values = []
    for s in range(0, len(samples), batch_size):
        chunk = samples[s:s + batch_size]
        rewards = reward_fn([x.prompt for x in chunk], [x.response for x in chunk])
        if len(rewards) != len(chunk):
            raise ValueError(f"the reward function returned {len(rewards)} scores for {len(chunk)} samples")
        values += [float(r) if truncated is None or x.finish_reason != "length" else float(truncated)
                   for x, r in zip(chunk, rewards)]
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        x = samples[bad[0]]
        prompt = x.prompt if len(x.prompt) <= 60 else x.prompt[:57] + "..."
        raise ValueError(f"the reward function returned {len(bad)} non-finite score(s) of {len(values)}; the first: "
                         f"{values[bad[0]]} for response {x.sample_index} of prompt {prompt!r}")
    for x, v in zip(samples, values):
        x.reward = v
    return samples


# ----------------------------------------------------------------------------------- select
def by_prompt(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    """Samples grouped by prompt text, in first-seen order."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for x in samples:
        groups[x.prompt].append(x)
    return dict(groups)


def _reward(x: Sample) -> float:
    if x.reward is None:
        raise ValueError("select stages need scored samples: run score() first")
    return x.reward


def best_per_prompt(samples: Iterable[Sample], k: int = 1) -> list[Sample]:
    """RAFT 'local' / best-of-N: the k highest-reward samples of each prompt (ties: earliest first)."""
    out = []
    for group in by_prompt(samples).values():
        out.extend(sorted(group, key=lambda x: -_reward(x))[:k])
    return out


def top_fraction(samples: list[Sample], fraction: float) -> list[Sample]:
    """RAFT 'global': the top `fraction` of all samples by reward, whatever their prompt."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    keep = max(1, math.ceil(fraction * len(samples))) if samples else 0
    order = sorted(range(len(samples)), key=lambda i: (-_reward(samples[i]), i))[:keep]
    return [samples[i] for i in sorted(order)]


def above_threshold(samples: Iterable[Sample], threshold: float) -> list[Sample]:
    """Samples with reward >= threshold (ReST Improve steps; threshold 1 keeps correct answers)."""
    return [x for x in samples if _reward(x) >= threshold]


_EQUATION = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/x\u00d7])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")


_TIMES = {"x": "*", "\u00d7": "*"}


def normalise_text(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def reasoning_path(text: str) -> str:
    """RFT's key for a distinct reasoning path: the equations 'a op b = c' in order, normalised
    ('x'/'×' read as '*', numbers as written, commas dropped); for a reply without an equation
    (answer-only outputs), its normalised text."""
    eqs = [f"{a}{_TIMES.get(op, op)}{b}={c}" for a, op, b, c in _EQUATION.findall(text.replace(",", ""))]
    return "|".join(eqs) if eqs else normalise_text(text)


def dedupe(samples: Iterable[Sample], key: Callable[[str], str] = normalise_text) -> list[Sample]:
    """Keep the first sample of each (prompt, key(response)); order is kept."""
    seen, out = set(), []
    for x in samples:
        k = (x.prompt, key(x.response))
        if k not in seen:
            seen.add(k)
            out.append(x)
    return out


def cap_per_prompt(samples: Iterable[Sample], cap: int, seed: int = 0) -> list[Sample]:
    """At most `cap` samples per prompt, chosen at random (seeded; ReST-EM's per-problem cap)."""
    rng, out = random.Random(seed), []
    for group in by_prompt(samples).values():
        out.extend(group if len(group) <= cap else sorted(rng.sample(group, cap), key=group.index))
    return out


# ------------------------------------------------------------------------------------ train
def to_sft_examples(samples: Iterable[Sample], system: str | None = None) -> list[SFTExample]:
    return [SFTExample(user_prompt(x.prompt, system) + (Message("assistant", x.response),)) for x in samples]


def tokenize_samples(tokenizer, samples: list[Sample], max_length: int = 512, weighted: bool = False,
                     system: str | None = None) -> list[Tokenized]:
    """Tokenized (prompt, response) pairs with the response as target; `weighted` attaches each
    sample's reward as its per-token weight (ReST-EM's reward-weighted NLL)."""
    out = []
    for x in samples:
        tok = truncate(tokenize_prompt_response(tokenizer, user_prompt(x.prompt, system), x.response), max_length)
        if tok is None:
            continue
        if weighted:
            tok.weight = _reward(x)
        out.append(tok)
    if not out:
        raise ValueError("no samples were selected for training (none passed the selection)")
    return out


def write_samples(path, samples: list[Sample], mode: str = "w", **columns: list) -> None:
    """One JSON line per sample (prompt, response, reward, iteration, source, finish_reason, and
    one value of each of `columns`, e.g. PPO's per-reply kl); mode "a" appends."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as f:
        for i, x in enumerate(samples):
            f.write(json.dumps({"prompt": x.prompt, "response": x.response, "reward": x.reward, "iteration": x.iteration,
                                "source": x.source, "finish_reason": x.finish_reason,
                                **{k: float(v[i]) for k, v in columns.items()}}) + "\n")


def sample_digest(samples: Iterable[Sample]) -> str:
    """A short fingerprint of scored samples in order (prompt, response, reward, finish reason: what
    `write_samples` keeps), to check that a gathered pool holds exactly what its shards sampled."""
    h = hashlib.sha256()
    for x in samples:
        h.update(json.dumps([x.prompt, x.response, x.reward, x.finish_reason]).encode() + b"\n")
    return h.hexdigest()[:16]


def record_shards(path, phase: str, shards: list[dict], pool: list[Sample]) -> None:
    """One line of `path` (a run's `shards.jsonl`) for the sampling phase `phase`: its `shards`
    (`shard`, `rank` that sampled it, null when read back from a stored phase, `first` prompt,
    `prompts`, `samples` and the sampler's `digest`) and `pool`: the digest of each shard's slice
    of the gathered pool that the run goes on with. A line of the same phase (a resumed run's
    replay) is replaced."""
    path = Path(path)
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["phase"] != phase] if path.is_file() else []
    cuts, start = [], 0
    for shard in shards:
        cuts.append(sample_digest(pool[start:start + shard["samples"]]))
        start += shard["samples"]
    if start != len(pool):
        raise ValueError(f"{phase}: the pool holds {len(pool)} samples, its shards {start}")
    lines.append(json.dumps({"phase": phase, "shards": shards, "pool": cuts}))
    write_text_atomic(path, "".join(ln + "\n" for ln in lines))


# ---------------------------------------------------------------------------------- metrics
def reward_stats(samples: list[Sample]) -> dict:
    rewards = sorted(_reward(x) for x in samples)
    if not rewards:
        return {"n": 0}
    return {"n": len(rewards), "mean": sum(rewards) / len(rewards), "max": rewards[-1], "min": rewards[0],
            "median": rewards[len(rewards) // 2] if len(rewards) % 2 else
            (rewards[len(rewards) // 2 - 1] + rewards[len(rewards) // 2]) / 2}


def pass_maj_at_k(samples: list[Sample], answer_for: Callable[[str], str], ks: Iterable[int]) -> dict:
    """pass@k (unbiased, from all n samples of a prompt) and maj@k (majority vote over disjoint
    chunks of k samples, averaged) for each k <= n, averaged over prompts."""
    groups = by_prompt(samples)
    out: dict[str, float] = {}
    for k in ks:
        passes, majs = [], []
        for prompt, group in groups.items():
            n = len(group)
            if k > n:
                continue
            gold = answer_for(prompt)
            correct = [answers_match(extract_answer(x.response), gold) for x in group]
            passes.append(pass_at_k(n, sum(correct), k))
            chunks = [group[i:i + k] for i in range(0, n - k + 1, k)]
            majs.append(sum(answers_match(majority_vote([extract_answer(x.response) for x in c]), gold)
                            for c in chunks) / len(chunks))
        if passes:
            out[f"pass@{k}"] = sum(passes) / len(passes)
            out[f"maj@{k}"] = sum(majs) / len(majs)
    return out
