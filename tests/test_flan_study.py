"""The Flan-style study: held-out families are asked as the mixture words them, answers are
checked exactly, and `alignkit flan-study` runs its arms (base, k families, no-CoT) end to end."""

import json
import logging

import pytest
import torch

from alignkit.cli import main
from alignkit.data.mixture import MixtureConfig, heldout_examples
from alignkit.data.tasks import get_task
from alignkit.eval import instructions
from alignkit.eval.instructions import HeldoutEvalConfig, answer_of, heldout_accuracy, is_correct, question
from alignkit.models.tiny import save_tiny
from alignkit.rollout.base import Completion


def test_answers_are_read_after_the_last_the_answer_is_and_matched_exactly():
    assert answer_of("Numbering the words: 1 cat, 2 dog. There are 2 words. The answer is 2.") == "2"
    assert answer_of("The answer is 3. No wait, the answer is 4.") == "4"
    assert answer_of(' "97". ') == "97"
    assert is_correct("97", "97") and is_correct("The answer is 97.", "97")
    assert not is_correct("970", "97") and not is_correct("The largest is 97", "97")
    assert not is_correct("Hello", "hello")  # case matters (change_case outputs differ only by case)


def test_questions_are_worded_as_the_mixture_words_its_zero_shot_formats():
    config = MixtureConfig(heldout_tasks=["unit_conversion"], n_shots=2, seed=5)
    items = get_task("unit_conversion").generate(3 + 2, seed=5)
    for form, fmt in (("direct", "zero_shot"), ("cot", "zero_shot_cot")):
        examples = heldout_examples(config, 3, fmt=fmt)["unit_conversion"]
        assert [question(it, form) for it in items[:3]] == [ex.messages[0].content for ex in examples]


def test_accuracy_counts_exact_answers_per_family_and_form(monkeypatch):
    class HalfRight:  # answers the even-numbered prompts of each call correctly
        def __init__(self, model, tokenizer, batch_size, dtype):
            pass

        def generate(self, prompts, params):
            return [Completion(i, 0, (f"The answer is {expected[p]}." if i % 2 == 0 else "no idea"), [], "stop")
                    for i, p in enumerate(prompts)]

    cfg = HeldoutEvalConfig(items=4, seed=1)
    expected = {}
    tok = type("Tok", (), {"apply_chat_template": lambda self, msgs, **kw: msgs[-1]["content"]})()
    for task in ("count_words", "max_of_list"):
        for it in get_task(task).generate(4, 1):
            for form in ("direct", "cot"):
                expected[question(it, form)] = it.output
    monkeypatch.setattr(instructions, "HFGenerator", HalfRight)
    result = heldout_accuracy(None, tok, ["count_words", "max_of_list"], cfg)
    assert {k: v for k, v in result.items() if k != "rows"} == {
        "count_words/direct": 0.5, "max_of_list/direct": 0.5, "heldout/direct": 0.5,
        "count_words/cot": 0.5, "max_of_list/cot": 0.5, "heldout/cot": 0.5}
    assert len(result["rows"]) == 16 and sum(r["correct"] for r in result["rows"]) == 8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny")))


def test_flan_study_runs_every_arm_and_resumes_from_stored_arms(tiny_dir, tmp_path, capsys, caplog):
    torch.set_num_threads(1)
    caplog.set_level(logging.INFO, logger="alignkit")
    out = tmp_path / "study"
    args = ["flan-study", f"model.path={tiny_dir}", f"train.output_dir={out}", "train.max_steps=1", "train.progress=false",
            "train.max_tokens_per_batch=512", "train.threads=1", "task_counts=[1,2]", "study_tasks=[reverse_string,sort_words]",
            "heldout_tasks=[count_words]", "examples_per_task=4", "total=8", "max_length=128", "eval.items=2",
            "eval.direct_tokens=3", "eval.cot_tokens=4"]
    assert main(args) == 0
    result = json.loads((out / "result.json").read_text())
    assert [(r["arm"], r["tasks"], r["cot_data"]) for r in result["arms"]] == [
        ("base", 0, True), ("tasks-1", 1, True), ("tasks-2", 2, True), ("tasks-2-no-cot", 2, False)]
    assert (out / "tasks-2" / "final" / "config.json").is_file() and (out / "flan_study.png").is_file()
    assert "| tasks-2-no-cot | 2 | no |" in (out / "table.md").read_text()
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "result.json").read_text())
    assert again["arms"] == result["arms"]
    assert sum("read from" in r.getMessage() for r in caplog.records) == 4
    caplog.clear()
    assert main([*args, "eval.items=3", "--resume"]) == 0  # another evaluation: arms are evaluated again, not retrained
    assert sum("evaluated with other settings" in r.getMessage() for r in caplog.records) == 4
    assert "resumed from" in " ".join(r.getMessage() for r in caplog.records)


def test_flan_study_refuses_training_on_what_it_evaluates(tiny_dir, capsys):
    assert main(["flan-study", f"model.path={tiny_dir}", "study_tasks=[count_words]", "heldout_tasks=[count_words]"]) == 1
    assert ("study_tasks ['count_words'] are also in heldout_tasks: a study never trains on what it evaluates"
            in capsys.readouterr().err)
