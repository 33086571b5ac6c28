"""Accuracy of a model on arithmetic problems, checked by the verifier (greedy decoding)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import at_least, one_of, opt
from alignkit.data.chat import prompt_text
from alignkit.data.records import Problem, user_prompt
from alignkit.data.tasks.arithmetic import ArithmeticConfig, generate_problems
from alignkit.data.tasks.arithmetic import prompt_text as task_prompt
from alignkit.rewards.verifiers import extract_answer, verify
from alignkit.rollout.base import SamplingParams
from alignkit.rollout.hf import HFGenerator

log = logging.getLogger("alignkit")


@dataclass
class ArithmeticEvalConfig:
    problems: int = opt(200, "held-out problems to evaluate (0 = skip)")
    style: str = opt("answer", "prompt style: answer (only the number) or cot (step by step)")
    max_new_tokens: int = opt(48, "generation budget per problem")
    batch_size: int = opt(32, "prompts decoded together")
    seed: int = opt(1234, "seed of the held-out problem set")
    word_problems: bool = opt(True, "short stories; false gives the plain form 'What is 47 + 38?'")

    def __post_init__(self):
        at_least(self, 0, "problems")
        at_least(self, 1, "max_new_tokens", "batch_size")
        one_of(self, "style", "answer", "cot")


@dataclass
class TrainingEvalConfig(ArithmeticEvalConfig):
    """The evaluation of a command that trains: the same keys, and the starting model's too."""

    baseline: bool = opt(False, "also evaluate the starting model before training (same problems)")


def heldout_problems(cfg: ArithmeticEvalConfig) -> list[Problem]:
    return generate_problems(cfg.problems, seed=cfg.seed, split="heldout",
                             config=ArithmeticConfig(word_problems=cfg.word_problems))


def prompts_for(tokenizer, problems: list[Problem], style: str) -> list[str]:
    return [prompt_text(tokenizer, user_prompt(task_prompt(p, style))) for p in problems]


def evaluate_arithmetic(model, tokenizer, problems: list[Problem], cfg: ArithmeticEvalConfig,
                        samples_path: str | Path | None = None) -> dict:
    """Greedy accuracy; writes one JSON line per problem to `samples_path` when given."""
    generator = HFGenerator(model, tokenizer, batch_size=cfg.batch_size)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens)
    completions = generator.generate(prompts_for(tokenizer, problems, cfg.style), params)
    rows, correct = [], 0.0
    for problem, comp in zip(problems, completions):
        score = verify(comp.text, problem.answer)
        correct += score
        rows.append({"id": problem.id, "question": problem.question, "answer": problem.answer,
                     "response": comp.text, "extracted": extract_answer(comp.text), "correct": bool(score)})
    if samples_path is not None:
        path = Path(samples_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"accuracy": correct / max(1, len(problems)), "n": len(problems)}


def starting_accuracy(model, tokenizer, cfg: TrainingEvalConfig, run_dir: Path) -> dict:
    """Held-out accuracy of the starting model (eval.baseline), on the problems the trained one gets."""
    if cfg.problems <= 0 or not cfg.baseline:
        return {}
    acc = evaluate_arithmetic(model, tokenizer, heldout_problems(cfg), cfg, run_dir / "eval_samples_start.jsonl")["accuracy"]
    log.info("starting model: held-out arithmetic accuracy %.3f", acc)
    return {"eval/start_arithmetic_accuracy": acc}
