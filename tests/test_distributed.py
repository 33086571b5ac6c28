"""Data parallel training (engine/distributed.py): `alignkit sft`, `rm` and `dpo` launched as 2
processes on CPU (gloo, one thread each, through torchrun and through accelerate launch) end with
the weights of one process given the same global batch (train.grad_accum micro-batches a step,
shared out between the processes, some steps unevenly), within atol 1e-5 in fp32: the processes
sum their gradients in another order than one process does. They log the same losses, only the
main process writes metrics.jsonl, and a 2-process run resumed from its checkpoint equals the
uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.engine.logging import read_metrics
from alignkit.models.tiny import save_tiny

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5
TIMINGS = re.compile(r"(^|/)step_s$|per_s$")  # wall-clock figures differ run to run
COMMON = ["train.progress=false", "train.threads=1", "train.lr=1e-3", "train.grad_accum=3"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, args: list[str]) -> None:
    """`alignkit <args>` as 2 processes started by torchrun or accelerate launch."""
    if launcher == "torchrun":
        start = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:  # without GPUs, accelerate starts several processes only with --multi_gpu
        start = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_port())]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*start, "-m", "alignkit", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not TIMINGS.search(k)} for row in read_metrics(run_dir)]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted((run_dir / "final").glob("*.safetensors"))
    assert files
    return {f"{p.name}/{k}": v for p in files for k, v in load_file(str(p)).items()}


def _same_run(one: Path, two: Path, steps: int = 3) -> None:
    """Two processes against one: weights within ATOL, the same rows (numbers to 1e-5 relative)."""
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= ATOL, worst
    rows_one, rows_two = _rows(one), _rows(two)
    assert [r["step"] for r in rows_one if "loss" in r] == list(range(1, steps + 1))
    assert [sorted(r) for r in rows_one] == [sorted(r) for r in rows_two]  # each row once: the main process logs
    for r1, r2 in zip(rows_one, rows_two):
        for k, v in r1.items():
            assert v == pytest.approx(r2[k], rel=1e-5, abs=1e-7), (r1["step"], k)


def _sft(tiny_dir) -> list[str]:
    # 31 examples, a packed row each: steps of 3 micro-batches, 2 on the main process and 1 on the other
    return ["sft", f"model.path={tiny_dir}", "train.max_steps=3", "train.warmup_steps=1", "train.max_tokens_per_batch=128",
            "data.max_length=96", "data.mixture.examples_per_task=4", "data.mixture.cap=4", "eval.problems=0",
            "train.save_every=1", *COMMON]


def test_sft_two_processes_equal_one_and_resume(tiny_dir, tmp_path):
    args = _sft(tiny_dir)
    assert main([*args, f"train.output_dir={tmp_path / 'one'}"]) == 0
    _launch("torchrun", [*args, f"train.output_dir={tmp_path / 'two'}"])
    _same_run(tmp_path / "one", tmp_path / "two")
    state = torch.load(tmp_path / "two" / "checkpoints" / "step-0000003" / "state.pt", weights_only=False)
    assert len(state["process_rngs"]) == 1  # the other process's RNG states, beside the main one's

    # stopped after its checkpoint at step 2 (a schedule that does not depend on the step count), then resumed
    constant = ["train.schedule=constant", "train.warmup_steps=0", "train.warmup_ratio=0"]
    _launch("torchrun", [*args, *constant, f"train.output_dir={tmp_path / 'whole'}"])
    _launch("torchrun", [*args, *constant, "train.max_steps=2", f"train.output_dir={tmp_path / 'cut'}"])
    _launch("torchrun", [*args, *constant, f"train.output_dir={tmp_path / 'cut'}", "--resume"])
    whole, cut = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    assert _rows(tmp_path / "whole") == _rows(tmp_path / "cut")


def test_rm_two_processes_by_accelerate_launch_equal_one(tiny_dir, tmp_path):
    args = ["rm", f"model.path={tiny_dir}", "train.max_steps=3", "train.eval_every=2", "data.builtin_pairs=24",
            "data.builtin_eval_pairs=8", "eval_pairs=8", "train.max_tokens_per_batch=160", "data.max_length=96",
            "model.lora={r: 4, alpha: 8}", *COMMON]
    assert main([*args, f"train.output_dir={tmp_path / 'one'}"]) == 0
    _launch("accelerate", [*args, f"train.output_dir={tmp_path / 'two'}"])
    _same_run(tmp_path / "one", tmp_path / "two")
    assert (tmp_path / "two" / "eval" / "report.json").is_file()  # the main process's final evaluation


def test_dpo_two_processes_equal_one(tiny_dir, tmp_path):
    """10 pairs, a row each: the 4th step has one micro-batch, and the second process none."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "chosen": f"It is {2 * i}.",
                                         "rejected": f"Maybe {2 * i + 1}, or so."}) + "\n" for i in range(10)))
    args = ["dpo", f"model.path={tiny_dir}", f"data.path={pairs}", "train.max_steps=4", "train.max_tokens_per_batch=64",
            "eval.problems=0", "beta=0.5", *COMMON]
    assert main([*args, f"train.output_dir={tmp_path / 'one'}"]) == 0
    _launch("torchrun", [*args, f"train.output_dir={tmp_path / 'two'}"])
    _same_run(tmp_path / "one", tmp_path / "two", steps=4)


def test_commands_without_data_parallel_refuse_several_processes(monkeypatch, capsys):
    """A launcher's WORLD_SIZE > 1 is refused, before any work, by the commands that run in one process."""
    from alignkit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["ppo", "iterations=1"]) == 2
    assert "alignkit ppo: error: runs in one process; data-parallel launches (torchrun, accelerate launch) support sft, rm, dpo" \
        in capsys.readouterr().err
