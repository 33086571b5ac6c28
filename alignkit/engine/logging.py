"""Run logging: metrics.jsonl in the run directory, plus optional TensorBoard / W&B / MLflow."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("alignkit")


def _clean(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl`.

    On resume, lines from steps after the checkpoint are dropped first, so the file reads as if
    the run had never been interrupted.
    """

    def __init__(self, run_dir: Path, trackers: list[str] = (), config: dict | None = None, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            tmp.replace(self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._trackers = [t for t in (_open_tracker(name, run_dir, config or {}) for name in trackers) if t]

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for tracker in self._trackers:
            tracker(step, {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"})


def _open_tracker(name: str, run_dir: Path, config: dict):
    """A callable(step, metrics) for an installed tracker; a warning and None if it is missing."""
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            return lambda step, m: [writer.add_scalar(k, v, step) for k, v in m.items()] and writer.flush()
        if name == "wandb":
            import wandb

            wandb.init(dir=str(run_dir), config=config)
            return lambda step, m: wandb.log(m, step=step)
        if name == "mlflow":
            import mlflow

            mlflow.start_run()
            mlflow.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})
            return lambda step, m: mlflow.log_metrics(m, step=step)
    except ImportError:
        log.warning("tracker %s is not installed; logging to metrics.jsonl only", name)
        return None
    raise ValueError(f"unknown tracker {name!r} (expected tensorboard, wandb or mlflow)")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
