"""Every key of every command is read by the code that runs it (a key that nothing reads is a bug).

Each command of `cli.COMMANDS` runs on a tiny model, in a few override variants that between them
take every branch that reads a key. While it runs, the config classes of its tree record the
fields that code under alignkit/ reads: not alignkit/config.py (building and --help), not a
`__post_init__` (validation is not use), not the dataclasses module (`asdict` dumps of the whole
config for metrics, `replace`). A `replace` copy reads for the key it was copied from, unless the
copy overrode it. The keys checked are the leaves of the config trees the runs built, derived from
the dataclasses at run time.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

import alignkit
from alignkit import cli

ROOT = str(Path(alignkit.__file__).parent) + "/"
SKIPPED_FILES = (ROOT + "config.py",)


class KeyReads:
    """The dotted keys of the config trees built during a run, and those read."""

    def __init__(self, root: str = ROOT, skipped: tuple[str, ...] = SKIPPED_FILES):
        self.root, self.skipped = root, skipped
        self.where: dict[int, tuple[object, str, frozenset]] = {}  # id -> (instance, key prefix, overridden fields)
        self.keys: set[str] = set()
        self.read: set[str] = set()

    def track(self, obj, prefix: str = "", overridden: frozenset = frozenset()) -> None:
        self.where[id(obj)] = (obj, prefix, overridden)
        for f in dataclasses.fields(obj):
            value = object.__getattribute__(obj, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                self.track(value, f"{prefix}{f.name}.")
            else:
                self.keys.add(prefix + f.name)

    def counts(self, code) -> bool:
        return (code.co_filename.startswith(self.root) and not code.co_filename.startswith(self.skipped)
                and code.co_name != "__post_init__")

    def note(self, obj, name: str, code) -> None:
        entry = self.where.get(id(obj))
        if entry is not None and entry[0] is obj and name not in entry[2] and self.counts(code):
            self.read.add(entry[1] + name)

    def unread(self) -> list[str]:
        return sorted(self.keys - self.read)


_current: list[KeyReads] = []


def _getattribute(self, name):
    value = object.__getattribute__(self, name)
    if _current and name in _FIELDS.get(type(self), ()):
        _current[-1].note(self, name, sys._getframe(1).f_code)
    return value


_FIELDS: dict[type, frozenset] = {}
_replace = dataclasses.replace


def _tracking_replace(obj, /, **changes):
    new = _replace(obj, **changes)
    if _current:
        reads = _current[-1]
        entry = reads.where.get(id(obj))
        if entry is not None and entry[0] is obj:
            reads.where[id(new)] = (new, entry[1], entry[2] | frozenset(changes))
    return new


def _instrument(monkeypatch, cfg) -> None:
    """Record field reads on every config class of `cfg`'s tree (and `replace` copies of them)."""
    stack = [cfg]
    while stack:
        obj = stack.pop()
        cls = type(obj)
        if cls not in _FIELDS:
            _FIELDS[cls] = frozenset(f.name for f in dataclasses.fields(cls))
            monkeypatch.setattr(cls, "__getattribute__", _getattribute)
        stack.extend(v for f in dataclasses.fields(obj) if dataclasses.is_dataclass(v := object.__getattribute__(obj, f.name)))
    monkeypatch.setattr(dataclasses, "replace", _tracking_replace)
    for name, module in list(sys.modules.items()):
        if name.startswith("alignkit") and getattr(module, "replace", None) is _replace:
            monkeypatch.setattr(module, "replace", _tracking_replace)


@pytest.fixture
def key_reads(monkeypatch):
    """A KeyReads that `alignkit.cli.main` fills: it tracks the config each command builds."""
    reads = KeyReads()
    load = cli.load_config

    def loading(cls, recipe=None, overrides=None):
        cfg = load(cls, recipe, overrides)
        _instrument(monkeypatch, cfg)
        reads.track(cfg)
        return cfg

    monkeypatch.setattr(cli, "load_config", loading)
    _current.append(reads)
    yield reads
    _current.remove(reads)
    _FIELDS.clear()


# -- the walker finds what it should -----------------------------------------------------------


@dataclasses.dataclass
class _Inner:
    used: int = 1
    copied: int = 2
    overridden: int = 3
    checked: int = 4


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    read: int = 0
    validated: int = 0
    dumped: int = 0

    def __post_init__(self):
        assert self.validated >= 0 and self.inner.checked > 0


def test_walker_reports_keys_only_validated_dumped_or_overridden(monkeypatch):
    reads = KeyReads(root=__file__, skipped=())
    cfg = _Outer()
    _current.append(reads)
    try:
        _instrument(monkeypatch, cfg)
        reads.track(cfg)
        assert cfg.read == 0 and cfg.inner.used == 1
        dataclasses.asdict(cfg)  # a dump reads nothing
        assert dataclasses.replace(cfg, dumped=1).dumped == 1  # runs __post_init__; `dumped` of the copy is overridden
        copy = dataclasses.replace(cfg.inner, overridden=7)
        assert copy.copied == 2 and copy.overridden == 7  # the copy reads `copied` for inner.copied
    finally:
        _current.remove(reads)
        _FIELDS.clear()
    assert reads.unread() == ["dumped", "inner.checked", "inner.overridden", "validated"]


# -- every command --------------------------------------------------------------------------------

QUESTIONS = [("What is 2 + 3?", "5"), ("What is 4 + 1?", "5"), ("What is 3 + 3?", "6"), ("What is 1 + 2?", "3")]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model, one that answers one-digit sums (so that every selection keeps something),
    and small data files of each kind."""
    from alignkit.algorithms.sampling.stages import Sample, tokenize_samples
    from alignkit.algorithms.sampling.train_stage import train_stage
    from alignkit.engine.config import SamplingTrainConfig
    from alignkit.models.load import save_model
    from alignkit.models.tiny import save_tiny, tiny_model, tiny_tokenizer
    from alignkit.tasks import RewardConfig, TaskConfig, build_task

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("keys")
    tok, model = tiny_tokenizer(), tiny_model(seed=0)
    task = build_task(TaskConfig(train=40, val=4, heldout=8, min_digits=1, max_digits=1, ops=["+"]), RewardConfig())
    data = tokenize_samples(tok, [Sample(p, task.answer_for(p)) for p in task.train])
    cfg = SamplingTrainConfig(output_dir=str(out / "teach"), lr=3e-3, epochs=40, max_tokens_per_batch=512, progress=False,
                              warmup_ratio=0.05)
    model, _ = train_stage(model, tok, data, cfg)
    return {
        "tiny": save_tiny(str(out / "tiny")),
        "answering": str(save_model(model, tok, out / "answering")),
        "sft": _jsonl(out / "sft.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                          for q, a in QUESTIONS]),
        "pairs": _jsonl(out / "pairs.jsonl", [{"prompt": q, "chosen": a, "rejected": "7"} for q, a in QUESTIONS]),
        "ranked": _jsonl(out / "ranked.jsonl", [{"prompt": q, "responses": [a, "7", "x"], "scores": [1.0, 0.2, 0.0]}
                                                for q, a in QUESTIONS]),
        "rows": _jsonl(out / "rows.jsonl", [{"prompt": q, "response": a} for q, a in QUESTIONS]),
        "problems": _jsonl(out / "problems.jsonl", [{"question": q, "answer": f"#### {a}"} for q, a in QUESTIONS * 3]),
        "prompts": _jsonl(out / "prompts.jsonl", [{"prompt": q} for q, _ in QUESTIONS]),
    }


def constant_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward for reward.kind=function."""
    return [float(len(r) % 2) for r in responses]


# Per command: the overrides of every run, then variants (added to them) that between them take
# every branch that reads a key. {name} is a path from `files`, {out} the run directory.
FAST = ["train.threads=1", "train.progress=false", "train.output_dir={out}"]
TINY_EVAL = ["eval.problems=1", "eval.max_new_tokens=2", "eval.batch_size=1"]


def one_digit(at: str = "task") -> list[str]:
    return [f"{at}.{kv}" for kv in ("min_digits=1", "max_digits=1", "ops=[+]", "allow_negative=false", "style=answer",
                                    "word_problems=false")]


def problems(at: str = "task") -> list[str]:
    """A problems file as the task; PPO's `prompts` have no validation split."""
    val = () if at == "prompts" else ("val=1",)
    return [f"{at}.{kv}" for kv in ("source=problems", "path={problems}", "heldout_path={problems}", "train=4", *val,
                                    "heldout=2")]


def rewards(at: str = "reward") -> list[list[str]]:
    return [[f"{at}.kind=model", f"{at}.path={{tiny}}"], [f"{at}.kind=function", f"{at}.function=test_config_keys:constant_reward"],
            [f"{at}.kind=combined", f"{at}.helpful_path={{tiny}}", f"{at}.safety_path={{tiny}}", f"{at}.safety_threshold=0.2"]]


ONE_DIGIT, PROBLEMS, REWARDS = one_digit(), problems(), rewards()
CHAT = ["chat.against={tiny}", "chat.prompts.count=2", "chat.sampling.max_new_tokens=2", "chat.sampling.batch_size=1"]
SAMPLING = [*FAST, *ONE_DIGIT, "task.train=8", "task.val=2", "task.heldout=2", "model.path={answering}", "sampling.max_new_tokens=3", "sampling.n=2", "metrics.train_problems=2",
            "train.max_steps=1"]
PACKED = ["train.max_steps=0", "train.epochs=1", "train.save_every=1", "packing=pad", "train.batch_size=4", "metrics.eval_samples=2", "metrics.ks=[1,2]",
          "metrics.baseline_samples=true"]
COMMANDS: dict[str, tuple[list[str], list[list[str]]]] = {
    "sft": ([*FAST, *TINY_EVAL, "model.path={tiny}", "data.max_length=64"],
            [["train.max_steps=1", "data.mixture.examples_per_task=3", "data.mixture.cap=3"],
             ["data.builtin=arithmetic", "data.arithmetic_examples=4", "data.arithmetic_style=cot", "train.epochs=1"],
             ["data.path={sft}", "data.eval_path={sft}", "data.packing=false", "train.batch_size=2", "train.epochs=1",
              "model.lora={{r: 2}}", "model.gradient_checkpointing=true"],
             ["train.max_steps=1", "data.max_length=512", "data.gatt.enabled=true", "data.gatt.mix=replace",
              "data.gatt.dialogues=2", "data.gatt.turns=2", "data.gatt.instructions=[short]",
              "data.gatt.samples_per_turn=2", "data.gatt.max_new_tokens=4", "data.gatt.eval_dialogues=1"]]),
    "eval": (["model.path={tiny}", "output_dir={out}", *TINY_EVAL],
             [[], [*CHAT, "eval.problems=0", "chat.reference={tiny}"],
              *[[*CHAT, "chat.prompts.source=prompts", "chat.prompts.path={prompts}", *r] for r in rewards("chat.judge")]]),
    "generate": (["model.path={tiny}", "output={out}/s.jsonl", "sampling.max_new_tokens=2"], [[], ["prompts_file={prompts}"]]),
    "rm": ([*FAST, "model.path={tiny}", "train.eval_every=1"],
           [["train.max_steps=1", "data.builtin_pairs=4", "data.builtin_eval_pairs=2", "data.subset=helpfulness"],
            ["data.path={pairs}", "data.eval_path={pairs}", "train.epochs=1", "model.lora={{r: 2}}",
             "model.gradient_checkpointing=true"],
            ["data.path={ranked}", "data.format=ranked", "train.epochs=1"]]),
    "rm-eval": (["model.path={tiny}", "output_dir={out}"], [["data.builtin_pairs=4"], ["data.path={pairs}", "data.format=pairs"]]),
    "score": (["input={rows}", "output={out}/s.jsonl"], [["model={tiny}"], ["helpful_model={tiny}", "safety_model={tiny}"]]),
    "dpo": ([*FAST, *TINY_EVAL, "model.path={answering}"],
            [["train.max_steps=1", "data.pairs.problems=4", "data.pairs.sampling.max_new_tokens=3", "eval.baseline=true"],
             ["data.path={pairs}", "train.epochs=1", "sft_reference=true", "reference_train.max_steps=0",
              "reference_train.epochs=1", "reference_train.progress=false", "model.lora={{r: 2}}"]]),
    "rrhf": ([*FAST, *TINY_EVAL, "model.path={answering}"],
             [["train.max_steps=1", "data.candidates.task.train=4", "data.candidates.sampling.max_new_tokens=3", "eval.baseline=true"],
              ["data.path={ranked}", "train.epochs=1", "model.lora={{r: 2}}"],
              *[[*problems("data.candidates.task"), "data.candidates.sampling.max_new_tokens=3", "train.max_steps=1", *r]
                for r in rewards("data.candidates.reward")]]),
    "make-pairs": (["model.path={answering}", "output={out}/p.jsonl", "pairs.problems=4", "pairs.sampling.max_new_tokens=3"], [[]]),
    "best-of-n": (["model.path={answering}", "output_dir={out}", "ns=[1,2]", "temperatures=[1.0]", "sampling.max_new_tokens=2",
                   "task.heldout=2"],
                  [[], [*ONE_DIGIT, "task.source=arithmetic", "task.val=1"], *[["task.source=arithmetic", *r] for r in REWARDS], PROBLEMS]),
    "rs": ([*SAMPLING, "iterations=1", "temperature_prompts=2"], [[], PACKED, PROBLEMS, *REWARDS]),
    "raft": ([*SAMPLING, "stages=1", "prompts_per_stage=4"], [[], [*PACKED, "selection=global"], PROBLEMS, *REWARDS]),
    "rft": (SAMPLING, [[], PACKED, [*PROBLEMS, "include_reference=true"]]),
    "rest-em": ([*SAMPLING, "iterations=2"], [[], PACKED, PROBLEMS, ["task.val=4", "train.lr=0.5"]]),
    "rest": ([*SAMPLING, "thresholds=[0.5]"], [[], PACKED, PROBLEMS, *REWARDS]),
    "flan-study": ([*FAST, "model.path={tiny}", "train.max_steps=1", "task_counts=[1]", "study_tasks=[reverse_string]",
                    "heldout_tasks=[count_words]", "examples_per_task=3", "total=3", "max_length=64", "eval.items=1",
                    "eval.direct_tokens=2", "eval.cot_tokens=2", "eval.seed=3", "eval.batch_size=2", "n_shots=1"],
                   [["cot_ablation=false"], ["cot_ablation=true", "train.resume=true", "train.max_steps=0", "train.epochs=1"]]),
    "ppo": (["train.threads=1", "train.output_dir={out}", "model.path={tiny}", "iterations=1", "prompts_per_iteration=2",
             "minibatch_size=2", "sampling.max_new_tokens=3", "ppo_epochs=1", "prompts.train=4", "prompts.heldout=2",
             "train.batch_size=1"],
            [[], ["train.schedule=cosine", "ptx.coef=0.1", "kl.adaptive=true", "iterations=2", "eval.every=1", "eval.patience=1",
                  "ptx.data.builtin=arithmetic", "ptx.data.arithmetic_examples=4", "ptx.data.arithmetic_style=cot",
                  "prompts.source=arithmetic", *one_digit("prompts"), *rewards()[1]],
             ["ptx.coef=0.1", "ptx.data.path={sft}", *problems("prompts"), *rewards()[0]],
             ["prompts.source=arithmetic", *rewards()[2], "ptx.coef=0.1", "ptx.data.mixture.examples_per_task=3",
              "ptx.data.mixture.cap=3"]]),
    "pipeline": (["model={tiny}", "output_dir={out}", "iterations=1", "precision=fp32", "threads=1",
                  "data={{sft_pairs: 4, rm_pairs: 8, rm_eval_pairs: 4, rl_prompts: 4, eval_prompts: 4, seed: 1}}",
                  "comparisons={{prompts: 4, newest_eval_fraction: 0.5, sampling: {{max_new_tokens: 3}}}}",
                  "eval={{max_new_tokens: 3, batch_size: 4, samples: 1, gatt_dialogues: 1, gatt_turns: 2}}",
                  "sft={{train: {{max_steps: 1, progress: false}}, data: {{max_length: 128}}, eval: {{problems: 0}}}}",
                  "reward_model={{train: {{max_steps: 1, progress: false}}}}",
                  "rejection_sampling={{train: {{max_steps: 1, progress: false}}, sampling: {{n: 2, max_new_tokens: 3}}, "
                  "temperature_prompts: 2, metrics: {{train_problems: 2}}}}"],
                 [["final=ppo", "gatt=true", "ppo={{iterations: 1, prompts_per_iteration: 2, minibatch_size: 2, ppo_epochs: 1, "
                   "sampling: {{max_new_tokens: 3}}, prompts: {{heldout: 2}}}}",
                   "gatt_sft={{train: {{max_steps: 1, progress: false}}, eval: {{problems: 0}}, data: {{max_length: 512, gatt: "
                   "{{dialogues: 2, turns: 2, samples_per_turn: 4, max_new_tokens: 4, eval_dialogues: 0, instructions: [short]}}}}}}"],
                  ["final=dpo", "gatt=false", "dpo={{train: {{max_steps: 1, progress: false}}, eval: {{problems: 1, max_new_tokens: 2}}}}"]]),
}


# Keys read only when something fails, and the tests that show them honoured.
FAILURE_ONLY = {"on_nonfinite": "test_on_nonfinite_skip_skips_the_step here; tests/test_engine.py for stop"}


def test_on_nonfinite_skip_skips_the_step(tmp_path):
    from alignkit.engine.config import LoopConfig
    from alignkit.engine.trainer import Engine
    from alignkit.models.tiny import tiny_model

    engine = Engine(tiny_model(), LoopConfig(output_dir=str(tmp_path), on_nonfinite="skip"), total_steps=2)
    before = [p.detach().clone() for p in engine.model.parameters()]
    nan = lambda batch: (torch.tensor(float("nan"), requires_grad=True), 1.0, {})
    assert engine.train_step([{}], nan) == {"skipped": 1.0} and engine.step == 1
    assert all(torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))


def test_every_command_has_variants():
    assert sorted(COMMANDS) == sorted(cli.COMMANDS)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_key_is_read(command, files, key_reads, tmp_path):
    common, variants = COMMANDS[command]
    for i, variant in enumerate(variants):
        out = tmp_path / f"v{i}"
        args = [a.format(out=out, **files) for a in (*common, *variant)]
        assert cli.main([command, *args]) == 0, f"{command} {' '.join(args)}"
    unread = [k for k in key_reads.unread() if k.rsplit(".", 1)[-1] not in FAILURE_ONLY]
    assert not unread, f"keys that no code of `alignkit {command}` reads: " + ", ".join(unread)
