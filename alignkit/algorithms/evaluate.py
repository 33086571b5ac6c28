"""`alignkit eval` (arithmetic accuracy with the verifier; with `chat.against`, the chat evaluation
against a baseline: win rate, safety, KL, length) and `alignkit generate`."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from alignkit.config import at_least, non_empty, opt
from alignkit.data.chat import prompt_text
from alignkit.data.records import user_prompt
from alignkit.data.tasks.arithmetic import ArithmeticConfig, generate_problems
from alignkit.eval.arithmetic import ArithmeticEvalConfig, evaluate_arithmetic
from alignkit.eval.chat import ChatEvalConfig, run_chat_eval
from alignkit.models.load import ModelConfig, load_model
from alignkit.rollout.base import SamplingConfig
from alignkit.rollout.backends import make_generator
from alignkit.tasks import read_prompts


@dataclass
class EvalConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the model to evaluate")
    eval: ArithmeticEvalConfig = opt(factory=ArithmeticEvalConfig, help="the arithmetic evaluation (problems: 0 = skip it)")
    min_digits: int = opt(2, "smallest operand size (digits)")
    max_digits: int = opt(2, "largest operand size (digits)")
    chat: ChatEvalConfig = opt(factory=ChatEvalConfig, help="the chat evaluation against a baseline model (chat.against)")
    output_dir: str = opt("runs/eval", "where samples.jsonl, chat.json, chat_samples.jsonl and result.json go")

    def __post_init__(self):
        at_least(self, 1, "min_digits")
        at_least(self, self.min_digits, "max_digits")
        if not self.eval.problems and not self.chat.against:
            raise ValueError("nothing to evaluate: eval.problems is 0 and chat.against is empty")


def _load_beside(cfg: EvalConfig, key: str, tokenizer, path: str):
    """The model of `chat.<key>`, loaded like the evaluated one; it must share its tokenizer (both
    reply to the same token ids, and the KL estimate compares them token by token)."""
    other, other_tokenizer, other_path = load_model(replace(cfg.model, path=getattr(cfg.chat, key)), train=False)
    if other_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"chat.{key}: {other_path} has another tokenizer than the evaluated model {path}")
    return other


def run_eval(cfg: EvalConfig) -> dict:
    model, tokenizer, path = load_model(cfg.model, train=False)
    out = Path(cfg.output_dir)
    result = {"model": path}
    if cfg.eval.problems:
        task = ArithmeticConfig(min_digits=cfg.min_digits, max_digits=cfg.max_digits, word_problems=cfg.eval.word_problems)
        problems = generate_problems(cfg.eval.problems, seed=cfg.eval.seed, split="heldout", config=task)
        result.update(style=cfg.eval.style, **evaluate_arithmetic(model, tokenizer, problems, cfg.eval, out / "samples.jsonl"))
    if cfg.chat.against:
        baseline = _load_beside(cfg, "against", tokenizer, path)
        reference = _load_beside(cfg, "reference", tokenizer, path) if cfg.chat.reference else None
        result["chat"] = run_chat_eval(model, tokenizer, baseline, reference, cfg.chat, out)
    out.mkdir(parents=True, exist_ok=True)
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
    generator = make_generator(model, tokenizer, cfg.sampling.batch_size, backend=cfg.sampling.backend)
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
