"""Read run directories into `Run` records: what each alignkit command left on disk.

A run directory is what a command's `train.output_dir` (or `output_dir`) holds:

* `metrics.jsonl`: one JSON object per logged step (every training command and the sampling
  methods: loss, lr, grad_norm, tokens_per_s, eval/..., PPO's reward and kl, the per-iteration
  rows of rs/raft/rft/rest/rest-em with train_acc/val_acc/heldout_acc/pass@k/maj@k);
* `result.json` and `table.md` (the sampling methods' outcome and per-iteration table);
* sub-directories with their own `metrics.jsonl` (a sampling method's train stages, `iter-1/`);
* `eval/report.json` (`alignkit rm`) or `report.json` (`alignkit rm-eval`): reward-model
  accuracy by rating and calibration;
* `sweep.jsonl` and `best.jsonl` (`alignkit best-of-n`);
* `alignkit pipeline`: `result.json` with `stages` (one row per policy stage: gold reward, win
  rate vs SFT, safety rate, KL, sample replies) and `gatt`, `table.md`, and one sub-directory per
  stage, each a run directory of its command (a reward-model stage's `eval/report.json`);
* samples: `eval_samples_start.jsonl`/`eval_samples.jsonl` (held-out answers before and after
  training), `samples-iter-N.jsonl` (ReST-EM's E-steps), `samples.jsonl` (PPO's rollouts);
* the run's config when one was written there (`config.yaml`, `config.json`, or a sampling
  run's `resume/config.json` while it is unfinished).

best-of-n, rm-eval and eval write no `metrics.jsonl`; their directories are recognised by their
own files. Any other directory without `metrics.jsonl` is an error that names it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.engine.logging import read_metrics

# sub-directories of a run that are never a train stage
NOT_STAGES = {"final", "checkpoints", "resume", "eval", "tensorboard", "wandb", "mlruns"}


class ReportError(ValueError):
    """A run directory the report cannot read (the message names it and says why)."""


@dataclass
class Run:
    path: Path
    name: str  # the run's label in the report (its directory name, made unique)
    kind: str  # the command that wrote it, as far as its files tell: sft, rm, rm-eval, dpo, rrhf, ppo, best-of-n, rest-em, raft,
    # rest, sampling (rs, rft), eval, pipeline
    metrics: list[dict] = field(default_factory=list)
    stages: dict[str, list[dict]] = field(default_factory=dict)  # sub-directory -> its metrics rows
    result: dict | None = None
    table: str | None = None
    sweep: list[dict] = field(default_factory=list)  # best-of-n rows: temperature, N, kl_bound, max_reward, median_reward
    best: list[dict] = field(default_factory=list)  # best-of-n's best sample per prompt
    rm_report: dict | None = None  # accuracy by rating bucket and calibration
    stage_rm_reports: dict[str, dict] = field(default_factory=dict)  # sub-directory -> its rm_report (a pipeline's RMs)
    eval_before: list[dict] = field(default_factory=list)  # held-out answers of the starting model
    eval_after: list[dict] = field(default_factory=list)  # held-out answers of the trained model
    iteration_samples: dict[int, list[dict]] = field(default_factory=dict)  # iteration -> sample rows
    config: dict | None = None

    def iteration_rows(self) -> list[dict]:
        """The per-iteration rows of a sampling method (rs, raft, rft, rest, rest-em)."""
        return [r for r in self.metrics if is_iteration_row(r)]

    def beta(self) -> float | None:
        """The KL coefficient the run used, when its config or its metrics say (DPO's beta, PPO's
        β of its last iteration)."""
        for row in reversed(self.metrics):
            if number(row.get("beta")) is not None:
                return float(row["beta"])
        cfg = self.config or {}
        for value in (cfg.get("beta"), (cfg.get("kl") or {}).get("beta") if isinstance(cfg.get("kl"), dict) else None):
            if number(value) is not None:
                return float(value)
        return None


ITERATION_KEYS = ("train_acc", "val_acc", "heldout_acc", "train_reward", "val_reward", "heldout_reward", "sample_acc")


def is_iteration_row(row: dict) -> bool:
    return any(k in row for k in ITERATION_KEYS) or any(k.startswith(("pass@", "maj@")) for k in row)


def number(value) -> float | None:
    """A finite number, or None (metrics write non-finite floats as strings: 'nan', 'inf')."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None



def _jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ReportError(f"{path}:{i + 1}: not a JSON object: {line[:80]!r}") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not JSON ({err})") from None
    return value if isinstance(value, dict) else None


def _config(path: Path) -> dict | None:
    """The config the run wrote, if any (never a model's config.json: that has a model_type)."""
    for name in ("config.yaml", "config.yml", "config.json", "resume/config.json"):
        f = path / name
        if not f.is_file():
            continue
        if f.suffix == ".json":
            cfg = _json(f)
        else:
            import yaml

            cfg = yaml.safe_load(f.read_text())
        if isinstance(cfg, dict) and "model_type" not in cfg:
            return cfg
    return None


def _rm_report(path: Path) -> dict | None:
    """The reward-model report of `alignkit rm` (eval/report.json) or `alignkit rm-eval` (report.json)."""
    report = _json(path / "eval" / "report.json") or _json(path / "report.json")
    return report if report is not None and "buckets" in report else None


def _kind(run: Run, has_metrics: bool) -> str:
    keys = {k for r in run.metrics for k in r}
    if isinstance((run.result or {}).get("stages"), list):
        return "pipeline"
    if run.sweep:
        return "best-of-n"
    if not has_metrics:
        return "rm-eval" if run.rm_report is not None else "eval"
    if not run.metrics:
        return "unknown (metrics.jsonl is empty)"
    if "m_epochs" in keys or (run.iteration_samples and any(k.startswith("pass@") for k in keys)):
        return "rest-em"
    if run.iteration_rows():
        return "raft" if "stage" in keys else "rest" if "grow" in keys else "sampling"
    if "logps/chosen" in keys:
        return "dpo"
    if "reward" in keys and "kl" in keys:
        return "ppo"
    if run.rm_report is not None or "rewards/chosen" in keys:
        return "rm"
    if "rank_accuracy" in keys or "loss/rank" in keys:
        return "rrhf"
    return "sft"


def read_run(path: str | Path, name: str | None = None) -> Run:
    """Everything the report uses from one run directory. A ReportError names the directory when
    it is missing, or is not a run directory of alignkit."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: no such run directory")
    has_metrics = (path / "metrics.jsonl").is_file()
    rm_report = _rm_report(path)
    result = _json(path / "result.json")
    if not has_metrics and not (path / "sweep.jsonl").is_file() and rm_report is None and result is None:
        raise ReportError(f"{path}: no metrics.jsonl: not a run directory of alignkit (a training run writes metrics.jsonl; "
                          "best-of-n writes sweep.jsonl, rm-eval report.json, eval result.json)")
    try:
        metrics = read_metrics(path) if has_metrics else []
    except ValueError as err:
        raise ReportError(str(err)) from None
    run = Run(path=path, name=name or path.resolve().name, kind="", metrics=metrics, result=result, rm_report=rm_report,
              config=_config(path))
    if (path / "table.md").is_file():
        run.table = (path / "table.md").read_text().strip()
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and p.name not in NOT_STAGES):
        if (sub / "metrics.jsonl").is_file():
            run.stages[sub.name] = read_metrics(sub)
            if (report := _rm_report(sub)) is not None:
                run.stage_rm_reports[sub.name] = report
    if (path / "sweep.jsonl").is_file():
        run.sweep = _jsonl(path / "sweep.jsonl")
    if (path / "best.jsonl").is_file():
        run.best = _jsonl(path / "best.jsonl")
    if (path / "eval_samples.jsonl").is_file():
        run.eval_after = _jsonl(path / "eval_samples.jsonl")
        if (path / "eval_samples_start.jsonl").is_file():
            run.eval_before = _jsonl(path / "eval_samples_start.jsonl")
    elif (path / "samples.jsonl").is_file() and not has_metrics:  # alignkit eval: the model's answers
        run.eval_after = _jsonl(path / "samples.jsonl")
    for f in path.glob("samples-iter-*.jsonl"):
        if m := re.fullmatch(r"samples-iter-(\d+)\.jsonl", f.name):
            run.iteration_samples[int(m.group(1))] = _jsonl(f)
    if has_metrics and (path / "samples.jsonl").is_file():  # PPO: a few rollouts per iteration
        for row in _jsonl(path / "samples.jsonl"):
            run.iteration_samples.setdefault(int(row.get("iteration", 0)), []).append(row)
    run.iteration_samples = dict(sorted(run.iteration_samples.items()))
    run.kind = _kind(run, has_metrics)
    return run


def read_runs(paths: list[str | Path]) -> list[Run]:
    """The runs in the order given, each named by its directory; two runs with the same directory
    name are told apart by their parent's name (then by a number)."""
    paths = [Path(p) for p in paths]
    names = [p.resolve().name for p in paths]
    labels = []
    for p, n in zip(paths, names):
        label = n if names.count(n) == 1 else f"{p.resolve().parent.name}/{n}"
        while label in labels:
            label = f"{label}#{len(labels) + 1}"
        labels.append(label)
    return [read_run(p, label) for p, label in zip(paths, labels)]
