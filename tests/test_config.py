import dataclasses
import importlib

import pytest

from alignkit.algorithms.sampling.best_of_n import BestOfNConfig
from alignkit.algorithms.sft import SFTConfig
from alignkit.cli import COMMANDS, main, resumable
from alignkit.config import ConfigError, load_config


def test_overrides_and_types(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 1.0e-4\n  epochs: 1\ndata:\n  builtin: arithmetic\n")
    cfg = load_config(SFTConfig, str(recipe), ["train.grad_accum=4", "model.lora={r: 8}"])
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 1.0 and cfg.train.grad_accum == 4
    assert cfg.data.builtin == "arithmetic"
    assert cfg.model.lora.r == 8 and cfg.model.lora.alpha == 32


def test_unknown_key_names_nearest(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lerning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.lerning_rate'"):
        load_config(SFTConfig, str(recipe))
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, None, ["train.grad_acum=2"])
    assert str(err.value) == "unknown key 'train.grad_acum'; did you mean 'grad_accum'?"


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match=r"train.grad_accum: expected an integer, got 'two'"):
        load_config(SFTConfig, None, ["train.grad_accum=two"])
    with pytest.raises(ConfigError, match=r"precision must be fp32, bf16 or auto"):
        load_config(SFTConfig, None, ["train.precision=fp8"])


def test_missing_recipe():
    with pytest.raises(ConfigError, match="recipe 'nope.yaml' does not exist"):
        load_config(SFTConfig, "nope.yaml")


def test_nested_override_keeps_the_methods_own_defaults():
    # SFTConfig's train default has epochs=2.0; overriding another train key must keep it.
    cfg = load_config(SFTConfig, None, ["train.lr=1e-4"])
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 2.0
    assert load_config(SFTConfig, None, []).train.epochs == 2.0


# A bad value fails while the recipe is read, naming the key: before the (missing) model loads.
BAD_VALUES = [
    ("sft", "train.grad_accum=0", "train: grad_accum must be at least 1, not 0"),
    ("sft", "train.trackers=[tensorbord]", "unknown tracker 'tensorbord'"),
    ("sft", "data.eval_fraction=1.5", "eval_fraction must be in [0.0, 1.0), not 1.5"),
    ("sft", "data.on_overlong=cut", "on_overlong must be one of truncate, drop, error, not 'cut'"),
    ("sft", "eval.style=poem", "style must be one of answer, cot, not 'poem'"),
    ("rm", "train.eval_every=-1", "train: eval_every must be at least 0, not -1"),
    ("rm", "data.eval_fraction=-0.1", "data.eval_fraction must be in [0.0, 1.0), not -0.1"),
    ("rm-eval", "bins=0", "bins must be at least 1, not 0"),
    ("dpo", "beta=0", "beta must be > 0, not 0.0"),
    ("dpo", "label_smoothing=0.5", "label_smoothing must be in [0.0, 0.5), not 0.5"),
    ("dpo", "reference_train.keep_checkpoints=-1", "reference_train: keep_checkpoints must be at least 0, not -1"),
    ("dpo", "data.pairs.pairs_per_problem=0", "pairs_per_problem must be at least 1, not 0"),
    ("rrhf", "rank_weight=-1", "rank_weight must be at least 0, not -1.0"),
    ("make-pairs", "precision=fp16", "precision must be one of fp32, bf16, auto, not 'fp16'"),
    ("eval", "max_digits=1", "max_digits must be at least 2, not 1"),
    ("generate", "prompts=[]", "prompts must not be empty"),
    ("best-of-n", "ns=[0,2]", "ns must hold integers >= 1, got [0, 2]"),
    ("rs", "packing=zip", "packing must be one of prefix, pack, pad, not 'zip'"),
    ("raft", "fraction=0", "fraction must be in (0.0, 1.0], not 0.0"),
    ("rft", "dedupe_by=hash", "dedupe_by must be one of path, text, none, not 'hash'"),
    ("rest-em", "cap_per_problem=0", "cap_per_problem must be at least 1, not 0"),
    ("rest", "thresholds=[0.5,0.2]", "thresholds must be strictly increasing, got [0.5, 0.2]"),
    ("ppo", "train.batch_size=0", "train: batch_size must be at least 1, not 0"),
]


def _fields(entry) -> set[str]:
    module, cls, _, _ = entry
    return {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}


@pytest.mark.parametrize("command,override,message", BAD_VALUES, ids=[f"{c}:{o}" for c, o, _ in BAD_VALUES])
def test_bad_value_fails_before_any_work(command, override, message, tmp_path, capsys):
    out, fields = tmp_path / "run", _fields(COMMANDS[command])
    args = [f"model.path={tmp_path / 'missing'}", override]
    if "train" in fields or "output_dir" in fields:
        args.append(f"{'train.' if 'train' in fields else ''}output_dir={out}")
    assert main([command, *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "does not exist" not in err, err
    assert not out.exists()


def test_score_values_are_checked_before_any_work(tmp_path, capsys):
    assert main(["score", f"input={tmp_path / 'rows.jsonl'}", f"model={tmp_path / 'missing'}", "max_tokens=0"]) == 1
    assert "max_tokens must be at least 1, not 0" in capsys.readouterr().err


def test_resume_only_where_a_command_can(tmp_path, capsys):
    can = {c for c, (module, cls, _, _) in COMMANDS.items() if resumable(getattr(importlib.import_module(module), cls))}
    assert can == {"sft", "rm", "dpo", "rrhf", "ppo", "rs", "raft", "rft", "rest", "rest-em", "flan-study"}
    for command in sorted(set(COMMANDS) - can - {"pipeline"}):
        assert main([command, "--resume", f"model.path={tmp_path / 'missing'}"]) == 2
        assert f"--resume: {command} cannot resume a run" in capsys.readouterr().err
    # the pipeline resumes whenever it runs again: --resume is taken and changes nothing
    assert main(["pipeline", "--resume", f"model={tmp_path / 'missing'}", f"output_dir={tmp_path / 'p'}"]) == 1
    assert "alignkit pipeline: error: model path" in capsys.readouterr().err
    cfg = load_config(SFTConfig, None, ["train.resume=true"])
    assert cfg.train.resume is True
    with pytest.raises(ConfigError, match=r"unknown key 'train'"):
        load_config(BestOfNConfig, None, ["train.resume=true"])
