import pytest

from alignkit.algorithms.sft import SFTConfig
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
