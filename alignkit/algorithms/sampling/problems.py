"""Problems with checkable answers for the sampling methods (RS, RAFT, RFT, ReST-EM, ReST):
the built-in arithmetic task or a problems file, its splits, its verifier, and evaluation
(greedy accuracy; pass@k and maj@k from samples)."""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.algorithms.sampling.stages import collect, pass_maj_at_k, score
from alignkit.config import opt
from alignkit.data.formats import load_problems
from alignkit.data.records import Message, Problem
from alignkit.data.tasks.arithmetic import ArithmeticConfig, generate_problems
from alignkit.data.tasks.arithmetic import prompt_text as task_prompt
from alignkit.rewards.verifier_reward import VerifierReward
from alignkit.rollout.base import SamplingParams
from alignkit.rollout.hf import HFGenerator


@dataclass
class ProblemsConfig:
    path: str = opt("", "problems file (question+answer, GSM8K '####' or problem+answer); empty = built-in arithmetic")
    eval_path: str = opt("", "held-out problems file (empty: built-in held-out split, or the tail of path)")
    train_problems: int = opt(512, "training problems (sampled from each iteration)")
    val_problems: int = opt(64, "validation problems, apart from the training ones (early stopping)")
    eval_problems: int = opt(200, "held-out problems for the reported accuracy")
    style: str = opt("answer", "prompt style: answer (only the number) or cot (step by step)")
    word_problems: bool = opt(False, "built-in task: short stories instead of 'What is 47 + 38?'")
    min_digits: int = opt(2, "built-in task: fewest digits of an operand")
    max_digits: int = opt(2, "built-in task: most digits of an operand")
    ops: list[str] = opt(factory=lambda: ["+", "-"], help="built-in task: operators")
    allow_negative: bool = opt(True, "built-in task: allow negative results (false: 'a - b' only with a >= b)")
    seed: int = opt(0, "seed of the built-in training problems")
    eval_seed: int = opt(1234, "seed of the built-in held-out problems")


@dataclass
class Task:
    train: list[Problem]
    val: list[Problem]
    heldout: list[Problem]
    style: str

    def prompt(self, problem: Problem) -> str:
        return task_prompt(problem, self.style)

    def prompts(self, problems: list[Problem]) -> list[str]:
        return [self.prompt(p) for p in problems]

    def shot_turns(self, shots: list[list[str]]) -> tuple[Message, ...]:
        """Few-shot exemplars as chat turns: each question in the task's prompt wording, then its reply."""
        return tuple(m for q, a in shots for m in (Message("user", task_prompt(Problem(q, ""), self.style)),
                                                   Message("assistant", a)))

    def reward(self, mode: str = "binary") -> VerifierReward:
        return VerifierReward(self.train + self.val + self.heldout, mode=mode, prompt_fn=self.prompt)


@dataclass
class SamplerConfig:
    samples_per_problem: int = opt(8, "N: responses sampled per training problem")
    temperature: float = opt(1.0, "sampling temperature")
    top_k: int = opt(40, "top-k sampling (the paper's 40; 0 = off)")
    top_p: float = opt(1.0, "nucleus sampling mass")
    max_new_tokens: int = opt(16, "generation budget (answers are short in the 'answer' style)")
    batch_size: int = opt(64, "prompts decoded together when sampling N per prompt (greedy passes take batch_size x N)")
    dtype: str = opt("fp32", "generation autocast dtype: fp32 or bf16, or auto (bf16 where the device computes it natively)")
    shots: list[list[str]] = opt(factory=list, help="few-shot exemplars, [question, reply] pairs: earlier chat turns "
                                                     "of the prompts sampled for training (never of evaluation or training prompts)")
    shot_iterations: int = opt(1, "iterations whose sampling uses the shots: the first this many (1: only the "
                                  "first, from the initial model; one-round methods count as iteration 1)")

    def __post_init__(self):
        for i, shot in enumerate(self.shots):
            if len(shot) != 2 or not all(isinstance(t, str) and t.strip() for t in shot):
                raise ValueError(f"sampler.shots[{i}]: expected a [question, reply] pair of non-empty texts, got {shot!r}")
        if self.shot_iterations < 0:
            raise ValueError(f"sampler.shot_iterations must be >= 0, got {self.shot_iterations}")


@dataclass
class MetricsConfig:
    eval_samples: int = opt(8, "samples per held-out problem for pass@k and maj@k (0 = skip)")
    ks: list[int] = opt(factory=lambda: [1, 4, 8], help="k values of pass@k and maj@k")
    train_problems: int = opt(128, "training problems scored greedily for train accuracy")
    baseline: bool = opt(True, "evaluate the base model first (iteration 0 of the table)")
    baseline_samples: bool = opt(False, "also sample the base model's held-out pass@k and maj@k (slow when it writes long replies)")


def load_task(cfg: ProblemsConfig) -> Task:
    """Training, validation and held-out problems (built-in splits never share an equation)."""
    need = cfg.train_problems + cfg.val_problems
    if cfg.path:
        problems = load_problems(cfg.path)
        heldout = load_problems(cfg.eval_path)[: cfg.eval_problems] if cfg.eval_path else []
        if not cfg.eval_path:
            problems, heldout = problems[: len(problems) - cfg.eval_problems], problems[len(problems) - cfg.eval_problems:]
        if len(problems) < 1 + cfg.val_problems:
            raise ValueError(f"{cfg.path}: {len(problems)} problems, too few for val_problems={cfg.val_problems}")
        train, val = problems[: min(len(problems) - cfg.val_problems, cfg.train_problems)], problems[-cfg.val_problems:] if cfg.val_problems else []
    else:
        arith = ArithmeticConfig(min_digits=cfg.min_digits, max_digits=cfg.max_digits, ops=tuple(cfg.ops),
                                 word_problems=cfg.word_problems, allow_negative=cfg.allow_negative)
        pool = generate_problems(need, seed=cfg.seed, split="train", config=arith)
        train, val = pool[: cfg.train_problems], pool[cfg.train_problems:]
        heldout = generate_problems(cfg.eval_problems, seed=cfg.eval_seed, split="heldout", config=arith) if cfg.eval_problems else []
    return Task(train, val, heldout, cfg.style)


def greedy_accuracy(generator, tokenizer, task: Task, problems: list[Problem], max_new_tokens: int) -> float:
    """Share of problems answered correctly with greedy decoding (the verifier decides)."""
    if not problems:
        return float("nan")
    samples = collect(generator, tokenizer, task.prompts(problems), SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    return sum(x.reward for x in score(samples, task.reward())) / len(samples)


def sampled_metrics(generator, tokenizer, task: Task, problems: list[Problem], n: int, ks: list[int],
                    params: SamplingParams) -> dict:
    """pass@k and maj@k for each k in ks from n samples per problem."""
    if not problems or n < 1:
        return {}
    p = SamplingParams(n=n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                       max_new_tokens=params.max_new_tokens, seed=params.seed)
    samples = collect(generator, tokenizer, task.prompts(problems), p)
    return pass_maj_at_k(samples, task.reward().answer_for, [k for k in ks if k <= n])


def generator_for(model, tokenizer, s: SamplerConfig) -> HFGenerator:
    """The sampler's generator: batch_size prompts of samples_per_problem rows each, and as many
    rows per batch for any other n (greedy evaluation decodes batch_size * N prompts at once)."""
    return HFGenerator(model, tokenizer, s.batch_size, s.dtype, max_rows=s.batch_size * s.samples_per_problem)


def sampling(s: SamplerConfig, n: int, seed: int) -> SamplingParams:
    return SamplingParams(n=n, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                          max_new_tokens=s.max_new_tokens, seed=seed)


def iteration_row(model, tokenizer, task: Task, s: SamplerConfig, m: MetricsConfig, seed: int, base: bool = False,
                  val_acc: float | None = None) -> dict:
    """Greedy train / held-out / validation accuracy and held-out pass@k, maj@k of a policy
    (for the base model only with `m.baseline_samples`). `val_acc`: the policy's validation
    accuracy when already measured (by the train stage's early stopping)."""
    gen = generator_for(model, tokenizer, s)
    if val_acc is None:
        val_acc = greedy_accuracy(gen, tokenizer, task, task.val, s.max_new_tokens)
    row = {"train_acc": greedy_accuracy(gen, tokenizer, task, task.train[: m.train_problems], s.max_new_tokens),
           "val_acc": val_acc,
           "heldout_acc": greedy_accuracy(gen, tokenizer, task, task.heldout, s.max_new_tokens)}
    if m.eval_samples and (m.baseline_samples or not base):
        row.update(sampled_metrics(gen, tokenizer, task, task.heldout, m.eval_samples, m.ks,
                                   sampling(s, m.eval_samples, seed + 777)))
    return row


def print_table(rows: list[dict], title: str) -> str:
    """A markdown table of the per-iteration rows (printed and returned)."""
    present = {k for r in rows for k in r}
    keys = [k for k in ("iteration", "temperature", "threshold", "kept", "sample_acc", "train_acc", "val_acc", "heldout_acc")
            if k in present]
    keys += sorted((k for k in present if k.startswith(("pass@", "maj@"))), key=lambda k: (k[0] != "p", int(k.split("@")[1])))
    keys += ["minutes"]
    lines = [title, "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [r.get(k, "") for k in keys]
        lines.append("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text
