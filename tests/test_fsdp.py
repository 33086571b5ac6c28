"""Fully sharded data parallelism (`train.fsdp=true`, engine/distributed.py): `alignkit sft` and
`dpo` launched as 2 processes on CPU (gloo, one thread each) with the model sharded by torch's
FSDP2 end with the weights of one process given the same global batch, within atol 1e-5 in fp32
(the processes sum their gradients in another order than one process does), and log the same
rows. Their checkpoints hold the gathered weights and optimizer state, numbered as one process
numbers them; a 2-process FSDP run resumed from its checkpoint equals the uninterrupted one.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import (  # noqa: F401 (a fixture)
    ATOL,
    COMMON,
    _dpo,
    _launch,
    _rows,
    _same_run,
    _sft,
    _weights,
    tiny_dir,
)

from alignkit.cli import main
from alignkit.engine.logging import read_metrics

FSDP = "train.fsdp=true"
SHARDED = "FSDP: the model's parameters, gradients and optimizer state are sharded over 2 processes"


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_sft_fsdp_equals_one_process_and_resumes(tiny_dir, tmp_path):
    args = _sft(tiny_dir)
    assert main([*args, f"train.output_dir={tmp_path / 'one'}"]) == 0
    assert SHARDED in _launch("torchrun", [*args, FSDP, f"train.output_dir={tmp_path / 'two'}"])
    _same_run(tmp_path / "one", tmp_path / "two")

    # the checkpoint: whole weights and optimizer state, as one process writes them
    one, two = (tmp_path / d / "checkpoints" / "step-0000003" for d in ("one", "two"))
    w1, w2 = (load_file(str(d / "trainable.safetensors")) for d in (one, two))
    assert w1.keys() == w2.keys() and max(_close(w1[k], w2[k]) for k in w1) <= ATOL
    s1, s2 = (torch.load(d / "state.pt", weights_only=False) for d in (one, two))
    o1, o2 = s1["optimizer"], s2["optimizer"]
    assert o1["param_groups"] == o2["param_groups"] and o1["state"].keys() == o2["state"].keys()
    for i, state in o1["state"].items():
        assert state.keys() == o2["state"][i].keys()
        assert all(_close(v, o2["state"][i][k]) <= ATOL for k, v in state.items()), i
    assert len(s2["process_rngs"]) == 1

    # stopped after its checkpoint at step 2, then resumed under FSDP
    constant = ["train.schedule=constant", "train.warmup_steps=0", "train.warmup_ratio=0", FSDP]
    _launch("torchrun", [*args, *constant, f"train.output_dir={tmp_path / 'whole'}"])
    _launch("torchrun", [*args, *constant, "train.max_steps=2", f"train.output_dir={tmp_path / 'cut'}"])
    _launch("torchrun", [*args, *constant, f"train.output_dir={tmp_path / 'cut'}", "--resume"])
    whole, cut = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert max(_close(whole[k], cut[k]) for k in whole) == 0.0
    assert _rows(tmp_path / "whole") == _rows(tmp_path / "cut")


def test_dpo_fsdp_equals_one_process(tiny_dir, tmp_path):
    """10 pairs, a row each: the 4th step has one micro-batch, which the second process runs
    again with its loss times zero (FSDP's collectives pair up across the processes)."""
    args = _dpo(tiny_dir, tmp_path)
    assert main([*args, f"train.output_dir={tmp_path / 'one'}"]) == 0
    assert SHARDED in _launch("torchrun", [*args, FSDP, f"train.output_dir={tmp_path / 'two'}"])
    _same_run(tmp_path / "one", tmp_path / "two", steps=4)


def test_rm_lora_fsdp_by_accelerate_launch_equals_one_process(tiny_dir, tmp_path):
    """A LoRA reward model (frozen and trained parameters in one FSDP unit), evaluated on the
    main process during training (every process gathers the whole model for it) and after."""
    args = ["rm", f"model.path={tiny_dir}", "train.max_steps=3", "train.eval_every=2", "data.builtin_pairs=24",
            "data.builtin_eval_pairs=8", "eval_pairs=8", "train.max_tokens_per_batch=160", "data.max_length=96",
            "model.lora={r: 4, alpha: 8}", *COMMON]
    assert main([*args, f"train.output_dir={tmp_path / 'one'}"]) == 0
    assert SHARDED in _launch("accelerate", [*args, FSDP, f"train.output_dir={tmp_path / 'two'}"])
    _same_run(tmp_path / "one", tmp_path / "two")
    rows = [r for r in _rows(tmp_path / "two") if "eval/accuracy" in r]
    assert [r["step"] for r in rows] == [2, 3]  # during training (step 2) and after the last step
    assert (tmp_path / "two" / "eval" / "report.json").is_file()


def _ppo(tiny_dir) -> list[str]:
    """PPO with a LoRA critic of its own adapter (a policy part and a critic part per row chunk):
    4 prompts × 2 replies an iteration in shards of 2 prompts (one a process), minibatches of 3
    replies in chunks of 1, so a minibatch's second round of chunks has one chunk for 2 processes
    and the second process runs pad parts."""
    return ["ppo", f"model.path={tiny_dir}", "reward.kind=function", "reward.function=tests.test_distributed:lowercase_letters",
            "prompts_per_iteration=4", "sampling.batch_size=2", "sampling.n=2", "sampling.max_new_tokens=8", "minibatch_size=3",
            "train.batch_size=1", "ppo_epochs=1", "prompts.train=8", "prompts.heldout=2", "eval.every=0", "critic_trunk=own",
            "train.lr=1e-3", "train.threads=1", "samples_every=1", "train.save_every=1",
            "vf_clip=0"]  # the value clip's share counts float ties (value == old value at an iteration's first step)


def test_ppo_fsdp_equals_one_process_and_resumes(tiny_dir, tmp_path):
    """Sampling, scoring and the no-grad passes run with the model gathered on every process, so
    the 2 processes sample the pool one process samples (test_distributed's PPO test); the
    updates run sharded. Final weights within ATOL of one process's, the same rows; stopped after
    its checkpoint at iteration 1 and resumed under FSDP, it ends where the uninterrupted run does."""
    args = _ppo(tiny_dir)
    assert main([*args, "iterations=2", f"train.output_dir={tmp_path / 'one'}"]) == 0
    assert SHARDED in _launch("torchrun", [*args, "iterations=2", FSDP, f"train.output_dir={tmp_path / 'two'}"])
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys() and max(_close(a[k], b[k]) for k in a) <= ATOL
    rows_one, rows_two = _ppo_rows(tmp_path / "one"), _ppo_rows(tmp_path / "two")
    assert [r.get("iteration") for r in rows_two] == [None, 1, 2, None] and [sorted(r) for r in rows_one] == [sorted(r) for r in rows_two]
    for r1, r2 in zip(rows_one, rows_two):
        for k, v in r1.items():
            assert v == pytest.approx(r2[k], rel=1e-4, abs=1e-5), (r1["step"], k)  # KL: a sum of differences

    _launch("torchrun", [*args, "iterations=1", FSDP, f"train.output_dir={tmp_path / 'cut'}"])
    _launch("torchrun", [*args, "iterations=2", FSDP, f"train.output_dir={tmp_path / 'cut'}", "--resume"])
    cut = _weights(tmp_path / "cut")
    assert max(_close(b[k], cut[k]) for k in b) == 0.0
    iterations = [[r for r in _ppo_rows(d) if "iteration" in r] for d in (tmp_path / "two", tmp_path / "cut")]
    assert iterations[0] == iterations[1]  # (the cut run's final evaluation, at iteration 1, stays in its log)


def _ppo_rows(run_dir) -> list[dict]:
    timings = re.compile(r"(^|/)(step_s|gen_s|iteration_s)$|per_s$")
    return [{k: v for k, v in r.items() if not timings.search(k)} for r in read_metrics(run_dir)]


def test_ppo_fsdp_refuses_vllm_before_loading_a_model(capsys):
    assert main(["ppo", "model.path=/nonexistent", FSDP, "sampling.backend=vllm"]) == 1  # a config error, as any other
    assert "train.fsdp cannot sample with sampling.backend=vllm" in capsys.readouterr().err


def test_fsdp_refuses_early_stopping_before_training():
    """ReST-EM's validation keeps the best epoch's whole weights; a sharded model has only its
    shards, so `fit` refuses the pair before any step."""
    from types import SimpleNamespace

    import pytest

    from alignkit.engine.trainer import EarlyStopping, fit

    engine = SimpleNamespace(cfg=SimpleNamespace(), sharded=True, zero=None)
    with pytest.raises(ValueError, match="train.fsdp does not keep early stopping"):
        fit(engine, lambda batch: None, lambda epoch: [], early_stopping=EarlyStopping(lambda model: {"reward": 0.0}))


def test_rest_em_refuses_fsdp_with_validation_when_the_recipe_is_read(capsys):
    """The same refusal as `fit`'s, before any model loads or any E-step samples."""
    from alignkit.cli import main

    assert main(["rest-em", "recipes/rest_em.yaml", "task.val=8", FSDP, "model.path=/nonexistent"]) == 1
    assert "train.fsdp does not keep early stopping's best weights (the M-step's validation, task.val=8)" in capsys.readouterr().err
