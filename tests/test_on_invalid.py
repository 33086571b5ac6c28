"""`on_invalid: skip`: unusable rows are dropped with a warning and listed in <output_dir>/skipped.jsonl;
the default (`error`) still lists every problem in one DataError."""

from __future__ import annotations

import json
import logging

import pytest

from alignkit.cli import main
from alignkit.config import ConfigError, load_config
from alignkit.data.formats import load_feedback, load_preferences, load_problems, load_prompts, load_ranked, load_sft
from alignkit.data.io import DataError, write_skipped
from alignkit.data.records import Message, PreferencePair, Problem, RankedResponses, SFTExample
from alignkit.tasks import RewardConfig, TaskConfig, build_task

BAD_LINES = [
    b'{"prompt": "cut off", "completion": \n',  # 2: malformed JSON
    b'{"prompt": "caf\xe9", "completion": "x"}\n',  # 3: Latin-1, not UTF-8
    b'[1, 2]\n',  # 4: a JSON value that is not an object
]
BAD_LINE_REASONS = [
    "invalid JSON: Expecting value at column 36",
    "invalid UTF-8: invalid continuation byte at byte 16",
    "not a JSON object (got list)",
]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Files are named relative to tmp_path, so locations read `data.jsonl:3`."""
    monkeypatch.chdir(tmp_path)


def write(name: str, good_first: dict, rows: list[dict]) -> str:
    """A good row, the three unreadable lines, then `rows` (JSON objects), one a line."""
    with open(name, "wb") as f:
        f.write(json.dumps(good_first).encode() + b"\n")
        f.writelines(BAD_LINES)
        f.writelines(json.dumps(r).encode() + b"\n" for r in rows)
    return name


def entries(name: str, reasons: list[str], first_line: int = 2) -> list[dict]:
    return [{"file": name, "line": first_line + i, "reason": r} for i, r in enumerate(reasons)]


def check(load, name: str, reasons: list[str], caplog) -> list:
    """Load under skip: the skipped list is exact, one warning gives the count; under the default
    the same rows are one DataError with every problem."""
    skipped: list[dict] = []
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        records = load(name, None, "skip", skipped)
    assert skipped == entries(name, reasons)
    total = len(records) + len(reasons)
    warning = f"{name}: skipped {len(reasons)} of {total} rows that cannot be used (on_invalid=skip); the first: {name}:2: {reasons[0]}"
    assert warning in caplog.messages
    with pytest.raises(DataError) as info:
        load(name)
    assert info.value.problems == [f"{name}:{i}: {r}" for i, r in enumerate(reasons, start=2)]
    return records


def test_sft_skips_each_kind_of_bad_row(caplog):
    name = write("sft.jsonl", {"prompt": "hi", "completion": "hello"}, [
        {"prompt": 3, "completion": "x"},  # 5: wrong type
        {"prompt": "q"},  # 6: missing field
        {"promt": "q", "completion": "a"},  # 7: misspelt field
        {"question": "q", "answer": "a"},  # 8: no known format
        {"messages": [{"role": "user", "content": "q"}]},  # 9: no assistant turn
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "id": 7},  # 10: good
    ])
    reasons = BAD_LINE_REASONS + [
        "prompt: expected a string, got number",
        "completion: missing",
        "prompt: missing (found 'promt': did you mean 'prompt'?)",
        "fields: no known SFT format (found: question, answer; expected: "
        "messages | prompt+completion | text (Anthropic HH) | instruction+output (Alpaca))",
        "messages: no assistant turn",
    ]
    records = check(load_sft, name, reasons, caplog)
    assert records == [SFTExample((Message("user", "hi"), Message("assistant", "hello"))),
                       SFTExample((Message("user", "q"), Message("assistant", "a")))]


def test_preferences_skip_and_several_problems_of_a_row_share_one_entry(caplog):
    name = write("pairs.jsonl", {"prompt": "p", "chosen": "a", "rejected": "b"}, [
        {"prompt": "p", "chosen": "a", "rejected": "a"},  # 5: no preference
        {"prompt": ["p"], "chosen": 1, "rejected": "b", "rating": "huge"},  # 6: three problems
        {"prompt": "p", "chosen": "a", "rejectd": "b"},  # 7: misspelt
        {"prompt": "q", "chosen": "c", "rejected": "", "source": "hh"},  # 8: good (empty reply, extra column)
    ])
    reasons = BAD_LINE_REASONS + [
        "rejected: same text as chosen",
        "prompt[0]: expected an object with role and content, got string; chosen: expected a string, got number; "
        "rating: unknown rating 'huge' (expected one of: significantly better, better, slightly better, negligibly better)",
        "rejected: missing (found 'rejectd': did you mean 'rejected'?)",
    ]
    skipped: list[dict] = []
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        records = load_preferences(name, None, "skip", skipped)
    assert skipped == entries(name, reasons)
    assert records == [PreferencePair((Message("user", "p"),), "a", "b"), PreferencePair((Message("user", "q"),), "c", "")]
    with pytest.raises(DataError) as info:
        load_preferences(name)
    assert len(info.value.problems) == 8  # the row of line 6 has three


def test_ranked_skips_non_finite_scores(caplog):
    name = write("ranked.jsonl", {"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}, [])
    with open(name, "a") as f:
        f.write('{"prompt": "p", "responses": ["a", "b"], "scores": [NaN, 0]}\n')  # 5
        f.write('{"prompt": "p", "responses": ["a", "b"], "scores": [1e999, 0]}\n')  # 6: inf
        f.write('{"prompt": "p", "responses": ["a"], "scores": [1]}\n')  # 7
        f.write('{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 0]}\n')  # 8
    reasons = BAD_LINE_REASONS + [
        "scores[0]: expected a finite number, got nan",
        "scores[0]: expected a finite number, got inf",
        "responses: expected at least 2 responses, got 1",
        "scores: expected 3 scores (one per response), got 2",
    ]
    records = check(load_ranked, name, reasons, caplog)
    assert records == [RankedResponses((Message("user", "p"),), ("a", "b"), (1.0, 0.0))]
    skipped: list[dict] = []
    assert load_feedback(name, None, "auto", "skip", skipped) == ("ranked", records)
    assert skipped == entries(name, reasons)


def test_problems_and_prompts_skip(caplog):
    name = write("problems.jsonl", {"question": "1+1?", "answer": "#### 2"}, [
        {"question": "q", "answer": "steps ####"},  # 5
        {"question": "", "answer": 3},  # 6
    ])
    reasons = BAD_LINE_REASONS + ["answer: nothing after '####'", "question: empty text"]
    assert check(load_problems, name, reasons, caplog) == [Problem("1+1?", "2", id="problems.jsonl:1")]
    name = write("prompts.jsonl", {"prompt": "hi"}, [{"prompt": ["hi"]}, {"text": "hi"}, {"prompt": "yo", "x": 1}])
    reasons = BAD_LINE_REASONS + ["prompt: expected a string, got list", "prompt: missing"]
    assert check(load_prompts, name, reasons, caplog) == ["hi", "yo"]


def test_no_usable_row_is_still_an_error():
    with open("bad.jsonl", "wb") as f:
        f.writelines(BAD_LINES)
    skipped: list[dict] = []
    with pytest.raises(DataError) as info:
        load_sft("bad.jsonl", None, "skip", skipped)
    assert str(info.value) == (
        "3 problems in bad.jsonl (no usable row, so on_invalid=skip keeps nothing):\n"
        + "\n".join(f"bad.jsonl:{i}: {r}" for i, r in enumerate(BAD_LINE_REASONS, start=1)))
    assert skipped == []


def test_a_source_that_cannot_be_read_is_an_error_under_skip():
    with pytest.raises(DataError, match="nope.jsonl: no such file or directory"):
        load_sft("nope.jsonl", None, "skip", [])
    with open("whole.json", "w") as f:
        f.write('[{"prompt": "a", "completion": "b"}, {"prompt": 1, "completion": "b"}, 7]')
    skipped: list[dict] = []
    assert len(load_sft("whole.json", None, "skip", skipped)) == 1
    assert skipped == [{"file": "whole.json", "line": "item 1", "reason": "prompt: expected a string, got number"},
                       {"file": "whole.json", "line": "item 2", "reason": "not a JSON object (got number)"}]


def test_unknown_on_invalid_value():
    with pytest.raises(ValueError, match="on_invalid must be one of error, skip, not 'drop'"):
        load_sft("x.jsonl", None, "drop")
    with pytest.raises(ConfigError) as err:
        from alignkit.algorithms.sft import SFTConfig

        load_config(SFTConfig, None, ["data.on_invalid=drop"])
    assert str(err.value) == "data: on_invalid must be one of error, skip, not 'drop'"


def test_write_skipped_writes_one_object_a_row(tmp_path):
    rows = [{"file": "a.jsonl", "line": 2, "reason": "prompt: missing"},
            {"file": "a.json", "line": "item 0", "reason": "not a JSON object (got list)"}]
    path = write_skipped(tmp_path / "run", rows)
    assert path == tmp_path / "run" / "skipped.jsonl"
    assert path.read_text() == (
        '{"file": "a.jsonl", "line": 2, "reason": "prompt: missing"}\n'
        '{"file": "a.json", "line": "item 0", "reason": "not a JSON object (got list)"}\n')
    assert write_skipped(tmp_path / "other", []) is None and not (tmp_path / "other").exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["skipped.jsonl"]  # no temporary file left


def test_task_files_carry_their_skipped_rows():
    write("problems.jsonl", {"question": "What is 1 + 1?", "answer": "2"},
          [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(2, 6)])
    with open("held.jsonl", "w") as f:
        f.write('{"question": "What is 9 + 1?", "answer": "10"}\n{"question": "What is 8 + 1?"}\n')
    cfg = TaskConfig(source="problems", path="problems.jsonl", heldout_path="held.jsonl", train=10, val=1, heldout=5,
                     on_invalid="skip")
    task = build_task(cfg, RewardConfig())
    assert len(task.train) == 4 and len(task.val) == 1 and len(task.heldout) == 1
    assert task.skipped == entries("problems.jsonl", BAD_LINE_REASONS) + [
        {"file": "held.jsonl", "line": 2, "reason": "answer: missing"}]
    with pytest.raises(DataError):
        build_task(TaskConfig(source="problems", path="problems.jsonl", heldout=1), RewardConfig())
    write("prompts.jsonl", {"prompt": "a"}, [{"prompt": "b"}])
    task = build_task(TaskConfig(source="prompts", path="prompts.jsonl", on_invalid="skip"), RewardConfig(kind="gold"))
    assert task.train == ["a", "b"] and task.skipped == entries("prompts.jsonl", BAD_LINE_REASONS)
    assert build_task(TaskConfig(train=2, val=0, heldout=0), RewardConfig()).skipped == []


def test_sft_cli_writes_skipped_rows_to_the_run_dir(tmp_path, capsys):
    from alignkit.models.tiny import save_tiny

    model = save_tiny(str(tmp_path / "tiny"))
    name = write("sft.jsonl", {"prompt": "What is 2 + 3?", "completion": "5"},
                 [{"prompt": "What is 1 + 1?", "completion": "2"}, {"prompt": "What is 1 + 2?"}])
    args = ["sft", f"data.path={name}", f"model.path={model}", "train.output_dir=run", "train.max_steps=1",
            "train.progress=false", "eval.problems=0", "data.eval_fraction=0", "data.max_length=64"]
    assert main(args) == 1  # the default: an error before any work
    assert f"alignkit sft: error: 4 problems in {name}:\n{name}:2: {BAD_LINE_REASONS[0]}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main([*args, "data.on_invalid=skip"]) == 0
    lines = (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [*entries(name, BAD_LINE_REASONS),
                                                    {"file": name, "line": 6, "reason": "completion: missing"}]
    assert (tmp_path / "run" / "final" / "config.json").is_file()
