"""Ghost Attention with a model: sampling the GAtt training dialogues, and measuring how many turns a
model keeps following an instruction given once.

`build_gatt_examples` samples the training data of `data.gatt` (instruction on every user turn,
rejection of replies that do not follow) through a `chat_sampler` over the model.
`instruction_following_by_turn` is the evaluation: as at inference, the instruction is on the
FIRST user turn only; the model answers greedily turn by turn with its own replies in the history;
each reply is checked by the instruction's rule. Its dialogues come from the held-out split of
the built-in prompts, which shares no prompt with the training dialogues.
"""

from __future__ import annotations

import itertools

from alignkit.data.gatt import (
    INSTRUCTIONS,
    GAttConfig,
    Instruction,
    Sampler,
    collect_gatt,
    gatt_dialogues,
    with_instruction,
)
from alignkit.data.records import Message, SFTExample
from alignkit.rollout.base import SamplingParams, chat_prompts
from alignkit.rollout.hf import HFGenerator


def chat_sampler(model, tokenizer, precision: str = "fp32", max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0, batch_size: int = 16) -> Sampler:
    """A `data.gatt.Sampler` over a Hugging Face model: conversations formatted with the chat
    template, replies stripped of surrounding whitespace; each call is seeded with `seed` plus the
    number of earlier calls (deterministic, and the turns of a dialogue draw differently)."""
    generator = HFGenerator(model, tokenizer, batch_size=batch_size, dtype=precision)
    calls = itertools.count()

    def sample(conversations: list[tuple[Message, ...]], n: int) -> list[list[str]]:
        params = SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + next(calls))
        texts = [c.text.strip() for c in generator.generate(chat_prompts(tokenizer, conversations), params)]
        return [texts[i * n:(i + 1) * n] for i in range(len(conversations))]

    return sample


def build_gatt_examples(model, tokenizer, cfg: GAttConfig, precision: str = "fp32") -> tuple[list[SFTExample], dict]:
    """GAtt training examples sampled from `model` (tokenize them with `targets="last"`) and
    statistics {tried, kept, examples, per_instruction: {name: {tried, kept}}} (`data.gatt.collect_gatt`)."""
    sample = chat_sampler(model, tokenizer, precision, cfg.max_new_tokens, cfg.temperature, cfg.seed)
    return collect_gatt(sample, cfg)


def _summary(marks: list[list[bool]]) -> dict:
    """marks[j][k]: reply k of conversation j follows. Share per turn, its mean over turns, and the
    mean number of turns followed from turn 1 on before the first miss."""
    turns = len(marks[0])
    by_turn = [sum(m[k] for m in marks) / len(marks) for k in range(turns)]
    kept = [next((k for k, ok in enumerate(m) if not ok), turns) for m in marks]
    return {"by_turn": by_turn, "mean": sum(by_turn) / turns, "kept_turns": sum(kept) / len(kept)}


def follow_by_turn(sample: Sampler, dialogues: list[tuple[str, ...]], instructions: list[Instruction]) -> dict:
    """Every dialogue under every instruction, the instruction on the first user turn only, one
    reply per turn from `sample` (greedy for an evaluation) with the earlier replies in the history.
    Returns {"by_turn": [share of following replies at turn 1, 2, ...], "mean": mean over turns,
    "kept_turns": mean count of consecutive following turns from turn 1, "per_instruction": {name:
    the same three}, "rows": [{instruction, users, replies, follows}]}. Dialogues have equal length."""
    pairs = [(inst, users) for inst in instructions for users in dialogues]
    convs: list[tuple[Message, ...]] = [() for _ in pairs]
    replies: list[list[str]] = [[] for _ in pairs]
    for k in range(len(dialogues[0])):
        convs = [c + (Message("user", with_instruction(inst, users[k]) if k == 0 else users[k]),)
                 for c, (inst, users) in zip(convs, pairs)]
        got = [reply for (reply,) in sample(convs, 1)]
        convs = [c + (Message("assistant", reply),) for c, reply in zip(convs, got)]
        for rs, reply in zip(replies, got):
            rs.append(reply)
    marks = [[inst.follows(r) for r in rs] for (inst, _), rs in zip(pairs, replies)]
    per_instruction = {inst.name: _summary([m for (i, _), m in zip(pairs, marks) if i is inst]) for inst in instructions}
    rows = [{"instruction": inst.name, "users": list(users), "replies": rs, "follows": m}
            for (inst, users), rs, m in zip(pairs, replies, marks)]
    return {**_summary(marks), "per_instruction": per_instruction, "rows": rows}


def instruction_following_by_turn(model, tokenizer, dialogues: int, instructions: list[str], turns: int,
                                  precision: str = "fp32", max_new_tokens: int = 64, seed: int = 0) -> dict:
    """`follow_by_turn` of `model`, greedy, on `dialogues` held-out dialogues of `turns` user turns
    (prompts of the held-out split, never in GAtt training data) under each named instruction."""
    held_out = gatt_dialogues(dialogues, turns, seed, "heldout")
    sample = chat_sampler(model, tokenizer, precision, max_new_tokens, temperature=0.0, seed=seed)
    return follow_by_turn(sample, held_out, [INSTRUCTIONS[name] for name in instructions])
