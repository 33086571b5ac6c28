"""`alignkit flan-study`: the Flan paper's two findings, measured on the built-in task families.

Arms, each an `alignkit sft` run of the same base model for the same number of optimizer steps
(`train.max_steps`: equal compute) on the built-in mixture restricted to the first k training
families (`study_tasks`, k in `task_counts`), and, with `cot_ablation`, one arm on all of them
without the chain-of-thought formats. After each arm, greedy accuracy on the held-out families
(`heldout_tasks`, never trained on), asked directly and with the chain-of-thought
trigger (`eval/instructions.py`); the base model is arm 0. Findings to look for (Chung et al.
2022): held-out accuracy rises with the number of training tasks, then flattens; without CoT
data, CoT prompting gets worse.

Each arm's run is `<output_dir>/<arm>/` (its own metrics.jsonl and final/); the study writes one
row per arm to `metrics.jsonl`, `table.md`, `result.json` and `flan_study.png`. With
`train.resume`, arms already evaluated with the same evaluation settings are read from their
`heldout.json`, and a killed arm resumes from its checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from alignkit.algorithms.sft import SFTConfig, SFTDataConfig
from alignkit.algorithms.sft import run as run_sft
from alignkit.config import at_least, opt
from alignkit.data.mixture import FORMATS, MixtureConfig
from alignkit.data.tasks import TASKS, get_task
from alignkit.engine.config import TrainConfig
from alignkit.engine.logging import MetricsLogger
from alignkit.eval.arithmetic import TrainingEvalConfig
from alignkit.eval.instructions import FORMS, HeldoutEvalConfig, heldout_accuracy
from alignkit.files import write_jsonl_atomic, write_text_atomic
from alignkit.models.load import ModelConfig, load_model

log = logging.getLogger("alignkit")

@dataclass
class FlanStudyConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the base model of every arm")
    train: TrainConfig = opt(factory=lambda: TrainConfig(output_dir="runs/flan_study", lr=5e-5, max_steps=12),
                             help="each arm's SFT, packed, without a held-out loss (max_steps: the same compute for every arm)")
    heldout_tasks: list[str] = opt(factory=lambda: ["count_words", "unit_conversion", "max_of_list"],
                                   help="families never trained on: the evaluation")
    examples_per_task: int = opt(60, "items generated per training family (the mixture's n_t and cap)")
    total: int = opt(360, "training examples of every arm, spread evenly over its families")
    n_shots: int = opt(2, "worked exemplars in the mixture's few-shot formats")
    max_length: int = opt(384, "tokens per training example")
    study_tasks: list[str] = opt(factory=list, help="training families in the order arms add them (empty: every "
                                 "registered family not held out, in registry order)")
    task_counts: list[int] = opt(factory=lambda: [1, 2, 4, 6], help="k: arms train on the first k study_tasks")
    cot_ablation: bool = opt(True, "also an arm on all study_tasks without chain-of-thought formats")
    eval: HeldoutEvalConfig = opt(factory=HeldoutEvalConfig, help="the held-out evaluation")

    def __post_init__(self):
        for name in [*self.study_tasks, *self.heldout_tasks]:
            get_task(name)
        if not self.heldout_tasks:
            raise ValueError("heldout_tasks is empty: there is nothing to evaluate")
        tasks = self.families()
        clash = sorted(set(tasks) & set(self.heldout_tasks))
        if clash:
            raise ValueError(f"study_tasks {clash} are also in heldout_tasks: a study never trains on what it evaluates")
        bad = [k for k in self.task_counts if not 1 <= k <= len(tasks)]
        if bad or not self.task_counts:
            raise ValueError(f"task_counts must be a non-empty list of integers in [1, {len(tasks)}], got {self.task_counts}")
        at_least(self, 1, "examples_per_task", "total", "n_shots", "max_length")

    def families(self) -> list[str]:
        return list(self.study_tasks) or [t for t in TASKS if t not in self.heldout_tasks]

    def mixture(self, arm: dict) -> MixtureConfig:
        return MixtureConfig(tasks=arm["tasks"], heldout_tasks=list(self.heldout_tasks), formats=arm["formats"],
                             examples_per_task=self.examples_per_task, cap=self.examples_per_task, total=self.total,
                             n_shots=self.n_shots, seed=self.train.seed)


def arms(cfg: FlanStudyConfig) -> list[dict]:
    """(name, tasks, formats) of every trained arm, in order."""
    tasks = cfg.families()
    out = [{"arm": f"tasks-{k}", "tasks": tasks[:k], "formats": list(FORMATS)} for k in sorted(set(cfg.task_counts))]
    if cfg.cot_ablation:
        out.append({"arm": f"tasks-{len(tasks)}-no-cot", "tasks": tasks, "formats": ["zero_shot", "few_shot"]})
    return out


def _evaluation(cfg: FlanStudyConfig) -> dict:
    """What an arm's stored result depends on besides its training."""
    return {"heldout_tasks": list(cfg.heldout_tasks), **asdict(cfg.eval)}


def _evaluate(model, tokenizer, cfg: FlanStudyConfig, arm_dir: Path) -> dict:
    """Held-out accuracy of `model`, stored in arm_dir/heldout.json with the evaluation settings
    (and the replies beside it)."""
    result = heldout_accuracy(model, tokenizer, cfg.heldout_tasks, cfg.eval, cfg.train.precision)
    write_jsonl_atomic(arm_dir / "heldout_replies.jsonl", result.pop("rows"))
    write_text_atomic(arm_dir / "heldout.json", json.dumps({"evaluation": _evaluation(cfg), "result": result}, indent=1) + "\n")
    return result


def _arm(cfg: FlanStudyConfig, arm: dict | None, run_dir: Path) -> dict:
    """Train (unless `arm` is None: the base model) and evaluate one arm, or read its stored result."""
    arm_dir = run_dir / (arm["arm"] if arm else "base")
    stored = arm_dir / "heldout.json"
    if cfg.train.resume and stored.is_file():
        saved = json.loads(stored.read_text())
        if saved.get("evaluation") == _evaluation(cfg):
            log.info("%s: read from %s", arm_dir.name, stored)
            return saved["result"]
        log.info("%s: %s was evaluated with other settings; evaluating again", arm_dir.name, stored)
    if arm is None:
        model, tokenizer, _ = load_model(cfg.model, train=False)
        return _evaluate(model, tokenizer, cfg, arm_dir)
    sft = SFTConfig(model=cfg.model, train=replace(cfg.train, output_dir=str(arm_dir)),
                    data=SFTDataConfig(builtin="mixture", eval_fraction=0.0, max_length=cfg.max_length,
                                       mixture=cfg.mixture(arm)),
                    eval=TrainingEvalConfig(problems=0))
    final = run_sft(sft)["final_model"]
    model, tokenizer, _ = load_model(replace(cfg.model, path=final, lora=None, quantization="none"), train=False)
    return _evaluate(model, tokenizer, cfg, arm_dir)


def plot(rows: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6.5, 4))
    full = [r for r in rows if r["cot_data"]]
    for form, style in zip(FORMS, ("o-", "s-")):
        line, = ax.plot([r["tasks"] for r in full], [r[f"heldout/{form}"] for r in full], style, label=f"{form} prompts")
        for r in rows:
            if not r["cot_data"]:
                ax.plot([r["tasks"]], [r[f"heldout/{form}"]], "x", ms=10, color=line.get_color(),
                        label=f"{form}, trained without CoT data")
    ax.set(xlabel="training task families (0 = base model)", ylabel="held-out accuracy",
           title="Held-out families vs training task families (cf. Flan)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def run(cfg: FlanStudyConfig) -> dict:
    run_dir = Path(cfg.train.output_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    logger = MetricsLogger(run_dir, cfg.train.trackers, config=asdict(cfg))
    rows = []
    for i, arm in enumerate([None, *arms(cfg)]):
        result = _arm(cfg, arm, run_dir)
        row = {"arm": arm["arm"] if arm else "base", "tasks": len(arm["tasks"]) if arm else 0,
               "cot_data": arm is None or "zero_shot_cot" in arm["formats"], **result}
        rows.append(row)
        logger.log(i, row)
        log.info("%s: %s", row["arm"], {k: round(v, 3) for k, v in result.items()})
    logger.close()
    heldout = cfg.heldout_tasks
    lines = ["| arm | training families | CoT data | held-out direct | held-out CoT | "
             + " | ".join(f"{t} (direct / CoT)" for t in heldout) + " |", "|---" * (5 + len(heldout)) + "|"]
    lines += [f"| {r['arm']} | {r['tasks']} | {'yes' if r['cot_data'] else 'no'} | {r['heldout/direct']:.3f} | "
              f"{r['heldout/cot']:.3f} | " + " | ".join(f"{r[f'{t}/direct']:.3f} / {r[f'{t}/cot']:.3f}" for t in heldout) + " |"
              for r in rows]
    table = "\n".join(lines)
    write_text_atomic(run_dir / "table.md", table + "\n")
    print(table, flush=True)
    note = plot(rows, run_dir / "flan_study.png")
    if note:
        log.warning(note)
    result = {"families": cfg.families(), "heldout_tasks": heldout, "arms": rows,
              "plot": note or str(run_dir / "flan_study.png")}
    write_text_atomic(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
    return result
