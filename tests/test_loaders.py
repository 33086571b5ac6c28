"""Loaders: every format read into records, and every bad row reported as `file:line: field: problem`."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignkit.data.chat import IGNORE, render_ids
from alignkit.data.formats import HH_HINT, load_preferences, load_problems, load_ranked, load_sft
from alignkit.data.io import DataError, read_rows
from alignkit.data.packing import scoring_group, tokenize_group
from alignkit.data.records import Message, PreferencePair, Problem, RankedResponses, SFTExample

U, A, S = "user", "assistant", "system"
HH_PROMPT = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour."
NO_COMMON = "shares no prompt with chosen (the conversations differ before their first assistant turn)"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Files are written in tmp_path and named relative to it, so locations read `data.jsonl:3`."""
    monkeypatch.chdir(tmp_path)


def conv(*turns: tuple[str, str]) -> tuple[Message, ...]:
    return tuple(Message(role, content) for role, content in turns)


def msgs(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def write_jsonl(name: str, rows: list) -> str:
    """Rows are dicts (dumped) or raw lines (written as they are)."""
    with open(name, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return name


def write_json(name: str, data: object) -> str:
    with open(name, "w") as f:
        json.dump(data, f)
    return name


def write_parquet(name: str, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), name)
    return name


def write_dataset(name: str, splits: dict[str, list[dict]] | list[dict]) -> str:
    import datasets

    if isinstance(splits, list):
        datasets.Dataset.from_list(splits).save_to_disk(name)
    else:
        datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(name)
    return name


def problems(load, *args) -> list[str]:
    with pytest.raises(DataError) as info:
        load(*args)
    return info.value.problems


# ---- io ---------------------------------------------------------------------------------


def test_missing_path_is_named():
    with pytest.raises(DataError) as info:
        load_sft("nope.jsonl")
    assert str(info.value) == "1 problem in nope.jsonl:\nnope.jsonl: no such file or directory"


def test_unknown_extension_lists_supported():
    open("data.csv", "w").close()
    assert problems(read_rows, "data.csv") == [
        "data.csv: unsupported file type '.csv' (supported: .jsonl, .json, .parquet, "
        "or a directory written by datasets' save_to_disk)"
    ]


def test_jsonl_locations_skip_blank_lines_and_report_bad_lines():
    write_jsonl("data.jsonl", [{"a": 1}, "", "{bad", "[1, 2]", {"a": 2}])
    assert problems(read_rows, "data.jsonl") == [
        "data.jsonl:3: invalid JSON: Expecting property name enclosed in double quotes at column 2",
        "data.jsonl:4: not a JSON object (got list)",
    ]
    write_jsonl("good.jsonl", [{"a": 1}, "", {"a": 2}])
    assert read_rows("good.jsonl") == [("good.jsonl:1", {"a": 1}), ("good.jsonl:3", {"a": 2})]


def test_json_list_field_and_bad_items():
    write_json("data.json", {"version": 1, "data": [{"a": 1}, {"a": 2}]})
    assert read_rows("data.json") == [("data.json:item 0", {"a": 1}), ("data.json:item 1", {"a": 2})]
    write_json("bad.json", [{"a": 1}, "text"])
    assert problems(read_rows, "bad.json") == ["bad.json:item 1: not a JSON object (got string)"]


def test_split_of_dataset_dict():
    write_dataset("ds", {"train": [{"a": 1}], "test": [{"a": 2}]})
    assert read_rows("ds") == [("ds[train]:row 0", {"a": 1})]
    assert read_rows("ds", "test") == [("ds[test]:row 0", {"a": 2})]
    assert problems(read_rows, "ds", "validation") == ["ds: no split 'validation' (splits: train, test)"]


def test_error_message_shows_at_most_50_problems():
    error = DataError([f"f:{i}: x: bad" for i in range(53)], "f")
    lines = str(error).splitlines()
    assert lines[0] == "53 problems in f:"
    assert lines[1:] == [f"f:{i}: x: bad" for i in range(50)] + ["... and 3 more"]
    assert len(error.problems) == 53


# ---- SFT --------------------------------------------------------------------------------


def test_sft_all_formats():
    hh = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 4"
    write_jsonl("sft.jsonl", [
        {"messages": msgs((S, "Be brief."), (U, "Hi"), (A, "Hello"))},
        {"prompt": "Q", "completion": "A", "system": "Sys"},
        {"prompt": msgs((U, "Q1"), (A, "A1"), (U, "Q2")), "completion": msgs((A, "A2"))},
        {"text": hh},
        {"instruction": "Add", "input": "1 1", "output": "2"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ])
    assert load_sft("sft.jsonl") == [
        SFTExample(conv((S, "Be brief."), (U, "Hi"), (A, "Hello"))),
        SFTExample(conv((S, "Sys"), (U, "Q"), (A, "A"))),
        SFTExample(conv((U, "Q1"), (A, "A1"), (U, "Q2"), (A, "A2"))),
        SFTExample(conv((U, "Hi"), (A, "Hello!"), (U, "2+2?"), (A, "4"))),
        SFTExample(conv((U, "Add\n\n1 1"), (A, "2"))),
        SFTExample(conv((U, "Say hi"), (A, "hi"))),
    ]


def test_sft_bad_rows_all_reported():
    write_jsonl("data.jsonl", [
        {"messages": msgs((U, "Hi"), (A, "Hello"))},
        {"messages": msgs((U, "Hi"), ("bot", "Hello"), (A, ""))},
        {"messages": msgs((U, "Hi"), (A, "Hello"), (U, "And?"))},
        {"prompt": "Q", "completion": "   "},
        '{"prompt": "Q", "completion": ',
        {"text": "Hi there"},
        {"text": "\n\nHuman:\n\nAssistant: Hi"},
        {"question": "Q", "answer": "A"},
        {"prompt": "Q", "completion": "A", "system": "S", "messages": None},
    ])
    assert problems(load_sft, "data.jsonl") == [
        "data.jsonl:2: messages[1].role: unknown role 'bot' (expected system, user, assistant)",
        "data.jsonl:2: messages[2].content: empty text",
        "data.jsonl:3: messages: must end with an assistant turn (last is user)",
        "data.jsonl:4: completion: empty text",
        "data.jsonl:5: invalid JSON: Expecting value at column 30",
        "data.jsonl:6: text: expected Anthropic HH text ('\\n\\nHuman: ...\\n\\nAssistant: ...')",
        "data.jsonl:7: text: turn 1 (Human): empty text",
        "data.jsonl:8: fields: no known SFT format (found: question, answer; expected: messages | "
        "prompt+completion | text (Anthropic HH) | instruction+output (Alpaca))",
    ]


def test_sft_from_parquet_with_null_columns():
    write_parquet("sft.parquet", [
        {"messages": msgs((U, "Hi"), (A, "Yo")), "prompt": None, "completion": None},
        {"messages": None, "prompt": "Q", "completion": "A"},
        {"messages": None, "prompt": "Q", "completion": None},
    ])
    assert problems(load_sft, "sft.parquet") == ["sft.parquet:row 2: completion: missing"]
    write_parquet("ok.parquet", [{"messages": msgs((U, "Hi"), (A, "Yo"))}])
    assert load_sft("ok.parquet") == [SFTExample(conv((U, "Hi"), (A, "Yo")))]


# ---- preferences ------------------------------------------------------------------------


def test_preferences_all_formats():
    write_jsonl("prefs.jsonl", [
        {"prompt": "Q", "chosen": "good", "rejected": "bad", "rating": "Significantly_Better",
         "safety": "both_safe", "prompt_unsafe": False},
        {"prompt": msgs((U, "Q")), "chosen": msgs((A, "good")), "rejected": msgs((A, "bad")),
         "rating": "unsure", "is_unsafe": True},
        {"chosen": msgs((U, "Q"), (A, "good")), "rejected": msgs((U, "Q"), (A, "bad"))},
        {"chosen": HH_PROMPT + "\n\nAssistant: Blue. ", "rejected": HH_PROMPT + "\n\nAssistant: No."},
        {"prompt": "Q", "chosen": "good", "rejected": "bad", "system": "Sys"},
    ])
    assert load_preferences("prefs.jsonl") == [
        PreferencePair(conv((U, "Q")), "good", "bad", "significantly better", "both_safe", False),
        PreferencePair(conv((U, "Q")), "good", "bad", "negligibly better", None, True),
        PreferencePair(conv((U, "Q")), "good", "bad"),
        PreferencePair(conv((U, "Hi"), (A, "Hello!"), (U, "Name a colour.")), "Blue.", "No."),
        PreferencePair(conv((S, "Sys"), (U, "Q")), "good", "bad"),
    ]


def test_preferences_bad_rows_all_reported():
    write_jsonl("prefs.jsonl", [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q", "rejected": "bad"},
        {"prompt": "Q", "chosen": " same", "rejected": "same "},
        {"prompt": "Q", "chosen": "a", "rejected": "b", "rating": "great"},
        {"chosen": HH_PROMPT + "\n\nAssistant: Blue", "rejected": "\n\nHuman: Other\n\nAssistant: Red"},
        {"chosen": "good", "rejected": "bad", "safety": "safe", "is_unsafe": "yes"},
        {"prompt": msgs((U, "Q"), (A, "A")), "chosen": msgs((U, "x")), "rejected": ""},
        {"chosen": msgs((U, "Q"), (A, "a")), "rejected": msgs((U, "Other"), (A, "b"))},
        {"text": "hello"},
    ])
    assert problems(load_preferences, "prefs.jsonl") == [
        "prefs.jsonl:2: chosen: missing",
        "prefs.jsonl:3: rejected: same text as chosen",
        "prefs.jsonl:4: rating: unknown rating 'great' (expected one of: significantly better, "
        "better, slightly better, negligibly better)",
        "prefs.jsonl:5: rejected: " + NO_COMMON,
        "prefs.jsonl:6: prompt: missing",
        "prefs.jsonl:6: safety: unknown label 'safe' (expected one of: chosen_only_safe, both_safe, "
        "both_unsafe)",
        "prefs.jsonl:6: is_unsafe: expected true or false, got string",
        "prefs.jsonl:7: prompt: must end with a user turn (last is assistant)",
        "prefs.jsonl:7: chosen: expected a single assistant message",
        "prefs.jsonl:8: rejected: " + NO_COMMON,
        "prefs.jsonl:9: fields: no known preference format (found: text; expected: "
        "prompt+chosen+rejected | chosen+rejected conversations | chosen+rejected Anthropic HH text)",
    ]


# HH-RLHF rows as published: "\n\nHuman: ...\n\nAssistant: ..." with nothing stripped.
ADDRESS = "\n\nHuman: What is the home address of my coworker Dana?"
SHELL = "\n\nHuman: How do I list files?\n\nAssistant: Use ls.\n\nHuman: And hidden ones?"


def test_hh_rlhf_empty_final_reply_is_kept_with_one_warning(caplog):
    write_jsonl("hh.jsonl", [
        {"chosen": ADDRESS + "\n\nAssistant:", "rejected": ADDRESS + "\n\nAssistant: She lives at 12 Oak Street."},
        {"chosen": SHELL + "\n\nAssistant: Use ls -a.", "rejected": SHELL + "\n\nAssistant: "},
        {"chosen": SHELL + "\n\nAssistant: ls -a shows them.", "rejected": SHELL + "\n\nAssistant: Try dir."},
    ])
    shell = conv((U, "How do I list files?"), (A, "Use ls."), (U, "And hidden ones?"))
    with caplog.at_level("WARNING", logger="alignkit"):
        assert load_preferences("hh.jsonl") == [
            PreferencePair(conv((U, "What is the home address of my coworker Dana?")), "", "She lives at 12 Oak Street."),
            PreferencePair(shell, "Use ls -a.", ""),
            PreferencePair(shell, "ls -a shows them.", "Try dir."),
        ]
    assert [r.getMessage() for r in caplog.records] == [
        "hh.jsonl: 2 of 3 preference pairs have an empty chosen or rejected reply; kept "
        "(an empty reply is a valid answer, e.g. declining to answer)"
    ]


def test_hh_rlhf_histories_that_differ_early_split_at_the_last_shared_assistant_turn(caplog):
    """TRL's implicit prompt (longest common prefix) cut back to the last '\n\nAssistant:' both share."""
    human = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: "
    assistant = "\n\nHuman: Name a fruit.\n\nAssistant: "
    write_jsonl("hh.jsonl", [
        # differ in an earlier Human turn (the second one)
        {"chosen": human + "Name a colour.\n\nAssistant: Blue.\n\nHuman: Another?\n\nAssistant: Red.",
         "rejected": human + "Name a color.\n\nAssistant: Blue.\n\nHuman: Another?\n\nAssistant: Green."},
        # differ in an earlier Assistant turn (the first one)
        {"chosen": assistant + "An apple.\n\nHuman: Its colour?\n\nAssistant: Red.",
         "rejected": assistant + "A pear.\n\nHuman: Its colour?\n\nAssistant: Green."},
        # rejected goes one exchange further, with an empty final reply
        {"chosen": assistant + "A plum.",
         "rejected": assistant + "A plum.\n\nHuman: Thanks\n\nAssistant:"},
        # the usual row: same history, different final reply
        {"chosen": assistant + "A fig.", "rejected": assistant + "A kiwi."},
    ])
    with caplog.at_level("WARNING", logger="alignkit"):
        pairs = load_preferences("hh.jsonl")
    assert pairs == [
        PreferencePair(conv((U, "Hi")),
                       "Hello! How can I help?\n\nHuman: Name a colour.\n\nAssistant: Blue.\n\nHuman: Another?\n\nAssistant: Red.",
                       "Hello! How can I help?\n\nHuman: Name a color.\n\nAssistant: Blue.\n\nHuman: Another?\n\nAssistant: Green."),
        PreferencePair(conv((U, "Name a fruit.")),
                       "An apple.\n\nHuman: Its colour?\n\nAssistant: Red.",
                       "A pear.\n\nHuman: Its colour?\n\nAssistant: Green."),
        PreferencePair(conv((U, "Name a fruit.")), "A plum.", "A plum.\n\nHuman: Thanks\n\nAssistant:"),
        PreferencePair(conv((U, "Name a fruit.")), "A fig.", "A kiwi."),
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "hh.jsonl: 3 of 4 preference pairs differ before their last assistant turn; the prompt is "
        "the turns both share, each reply carries its differing turns as text"
    ]


def test_implicit_prompt_lists_follow_the_hh_rule():
    """The same rows as TRL implicit-prompt message lists give the same pairs as their HH text."""
    hi, fruit = [(U, "Hi"), (A, "Hello! How can I help?")], [(U, "Name a fruit.")]
    rows = [
        (hi + [(U, "Name a colour."), (A, "Blue.")], hi + [(U, "Name a color."), (A, "Blue.")]),
        (fruit + [(A, "An apple."), (U, "Its colour?"), (A, "Red.")], fruit + [(A, "A pear."), (U, "Its colour?"), (A, "")]),
        (fruit + [(A, "")], fruit + [(A, "A kiwi.")]),
    ]
    hh = lambda turns: "".join(f"\n\n{'Human' if r == U else 'Assistant'}:" + (f" {c}" if c else "") for r, c in turns)
    write_jsonl("lists.jsonl", [{"chosen": msgs(*c), "rejected": msgs(*r)} for c, r in rows])
    write_jsonl("hh.jsonl", [{"chosen": hh(c), "rejected": hh(r)} for c, r in rows])
    assert load_preferences("lists.jsonl") == load_preferences("hh.jsonl") == [
        PreferencePair(conv((U, "Hi")), "Hello! How can I help?\n\nHuman: Name a colour.\n\nAssistant: Blue.",
                       "Hello! How can I help?\n\nHuman: Name a color.\n\nAssistant: Blue."),
        PreferencePair(conv((U, "Name a fruit.")), "An apple.\n\nHuman: Its colour?\n\nAssistant: Red.",
                       "A pear.\n\nHuman: Its colour?\n\nAssistant:"),
        PreferencePair(conv((U, "Name a fruit.")), "", "A kiwi."),
    ]


def test_empty_replies_in_trl_rows():
    write_jsonl("prefs.jsonl", [
        {"prompt": "Q", "chosen": "", "rejected": "bad"},
        {"prompt": "Q", "chosen": "good", "rejected": ""},
        {"prompt": msgs((U, "Q")), "chosen": msgs((A, "")), "rejected": msgs((A, "bad"))},
    ])
    assert load_preferences("prefs.jsonl") == [
        PreferencePair(conv((U, "Q")), "", "bad"),
        PreferencePair(conv((U, "Q")), "good", ""),
        PreferencePair(conv((U, "Q")), "", "bad"),
    ]


def test_unusable_hh_and_implicit_rows_still_reported():
    write_jsonl("prefs.jsonl", [
        {"chosen": ADDRESS + "\n\nAssistant:", "rejected": ADDRESS + "\n\nAssistant: No."},
        {"chosen": ADDRESS, "rejected": ADDRESS + "\n\nAssistant: No."},
        {"chosen": ADDRESS + "\n\nAssistant: Sorry, no.", "rejected": 7},
        {"chosen": ADDRESS + "\n\nAssistant:", "rejected": ADDRESS + "\n\nAssistant: "},
        {"chosen": ADDRESS + "\n\nAssistant: No.", "rejected": "\n\nHuman: Where is Dana?\n\nAssistant: Home."},
        {"chosen": msgs((U, "Q"), (A, "")), "rejected": msgs((U, "Q"), (A, " "))},
        {"chosen": msgs((U, "Q"), (A, ""), (U, " "), (A, "No.")), "rejected": msgs((U, "Q"), (A, "Hm"))},
        {"prompt": "Q", "chosen": None, "rejected": ""},
    ])
    assert problems(load_preferences, "prefs.jsonl") == [
        "prefs.jsonl:2: chosen: " + HH_HINT,
        "prefs.jsonl:3: rejected: expected a string, got number",
        "prefs.jsonl:4: rejected: same text as chosen",
        "prefs.jsonl:5: rejected: " + NO_COMMON,
        "prefs.jsonl:6: rejected: same text as chosen",
        "prefs.jsonl:7: chosen[2].content: empty text",
        "prefs.jsonl:8: chosen: missing",
    ]


def test_empty_reply_tokenizes_to_the_end_of_turn(tok):
    """A reward model scores an empty reply at its end-of-turn token; DPO's target is that token."""
    write_jsonl("hh.jsonl", [{"chosen": ADDRESS + "\n\nAssistant:", "rejected": ADDRESS + "\n\nAssistant: 12 Oak St."}])
    (pair,) = load_preferences("hh.jsonl")
    group = scoring_group(tok, pair.prompt, [pair.chosen, pair.rejected], max_length=512)
    assert tok.eos_token_id in group.responses[0]
    assert group.prompt + group.responses[0] == render_ids(tok, pair.prompt + (Message(A, ""),))
    dpo = tokenize_group(tok, pair.prompt, [pair.chosen, pair.rejected], max_length=512)
    assert [t for t in dpo.labels[0] if t != IGNORE] == [tok.eos_token_id]


def test_rm_trains_on_hh_rlhf_rows_with_empty_replies_and_early_differences(tmp_path, caplog):
    """`alignkit rm` on rows shaped like the published HH-RLHF files starts training."""
    from alignkit.cli import main
    from alignkit.models.tiny import save_tiny

    fruit = "\n\nHuman: Name a fruit.\n\nAssistant: "
    data = write_jsonl("hh.jsonl", [
        {"chosen": ADDRESS + "\n\nAssistant:", "rejected": ADDRESS + "\n\nAssistant: 12 Oak Street."},
        {"chosen": SHELL + "\n\nAssistant: ls -a", "rejected": SHELL + "\n\nAssistant: "},
        {"chosen": fruit + "An apple.\n\nHuman: Its colour?\n\nAssistant: Red.",
         "rejected": fruit + "A pear.\n\nHuman: Its colour?\n\nAssistant: Blue."},
    ])
    run_dir = tmp_path / "run"
    with caplog.at_level("WARNING", logger="alignkit"):
        rc = main(["rm", f"model.path={save_tiny(str(tmp_path / 'tiny'))}", f"data.path={data}",
                   f"train.output_dir={run_dir}", "train.max_steps=2", "train.progress=false"])
    assert rc == 0
    assert (run_dir / "final" / "config.json").is_file()
    assert "hh.jsonl: 2 of 3 preference pairs have an empty chosen or rejected reply" in caplog.text


# HH-RLHF histories as published can hold an empty Assistant turn before the final one.
GAP = "\n\nHuman: Tell me a secret.\n\nAssistant:\n\nHuman: Please?"


def test_hh_rlhf_empty_assistant_turn_inside_shared_history_is_kept_as_an_empty_message(caplog, tok):
    write_jsonl("hh.jsonl", [
        {"chosen": GAP + "\n\nAssistant: No.", "rejected": GAP + "\n\nAssistant: Fine: 1234."},
        # the empty turn is where the histories start to differ: each reply carries it
        {"chosen": "\n\nHuman: a\n\nAssistant:\n\nHuman: b\n\nAssistant: c",
         "rejected": "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: c"},
    ])
    gap = conv((U, "Tell me a secret."), (A, ""), (U, "Please?"))
    with caplog.at_level("WARNING", logger="alignkit"):
        pairs = load_preferences("hh.jsonl")
    assert pairs == [
        PreferencePair(gap, "No.", "Fine: 1234."),
        PreferencePair(conv((U, "a")), "\n\nHuman: b\n\nAssistant: c", "x\n\nHuman: b\n\nAssistant: c"),
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "hh.jsonl: 1 of 2 preference pairs differ before their last assistant turn; the prompt is "
        "the turns both share, each reply carries its differing turns as text"
    ]
    # the same rows as message lists give the same pairs
    lists = [[(U, "Tell me a secret."), (A, ""), (U, "Please?"), (A, r)] for r in ("No.", "Fine: 1234.")]
    lists += [[(U, "a"), (A, r), (U, "b"), (A, "c")] for r in ("", "x")]
    write_jsonl("lists.jsonl", [{"chosen": msgs(*lists[i]), "rejected": msgs(*lists[i + 1])} for i in (0, 2)])
    assert load_preferences("lists.jsonl") == pairs
    # the chat template renders the empty turn: its header and end-of-turn token
    text = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in gap], tokenize=False)
    assert "<|im_start|>assistant\n<|im_end|>" in text
    dpo = tokenize_group(tok, pairs[0].prompt, [pairs[0].chosen, pairs[0].rejected], max_length=512)
    assert tok.decode([t for t in dpo.labels[0] if t != IGNORE]) == "No.<|im_end|>"


def test_sft_on_hh_text_keeps_empty_assistant_turns_with_one_warning(caplog, tok):
    write_jsonl("hh.jsonl", [
        {"chosen": ADDRESS + "\n\nAssistant:", "rejected": ADDRESS + "\n\nAssistant: 12 Oak Street."},
        {"text": GAP + "\n\nAssistant: No."},
        {"text": SHELL + "\n\nAssistant: "},
    ])
    with caplog.at_level("WARNING", logger="alignkit"):
        examples = load_sft("hh.jsonl")
    assert examples == [
        SFTExample(conv((U, "What is the home address of my coworker Dana?"), (A, ""))),
        SFTExample(conv((U, "Tell me a secret."), (A, ""), (U, "Please?"), (A, "No."))),
        SFTExample(conv((U, "How do I list files?"), (A, "Use ls."), (U, "And hidden ones?"), (A, ""))),
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "hh.jsonl: 2 of 3 SFT examples end with an empty assistant reply; kept (the target is the "
        "end-of-turn token: the model learns to stop)"
    ]
    from alignkit.algorithms.sft import tokenize_examples

    for targets, eos_only in (("last", [True, False, True]), ("all", [True, False, False])):
        tokenized = tokenize_examples(tok, examples, max_length=512, targets=targets)
        assert len(tokenized) == 3
        assert [[t for t in x.labels if t != IGNORE] == [tok.eos_token_id] for x in tokenized] == eos_only


def test_sft_cli_trains_on_hh_chosen_column_with_empty_replies(tmp_path, caplog):
    from alignkit.cli import main
    from alignkit.models.tiny import save_tiny

    data = write_jsonl("hh.jsonl", [
        {"chosen": ADDRESS + "\n\nAssistant:", "rejected": ADDRESS + "\n\nAssistant: 12 Oak Street."},
        {"chosen": GAP + "\n\nAssistant: No.", "rejected": GAP + "\n\nAssistant: 1234."},
        {"chosen": SHELL + "\n\nAssistant: ls -a", "rejected": SHELL + "\n\nAssistant:"},
    ])
    run_dir = tmp_path / "run"
    with caplog.at_level("WARNING", logger="alignkit"):
        rc = main(["sft", f"model.path={save_tiny(str(tmp_path / 'tiny'))}", f"data.path={data}",
                   f"train.output_dir={run_dir}", "train.max_steps=2", "train.progress=false",
                   "eval.problems=0", "data.eval_fraction=0"])
    assert rc == 0
    assert (run_dir / "final" / "config.json").is_file()
    assert "hh.jsonl: 1 of 3 SFT examples end with an empty assistant reply" in caplog.text


def test_ranked_empty_responses_are_kept_with_one_warning(caplog):
    write_jsonl("ranked.jsonl", [
        {"prompt": "What is Dana's address?", "responses": ["", "12 Oak Street."], "scores": [1.0, -2.0]},
        {"prompt": "Q", "completions": ["a", " ", "b"], "rewards": [0, 1, 2]},
        {"prompt": "Q", "responses": ["a", "b"], "scores": [0, 1]},
    ])
    with caplog.at_level("WARNING", logger="alignkit"):
        assert load_ranked("ranked.jsonl") == [
            RankedResponses(conv((U, "What is Dana's address?")), ("", "12 Oak Street."), (1.0, -2.0)),
            RankedResponses(conv((U, "Q")), ("a", " ", "b"), (0.0, 1.0, 2.0)),
            RankedResponses(conv((U, "Q")), ("a", "b"), (0.0, 1.0)),
        ]
    assert [r.getMessage() for r in caplog.records] == [
        "ranked.jsonl: 2 of 7 ranked responses are empty; kept (an empty reply is a valid answer, "
        "e.g. declining to answer)"
    ]
    write_jsonl("bad.jsonl", [{"prompt": "Q", "responses": ["", None, 3], "scores": [0, 1, 2]}])
    assert problems(load_ranked, "bad.jsonl") == [
        "bad.jsonl:1: responses[1]: missing",
        "bad.jsonl:1: responses[2]: expected a string, got number",
    ]


def test_preferences_from_parquet():
    write_parquet("prefs.parquet", [
        {"prompt": "Q", "chosen": "good", "rejected": "bad", "rating": "better"},
        {"prompt": "Q", "chosen": "good", "rejected": "bad", "rating": None},
    ])
    assert load_preferences("prefs.parquet") == [
        PreferencePair(conv((U, "Q")), "good", "bad", "better"),
        PreferencePair(conv((U, "Q")), "good", "bad"),
    ]
    write_parquet("bad.parquet", [
        {"prompt": "Q", "chosen": "x", "rejected": "x"},
        {"prompt": "", "chosen": "x", "rejected": "y"},
    ])
    assert problems(load_preferences, "bad.parquet") == [
        "bad.parquet:row 0: rejected: same text as chosen",
        "bad.parquet:row 1: prompt: empty text",
    ]


# ---- ranked responses -------------------------------------------------------------------


def test_ranked_from_json():
    write_json("ranked.json", [
        {"prompt": "Q", "responses": ["a", "b", "c"], "scores": [1, 0.5, 1]},
        {"prompt": msgs((U, "Q")), "completions": ["a", "b"], "rewards": [0, -1]},
    ])
    assert load_ranked("ranked.json") == [
        RankedResponses(conv((U, "Q")), ("a", "b", "c"), (1.0, 0.5, 1.0)),
        RankedResponses(conv((U, "Q")), ("a", "b"), (0.0, -1.0)),
    ]


def test_ranked_bad_rows_all_reported():
    write_json("ranked.json", {"rows": [
        {"prompt": "Q", "responses": ["a", "b"], "scores": [1, 2, 3]},
        {"prompt": "Q", "responses": ["a"], "scores": [1]},
        {"responses": ["a", 5], "scores": [1, "high"]},
        {"prompt": "Q", "responses": "a b", "scores": [1, True]},
        {"question": "Q"},
    ]})
    assert problems(load_ranked, "ranked.json") == [
        "ranked.json:item 0: scores: expected 2 scores (one per response), got 3",
        "ranked.json:item 1: responses: expected at least 2 responses, got 1",
        "ranked.json:item 2: prompt: missing",
        "ranked.json:item 2: responses[1]: expected a string, got number",
        "ranked.json:item 2: scores[1]: expected a number, got string",
        "ranked.json:item 3: responses: expected a list, got string",
        "ranked.json:item 3: scores[1]: expected a number, got boolean",
        "ranked.json:item 4: fields: no known ranked format (found: question; expected: "
        "prompt+responses+scores (or completions, rewards))",
    ]


# ---- problems ---------------------------------------------------------------------------


def test_problems_gsm8k_from_dataset_dir():
    write_dataset("gsm8k", {"train": [
        {"question": "How many?", "answer": "3 * 411 = <<3*411=1233>>1233\n1233 + 1 = 1234\n#### 1,234"},
        {"question": "Sum?", "answer": "4"},
    ]})
    assert load_problems("gsm8k") == [
        Problem("How many?", "1234", "gsm8k[train]:row 0", "3 * 411 = <<3*411=1233>>1233\n1233 + 1 = 1234"),
        Problem("Sum?", "4", "gsm8k[train]:row 1"),
    ]


def test_problems_with_ids_and_solutions():
    write_jsonl("math.jsonl", [
        {"id": "p1", "problem": "1+1?", "solution": "One and one.", "answer": "2"},
        {"id": 7, "problem": "2+2?", "solution": None, "answer": "4"},
    ])
    assert load_problems("math.jsonl") == [
        Problem("1+1?", "2", "p1", "One and one."),
        Problem("2+2?", "4", "7"),
    ]


def test_problems_bad_rows_all_reported():
    write_dataset("bad", [
        {"question": "Q", "answer": "work ####  "},
        {"question": None, "answer": "1"},
        {"question": "Q", "answer": None},
        {"question": "Q", "answer": "#### 5"},
    ])
    assert problems(load_problems, "bad") == [
        "bad:row 0: answer: nothing after '####'",
        "bad:row 1: question: missing",
        "bad:row 2: answer: missing",
    ]


def test_empty_file_is_an_error():
    write_jsonl("empty.jsonl", ["", "  "])
    assert problems(load_problems, "empty.jsonl") == ["empty.jsonl: no rows"]
