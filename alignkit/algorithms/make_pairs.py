"""Built-in preference pairs: a model's own correct and incorrect answers to arithmetic problems
(`alignkit make-pairs`; `alignkit dpo` builds them on the fly when it has no data.path).

Sample several answers per training problem, check each with the verifier, and pair a correct
answer (chosen) with an incorrect one (rejected). When the model has no correct sample for a
problem, the gold answer (`target_text`) is the chosen response, or (`gold_chosen: false`) the
problem gives no pair, so both sides of every pair are the model's own answers. The file is TRL's
conversational preference format, which `load_preferences` reads back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import at_least, one_of, opt
from alignkit.data.records import PreferencePair, Problem, user_prompt
from alignkit.data.tasks.arithmetic import ArithmeticConfig, generate_problems, prompt_text, target_text
from alignkit.eval.arithmetic import prompts_for
from alignkit.files import write_jsonl_atomic
from alignkit.models.load import ModelConfig, load_model
from alignkit.precision import resolve_precision
from alignkit.rewards.verifiers import verify
from alignkit.rollout.base import Completion, SamplingConfig
from alignkit.rollout.backends import make_generator

log = logging.getLogger("alignkit")


@dataclass
class PairsConfig:
    problems: int = opt(256, "training arithmetic problems to sample")
    sampling: SamplingConfig = opt(factory=lambda: SamplingConfig(n=4, max_new_tokens=24, batch_size=16),
                                   help="answers sampled per problem (n) and how")
    style: str = opt("answer", "prompt style: answer (only the number) or cot (step by step)")
    word_problems: bool = opt(True, "short stories; false gives the plain form 'What is 47 + 38?'")
    pairs_per_problem: int = opt(1, "pairs per problem (each with a different incorrect answer)")
    gold_chosen: bool = opt(True, "when the model has no correct sample, prefer the gold answer; false = only the model's own answers (on-policy pairs)")
    seed: int = opt(0, "seed of the problems and of the sampler")

    def __post_init__(self):
        at_least(self, 1, "problems", "pairs_per_problem")
        one_of(self, "style", "answer", "cot")


def make_pairs(model, tokenizer, cfg: PairsConfig, precision: str = "fp32") -> tuple[list[PreferencePair], dict]:
    """Sample (at `precision`, fp32 or bf16), verify and pair; returns (pairs, statistics)."""
    problems = generate_problems(cfg.problems, seed=cfg.seed, split="train", config=ArithmeticConfig(word_problems=cfg.word_problems))
    generator = make_generator(model, tokenizer, cfg.sampling.batch_size, precision, cfg.sampling.backend)
    completions = generator.generate(prompts_for(tokenizer, problems, cfg.style), cfg.sampling.params(cfg.seed))
    pairs, stats = pair_answers(problems, completions, cfg)
    log.info("built %d pairs from %d problems (sample accuracy %.3f, %d pairs with the gold answer as chosen)",
             len(pairs), len(problems), stats["sample_accuracy"], stats["pairs_with_gold_chosen"])
    return pairs, stats


def pair_answers(problems: list[Problem], completions: list[Completion], cfg: PairsConfig) -> tuple[list[PreferencePair], dict]:
    """Verify each sampled answer and pair a correct one (chosen) with incorrect ones (rejected)."""
    answers: list[dict[str, float]] = [{} for _ in problems]  # distinct stripped texts -> reward
    hits = 0.0
    for c in completions:
        # a reply cut off by max_new_tokens is not an answer, even when its last number happens to match
        reward = verify(c.text, problems[c.prompt_index].answer) if c.finish_reason == "stop" else 0.0
        hits += reward
        if c.text.strip():
            found = answers[c.prompt_index]
            found[c.text.strip()] = max(reward, found.get(c.text.strip(), 0.0))  # correct once = correct
    pairs, gold_chosen, solved = [], 0, 0
    for problem, found in zip(problems, answers):
        right = [t for t, r in found.items() if r > 0]
        # bare wrong numbers first: they contrast the arithmetic itself, not only the answer format
        wrong = sorted((t for t, r in found.items() if r == 0), key=lambda t: not t.lstrip("-").isdigit())[: cfg.pairs_per_problem]
        solved += bool(right)
        if not right and not cfg.gold_chosen:
            continue
        if not right:
            right = [target_text(problem, cfg.style)]
            gold_chosen += len(wrong)
        prompt = user_prompt(prompt_text(problem, cfg.style))
        pairs += [PreferencePair(prompt, right[i % len(right)], rejected) for i, rejected in enumerate(wrong)]
    accuracy = hits / max(1, len(completions))
    stats = {"problems": len(problems), "samples": len(completions), "sample_accuracy": accuracy,
             "problems_with_a_correct_sample": solved, "pairs": len(pairs), "pairs_with_gold_chosen": gold_chosen}
    return pairs, stats


def pair_record(pair: PreferencePair) -> dict:
    """A pair in TRL's conversational format."""
    return {"prompt": [{"role": m.role, "content": m.content} for m in pair.prompt],
            "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}]}


def write_pairs(pairs: list[PreferencePair], path: str | Path) -> Path:
    return write_jsonl_atomic(path, (pair_record(p) for p in pairs))


@dataclass
class MakePairsConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the model whose answers are paired")
    pairs: PairsConfig = opt(factory=PairsConfig, help="sampling and pairing")
    output: str = opt("runs/pairs/pairs.jsonl", "where the pairs go (JSONL, TRL conversational format)")
    precision: str = opt("fp32", "sampling precision: fp32, bf16 (autocast), or auto (bf16 where the device computes it natively)")
    threads: int = opt(0, "torch CPU threads (0 = torch default)")

    def __post_init__(self):
        one_of(self, "precision", "fp32", "bf16", "auto")
        at_least(self, 0, "threads")


def run(cfg: MakePairsConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tokenizer, _ = load_model(cfg.model, train=False)
    pairs, stats = make_pairs(model, tokenizer, cfg.pairs, resolve_precision(cfg.precision))
    return {**stats, "output": str(write_pairs(pairs, cfg.output))}
