"""The task registry: a task name or file -> (training prompts, held-out prompts, RewardFn).

Every sampling and online method (ppo, rs, raft, rft, rest, rest-em, best-of-n, rrhf) builds
its prompts and its reward here, from the same two config sections:

    task:    source (arithmetic | preferences | problems | prompts), path, sizes, seeds, style
    reward:  kind (auto | verifier | graded | gold | model | combined | function) and its paths

Sources: the built-in arithmetic problems and a problems file have answers (verifier rewards,
validation split, pass@k and maj@k, reference solutions, few-shot turns in the task's wording);
the built-in preference prompts and a prompts file (any `prompt` text field) have none and are
scored by the gold rules, a reward model, Llama 2's combined helpfulness/safety reward or a
user function. Built-in splits never share an equation or a prompt.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field

from alignkit.config import one_of, opt
from alignkit.data.records import Message, Problem
from alignkit.data.tasks.arithmetic import prompt_text as arithmetic_prompt
from alignkit.data.tasks.arithmetic import target_text
from alignkit.rewards.base import FunctionReward, GoldReward, RewardFn
from alignkit.rewards.verifier_reward import VerifierReward

log = logging.getLogger("alignkit")

SOURCES = ("arithmetic", "preferences", "problems", "prompts")
REWARD_KINDS = ("auto", "verifier", "graded", "gold", "model", "combined", "function")


@dataclass
class PromptSetConfig:
    """Where the prompts come from: training and held-out sets, no validation split (PPO's `prompts`)."""

    source: str = opt("arithmetic", "arithmetic (built-in problems, verifier), preferences (built-in prompts, gold "
                                    "rules), problems (a problems file, verifier) or prompts (a file with a 'prompt' text field)")
    path: str = opt("", "source=problems: question+answer rows (GSM8K '####' or problem+answer); source=prompts: "
                        "JSONL/JSON/Parquet/datasets dir with a 'prompt' text field and an optional 'unsafe' "
                        "flag (true: a harmful request, scored by the safety reward under reward.kind=combined)")
    heldout_path: str = opt("", "held-out file of the same kind (empty: problems keep the last `heldout` of path "
                                "apart; prompts have no held-out set)")
    train: int = opt(512, "training prompts (built-in sources; at most this many of a problems file)")
    heldout: int = opt(200, "held-out prompts for evaluation")
    seed: int = opt(0, "seed of the built-in training (and validation) set")
    heldout_seed: int | None = opt(1234, "seed of the built-in held-out set (null: the same as seed)")
    style: str = opt("answer", "prompt style of problems: answer (only the number) or cot (step by step)")
    word_problems: bool = opt(False, "arithmetic: short stories instead of 'What is 47 + 38?'")
    min_digits: int = opt(2, "arithmetic: fewest digits of an operand")
    max_digits: int = opt(2, "arithmetic: most digits of an operand")
    ops: list[str] = opt(factory=lambda: ["+", "-"], help="arithmetic: operators")
    allow_negative: bool = opt(True, "arithmetic: allow negative results (false: 'a - b' only with a >= b)")
    on_invalid: str = opt("error", "source=problems or prompts: a row that cannot be used is an error (listing every "
                                   "one), or skip: drop it with a warning and list it in <output_dir>/skipped.jsonl")

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"task.source must be one of {SOURCES}, not {self.source!r}")
        if self.source in ("problems", "prompts") and not self.path:
            raise ValueError(f"task.source={self.source} needs task.path")
        if self.style not in ("answer", "cot"):
            raise ValueError(f"task.style must be answer or cot, not {self.style!r}")
        one_of(self, "on_invalid", "error", "skip")


@dataclass
class TaskConfig(PromptSetConfig):
    """A prompt set with a validation split apart from the training prompts (the sampling methods'
    early stopping and model selection)."""

    val: int = opt(64, "validation problems apart from the training ones (early stopping; sources with answers)")


@dataclass
class RewardConfig:
    kind: str = opt("auto", "auto (verifier for sources with answers, gold for preferences), verifier (1/0), graded "
                            "(1, up to 0.5 for a near miss), gold (rules of the synthetic preferences), model (a trained "
                            "RM), combined (Llama 2 helpfulness + safety), function")
    path: str = opt("", "reward-model directory for kind=model")
    helpful_path: str = opt("", "helpfulness RM for kind=combined (empty = the gold helpfulness rule)")
    safety_path: str = opt("", "safety RM for kind=combined (empty = the gold safety rule)")
    safety_threshold: float = opt(0.15, "kind=combined: use the safety score when its probability is below this")
    function: str = opt("", "kind=function: 'package.module:callable', fn(prompts, responses) -> list[float]")

    def __post_init__(self):
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"reward.kind must be one of {REWARD_KINDS}, not {self.kind!r}")
        if self.kind == "model" and not self.path:
            raise ValueError("reward.kind=model needs reward.path (a reward-model directory)")


@dataclass
class Task:
    """Prompt texts of each split and the configured reward. Tasks with answers also map each
    prompt to its problem (`answer_for`, `verifier`, `reference`)."""

    source: str
    train: list[str]
    val: list[str]
    heldout: list[str]
    reward: RewardFn | None = None
    style: str = "answer"
    problems: dict[str, Problem] = field(default_factory=dict)
    unsafe: set[str] = field(default_factory=set)  # prompts flagged as harmful requests (the data's `unsafe` flag)
    skipped: list[dict] = field(default_factory=list)  # rows of the task's files dropped by on_invalid=skip
    _verifier: VerifierReward | None = field(default=None, repr=False)

    @property
    def has_answers(self) -> bool:
        return bool(self.problems)

    def is_unsafe(self, prompt: str) -> bool:
        """Whether the task's data flags `prompt` as a harmful request (the combined reward sends
        it to the safety model)."""
        return prompt in self.unsafe

    def verifier(self, mode: str = "binary") -> VerifierReward:
        """The answer check of every prompt of the task, 1/0 (binary) or with partial credit (graded)."""
        if not self.problems:
            raise ValueError("this needs problems with answers (task.source=arithmetic or problems)")
        if self._verifier is None:
            self._verifier = VerifierReward(self.problems.values(), prompt_fn=self.prompt)
        return self._verifier.with_mode(mode)

    def prompt(self, problem: Problem) -> str:
        return arithmetic_prompt(problem, self.style)

    def answer_for(self, prompt: str) -> str:
        """The final answer of a prompt's problem (GSM8K's '####' part)."""
        return self.verifier().answer_for(prompt)

    def reference(self, prompt: str) -> str:
        """The reference solution of a prompt's problem, in the task's style."""
        return target_text(self.problems[prompt], self.style)

    def shot_turns(self, shots: list[list[str]]) -> tuple[Message, ...]:
        """Few-shot exemplars as chat turns: each question (in the task's prompt wording when the
        task has problems), then its reply."""
        ask = (lambda q: arithmetic_prompt(Problem(q, ""), self.style)) if self.problems else (lambda q: q)
        return tuple(m for q, a in shots for m in (Message("user", ask(q)), Message("assistant", a)))


def _problem_splits(cfg: PromptSetConfig, skipped: list[dict] | None = None) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """Training, validation and held-out problems (built-in splits never share an equation); rows
    of a problems file dropped by on_invalid=skip go to `skipped`."""
    n_val = cfg.val if isinstance(cfg, TaskConfig) else 0
    if cfg.source == "problems":
        from alignkit.data.formats import load_problems

        problems = load_problems(cfg.path, on_invalid=cfg.on_invalid, skipped=skipped)
        heldout = load_problems(cfg.heldout_path, on_invalid=cfg.on_invalid, skipped=skipped)[: cfg.heldout] if cfg.heldout_path else []
        if not cfg.heldout_path:
            problems, heldout = problems[: len(problems) - cfg.heldout], problems[len(problems) - cfg.heldout:]
        if len(problems) < 1 + n_val:
            raise ValueError(f"{cfg.path}: {len(problems)} problems, too few for task.val={n_val}")
        return problems[: min(len(problems) - n_val, cfg.train)], problems[-n_val:] if n_val else [], heldout
    from alignkit.data.tasks.arithmetic import ArithmeticConfig, generate_problems

    arith = ArithmeticConfig(min_digits=cfg.min_digits, max_digits=cfg.max_digits, ops=tuple(cfg.ops),
                             word_problems=cfg.word_problems, allow_negative=cfg.allow_negative)
    pool = generate_problems(cfg.train + n_val, seed=cfg.seed, split="train", config=arith)
    heldout_seed = cfg.seed if cfg.heldout_seed is None else cfg.heldout_seed
    heldout = generate_problems(cfg.heldout, seed=heldout_seed, split="heldout", config=arith) if cfg.heldout else []
    return pool[: cfg.train], pool[cfg.train:], heldout


def read_prompts(path: str, on_invalid: str = "error", skipped: list[dict] | None = None) -> list[str]:
    """The 'prompt' texts of a file's rows (JSONL/JSON/Parquet/datasets dir), every one checked
    (`data.formats.load_prompts`)."""
    from alignkit.data.formats import load_prompts

    return load_prompts(path, on_invalid=on_invalid, skipped=skipped)


def _flagged(rows: list[tuple[str, bool]], unsafe: set[str]) -> list[str]:
    """The texts of (text, unsafe) rows; the flagged ones join `unsafe`."""
    unsafe.update(text for text, flag in rows if flag)
    return [text for text, _ in rows]


def _load_function(spec: str) -> RewardFn:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"reward.function must look like 'package.module:callable', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _gold_safety(task: Task) -> RewardFn:
    """Gold safety as a logit: the gold reward on the task's flagged prompts, +3 (σ = 0.95) elsewhere."""
    from alignkit.rewards.gold import gold_reward

    return FunctionReward(lambda p, r: gold_reward(p, r) if task.is_unsafe(p) else 3.0, "gold_safety")


def build_reward(cfg: RewardConfig, task: Task, precision: str = "fp32") -> RewardFn:
    """The RewardFn of `cfg` for `task` (verifier kinds check the task's answers)."""
    kind = cfg.kind
    if kind == "auto":
        if task.source == "prompts":
            raise ValueError("reward.kind=auto: a prompts file has no answers and no gold rules; set reward.kind "
                             "(model, gold, combined or function)")
        kind = "verifier" if task.has_answers else "gold"
    if kind in ("verifier", "graded"):
        if not task.has_answers:
            raise ValueError(f"reward.kind={kind} needs problems with answers (task.source=arithmetic or problems)")
        return task.verifier("binary" if kind == "verifier" else "graded")
    if kind == "gold":
        return GoldReward()

    def rm(path: str) -> RewardFn:
        from alignkit.rewards.model import RewardModel

        return RewardModel.from_pretrained(path, precision=precision)

    if kind == "model":
        return rm(cfg.path)
    if kind == "function":
        return _load_function(cfg.function)
    from alignkit.rewards.combine import CombinedReward

    helpful = rm(cfg.helpful_path) if cfg.helpful_path else GoldReward()
    safety = rm(cfg.safety_path) if cfg.safety_path else _gold_safety(task)
    if not (cfg.helpful_path and cfg.safety_path):
        log.info("combined reward: gold rules stand in for the missing helpfulness/safety reward model(s)")
    return CombinedReward(helpful, safety, task.is_unsafe, cfg.safety_threshold, whiten_output=False)


def build_task(task: PromptSetConfig, reward: RewardConfig, precision: str = "fp32") -> Task:
    """The task of `task` scored by `reward` (a reward model runs at `precision`): `.train`,
    `.heldout` (prompt texts) and `.reward` (a RewardFn over user prompt texts and replies).
    Rows of the task's files dropped by task.on_invalid=skip are in `.skipped` (the command writes
    them with `data.io.write_skipped`)."""
    skipped: list[dict] = []
    if task.source in ("arithmetic", "problems"):
        train, val, heldout = _problem_splits(task, skipped)
        out = Task(task.source, [], [], [], style=task.style)
        prompts = lambda ps: [out.prompt(p) for p in ps]
        out.train, out.val, out.heldout = prompts(train), prompts(val), prompts(heldout)
        out.problems = {out.prompt(p): p for p in train + val + heldout}
    elif task.source == "preferences":
        from alignkit.data.tasks.preferences import build_flagged_prompts

        heldout_seed = task.seed if task.heldout_seed is None else task.heldout_seed
        out = Task(task.source, [], [], [])
        out.train = _flagged(build_flagged_prompts(task.train, task.seed, "train"), out.unsafe)
        out.heldout = _flagged(build_flagged_prompts(task.heldout, heldout_seed, "heldout"), out.unsafe)
    else:
        from alignkit.data.formats import load_flagged_prompts

        out = Task(task.source, [], [], [], style=task.style)
        read = lambda path: _flagged(load_flagged_prompts(path, on_invalid=task.on_invalid, skipped=skipped), out.unsafe)
        out.train, out.heldout = read(task.path), read(task.heldout_path) if task.heldout_path else []
    out.skipped = skipped
    out.reward = build_reward(reward, out, precision)
    return out
