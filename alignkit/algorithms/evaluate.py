"""`alignkit eval` (arithmetic accuracy with the verifier) and `alignkit generate`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import at_least, non_empty, opt
from alignkit.data.chat import prompt_text
from alignkit.data.records import user_prompt
from alignkit.data.tasks.arithmetic import ArithmeticConfig, generate_problems
from alignkit.eval.arithmetic import ArithmeticEvalConfig, evaluate_arithmetic
from alignkit.models.load import ModelConfig, load_model
from alignkit.rollout.base import SamplingConfig
from alignkit.rollout.hf import HFGenerator
from alignkit.tasks import read_prompts


@dataclass
class EvalConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the model to evaluate")
    eval: ArithmeticEvalConfig = opt(factory=ArithmeticEvalConfig, help="the arithmetic evaluation")
    min_digits: int = opt(2, "smallest operand size (digits)")
    max_digits: int = opt(2, "largest operand size (digits)")
    output_dir: str = opt("runs/eval", "where samples.jsonl and result.json go")

    def __post_init__(self):
        at_least(self, 1, "min_digits", "eval.problems")
        at_least(self, self.min_digits, "max_digits")


def run_eval(cfg: EvalConfig) -> dict:
    model, tokenizer, path = load_model(cfg.model, train=False)
    task = ArithmeticConfig(min_digits=cfg.min_digits, max_digits=cfg.max_digits, word_problems=cfg.eval.word_problems)
    problems = generate_problems(cfg.eval.problems, seed=cfg.eval.seed, split="heldout", config=task)
    out = Path(cfg.output_dir)
    result = evaluate_arithmetic(model, tokenizer, problems, cfg.eval, out / "samples.jsonl")
    result = {"model": path, "style": cfg.eval.style, **result}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


@dataclass
class GenerateConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the model to sample from")
    prompts: list[str] = opt(factory=lambda: ["What is 23 + 19? Answer with only the number."], help="user messages")
    prompts_file: str = opt("", "a JSONL file with a 'prompt' field per line (used instead of prompts)")
    sampling: SamplingConfig = opt(factory=lambda: SamplingConfig(temperature=0.0, batch_size=16),
                                   help="samples per prompt (n) and how (temperature 0 = greedy)")
    seed: int = opt(0, "sampling seed")
    output: str = opt("runs/generate/samples.jsonl", "where the completions go")

    def __post_init__(self):
        if not self.prompts_file:
            non_empty(self, "prompts")


def run_generate(cfg: GenerateConfig) -> dict:
    prompts = read_prompts(cfg.prompts_file) if cfg.prompts_file else list(cfg.prompts)
    model, tokenizer, _ = load_model(cfg.model, train=False)
    texts = [prompt_text(tokenizer, user_prompt(p)) for p in prompts]
    generator = HFGenerator(model, tokenizer, cfg.sampling.batch_size)
    completions = generator.generate(texts, cfg.sampling.params(cfg.seed))
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for c in completions:
            f.write(json.dumps({"prompt": prompts[c.prompt_index], "sample": c.sample_index,
                                "response": c.text, "finish_reason": c.finish_reason}) + "\n")
    for c in completions[: min(len(completions), 8)]:
        print(f"[{c.prompt_index}.{c.sample_index}] {prompts[c.prompt_index]!r} -> {c.text!r}")
    return {"completions": len(completions), "output": str(out)}
