"""Run logging: metrics.jsonl in the run directory, plus optional TensorBoard / W&B / MLflow."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

from alignkit.files import write_text_atomic

log = logging.getLogger("alignkit")

# each tracker's package (what `pip install` takes)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _clean(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl`, and sends the numeric values to
    the extra `trackers` (tensorboard, wandb, mlflow); the run's `config`, when given, is written
    to `config.json` beside it.

    The trackers open first: a tracker whose package is missing is a ValueError naming the package,
    before the run directory is touched. Whoever opens a logger closes it when its run's logging
    is done (`close()`, idempotent), or when the run fails (`closing_on_error`). A new run starts
    the file afresh; a resumed one keeps its first `keep_lines` complete lines (what was logged up
    to the checkpoint it resumes from) and appends, so the file reads as if the run had never
    been interrupted. With `write=False` (a process other than the main one of several training
    together) it writes nothing, opens no tracker and touches no file.
    """

    def __init__(self, run_dir: Path, trackers: list[str] = (), config: dict | None = None, keep_lines: int | None = None,
                 write: bool = True):
        self._trackers: list[tuple] = []
        self.path = Path(run_dir) / "metrics.jsonl"
        self._write = write
        if not write:
            return
        try:
            for name in trackers:
                self._trackers.append(_open_tracker(name, run_dir, config or {}))
        except BaseException:
            self._close_trackers()
            raise
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if config:  # what the run was asked to do, beside what it measured (alignkit report reads it)
            write_text_atomic(self.path.parent / "config.json", json.dumps(config, indent=1, default=str) + "\n")
        if keep_lines is not None and self.path.exists():
            with self.path.open("rb") as f:
                kept = [line for _, line in zip(range(keep_lines), f) if line.endswith(b"\n")]
            write_text_atomic(self.path, b"".join(kept).decode("utf-8"))
        elif keep_lines is None and self.path.exists():
            self.path.unlink()

    def lines(self) -> int:
        """Complete lines of metrics.jsonl so far (what a checkpoint records, `keep_lines` on resume)."""
        if not self.path.is_file():
            return 0
        with self.path.open("rb") as f:
            return sum(1 for line in f if line.endswith(b"\n"))

    def log(self, step: int, metrics: dict) -> None:
        if not self._write:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        for _, write, _ in self._trackers:
            write(step, numbers)

    def close(self) -> None:
        """Flush and close every tracker (TensorBoard's writer, W&B's run, MLflow's run). Later
        calls do nothing; later rows still go to metrics.jsonl. A tracker that fails to close is a
        warning: the others close."""
        self._close_trackers()

    def _close_trackers(self) -> None:
        trackers, self._trackers = self._trackers, []
        for name, _, close in reversed(trackers):
            try:
                close()
            except Exception as err:  # noqa: BLE001 - closing the others matters more
                log.warning("tracker %s did not close cleanly: %s", name, err)

    @contextlib.contextmanager
    def closing_on_error(self):
        """Close the trackers when the block raises (the run is over); leave them open otherwise."""
        try:
            yield self
        except BaseException:
            self.close()
            raise



def _open_tracker(name: str, run_dir: Path, config: dict) -> tuple:
    """(name, write(step, metrics), close()) for one tracker; a ValueError naming the package
    (and the pip command) when it is not installed."""
    if name not in TRACKER_PACKAGES:
        raise ValueError(f"unknown tracker {name!r} (expected tensorboard, wandb or mlflow)")
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
        elif name == "wandb":
            import wandb
        else:
            import mlflow
    except ImportError as err:
        package = TRACKER_PACKAGES[name]
        raise ValueError(f"train.trackers: {name} needs the {package!r} package, which is not installed "
                         f"(pip install {package}), or drop {name} from train.trackers") from err
    if name == "tensorboard":
        writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

        def write(step, metrics):
            for k, v in metrics.items():
                writer.add_scalar(k, v, step)
            writer.flush()

        return name, write, writer.close
    if name == "wandb":
        # a run of its own even when another is active (a sampling method's train stage): wandb>=0.19.10
        run = wandb.init(dir=str(run_dir), config=config, reinit="create_new")
        return name, lambda step, m: run.log(m, step=step), lambda: run.finish()
    # nested under a run already active in this process (a sampling method's train stage); metrics
    # and the end go to this run by its id, whichever run is active then
    from mlflow.entities import Metric

    run_id = mlflow.start_run(nested=mlflow.active_run() is not None).info.run_id
    mlflow.log_params({k: str(v)[:250] for k, v in flatten(config).items()})
    client = mlflow.MlflowClient()

    def write(step, metrics):
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close():
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run()
        else:
            client.set_terminated(run_id)

    return name, write, close


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as one level of dotted keys ({'train': {'lr': 1}} -> {'train.lr': 1})."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of `run_dir/metrics.jsonl`; a last line cut short by a kill is left out."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON object: {line[:80]!r}") from None
            log.warning("%s: its last line was cut short (a killed run) and is left out", path)
    return rows
