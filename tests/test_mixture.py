from __future__ import annotations

import re
from collections import Counter

import pytest

from alignkit.data.mixture import (
    COT_TRIGGER,
    FORMATS,
    MixtureConfig,
    build_mixture,
    heldout_examples,
    mixture_counts,
    mixture_stats,
)
from alignkit.data.tasks import TASKS, TaskItem, get_task
from alignkit.rewards.verifiers import extract_answer

BASE = {
    "kilometres": 1000,
    "metres": 1,
    "centimetres": 0.01,
    "kilograms": 1000,
    "grams": 1,
    "hours": 3600,
    "minutes": 60,
    "seconds": 1,
}
UNIT = re.compile(r"\b(" + "|".join(BASE) + r")\b")


def ints(text):
    return [int(x) for x in text.split(", ")]


def expected_output(item):
    """The right output, recomputed from the item's instruction and input."""
    task, text, instr = item.task, item.input, item.instruction
    if task == "arithmetic":
        return item.rationale.rsplit("= ", 1)[1].rstrip(".")
    if task == "reverse_string":
        return text[::-1]
    if task == "change_case":
        return text.upper() if "upper" in instr else text.lower()
    if task == "sort_numbers":
        down = "descending" in instr or "largest to smallest" in instr
        return ", ".join(map(str, sorted(ints(text), reverse=down)))
    if task == "sort_words":
        return ", ".join(sorted(text.split(", ")))
    if task == "count_letters":
        return str(text.count(re.search(r'"(\w)"', instr).group(1)))
    if task == "count_words":
        return str(len(text.split()))
    if task == "unit_conversion":
        value, src = text.split(" ")
        result = int(value) * BASE[src] / BASE[UNIT.search(instr).group(1)]
        assert result == int(result)
        return str(int(result))
    if task == "max_of_list":
        return str(max(ints(text)))
    raise AssertionError(task)


def test_registry_has_the_families():
    need = {
        "arithmetic",
        "reverse_string",
        "change_case",
        "sort_numbers",
        "sort_words",
        "count_letters",
        "count_words",
        "unit_conversion",
        "max_of_list",
    }
    assert need <= set(TASKS)
    assert all(len(f.templates) >= 3 for f in TASKS.values())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_family_outputs_are_correct(name):
    family = get_task(name)
    items = family.generate(60, seed=3)
    assert items == family.generate(60, seed=3)
    assert items != family.generate(60, seed=4)
    assert len({(it.instruction, it.input) for it in items}) == 60
    assert len({it.instruction for it in items}) >= 3
    for it in items:
        assert it.task == name and it.rationale
        assert it.output == expected_output(it), it
        if name.startswith("sort_"):  # the rationale chains the sorted items with < or <=
            assert re.findall(r"\w+", it.rationale.split(": ", 1)[1]) == it.output.split(", ")
        elif name != "reverse_string":  # reverse_string's rationale spells the letters instead
            assert it.output in it.rationale


def test_unknown_task_names_nearest():
    with pytest.raises(
        ValueError, match=r"'sort_word'.*did you mean 'sort_words'.*valid tasks: .*max_of_list"
    ):
        get_task("sort_word")
    with pytest.raises(ValueError, match="did you mean 'count_letters'"):
        MixtureConfig(tasks=["count_leters"])


def test_config_validation():
    with pytest.raises(ValueError, match="both trained on and held out"):
        MixtureConfig(tasks=["sort_words", "unit_conversion"])
    with pytest.raises(ValueError, match="formats"):
        MixtureConfig(formats=["one_shot"])
    with pytest.raises(ValueError, match="at least 3 items"):
        MixtureConfig(tasks=["sort_words"], task_sizes={"sort_words": 2})
    with pytest.raises(ValueError, match="not a training task"):
        MixtureConfig(task_sizes={"unit_conversion": 5})
    assert (
        MixtureConfig(tasks=["sort_words"], task_sizes={"sort_words": 1}, formats=["zero_shot"]).size(
            "sort_words"
        )
        == 1
    )


def test_default_tasks_exclude_heldout():
    cfg = MixtureConfig()
    assert "unit_conversion" not in cfg.training_tasks()
    assert set(cfg.training_tasks()) == set(TASKS) - {"unit_conversion"}


# Three tasks whose instructions have no fields, so an example's task can be read from its text.
LITERAL = ("sort_words", "count_words", "max_of_list")


def task_of(example):
    last = example.messages[0].content.split("\n\n")[-1]
    instruction = last.split("\n")[0]
    return next(t for t in LITERAL if instruction in get_task(t).templates)


def test_cap_makes_rates_proportional_to_min_size_and_cap():
    cfg = MixtureConfig(tasks=list(LITERAL), task_sizes={"sort_words": 500}, examples_per_task=50, cap=100)
    # weights min(n_t, cap) = 100, 50, 50; total defaults to their sum 200
    assert mixture_counts(cfg) == {"sort_words": 100, "count_words": 50, "max_of_list": 50}
    mixed = build_mixture(cfg)
    assert len(mixed) == 200
    assert Counter(task_of(e) for e in mixed) == Counter(mixture_counts(cfg))
    # total=60: 60 * 100/200 = 30 and 60 * 50/200 = 15 each
    cfg.total = 60
    assert mixture_counts(cfg) == {"sort_words": 30, "count_words": 15, "max_of_list": 15}
    assert Counter(task_of(e) for e in build_mixture(cfg)) == Counter(mixture_counts(cfg))
    # total=7: exact shares 3.5, 1.75, 1.75 -> floors 3, 1, 1; the 2 left go to the largest remainders
    cfg.total = 7
    assert mixture_counts(cfg) == {"sort_words": 3, "count_words": 2, "max_of_list": 2}


def test_small_tasks_repeat_when_total_exceeds_items():
    cfg = MixtureConfig(tasks=["sort_words", "count_words"], examples_per_task=5, total=30)
    mixed = build_mixture(cfg)
    assert len(mixed) == 30
    assert Counter(task_of(e) for e in mixed) == {"sort_words": 15, "count_words": 15}


def format_of(example):
    user = example.messages[0].content
    few = "\nAnswer: " in user
    cot = COT_TRIGGER in user
    return ("few_shot" if few else "zero_shot") + ("_cot" if cot else "")


def test_formats_targets_and_exemplars():
    cfg = MixtureConfig(tasks=list(LITERAL), examples_per_task=40, cap=40, n_shots=2, seed=1)
    mixed = build_mixture(cfg)
    assert mixed == build_mixture(cfg)
    assert mixed != build_mixture(MixtureConfig(tasks=list(LITERAL), examples_per_task=40, cap=40, seed=2))
    by_format = Counter(format_of(e) for e in mixed)
    stats = mixture_stats(cfg)
    assert by_format == {f: sum(s[f] for s in stats.values()) for f in FORMATS}
    assert set(by_format) == set(FORMATS) and stats["max_of_list"] == {
        "size": 40,
        "count": 40,
        "zero_shot": 10,
        "few_shot": 10,
        "zero_shot_cot": 10,
        "few_shot_cot": 10,
    }
    for e in mixed:
        user, reply = e.messages[0], e.messages[1]
        assert (user.role, reply.role) == ("user", "assistant")
        fmt, blocks = format_of(e), user.content.split("\n\n")
        assert len(blocks) == (cfg.n_shots + 1 if fmt.startswith("few") else 1)
        target = blocks[-1].split("\n")[:2]
        assert all(b.split("\n")[:2] != target for b in blocks[:-1])  # exemplars never hold the target
        assert len({b.split("\n")[1] for b in blocks}) == len(blocks)  # nor repeat one another
        task = task_of(e)
        for block, answer in [(b, b.split("\nAnswer: ")[1]) for b in blocks[:-1]] + [
            (blocks[-1], reply.content)
        ]:
            lines = block.split("\n")
            assert lines[0] in get_task(task).templates  # exemplars come from the same task
            gold = expected_output(TaskItem(task, lines[0], lines[1].removeprefix("Input: "), "", ""))
            if fmt.endswith("cot"):
                assert answer.endswith(f"The answer is {gold}.") and len(answer) > len(gold) + 20
            else:
                assert answer == gold


def test_heldout_examples():
    cfg = MixtureConfig(heldout_tasks=["unit_conversion", "reverse_string"])
    held = heldout_examples(cfg, 8)
    assert set(held) == {"unit_conversion", "reverse_string"}
    assert all(len(v) == 8 for v in held.values())
    assert Counter(format_of(e) for e in held["unit_conversion"]) == {f: 2 for f in FORMATS}
    zero = heldout_examples(cfg, 5, fmt="zero_shot_cot")["unit_conversion"]
    assert all(format_of(e) == "zero_shot_cot" for e in zero)
    for e in zero:
        instruction, text = e.messages[0].content.split("\n")[:2]
        value, src = text.removeprefix("Input: ").split(" ")
        gold = int(int(value) * BASE[src] / BASE[UNIT.search(instruction).group(1)])
        assert extract_answer(e.messages[1].content) == str(gold)
    assert heldout_examples(cfg, 3) == heldout_examples(cfg, 3)
    with pytest.raises(ValueError, match="fmt"):
        heldout_examples(cfg, 3, fmt="cot")
