"""Data parallel training (engine/distributed.py): `alignkit sft`, `rm` and `dpo` launched as 2
processes on CPU (gloo, one thread each, through torchrun and through accelerate launch) end with
the weights of one process given the same global batch (train.grad_accum micro-batches a step,
shared out between the processes, some steps unevenly), within atol 1e-5 in fp32: the processes
sum their gradients in another order than one process does. They log the same losses, only the
main process writes metrics.jsonl, and a 2-process run resumed from its checkpoint equals the
uninterrupted one bit for bit.

Sampling under data parallelism: `rest-em` and `ppo` as 2 processes sample each shard of prompts
in one process (both processes sample), and the pool the run goes on with is exactly the union
of the shards, in shard order (`shards.jsonl`: every rank's digest of what it sampled against
the samples the main process wrote and trained on), and the same pool as one process samples;
the runs then end with the weights and rows of one process.
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

from alignkit.algorithms.sampling.stages import Sample, sample_digest
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


# alignkit's CLI in a process that SIGKILLs itself at its first optimizer step (each of the processes)
KILLED_AT_FIRST_STEP = """
import os, signal, sys
import alignkit.engine.trainer as trainer
trainer.Engine.train_step = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
from alignkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _launch(launcher: str, args: list[str], script: str | None = None, ok: bool = True) -> str:
    """`alignkit <args>` as 2 processes started by torchrun or accelerate launch (`script`: a file
    run instead of `-m alignkit`; `ok=False`: the launch is expected to fail); their stderr."""
    if launcher == "torchrun":
        start = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:  # without GPUs, accelerate starts several processes only with --multi_gpu
        start = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_port())]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*start, *([script] if script else ["-m", "alignkit"]), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == ok, proc.stderr[-4000:]
    return proc.stderr


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


def _dpo(tiny_dir: str, tmp_path) -> list[str]:
    """DPO on 10 pairs, a row each, for 4 steps: the 4th step has one micro-batch."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "chosen": f"It is {2 * i}.",
                                         "rejected": f"Maybe {2 * i + 1}, or so."}) + "\n" for i in range(10)))
    return ["dpo", f"model.path={tiny_dir}", f"data.path={pairs}", "train.max_steps=4", "train.max_tokens_per_batch=64",
            "eval.problems=0", "beta=0.5", *COMMON]


def test_dpo_two_processes_equal_one(tiny_dir, tmp_path):
    """10 pairs, a row each: the 4th step has one micro-batch, and the second process none."""
    args = _dpo(tiny_dir, tmp_path)
    assert main([*args, f"train.output_dir={tmp_path / 'one'}"]) == 0
    _launch("torchrun", [*args, f"train.output_dir={tmp_path / 'two'}"])
    _same_run(tmp_path / "one", tmp_path / "two", steps=4)


@pytest.fixture(scope="module")
def answering_dir(tmp_path_factory):
    """A tiny model taught one-digit sums for a few seconds: some of its samples are correct, so
    ReST-EM keeps some and its M-step trains."""
    from alignkit.algorithms.sampling.stages import tokenize_samples
    from alignkit.algorithms.sampling.train_stage import train_stage
    from alignkit.engine.config import SamplingTrainConfig
    from alignkit.models.load import save_model
    from alignkit.models.tiny import tiny_model, tiny_tokenizer
    from alignkit.tasks import RewardConfig, TaskConfig, build_task

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok, model = tiny_tokenizer(), tiny_model(seed=0)
        task = build_task(TaskConfig(train=40, val=4, heldout=8, min_digits=1, max_digits=1, ops=["+"]), RewardConfig())
        data = tokenize_samples(tok, [Sample(p, task.answer_for(p)) for p in task.train])
        out = tmp_path_factory.mktemp("answering")
        cfg = SamplingTrainConfig(output_dir=str(out / "run"), lr=3e-3, epochs=40, max_tokens_per_batch=512, progress=False,
                                  warmup_ratio=0.05)
        model, _ = train_stage(model, tok, data, cfg)
        return str(save_model(model, tok, out / "model"))
    finally:
        torch.set_num_threads(threads)


def _shard_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "shards.jsonl").read_text().splitlines()]


def _check_pool(line: dict, prompts: int, samples: int) -> None:
    """One sampling phase's record: its shards tile the prompts once, both processes sampled, and
    the pool's slice of each shard is what that shard's process sampled."""
    shards = line["shards"]
    assert [s["shard"] for s in shards] == [0, 1]
    assert [s["first"] for s in shards] == [sum(t["prompts"] for t in shards[:i]) for i in range(len(shards))]
    assert sum(s["prompts"] for s in shards) == prompts and sum(s["samples"] for s in shards) == samples
    assert [s["rank"] for s in shards] == [i % 2 for i in range(len(shards))]  # shard k by process k mod 2
    assert line["pool"] == [s["digest"] for s in shards]


def _samples_file(path: Path) -> list[Sample]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [Sample(r["prompt"], r["response"], reward=r["reward"], finish_reason=r["finish_reason"]) for r in rows]


def test_rest_em_two_processes_pool_is_the_union_of_the_shards(answering_dir, tmp_path):
    """40 problems: two shards (32 + 8 prompts: SHARD_PROMPTS = 32 >= sampling.batch_size), one a process."""
    from alignkit.algorithms.sampling.rest_em import RestEMConfig, _correct
    from alignkit.algorithms.sampling.stages import cap_per_prompt

    n = 2
    args = ["rest-em", f"model.path={answering_dir}", "task.min_digits=1", "task.max_digits=1", "task.ops=[+]", "task.train=40",
            "task.val=4", "task.heldout=4", f"sampling.n={n}", "sampling.batch_size=16", "sampling.max_new_tokens=4", "iterations=1", "train.epochs=1",
            "train.grad_accum=2", "train.max_tokens_per_batch=256", "metrics.train_problems=4", "metrics.eval_samples=0",
            "metrics.baseline=false", "cap_per_problem=1", *COMMON[:3]]
    assert main([*args, f"train.output_dir={tmp_path / 'one'}"]) == 0
    _launch("torchrun", [*args, f"train.output_dir={tmp_path / 'two'}"])
    one, two = tmp_path / "one", tmp_path / "two"

    [line] = _shard_lines(two)
    assert line["phase"] == "001-sample"
    _check_pool(line, 40, 40 * n)
    pool = _samples_file(two / "samples-iter-1.jsonl")  # every sample of the E-step, as the main process had them
    cuts = [sum(s["samples"] for s in line["shards"][:i]) for i in range(len(line["shards"]) + 1)]
    assert [sample_digest(pool[a:b]) for a, b in zip(cuts, cuts[1:])] == [s["digest"] for s in line["shards"]]
    counts: dict[str, int] = {}
    for x in pool:
        counts[x.prompt] = counts.get(x.prompt, 0) + 1
    assert len(counts) == 40 and set(counts.values()) == {n}  # every problem of the split, sampled n times, once

    # the kept answers the M-step trained on: the selection of the whole pool
    kept = _samples_file(two / "kept-iter-1.jsonl")
    cfg = RestEMConfig(cap_per_problem=1)
    assert kept and [sample_digest([x]) for x in kept] == [sample_digest([x]) for x in cap_per_prompt(_correct(pool, cfg), 1, 1)]

    # the pool, the kept answers and the trained model are one process's
    [line_one] = _shard_lines(one)
    assert [s["digest"] for s in line_one["shards"]] == [s["digest"] for s in line["shards"]]
    assert {s["rank"] for s in line_one["shards"]} == {0}
    for name in ("samples-iter-1.jsonl", "kept-iter-1.jsonl"):
        assert (one / name).read_text() == (two / name).read_text()
    a, b = _weights(one), _weights(two)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= ATOL
    timings = {"minutes", "e_step_s", "m_step_s", "eval_s"}
    rows_one, rows_two = ([{k: v for k, v in r.items() if k not in timings} for r in read_metrics(d)] for d in (one, two))
    assert [r["step"] for r in rows_two] == [1] and rows_one == rows_two
    assert (two / "result.json").is_file() and not (two / "resume").exists()

    # killed at the M-step's first optimizer step, resumed at 2 processes: the stored shards are read back
    killer = tmp_path / "killer.py"
    killer.write_text(KILLED_AT_FIRST_STEP)
    cut = tmp_path / "cut"
    _launch("torchrun", [*args, f"train.output_dir={cut}"], script=str(killer), ok=False)
    assert not (cut / "result.json").exists() and len(list((cut / "resume").glob("001-sample/shard-*.jsonl"))) == 2
    _launch("torchrun", [*args, f"train.output_dir={cut}", "--resume"])
    [line_cut] = _shard_lines(cut)
    assert [(s["rank"], s["digest"]) for s in line_cut["shards"]] == [(None, s["digest"]) for s in line["shards"]]
    assert (cut / "kept-iter-1.jsonl").read_text() == (two / "kept-iter-1.jsonl").read_text()
    c = _weights(cut)
    assert all(torch.equal(b[k], c[k]) for k in b)  # the uninterrupted 2-process run's weights, bit for bit
    assert [{k: v for k, v in r.items() if k not in timings} for r in read_metrics(cut)] == rows_two


def lowercase_letters(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward that tells the tiny model's replies apart: the lowercase letters in a reply."""
    return [float(sum(ch.islower() for ch in r)) for r in responses]


def test_ppo_two_processes_pool_is_the_union_of_the_shards(tiny_dir, tmp_path):
    """4 prompts an iteration in shards of sampling.batch_size = 2: one shard a process."""
    args = ["ppo", f"model.path={tiny_dir}", "reward.kind=function", "reward.function=tests.test_distributed:lowercase_letters", "iterations=2", "prompts_per_iteration=4", "sampling.batch_size=2", "sampling.n=2",
            "sampling.max_new_tokens=8", "minibatch_size=4", "train.batch_size=1", "ppo_epochs=1", "prompts.train=8",
            "prompts.heldout=2", "eval.every=0", "train.lr=1e-3", "train.threads=1", "samples_every=1",
            "vf_clip=0"]  # the value clip's share counts float ties (value == old value at an iteration's first step)
    assert main([*args, f"train.output_dir={tmp_path / 'one'}"]) == 0
    _launch("torchrun", [*args, f"train.output_dir={tmp_path / 'two'}"])
    one, two = tmp_path / "one", tmp_path / "two"

    lines = _shard_lines(two)
    assert [line["phase"] for line in lines] == ["iteration-1", "iteration-2"]
    for line, line_one in zip(lines, _shard_lines(one)):
        _check_pool(line, 4, 8)
        assert line_one["pool"] == line["pool"]  # one process sampled the same pool
        assert {s["rank"] for s in line_one["shards"]} == {0}
    # the main process's samples.jsonl holds the first 4 replies of each iteration: the first shard's, sampled by the main process
    rows = [json.loads(line) for line in (two / "samples.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1] * 4 + [2] * 4
    for r1, r2 in zip([json.loads(line) for line in (one / "samples.jsonl").read_text().splitlines()], rows):
        assert r1.pop("kl") == pytest.approx(r2.pop("kl"), rel=1e-4, abs=1e-5) and r1 == r2
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= ATOL
    timings = re.compile(r"(^|/)(step_s|gen_s|iteration_s)$|per_s$")
    rows_one, rows_two = ([{k: v for k, v in r.items() if not timings.search(k)} for r in read_metrics(d)] for d in (one, two))
    assert [r.get("iteration") for r in rows_two] == [None, 1, 2, None] and [sorted(r) for r in rows_one] == [sorted(r) for r in rows_two]
    for r1, r2 in zip(rows_one, rows_two):
        for k, v in r1.items():
            assert v == pytest.approx(r2[k], rel=1e-4, abs=1e-5), (r1["step"], k)  # KL: a sum of differences


def test_commands_without_data_parallel_refuse_several_processes(monkeypatch, capsys):
    """A launcher's WORLD_SIZE > 1 is refused, before any work, by the commands that run in one process."""
    from alignkit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["rrhf", "train.max_steps=1"]) == 2
    assert "alignkit rrhf: error: runs in one process; data-parallel launches (torchrun, accelerate launch) support sft, rm, " \
           "dpo, rs, raft, rft, rest, rest-em, ppo" in capsys.readouterr().err
