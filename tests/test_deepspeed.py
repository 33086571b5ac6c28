"""DeepSpeed ZeRO (`train.deepspeed`, engine/zero.py): `alignkit sft` (ZeRO stage 2 by torchrun,
stage 3 by the `deepspeed` launcher) and a LoRA `rm` (stage 2 by accelerate launch) launched as 2
processes on CPU (gloo, one thread each) end with the weights of one process without DeepSpeed
given the same global batch, within atol 1e-5 in fp32 (measured: 1e-8 for stage 2, 1.2e-7 for
stage 3), and log the same rows. Every step has 3 micro-batches, 2 on the main process and 1 on
the other, which runs a pad pass (ZeRO's collectives pair up across the processes), so a process
accumulates more than one micro-batch a step and the counts are uneven. Checkpoints hold the
gathered weights and AdamW state, numbered as one process numbers them, and a run stopped after
its checkpoint at step 2 and resumed under DeepSpeed (stage 2 and stage 3) ends where one process
does (a constant learning rate after a step of warmup, so that the shorter run's schedule is the
longer one's). A DeepSpeed config that
contradicts alignkit's keys, and the combinations not supported, are refused before any model loads.

The first DeepSpeed launch on a machine compiles DeepSpeed's shared-memory collective op for CPU
(about a minute; torch keeps it in ~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR, afterwards).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import (  # noqa: F401 (a fixture)
    ATOL,
    COMMON,
    REPO,
    _launch,
    _port,
    _same_run,
    _sft,
    tiny_dir,
)

from alignkit.cli import main

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'alignkit[deepspeed]')")

ZERO = "DeepSpeed ZeRO stage {} over 2 processes"
CONSTANT = ["train.schedule=constant"]


def _config(tmp_path, stage: int, **extra) -> str:
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 6, **extra}))
    return f"train.deepspeed={path}"


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_sft_zero2_equals_one_process_and_resumes(tiny_dir, tmp_path):
    args = [*_sft(tiny_dir), *CONSTANT]
    assert main([*args, f"train.output_dir={tmp_path / 'one'}"]) == 0
    two = [*args, _config(tmp_path, 2), f"train.output_dir={tmp_path / 'two'}"]
    assert ZERO.format(2) in _launch("torchrun", [*two, "train.max_steps=2"])
    assert "resumed from" in _launch("torchrun", [*two, "--resume"])
    _same_run(tmp_path / "one", tmp_path / "two")

    # the checkpoints: whole weights and optimizer state, as one process writes them
    for step in ("step-0000002", "step-0000003"):
        _same_checkpoint(tmp_path / "one" / "checkpoints" / step, tmp_path / "two" / "checkpoints" / step)


def _same_checkpoint(one, two) -> None:
    w1, w2 = (load_file(str(d / "trainable.safetensors")) for d in (one, two))
    assert w1.keys() == w2.keys() and max(_close(w1[k], w2[k]) for k in w1) <= ATOL
    o1, o2 = (torch.load(d / "state.pt", weights_only=False)["optimizer"] for d in (one, two))
    assert o1["param_groups"] == o2["param_groups"] and o1["state"].keys() == o2["state"].keys()
    for i, state in o1["state"].items():
        assert state.keys() == o2["state"][i].keys()
        assert all(_close(v, o2["state"][i][k]) <= ATOL for k, v in state.items()), i


def test_sft_zero3_by_deepspeed_launcher_equals_one_process(tiny_dir, tmp_path):
    """Stage 3 partitions the parameters (and the AdamW state a resumed run loads into them); the
    model is a plain module again after training, which the main process saves. DeepSpeed's own launcher passes --local_rank to the program unless told
    not to (--no_local_rank); alignkit's command line takes none."""
    args = [*_sft(tiny_dir), *CONSTANT]
    assert main([*args, f"train.output_dir={tmp_path / 'one'}"]) == 0
    two = [*args, _config(tmp_path, 3), f"train.output_dir={tmp_path / 'two'}"]
    assert ZERO.format(3) in _deepspeed([*two, "train.max_steps=2"])
    assert "resumed from" in _deepspeed([*two, "--resume"])
    _same_run(tmp_path / "one", tmp_path / "two")
    _same_checkpoint(tmp_path / "one" / "checkpoints" / "step-0000003", tmp_path / "two" / "checkpoints" / "step-0000003")


def _deepspeed(args: list[str]) -> str:
    """`alignkit <args>` as 2 processes started by DeepSpeed's launcher; their stderr."""
    start = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_port()),
             "--no_local_rank", "--module", "alignkit"]
    proc = subprocess.run([*start, *args], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def test_rm_lora_zero2_by_accelerate_launch_equals_one_process(tiny_dir, tmp_path):
    """A LoRA reward model (frozen and trained parameters), evaluated on the main process during
    training (stage 2 keeps the parameters whole on every process) and after."""
    args = ["rm", f"model.path={tiny_dir}", "train.max_steps=3", "train.eval_every=2", "data.builtin_pairs=24",
            "data.builtin_eval_pairs=8", "eval_pairs=8", "train.max_tokens_per_batch=160", "data.max_length=96",
            "model.lora={r: 4, alpha: 8}", *COMMON]
    assert main([*args, f"train.output_dir={tmp_path / 'one'}"]) == 0
    assert ZERO.format(2) in _launch("accelerate", [*args, _config(tmp_path, 2), f"train.output_dir={tmp_path / 'two'}"])
    _same_run(tmp_path / "one", tmp_path / "two")
    assert (tmp_path / "two" / "eval" / "report.json").is_file()


@pytest.mark.parametrize("extra, key", [
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, "optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"train_batch_size": 64}, "train_batch_size"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
    ({"gradient_clipping": 0.5}, "gradient_clipping"),
    ({"bf16": {"enabled": True}}, "bf16"),
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"zero_force_ds_cpu_optimizer": True}, "zero_force_ds_cpu_optimizer"),
])
def test_contradicting_keys_are_refused_before_loading_a_model(tmp_path, capsys, extra, key):
    path = _config(tmp_path, 2, **extra)
    assert main(["sft", "model.path=/nonexistent", path]) == 1
    assert f"train.deepspeed: {path.split('=', 1)[1]}: {key}: " in capsys.readouterr().err


def test_auto_keys_are_filled_in(tmp_path):
    """Keys set to "auto" (as Hugging Face's configs carry them) take alignkit's values."""
    from alignkit.engine.zero import check, ds_config

    path = _config(tmp_path, 3, train_batch_size="auto", gradient_clipping="auto", bf16={"enabled": "auto"}).split("=", 1)[1]
    assert check(path, 1.0) == 3
    filled = ds_config(path, 1.0)
    assert filled["gradient_clipping"] == 1.0 and filled["train_batch_size"] == 1 and "bf16" not in filled


@pytest.mark.parametrize("args, message", [
    (["sft", "{config}", "train.fsdp=true"], "train.fsdp and train.deepspeed both shard the model"),
    (["sft", "{config}", "train.on_nonfinite=skip"], "train.deepspeed: on_nonfinite=skip is not supported"),
    (["ppo", "{config3}"], "ppo samples with the model between its updates"),
    (["rm", "{config3}"], "rm evaluates through a scorer of the model being trained"),
    (["rest-em", "recipes/rest_em.yaml", "task.val=8", "{config}"], "train.deepspeed does not keep early stopping's best weights"),
    (["ppo", "{config}", "sampling.backend=vllm"], "train.deepspeed cannot sample with sampling.backend=vllm"),
    (["sft", "train.deepspeed=/nonexistent.json"], "train.deepspeed: no such file: /nonexistent.json"),
    (["sft", "{config0}"], "zero_optimization.stage: must be 1, 2 or 3, not 0"),
])
def test_unsupported_combinations_are_refused_before_loading_a_model(tmp_path, capsys, args, message):
    configs = {"config": _config(tmp_path, 2), "config3": _config(tmp_path, 3), "config0": _config(tmp_path, 0)}
    assert main([a.format(**configs) for a in args] + ["model.path=/nonexistent"]) == 1
    assert message in capsys.readouterr().err


def test_missing_deepspeed_is_named(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    assert main(["sft", "model.path=/nonexistent", _config(tmp_path, 2)]) == 1
    assert "train.deepspeed needs DeepSpeed: pip install 'alignkit[deepspeed]'" in capsys.readouterr().err
