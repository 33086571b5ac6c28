"""Ghost Attention (Llama 2 §3.3): the checkers, the sampling with the instruction on every turn
and rejection of non-following replies, the training examples (instruction on the first turn only,
loss on the last reply only), the per-turn evaluation, and `alignkit sft` with data.gatt."""

import json

import pytest

from alignkit.cli import main
from alignkit.data.chat import IGNORE, tokenize_conversation
from alignkit.data.gatt import (
    INSTRUCTIONS,
    GAttConfig,
    collect_gatt,
    gatt_dialogues,
    sample_following,
    training_examples,
)
from alignkit.data.records import Message
from alignkit.engine.logging import read_metrics
from alignkit.eval.gatt import follow_by_turn, instruction_following_by_turn
from alignkit.models.tiny import save_tiny

UPPER, PIRATE, SHORT, EXCLAIM = (INSTRUCTIONS[n] for n in ("upper_case", "pirate", "short", "exclamation"))


@pytest.mark.parametrize("inst, reply, ok", [
    (UPPER, "THE ANSWER IS 5.", True), (UPPER, "The answer is 5.", False), (UPPER, "42", False), (UPPER, "", False),
    (EXCLAIM, "Five!", True), (EXCLAIM, "Five! ", True), (EXCLAIM, "Five.", False), (EXCLAIM, "!Five", False),
    (PIRATE, "Ahoy! The answer be 5.", True), (PIRATE, "  Ahoy! 5", True), (PIRATE, "ahoy! 5", False),
    (PIRATE, "The answer is 5. Ahoy!", False),
    (SHORT, "Five.", True), (SHORT, "one two three four five six seven eight nine ten", True),
    (SHORT, "one two three four five six seven eight nine ten eleven", False), (SHORT, "   ", False),
])
def test_checkers(inst, reply, ok):
    assert inst.follows(reply) is ok


class Recorder:
    """A stub sampler: records the conversations it is asked about and answers from a script,
    `script(conversation, turn) -> candidates`."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def __call__(self, conversations, n):
        self.calls.append((conversations, n))
        turn = len(self.calls) - 1
        return [self.script(c, turn)[:n] for c in conversations]


def test_sampling_puts_the_instruction_on_every_turn_and_rejects_non_following_dialogues():
    dialogues = [("u1", "u2", "u3"), ("v1", "v2", "v3")]

    def script(conv, turn):
        first = conv[0].content
        if first.endswith("v1") and turn == 1:
            return ["no", "still no"]  # dialogue 2 has no following candidate at turn 2
        return ["not upper", f"REPLY {turn + 1}", "ALSO UPPER"]  # the first following one is kept

    sample = Recorder(script)
    replies = sample_following(sample, dialogues, [UPPER, UPPER], n=3)
    assert replies == [("REPLY 1", "REPLY 2", "REPLY 3"), None]
    assert [n for _, n in sample.calls] == [3, 3, 3]
    assert [len(convs) for convs, _ in sample.calls] == [2, 2, 1]  # the rejected dialogue is not sampled further
    last = sample.calls[2][0][0]
    assert last == (Message("user", f"{UPPER.text} u1"), Message("assistant", "REPLY 1"),
                    Message("user", f"{UPPER.text} u2"), Message("assistant", "REPLY 2"),
                    Message("user", f"{UPPER.text} u3"))


def test_training_examples_have_the_instruction_first_and_the_loss_on_the_last_reply_only(tok):
    examples = training_examples(("u1", "u2", "u3"), ("A1!", "A2!", "A3!"), EXCLAIM)
    assert [len(e.messages) for e in examples] == [2, 4, 6]  # one example per turn prefix
    full = examples[-1].messages
    assert [m.content for m in full if m.role == "user"] == [f"{EXCLAIM.text} u1", "u2", "u3"]
    assert [m.content for m in full if m.role == "assistant"] == ["A1!", "A2!", "A3!"]
    tokenized = tokenize_conversation(tok, full, targets="last")
    labeled = [i for i, label in enumerate(tokenized.labels) if label != IGNORE]
    # the byte tokenizer: the last reply's 3 bytes and its end-of-turn token, and nothing before them
    assert tok.decode([tokenized.input_ids[i] for i in labeled]) == "A3!<|im_end|>"
    assert labeled == list(range(labeled[0], labeled[0] + 4))
    text_before = tok.decode(tokenized.input_ids[:labeled[0]])
    assert text_before.endswith("u3<|im_end|>\n<|im_start|>assistant\n") and "A2!" in text_before
    assert all(label == IGNORE for label in tokenized.labels[:labeled[0]] + tokenized.labels[labeled[-1] + 1:])


def test_collect_counts_kept_dialogues_per_instruction():
    cfg = GAttConfig(enabled=True, dialogues=4, turns=2, instructions=["upper_case", "pirate"], samples_per_turn=2)
    sample = Recorder(lambda conv, turn: ["OK"])  # follows upper_case, never pirate
    examples, stats = collect_gatt(sample, cfg)
    assert stats == {"tried": 4, "kept": 2, "examples": 4,
                     "per_instruction": {"upper_case": {"tried": 2, "kept": 2}, "pirate": {"tried": 2, "kept": 0}}}
    assert all(e.messages[0].content.startswith(UPPER.text) for e in examples)
    assert all(not m.content.startswith(UPPER.text) for e in examples for m in e.messages[1:])


def test_heldout_dialogues_share_no_prompt_with_training_dialogues():
    train = {u for d in gatt_dialogues(100, 3, seed=0) for u in d}
    held_out = {u for d in gatt_dialogues(100, 3, seed=0, split="heldout") for u in d}
    assert train and held_out and not train & held_out


def test_config_refuses_an_unknown_instruction():
    with pytest.raises(ValueError, match="unknown"):
        GAttConfig(instructions=["upper_case", "french"])


def test_follow_by_turn_gives_the_instruction_once_and_scores_each_turn():
    dialogues = [("a1", "a2", "a3"), ("b1", "b2", "b3")]
    known = {"a": ["YES", "YES", "no"], "b": ["no", "YES", "YES"]}

    def script(conv, turn):
        return [known[conv[0].content[-2]][turn]]

    sample = Recorder(script)
    result = follow_by_turn(sample, dialogues, [UPPER])
    assert result["by_turn"] == [0.5, 1.0, 0.5]
    assert result["mean"] == pytest.approx(2 / 3)
    assert result["kept_turns"] == 1.0  # dialogue a keeps it 2 turns, dialogue b 0
    assert result["per_instruction"]["upper_case"]["by_turn"] == [0.5, 1.0, 0.5]
    assert [r["follows"] for r in result["rows"]] == [[True, True, False], [False, True, True]]
    assert all(n == 1 for _, n in sample.calls)  # one (greedy) reply per turn
    last = sample.calls[2][0][0]
    assert last == (Message("user", f"{UPPER.text} a1"), Message("assistant", "YES"), Message("user", "a2"),
                    Message("assistant", "YES"), Message("user", "a3"))


def test_instruction_following_by_turn_runs_on_a_tiny_model(model, tok):
    result = instruction_following_by_turn(model, tok, dialogues=2, instructions=["short", "pirate"], turns=2,
                                           max_new_tokens=4)
    assert len(result["by_turn"]) == 2 and set(result["per_instruction"]) == {"short", "pirate"}
    assert len(result["rows"]) == 4 and all(len(r["replies"]) == 2 for r in result["rows"])
    assert 0.0 <= result["mean"] <= 1.0 and 0.0 <= result["kept_turns"] <= 2.0


@pytest.mark.parametrize("mix", ["replace", "add"])
def test_sft_cli_trains_on_gatt_dialogues(tmp_path, capsys, mix):
    model_dir = save_tiny(str(tmp_path / "tiny"))
    out = tmp_path / "run"
    code = main(["sft", f"model.path={model_dir}", f"train.output_dir={out}", "train.max_steps=2", "train.progress=false",
                 "train.threads=1", "eval.problems=0", "data.max_length=256", "data.builtin=arithmetic",
                 "data.arithmetic_examples=4", "data.gatt.enabled=true", f"data.gatt.mix={mix}", "data.gatt.dialogues=4", "data.gatt.turns=2", "data.gatt.instructions=[short]",
                 "data.gatt.samples_per_turn=4", "data.gatt.max_new_tokens=6", "data.gatt.eval_dialogues=2"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["gatt/dialogues_tried"] == 4 and result["gatt/dialogues_kept"] >= 1
    assert result["gatt/examples"] == 2 * result["gatt/dialogues_kept"]
    assert {"eval/start_gatt_following_mean", "eval/gatt_following_mean", "eval/gatt_kept_turns"} <= set(result)
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r and "eval/loss" not in r] == [1, 2]
    assert (out / "final").is_dir()
