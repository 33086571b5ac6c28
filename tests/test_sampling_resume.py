"""The sampling methods continue a killed run with `--resume` (algorithms/sampling/run_state.py).

Each run is a real `python -m alignkit.cli` process on a tiny model, killed with SIGKILL: inside an
E-step (after some shards of samples are stored), inside an M-step (during an optimizer step),
while a stored phase is being written (before its rename), and at random moments. The resumed
run must end with exactly the weights and the rows of a run that was never killed (fp32 on CPU is
run-to-run deterministic), without sampling again what it had stored."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.engine.logging import read_metrics
from test_sampling_methods import COMMON, answering_model  # noqa: F401 (the module fixture)

# 60 training problems: two shards of samples per E-step
REST_EM = ["task.train=60", "iterations=2", "train.epochs=2", "metrics.eval_samples=2", "metrics.ks=[1,2]",
           "stop_when_worse=false"]
TIMINGS = {"minutes", "e_step_s", "m_step_s", "eval_s"}

# Runs alignkit's CLI after arranging for the process to SIGKILL itself on the Nth call of one
# function: "collect" (sampling a shard), "train_step" (an optimizer step), "replace" (the rename
# that completes a stored file: the kill lands after the temporary file is written).
KILLER = """
import os, signal, sys
where, nth = sys.argv[1], int(sys.argv[2])
calls = [0]
def killing(fn):
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapped
import alignkit.algorithms.sampling.frame as frame, alignkit.engine.trainer as trainer, alignkit.files as files
if where == "collect":
    frame.collect = killing(frame.collect)
elif where == "train_step":
    trainer.Engine.train_step = killing(trainer.Engine.train_step)
elif where == "replace":
    files.os = type(os)("os_wrapper")
    files.os.__dict__.update(os.__dict__)
    files.os.replace = killing(os.replace)
from alignkit.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _env():
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}


def _run(args, kill=None):
    """Run `alignkit <args>`; with kill=(where, nth), the process kills itself there. Returns the
    completed process."""
    cmd = [sys.executable, "-c", KILLER, kill[0], str(kill[1]), *args] if kill else [sys.executable, "-m", "alignkit.cli", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in read_metrics(run_dir)]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert _rows(a) == _rows(b)
    assert json.loads((a / "result.json").read_text())["heldout_acc"] == json.loads((b / "result.json").read_text())["heldout_acc"]
    assert not (b / "resume").exists()  # a finished run keeps no resume state


@pytest.fixture(scope="module")
def straight(answering_model, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """ReST-EM never killed."""
    out = tmp_path_factory.mktemp("straight") / "run"
    done = _run(["rest-em", f"model.path={answering_model}", f"train.output_dir={out}", *COMMON, *REST_EM])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _args(model, out):
    return ["rest-em", f"model.path={model}", f"train.output_dir={out}", *COMMON, *REST_EM]


@pytest.mark.parametrize("kill, extra", [(("collect", 2), []), (("train_step", 3), []), (("train_step", 3), ["train.save_every=1"]),
                                         (("replace", 9), [])],
                         ids=["inside-an-E-step", "inside-an-M-step", "inside-a-checkpointed-M-step", "during-a-stored-write"])
def test_rest_em_killed_then_resumed_ends_as_if_never_killed(answering_model, straight, tmp_path, kill, extra):  # noqa: F811
    out = tmp_path / "run"
    killed = _run([*_args(answering_model, out), *extra], kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "result.json").exists()
    resumed = _run([*_args(answering_model, out), *extra, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if kill[0] == "collect":  # killed sampling the second shard of iteration 1's E-step: the first is stored
        assert "scored samples read from" in resumed.stderr
    if extra:  # the M-step goes on from its step-2 checkpoint, with early stopping's state
        assert "resumed from" in resumed.stderr and "step-0000002" in resumed.stderr
        assert not (out / "iter-1" / "checkpoints").exists()  # removed once the stage's model is stored
    _assert_same_run(straight, out)


def test_rest_em_killed_at_random_moments_ends_as_if_never_killed(answering_model, straight, tmp_path):  # noqa: F811
    out, rng = tmp_path / "run", random.Random(27)
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", *_args(answering_model, out), *(["--resume"] if attempt else [])],
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=rng.uniform(3.0, 9.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
        if proc.returncode == 0:
            break
    if not (out / "result.json").exists():
        last = _run([*_args(answering_model, out), "--resume"])
        assert last.returncode == 0, last.stderr[-3000:]
    _assert_same_run(straight, out)


def test_rs_with_lora_and_a_pool_resumes_exactly_after_a_kill_in_its_second_iteration(answering_model, tmp_path):  # noqa: F811
    args = lambda out: ["rs", f"model.path={answering_model}", f"train.output_dir={out}", "iterations=2", "train.epochs=1",
                        "temperature_prompts=4", "temperatures=[1.0]", "min_reward=0.0", "model.lora.r=4",
                        "model.lora.alpha=8", "model.lora.dropout=0.1", "train.lr=1e-3", *COMMON]
    whole = _run(args(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = len(read_metrics(tmp_path / "whole" / "iter-1"))  # optimizer steps of iteration 1 (one row each)
    killed = _run(args(tmp_path / "cut"), kill=("train_step", first + 1))  # the first step of iteration 2
    assert killed.returncode == -signal.SIGKILL
    resumed = _run([*args(tmp_path / "cut"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "the trained model is read from" in resumed.stderr
    wa, wb = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _rows(tmp_path / "whole") == _rows(tmp_path / "cut")


def test_resume_with_another_config_or_after_the_end_is_a_clear_error(answering_model, straight, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    killed = _run(_args(answering_model, out), kill=("train_step", 2))
    assert killed.returncode == -signal.SIGKILL
    assert main([*_args(answering_model, out), "train.lr=0.001", "--resume"]) == 1
    err = capsys.readouterr().err
    assert (f"alignkit rest-em: error: --resume: the config differs from the one the run in {out} started with "
            f"({out / 'resume' / 'config.json'}): train.lr: 2e-05 -> 0.001. Resume with the same settings, or start a "
            "new run (another train.output_dir, or without --resume)") in err
    assert main(["rest-em", "model.path=x", f"train.output_dir={straight}", "--resume", *COMMON, *REST_EM]) == 1
    assert (f"alignkit rest-em: error: --resume: the run in {straight} has finished (result.json); there is nothing "
            "to resume. Run without --resume to start it again") in capsys.readouterr().err
