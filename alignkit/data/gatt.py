"""Ghost Attention (GAtt, Llama 2 §3.3): multi-turn dialogues that teach a model to keep following
an instruction given once, in the first user turn.

Construction, as Llama 2 describes it:

1. A dialogue is T user turns [u1 .. uT] (the built-in preference prompts, `gatt_dialogues`) and
   an instruction `inst` (`INSTRUCTIONS`: each one has a rule that checks whether a reply follows
   it).
2. The assistant replies are sampled from the model turn by turn, the model seeing its own earlier
   replies, with the instruction on EVERY user turn (`inst + " " + u_k`, `with_instruction`).
   Several candidates are drawn per turn and the first one that follows the instruction is kept:
   rejection sampling, so a kept reply is a sample of the model's replies that follow. A dialogue
   in which some turn has no following candidate is dropped whole (`sample_following`).
3. The training examples keep the instruction on the FIRST user turn only and carry the loss on
   the last assistant turn only (tokenized with `targets="last"` of `data.chat`: every earlier
   token, earlier assistant replies included, has no label). One example per turn prefix
   (turns 1..k for k = 1..T), so every turn depth is trained (`training_examples`).

The model is reached through a `Sampler`, a plain function, so this module stays below the
models and the sampler (`eval.gatt.build_gatt_examples` builds one over a Hugging Face model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from alignkit.config import at_least, non_empty, one_of, opt
from alignkit.data.records import Message, SFTExample
from alignkit.data.tasks.preferences import build_prompts


@dataclass(frozen=True)
class Instruction:
    """An instruction a user gives once for the whole dialogue, and the rule that checks a reply."""

    name: str
    text: str
    follows: Callable[[str], bool]


def _upper_case(reply: str) -> bool:
    return any(c.isalpha() for c in reply) and reply == reply.upper()


def _exclamation(reply: str) -> bool:
    return reply.rstrip().endswith("!")


def _pirate(reply: str) -> bool:
    return reply.lstrip().startswith("Ahoy!")


def _short(reply: str) -> bool:
    return 1 <= len(reply.split()) <= 10


INSTRUCTIONS: dict[str, Instruction] = {i.name: i for i in (
    Instruction("upper_case", "Answer in upper case letters only.", _upper_case),
    Instruction("exclamation", "End every reply with an exclamation mark '!'.", _exclamation),
    Instruction("pirate", "Speak like a pirate: start every reply with 'Ahoy!'.", _pirate),
    Instruction("short", "Answer in at most 10 words.", _short),
)}


@dataclass
class GAttConfig:
    """`alignkit sft`'s `data.gatt`: Ghost Attention dialogues sampled from the starting model."""

    enabled: bool = opt(False, "build GAtt dialogues with the starting model before training and train on them")
    dialogues: int = opt(64, "dialogues tried (instructions assigned in turn); those with a non-following turn are dropped")
    turns: int = opt(3, "user turns per dialogue (one training example per turn prefix)")
    instructions: list[str] = opt(factory=lambda: list(INSTRUCTIONS),
                                  help=f"instructions to use, of: {', '.join(INSTRUCTIONS)}")
    samples_per_turn: int = opt(4, "candidate replies sampled per turn; the first that follows the instruction is kept")
    temperature: float = opt(0.7, "sampling temperature of the candidates")
    max_new_tokens: int = opt(64, "most tokens per sampled reply")
    seed: int = opt(0, "seed of the dialogues' prompts and of the sampler")
    mix: str = opt("add", "add: GAtt examples join the other SFT data; replace: train on GAtt examples only")
    eval_dialogues: int = opt(16, "held-out dialogues (prompts never in training) on which instruction following "
                                  "per turn is measured, instruction in the first turn only, before and after training "
                                  "(0 = off)")

    def __post_init__(self):
        at_least(self, 1, "dialogues", "turns", "samples_per_turn", "max_new_tokens")
        at_least(self, 0, "temperature", "eval_dialogues")
        non_empty(self, "instructions")
        unknown = [n for n in self.instructions if n not in INSTRUCTIONS]
        if unknown:
            raise ValueError(f"instructions: unknown {unknown}; built-in: {', '.join(INSTRUCTIONS)}")
        one_of(self, "mix", "add", "replace")


Sampler = Callable[[list[tuple[Message, ...]], int], list[list[str]]]
"""`sample(conversations, n)`: n candidate replies for each conversation (each ends with a user turn)."""


def gatt_dialogues(n: int, turns: int, seed: int, split: str = "train") -> list[tuple[str, ...]]:
    """`n` dialogues of `turns` user prompts each, from the built-in preference prompts of `split`
    ("train" or "heldout": the two never share a prompt); deterministic."""
    prompts = build_prompts(n * turns, seed=seed, split=split)
    return [tuple(prompts[i * turns: (i + 1) * turns]) for i in range(n)]


def with_instruction(inst: Instruction, user: str) -> str:
    return f"{inst.text} {user}"


def sample_following(sample: Sampler, dialogues: list[tuple[str, ...]], instructions: list[Instruction],
                     n: int) -> list[tuple[str, ...] | None]:
    """GAtt's sampling: dialogue i is answered turn by turn under `instructions[i]`, which is on
    every user turn; of the `n` candidates of a turn the first that follows is kept. Returns each
    dialogue's replies, or None when some turn had no following candidate (rejected)."""
    replies: list[list[str] | None] = [[] for _ in dialogues]
    for k in range(max((len(d) for d in dialogues), default=0)):
        alive = [i for i, r in enumerate(replies) if r is not None and k < len(dialogues[i])]
        if not alive:
            break
        convs = []
        for i in alive:
            inst, users = instructions[i], dialogues[i]
            conv: tuple[Message, ...] = ()
            for u, a in zip(users[:k], replies[i]):
                conv += (Message("user", with_instruction(inst, u)), Message("assistant", a))
            convs.append(conv + (Message("user", with_instruction(inst, users[k])),))
        for i, candidates in zip(alive, sample(convs, n)):
            kept = next((c for c in candidates if instructions[i].follows(c)), None)
            replies[i] = None if kept is None else replies[i] + [kept]
    return [None if r is None else tuple(r) for r in replies]


def training_examples(users: tuple[str, ...], replies: tuple[str, ...], inst: Instruction) -> list[SFTExample]:
    """One example per turn prefix: the instruction on the first user turn only. Tokenize them with
    `targets="last"` so that only the last assistant reply carries loss."""
    messages: tuple[Message, ...] = ()
    out = []
    for k, (u, a) in enumerate(zip(users, replies)):
        messages += (Message("user", with_instruction(inst, u) if k == 0 else u), Message("assistant", a))
        out.append(SFTExample(messages))
    return out


def collect_gatt(sample: Sampler, cfg: GAttConfig) -> tuple[list[SFTExample], dict]:
    """GAtt training examples (list[SFTExample], to tokenize with `targets="last"`) sampled through
    `sample`, and statistics: dialogues tried and kept, examples, and tried/kept per instruction."""
    dialogues = gatt_dialogues(cfg.dialogues, cfg.turns, cfg.seed, "train")
    chosen = [INSTRUCTIONS[cfg.instructions[i % len(cfg.instructions)]] for i in range(len(dialogues))]
    per_instruction = {n: {"tried": 0, "kept": 0} for n in cfg.instructions}
    examples: list[SFTExample] = []
    for users, inst, replies in zip(dialogues, chosen, sample_following(sample, dialogues, chosen, cfg.samples_per_turn)):
        per_instruction[inst.name]["tried"] += 1
        if replies is not None:
            per_instruction[inst.name]["kept"] += 1
            examples += training_examples(users, replies, inst)
    kept = sum(c["kept"] for c in per_instruction.values())
    return examples, {"tried": len(dialogues), "kept": kept, "examples": len(examples), "per_instruction": per_instruction}
