"""Accuracy on held-out instruction task families (the Flan evaluation: tasks never trained on).

Each held-out family is asked zero-shot in two ways, as the mixture words them
(`data.mixture`): directly ("Answer: <output>") and with the chain-of-thought trigger, where the
reply is expected to end "The answer is <output>.". A reply is correct when its answer, the sentence
after the last "The answer is" when it has one, else the whole reply, equals the item's exact
output once surrounding spaces, quotes and a final period are removed. Greedy decoding.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from alignkit.config import at_least, opt
from alignkit.data.chat import prompt_text
from alignkit.data.mixture import COT_TRIGGER
from alignkit.data.records import user_prompt
from alignkit.data.tasks import TaskItem, get_task
from alignkit.rollout.base import SamplingParams
from alignkit.rollout.hf import HFGenerator

log = logging.getLogger("alignkit")

FORMS = ("direct", "cot")
_MARK = re.compile(r"the answer is", re.IGNORECASE)


@dataclass
class HeldoutEvalConfig:
    items: int = opt(40, "items per held-out family (each asked directly and with chain of thought)")
    seed: int = opt(777, "seed of the held-out items")
    direct_tokens: int = opt(32, "generation budget of a direct answer")
    cot_tokens: int = opt(160, "generation budget of a chain-of-thought answer")
    batch_size: int = opt(32, "prompts decoded together")

    def __post_init__(self):
        at_least(self, 1, "items", "direct_tokens", "cot_tokens", "batch_size")


def question(item: TaskItem, form: str) -> str:
    """The zero-shot user turn of `item`, worded as the mixture's zero_shot / zero_shot_cot formats."""
    text = f"{item.instruction}\nInput: {item.input}"
    return f"{text}\n{COT_TRIGGER}" if form == "cot" else text


def answer_of(reply: str) -> str:
    """The answer a reply gives: after its last 'The answer is' up to the end of that sentence
    (a period followed by a space, or a line break), else the whole reply; trimmed."""
    text = _MARK.split(reply)[-1]
    text = re.split(r"\.\s|\n", text.strip(), maxsplit=1)[0] if len(_MARK.split(reply)) > 1 else text
    return text.strip().rstrip(".").strip().strip("\"'").strip()


def is_correct(reply: str, output: str) -> bool:
    return answer_of(reply) == output.strip()


def heldout_accuracy(model, tokenizer, tasks: list[str], cfg: HeldoutEvalConfig, precision: str = "fp32") -> dict:
    """{"<task>/<form>": accuracy, "heldout/<form>": mean over tasks} for each held-out family and
    form, and the replies (`rows`: task, form, input, output, reply, correct)."""
    generator = HFGenerator(model, tokenizer, batch_size=cfg.batch_size, dtype=precision)
    out, rows = {}, []
    for form in FORMS:
        budget = cfg.cot_tokens if form == "cot" else cfg.direct_tokens
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=budget)
        for task in tasks:
            start, items = time.time(), get_task(task).generate(cfg.items, cfg.seed)
            prompts = [prompt_text(tokenizer, user_prompt(question(it, form))) for it in items]
            replies = [c.text for c in generator.generate(prompts, params)]
            marks = [is_correct(r, it.output) for r, it in zip(replies, items)]
            out[f"{task}/{form}"] = sum(marks) / len(marks)
            log.info("held-out %s (%s): %d prompts in %.1fs, accuracy %.3f", task, form, len(items), time.time() - start,
                     out[f"{task}/{form}"])
            rows += [{"task": task, "form": form, "input": it.input, "output": it.output, "reply": r, "correct": m}
                     for it, r, m in zip(items, replies, marks)]
        out[f"heldout/{form}"] = sum(out[f"{t}/{form}"] for t in tasks) / len(tasks)
    return {**out, "rows": rows}
