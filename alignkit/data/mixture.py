"""Flan-style instruction mixture: many tasks, four formats, examples-proportional mixing with a cap.

Each training task t has n_t generated items (`examples_per_task`, or `task_sizes[t]`). Its
mixing rate is rate_t = min(n_t, cap) / sum_s min(n_s, cap), so a large task cannot drown the
others. The mixture holds `total` examples (default sum_t min(n_t, cap)); task t gets
total * rate_t of them, rounded by largest remainder (ties to the earlier task). A task asked
for more examples than it has items repeats them. Formats are zero-/few-shot x with/without
chain-of-thought, spread evenly over each task's examples.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from alignkit.data.records import Message, SFTExample
from alignkit.data.tasks import TASKS, TaskItem, get_task

FORMATS = ("zero_shot", "few_shot", "zero_shot_cot", "few_shot_cot")
COT_TRIGGER = "Explain your reasoning step by step, then give the answer."


@dataclass
class MixtureConfig:
    """What goes into the mixture and how much of each task."""

    # training tasks; empty: every registered task that is not held out
    tasks: list[str] = field(default_factory=list)
    heldout_tasks: list[str] = field(default_factory=lambda: ["unit_conversion"])  # never trained on
    examples_per_task: int = 200  # n_t: items generated per task
    task_sizes: dict[str, int] = field(default_factory=dict)  # per-task n_t overrides
    cap: int = 100  # rate_t is proportional to min(n_t, cap)
    formats: list[str] = field(default_factory=lambda: list(FORMATS))  # any of FORMATS
    n_shots: int = 2  # worked exemplars in a few-shot prompt
    total: int | None = None  # mixed examples; None: sum_t min(n_t, cap)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in [*self.tasks, *self.heldout_tasks]:
            get_task(name)
        for names, what in ((self.tasks, "tasks"), (self.heldout_tasks, "heldout_tasks")):
            if len(set(names)) != len(names):
                raise ValueError(f"{what} lists a task twice: {names}")
        overlap = sorted(set(self.tasks) & set(self.heldout_tasks))
        if overlap:
            raise ValueError(f"tasks {overlap} are both trained on and held out")
        if not self.training_tasks():
            raise ValueError("no training tasks: every registered task is held out")
        for name in self.task_sizes:
            if name not in self.training_tasks():
                raise ValueError(f"task_sizes names {name!r}, which is not a training task {self.training_tasks()}")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"formats must be a non-empty list of {FORMATS}, got {self.formats}")
        if self.cap < 1 or self.n_shots < 1 or (self.total is not None and self.total < 1):
            raise ValueError(
                f"cap, n_shots and total must be >= 1, got {self.cap}, {self.n_shots}, {self.total}"
            )
        need = self.n_shots + 1 if any(f.startswith("few_shot") for f in self.formats) else 1
        small = {t: self.size(t) for t in self.training_tasks() if self.size(t) < need}
        if small:
            raise ValueError(
                f"each task needs at least {need} items for these formats and n_shots; got {small}"
            )

    def training_tasks(self) -> list[str]:
        """The tasks listed in `tasks`, or when none are: every registered task not held out."""
        return list(self.tasks) or [t for t in TASKS if t not in self.heldout_tasks]

    def size(self, task: str) -> int:
        """n_t: the number of items generated for `task`."""
        return self.task_sizes.get(task, self.examples_per_task)


def mixture_counts(config: MixtureConfig) -> dict[str, int]:
    """Examples per training task: `total` split in proportion to min(n_t, cap)."""
    weights = {t: min(config.size(t), config.cap) for t in config.training_tasks()}
    whole = sum(weights.values())
    total = whole if config.total is None else config.total
    counts = {t: total * w // whole for t, w in weights.items()}
    by_remainder = sorted(weights, key=lambda t: -(total * weights[t] % whole))
    for t in by_remainder[: total - sum(counts.values())]:
        counts[t] += 1
    return counts


def _formats_for(config: MixtureConfig, count: int) -> list[str]:
    return [config.formats[j % len(config.formats)] for j in range(count)]


def mixture_stats(config: MixtureConfig) -> dict[str, dict[str, int]]:
    """Per training task: its size n_t, its example count and the count of each format (for logs)."""
    return {
        t: {"size": config.size(t), "count": c, **Counter(_formats_for(config, c))}
        for t, c in mixture_counts(config).items()
    }


def _cot_answer(item: TaskItem) -> str:
    return f"{item.rationale} The answer is {item.output}."


def _render(item: TaskItem, fmt: str, shots: list[TaskItem]) -> SFTExample:
    """User turn (worked `shots` first) and assistant target for one format."""
    cot = fmt.endswith("_cot")

    def question(it: TaskItem) -> str:
        return f"{it.instruction}\nInput: {it.input}" + (f"\n{COT_TRIGGER}" if cot else "")

    def answer(it: TaskItem) -> str:
        return _cot_answer(it) if cot else it.output

    blocks = [f"{question(s)}\nAnswer: {answer(s)}" for s in shots]
    user = "\n\n".join([*blocks, question(item)])
    return SFTExample((Message("user", user), Message("assistant", answer(item))))


def _example(rng: random.Random, items: list[TaskItem], target: int, fmt: str, k: int) -> SFTExample:
    """Item `target` in `fmt`; few-shot exemplars are k other items of the same task."""
    picks = rng.sample(range(len(items) - 1), k) if fmt.startswith("few_shot") else []
    return _render(items[target], fmt, [items[j if j < target else j + 1] for j in picks])


def build_mixture(config: MixtureConfig) -> list[SFTExample]:
    """The shuffled training mixture, deterministic in the config."""
    rng = random.Random(f"mixture:{config.seed}")
    out: list[SFTExample] = []
    for task, count in mixture_counts(config).items():
        items = get_task(task).generate(config.size(task), config.seed)
        passes, rest = divmod(count, len(items))
        picks = list(range(len(items))) * passes + rng.sample(range(len(items)), rest)
        rng.shuffle(picks)
        for i, fmt in zip(picks, _formats_for(config, count)):
            out.append(_example(rng, items, i, fmt, config.n_shots))
    rng.shuffle(out)
    return out


def heldout_examples(
    config: MixtureConfig, n_per_task: int, fmt: str | None = None
) -> dict[str, list[SFTExample]]:
    """`n_per_task` examples of each held-out task, in `fmt` or cycling through config.formats."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    rng = random.Random(f"heldout:{config.seed}")
    out = {}
    for task in config.heldout_tasks:
        items = get_task(task).generate(n_per_task + config.n_shots, config.seed)
        formats = [fmt] * n_per_task if fmt else _formats_for(config, n_per_task)
        out[task] = [_example(rng, items, i, f, config.n_shots) for i, f in enumerate(formats)]
    return out
