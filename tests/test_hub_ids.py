"""`model.path` and `data.path` take Hugging Face Hub ids (`owner/name`), served from the HF caches.

No test touches the network: the runs that need the Hub's own environment variables (HF_HOME,
HF_HUB_OFFLINE, read when huggingface_hub and datasets are imported) run in a fresh interpreter
with HF_HUB_OFFLINE=1 and HF_HOME in a temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.data.io import DataError, is_hub_id, read_rows
from alignkit.models.load import resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _offline(code: str, hf_home: Path) -> str:
    """Run `code` in a fresh interpreter offline, with an HF cache under `hf_home`; its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("spec, hub", [("Qwen/Qwen2.5-0.5B-Instruct", True), ("trl-lib/ultrafeedback_binarized", True),
                                       ("missing", False), ("/does/not/exist", False), ("runs/sft/final", False),
                                       ("./a/b", False), ("~/models", False), ("a--b/c", False), ("owner/", False)])
def test_what_reads_as_a_hub_id(spec, hub):
    assert is_hub_id(spec) is hub


def test_a_local_directory_wins_over_the_hub_id_it_spells(tmp_path, monkeypatch):
    from alignkit.models.tiny import save_tiny

    monkeypatch.chdir(tmp_path)
    save_tiny("acme/tiny")
    assert resolve_model_path("acme/tiny") == "acme/tiny"


def test_a_missing_data_file_under_a_folder_stays_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        read_rows("data/train.jsonl")
    assert str(err.value) == "1 problem in data/train.jsonl:\ndata/train.jsonl: no such file or directory"


def test_unknown_model_id_offline_names_the_id_and_the_fix(tmp_path):
    out = _offline("from alignkit.models.load import ModelError, resolve_model_path\n"
                   "try:\n    resolve_model_path('acme/no-such-model')\n"
                   "except ModelError as err:\n    print(err)\n", tmp_path)
    assert out == (f"model path 'acme/no-such-model' is not a local directory, and the Hugging Face Hub model "
                   f"'acme/no-such-model' is not in the HF cache ({tmp_path / 'hub'}) and HF_HUB_OFFLINE=1 forbids "
                   "downloading it: download it with `hf download acme/no-such-model` (or unset HF_HUB_OFFLINE), "
                   "or give a local directory\n")


def test_unknown_dataset_id_offline_names_the_id_and_the_fix(tmp_path):
    out = _offline("from alignkit.data.io import DataError, read_rows\n"
                   "try:\n    read_rows('acme/no-such-data')\n"
                   "except DataError as err:\n    print(err)\n", tmp_path)
    assert out == ("1 problem in acme/no-such-data:\nacme/no-such-data: not a local path, and the Hugging Face Hub data "
                   f"set 'acme/no-such-data' is not in the datasets cache ({tmp_path / 'datasets'}) and HF_HUB_OFFLINE=1 "
                   "forbids downloading it: unset HF_HUB_OFFLINE to download it (it is cached for later offline runs), "
                   "or give a local file\n")


def test_a_model_in_the_hf_cache_is_found_by_its_id_offline(tmp_path):
    """The cache laid out as huggingface_hub writes it (models--owner--name/refs/main naming a
    snapshot folder); huggingface_hub's own lookup finds the snapshot, and the model loads from it."""
    from alignkit.models.tiny import save_tiny

    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-chat"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = save_tiny(str(repo / "snapshots" / COMMIT))
    out = _offline("import json, torch\n"
                   "from alignkit.models.load import ModelConfig, load_model\n"
                   "model, tok, path = load_model(ModelConfig(path='acme/tiny-chat'), train=False)\n"
                   "print(json.dumps([path, model.model.embed_tokens.weight[0, :4].tolist(), tok.eos_token]))\n",
                   tmp_path / "hf")
    from alignkit.models.tiny import tiny_model

    path, first, eos = json.loads(out)
    assert path == snapshot and eos == "<|im_end|>"
    assert first == tiny_model(seed=0).model.embed_tokens.weight[0, :4].tolist()


def test_a_dataset_id_is_read_with_load_dataset(monkeypatch, tmp_path):
    """A Hub id that is not a local path goes to `datasets.load_dataset(id, split=...)` (which
    serves it from its cache or downloads it); rows carry `id[split]:row N`."""
    import datasets

    monkeypatch.chdir(tmp_path)
    calls = []

    def load_dataset(repo_id, split):
        calls.append((repo_id, split))
        return datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e",
                                                                                                "rejected": "f"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows = read_rows("trl-lib/ultrafeedback_binarized")
    rows_test = read_rows("trl-lib/ultrafeedback_binarized", split="test")
    assert calls == [("trl-lib/ultrafeedback_binarized", "train"), ("trl-lib/ultrafeedback_binarized", "test")]
    assert rows == [("trl-lib/ultrafeedback_binarized[train]:row 0", {"prompt": "a", "chosen": "b", "rejected": "c"}),
                    ("trl-lib/ultrafeedback_binarized[train]:row 1", {"prompt": "d", "chosen": "e", "rejected": "f"})]
    assert [loc for loc, _ in rows_test] == ["trl-lib/ultrafeedback_binarized[test]:row 0",
                                             "trl-lib/ultrafeedback_binarized[test]:row 1"]
