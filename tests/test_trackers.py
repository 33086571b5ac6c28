"""The extra trackers (train.trackers): TensorBoard's event files read back against metrics.jsonl,
W&B and MLflow closed at the end of a run, and a missing tracker package reported before any
training. W&B and MLflow run as fake modules through the same imports (the packages are ~190 MB
with their dependencies, so not in the `test` extra); the last test runs the real ones, offline,
where they are installed."""

import sys
import types

import pytest
import torch

from alignkit.cli import main
from alignkit.engine.config import TrainConfig
from alignkit.engine.logging import MetricsLogger, read_metrics
from alignkit.engine.trainer import Engine, fit
from alignkit.models.tiny import save_tiny, tiny_model

SFT = ["train.max_steps=3", "train.progress=false", "train.threads=1", "eval.problems=2", "data.mixture.examples_per_task=8",
       "data.mixture.cap=8", "data.max_length=256"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


def test_tensorboard_scalars_match_metrics_jsonl(tiny_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["sft", "recipes/sft.yaml", f"model.path={tiny_dir}", f"train.output_dir={out}",
                 "train.trackers=[tensorboard]"] + SFT) == 0
    expected = {}
    for row in read_metrics(out):
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                expected[key, row["step"]] = value
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    seen = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert seen.keys() == expected.keys()
    assert {k for k, _ in seen} >= {"loss", "lr", "grad_norm", "eval/arithmetic_accuracy"}
    assert sorted(s for k, s in seen if k == "loss") == [1, 2, 3]
    for key, value in expected.items():
        assert seen[key] == pytest.approx(value, rel=1e-6, abs=1e-30), key  # event files hold float32


def test_missing_tracker_package_is_clear_and_comes_before_training(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    out = tmp_path / "run"
    assert main(["sft", "recipes/sft.yaml", f"model.path={tiny_dir}", f"train.output_dir={out}",
                 "train.trackers=[tensorboard]"] + SFT) == 1
    err = capsys.readouterr().err
    assert "'tensorboard' package" in err and "pip install tensorboard" in err
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()
    for name in ("wandb", "mlflow"):
        monkeypatch.setitem(sys.modules, name, None)
        with pytest.raises(ValueError, match=f"pip install {name}"):
            MetricsLogger(tmp_path / name, [name])
        assert not (tmp_path / name / "metrics.jsonl").exists()


class FakeWandb(types.ModuleType):
    """wandb's surface that the logger uses: init() -> run with log() and finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.runs = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], finished=0)
        run.log = lambda metrics, step: run.logged.append((step, metrics))
        run.finish = lambda: setattr(run, "finished", run.finished + 1)
        self.runs.append(run)
        return run


class FakeMlflow(types.ModuleType):
    """mlflow as the logger uses it: the fluent API's stack of active runs, and a client that logs
    and terminates by run id."""

    def __init__(self):
        super().__init__("mlflow")
        self.stack, self.ended, self.metrics, self.nested = [], [], [], []
        self.entities = types.SimpleNamespace(Metric=lambda key, value, timestamp, step: (key, value, step))
        fake = self

        class MlflowClient:
            def log_batch(self, run_id, metrics):
                fake.metrics.append((run_id, metrics))

            def set_terminated(self, run_id):
                fake.ended.append(run_id)

        self.MlflowClient = MlflowClient

    @staticmethod
    def _run(run_id):
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id))

    def active_run(self):
        return self._run(self.stack[-1]) if self.stack else None

    def start_run(self, nested=False):
        self.nested.append(nested)
        self.stack.append(f"run{len(self.nested)}")
        return self.active_run()

    def log_params(self, params):
        self.params = params

    def end_run(self):
        self.ended.append(self.stack.pop())


@pytest.fixture
def fakes(monkeypatch):
    wandb, mlflow = FakeWandb(), FakeMlflow()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setitem(sys.modules, "mlflow.entities", mlflow.entities)
    return wandb, mlflow


def test_close_finishes_wandb_and_ends_mlflow_once(fakes, tmp_path):
    wandb, mlflow = fakes
    logger = MetricsLogger(tmp_path, ["wandb", "mlflow"], config={"train": {"lr": 0.1}})
    logger.log(1, {"loss": torch.tensor(0.5), "note": "text", "flag": True})
    (run,) = wandb.runs
    assert run.kwargs["dir"] == str(tmp_path) and run.kwargs["config"] == {"train": {"lr": 0.1}}
    assert run.logged == [(1, {"loss": 0.5, "flag": True})]
    assert mlflow.params == {"train.lr": "0.1"} and mlflow.metrics == [("run1", [("loss", 0.5, 1), ("flag", 1.0, 1)])]
    logger.close()
    logger.close()
    assert run.finished == 1 and mlflow.ended == ["run1"]
    logger.log(2, {"loss": 0.25})  # metrics.jsonl still takes rows; the closed trackers do not
    assert len(run.logged) == 1 and [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_a_run_inside_a_run_logs_and_closes_on_its_own(fakes, tmp_path):
    """A sampling method's train stage opens its trackers inside the run's: each logs to its own
    run, and closing one leaves the other open."""
    wandb, mlflow = fakes
    outer = MetricsLogger(tmp_path / "outer", ["wandb", "mlflow"])
    stage = MetricsLogger(tmp_path / "outer" / "stage", ["wandb", "mlflow"])
    stage.log(1, {"loss": 1.0})
    outer.log(1, {"reward": 0.5})  # to its own run, though the stage's is the active one
    assert mlflow.nested == [False, True] and [run_id for run_id, _ in mlflow.metrics] == ["run2", "run1"]
    stage.close()
    assert mlflow.ended == ["run2"] and [run.finished for run in wandb.runs] == [0, 1]
    outer.close()
    assert mlflow.ended == ["run2", "run1"] and [run.finished for run in wandb.runs] == [1, 1]
    assert wandb.runs[0].kwargs["reinit"] == "create_new"


def test_a_failing_close_still_closes_the_others(fakes, tmp_path, caplog):
    wandb, mlflow = fakes
    logger = MetricsLogger(tmp_path, ["mlflow", "wandb"])
    wandb.runs[0].finish = lambda: 1 / 0
    with caplog.at_level("WARNING", logger="alignkit"):
        logger.close()
    assert mlflow.ended == ["run1"] and "tracker wandb did not close cleanly" in caplog.text


def test_a_tracker_that_fails_to_open_closes_those_already_open(fakes, tmp_path, monkeypatch):
    wandb, _ = fakes
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ValueError, match="pip install mlflow"):
        MetricsLogger(tmp_path, ["wandb", "mlflow"])
    assert wandb.runs[0].finished == 1


def test_a_failed_fit_closes_its_trackers(fakes, tmp_path):
    wandb, _ = fakes
    engine = Engine(tiny_model(), TrainConfig(output_dir=str(tmp_path / "a"), progress=False, trackers=["wandb"]), total_steps=2)

    def failing(batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fit(engine, failing, lambda epoch: [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}])
    assert wandb.runs[0].finished == 1


@pytest.mark.parametrize("command, extra", [
    ("sft", ["data.builtin=arithmetic", "data.arithmetic_examples=4", "eval.problems=0"]),
    ("rm", ["data.builtin_pairs=4", "data.builtin_eval_pairs=2"]),
])
def test_a_training_command_closes_its_trackers_when_it_ends(fakes, tiny_dir, tmp_path, command, extra, capsys):
    wandb, mlflow = fakes
    assert main([command, f"model.path={tiny_dir}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1",
                 "train.trackers=[wandb,mlflow]", "train.threads=1", "train.progress=false", *extra]) == 0
    assert [run.finished for run in wandb.runs] == [1] and mlflow.ended == ["run1"] and not mlflow.stack


def test_sampling_run_closes_its_trackers_at_finish(fakes, tiny_dir, tmp_path, capsys):
    wandb, mlflow = fakes
    out = tmp_path / "rest"
    assert main(["rest", f"model.path={tiny_dir}", f"train.output_dir={out}", "train.trackers=[wandb,mlflow]",
                 "thresholds=[0.0]", "metrics.baseline=false", "train.threads=1", "train.progress=false",
                 "task.min_digits=1", "task.max_digits=1", "task.ops=[+]", "task.train=4", "task.val=2", "task.heldout=2",
                 "sampling.max_new_tokens=4", "sampling.n=2", "metrics.train_problems=2", "train.max_tokens_per_batch=512"]) == 0
    # the train stage's trackers closed when the stage ended, the run's own at finish
    assert [run.kwargs["dir"] for run in wandb.runs] == [str(out), str(out / "grow-1-improve-1")]
    assert [run.finished for run in wandb.runs] == [1, 1]
    assert mlflow.ended == ["run2", "run1"] and not mlflow.stack


def test_real_wandb_offline_and_mlflow_file_store(tmp_path, monkeypatch):
    """The packages themselves, when installed (not in the `test` extra: heavy): W&B offline,
    MLflow on a file store in tmp_path; a stage's runs inside the run's, both closed."""
    wandb, mlflow = pytest.importorskip("wandb"), pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    outer = MetricsLogger(tmp_path / "run", ["wandb", "mlflow"], config={"train": {"lr": 0.1}})
    stage = MetricsLogger(tmp_path / "run" / "stage", ["wandb", "mlflow"])
    stage.log(1, {"loss": 1.0})
    outer.log(2, {"reward": 0.75})
    stage.close()
    outer.close()
    outer.close()
    assert wandb.run is None and mlflow.active_run() is None
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted((r.info.status, tuple(r.data.metrics.items())) for r in runs) == [
        ("FINISHED", (("loss", 1.0),)), ("FINISHED", (("reward", 0.75),))]
    for run_dir in (tmp_path / "run", tmp_path / "run" / "stage"):
        assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
