"""Reward model: packed scoring equals per-sequence scoring, training moves accuracy, plain-HF
round trip, rm-eval report, `score`, and bad data refused before training."""

import json
import math
import sys

import pytest
import torch

from alignkit.cli import main
from alignkit.data.chat import render_ids
from alignkit.data.packing import group_row, scoring_group
from alignkit.data.records import Message, user_prompt
from alignkit.eval.reward_eval import calibration, pair_report, plot_report
from alignkit.models.load import LoraConfig, ModelConfig, save_model
from alignkit.models.tiny import save_tiny
from alignkit.rewards.model import RewardModel, load_reward_model

PROMPTS = ["What is 2 + 2?", "Reverse the word 'stone'.", "What is 2 + 2?", "Hi", "What is 2 + 2?", "Hi"]
RESPONSES = ["4", "enots", "The answer is 4.", "Hello! How can I help you today?", "The answer is 5.", "Hey"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny")))


def reference_scores(model, tok, prompts, responses):
    """Each sequence alone through the plain transformers SequenceClassification forward."""
    out = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([render_ids(tok, user_prompt(p) + (Message("assistant", r),))])
        assert ids[0, -1] != model.config.pad_token_id  # transformers reads the true last token
        with torch.no_grad():
            out.append(model(input_ids=ids).logits[0, 0].item())
    return out


def test_packed_rows_score_like_each_sequence_alone(tiny_dir):
    model, tok, _ = load_reward_model(ModelConfig(path=tiny_dir))
    model.eval()
    ref = reference_scores(model, tok, PROMPTS, RESPONSES)
    for max_tokens in (4096, 200):  # one row with all groups; several rows
        got = RewardModel(model, tok, max_tokens=max_tokens)(PROMPTS, RESPONSES)
        assert got == pytest.approx(ref, abs=1e-5)
    assert len(set(round(x, 4) for x in ref)) == len(ref)  # the check can tell sequences apart
    probs = RewardModel(model, tok, probabilities=True)(PROMPTS, RESPONSES)
    assert probs == pytest.approx([1 / (1 + math.exp(-x)) for x in ref], abs=1e-6)


def test_group_layout_shares_the_prompt_and_marks_last_tokens(tok):
    prompt = user_prompt("Sort 3, 1, 2.")
    group = scoring_group(tok, prompt, ["1, 2, 3", "1, 3, 2", "3"], max_length=512)
    for suffix, r in zip(group.responses, ["1, 2, 3", "1, 3, 2", "3"]):
        assert group.prompt + suffix == render_ids(tok, prompt + (Message("assistant", r),))
    assert len(group.prompt) >= len(render_ids(tok, prompt, add_generation_prompt=True))
    row = group_row([group, group], keep_last=True)
    ends = row["ends"].tolist()
    n = len(group)
    lengths = [len(s) for s in group.responses]
    first = [len(group.prompt) + sum(lengths[: k + 1]) - 1 for k in range(3)]
    assert ends == first + [n + e for e in first]
    assert row["position_ids"][0, len(group.prompt) + lengths[0]].item() == len(group.prompt)  # 2nd reply restarts
    cut = scoring_group(tok, prompt, ["1, 2, 3", "3"], max_length=20)
    assert cut.truncated and all(len(cut.prompt) + len(s) <= 20 for s in cut.responses)
    assert cut.prompt == group.prompt[-len(cut.prompt):]  # prompt tokens dropped from the left


def test_lora_rm_saves_to_a_plain_hf_directory(tiny_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, tok, _ = load_reward_model(ModelConfig(path=tiny_dir, lora=LoraConfig(r=4, top_layers=1)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n in trainable if "lora" not in n] == ["base_model.model.score.modules_to_save.default.weight"]
    lora = [n for n in trainable if "lora_B" in n]
    assert len(lora) == 7 and all(".layers.1." in n for n in lora)  # q k v o gate up down of the top layer only
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: move the adapter and the head
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    model.eval()
    expected = RewardModel(model, tok)(PROMPTS, RESPONSES)
    out = save_model(model, tok, tmp_path / "rm")
    plain_tok = AutoTokenizer.from_pretrained(out)
    plain = AutoModelForSequenceClassification.from_pretrained(out)
    assert plain.config.num_labels == 1 and plain.config.pad_token_id == tok.pad_token_id
    got = []
    for p, r in zip(PROMPTS, RESPONSES):  # the recipe in alignkit.rewards.model's docstring
        text = plain_tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False)
        enc = plain_tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            got.append(plain(**enc).logits[0, 0].item())
    assert got == pytest.approx(expected, abs=1e-5)
    base = RewardModel(load_reward_model(ModelConfig(path=tiny_dir), train=False)[0].eval(), tok)(PROMPTS, RESPONSES)
    assert max(abs(a - b) for a, b in zip(got, base)) > 1e-2  # the trained weights were saved


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


PAIRS = [
    {"prompt": f"What is {a} + {b}?", "chosen": f"The answer is {a + b}.", "rejected": "I won't help with that. " * 3, "rating": rating}
    for (a, b), rating in zip([(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 5)],
                              ["significantly better", "better", "slightly better", "negligibly better", "better", "unsure"])
]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rm_smoke_run_learns_an_overfit_batch(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    run_dir = tmp_path / "run"
    rc = main(["rm", f"model.path={tiny_dir}", f"data.path={data}", f"data.eval_path={data}", f"train.output_dir={run_dir}",
               "model.lora={r: 8, alpha: 16}", "train.lr=5e-3", "train.max_steps=12", "train.warmup_steps=1",
               "train.progress=false", "margin=small"])
    assert rc == 0, capsys.readouterr().err
    steps = [m for m in read_metrics(run_dir) if "loss" in m]
    assert len(steps) == 12 and steps[0]["units"] == 6  # all six pairs in one packed row
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"] and steps[-1]["accuracy"] == 1.0
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["accuracy"] == 1.0 and report["buckets"]["negligibly better"]["n"] == 2
    assert (run_dir / "final" / "config.json").is_file() and (run_dir / "eval" / "calibration.png").is_file()


def test_rm_trains_on_ranked_responses(tiny_dir, tmp_path):
    rows = [{"prompt": f"Count to {n}.", "responses": [" ".join(map(str, range(1, n + 1))), "no", "1"], "scores": [2, 0, 1]}
            for n in (3, 4, 5, 6)]
    data = write_jsonl(tmp_path / "ranked.jsonl", rows)
    run_dir = tmp_path / "run"
    assert main(["rm", f"model.path={tiny_dir}", f"data.path={data}", f"data.eval_path={data}", f"train.output_dir={run_dir}",
                 "train.lr=1e-3", "train.max_steps=10", "train.progress=false"]) == 0
    steps = [m for m in read_metrics(run_dir) if "loss" in m]
    assert steps[0]["units"] == 4 and steps[-1]["loss"] < steps[0]["loss"]
    assert json.loads((run_dir / "eval" / "report.json").read_text())["n"] == 12  # 3 untied pairs per prompt


def test_pair_report_buckets_and_calibration():
    # diffs: sig +2, +1 (2/2 right); better −0.5 (0/1); slightly +0.1 (1/1); negligibly 0.0 (a tie is wrong)
    chosen = [2.0, 1.0, 0.0, 0.1, 0.0]
    rejected = [0.0, 0.0, 0.5, 0.0, 0.0]
    ratings = ["significantly better", "significantly better", "better", "slightly better", "negligibly better"]
    rep = pair_report(chosen, rejected, ratings, bins=5)
    assert rep["accuracy"] == pytest.approx(3 / 5)
    assert rep["mean_margin"] == pytest.approx((2 + 1 - 0.5 + 0.1 + 0) / 5)
    assert {r: (b["n"], b["accuracy"]) for r, b in rep["buckets"].items()} == {
        "significantly better": (2, 1.0), "better": (1, 0.0), "slightly better": (1, 1.0), "negligibly better": (1, 0.0)}
    # σ(|d|): 0.881 (bin 0.8–0.9), 0.731 (0.7–0.8), 0.622 (0.6–0.7), 0.525 and 0.5 (0.5–0.6)
    cal = calibration([2.0, 1.0, -0.5, 0.1, 0.0], bins=5)
    assert [b["n"] for b in cal["bins"]] == [2, 1, 1, 1, 0]
    assert [b["accuracy"] for b in cal["bins"]] == [0.5, 0.0, 1.0, 1.0, None]
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    ece = (abs(0.5 - (sig(0.1) + 0.5) / 2) * 2 + abs(0 - sig(0.5)) + abs(1 - sig(1)) + abs(1 - sig(2))) / 5
    assert cal["ece"] == pytest.approx(ece)


def test_plot_is_optional(tmp_path, monkeypatch):
    rep = pair_report([1.0, 0.0], [0.0, 1.0], ["better", None])
    assert rep["buckets"]["unrated"] == {"n": 1, "accuracy": 0.0, "mean_margin": -1.0}
    assert plot_report(rep, tmp_path / "a.png") == tmp_path / "a.png" and (tmp_path / "a.png").stat().st_size > 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert plot_report(rep, tmp_path / "b.png") is None and not (tmp_path / "b.png").exists()


def test_rm_eval_and_score_commands(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert main(["rm-eval", f"model.path={tiny_dir}", f"data.path={data}", f"output_dir={tmp_path / 'ev'}"]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["n"] == 6 and [b["n"] for b in report["buckets"].values()] == [1, 2, 1, 2]
    assert "| accuracy (%) |" in (tmp_path / "ev" / "report.md").read_text()

    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES)])
    assert main(["score", f"input={rows}", f"model={tiny_dir}", f"output={tmp_path / 's.jsonl'}"]) == 0
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    model, tok, _ = load_reward_model(ModelConfig(path=tiny_dir), train=False)
    assert [s["score"] for s in scored] == pytest.approx(reference_scores(model.eval(), tok, PROMPTS, RESPONSES), abs=1e-5)
    assert list(scored[0]) == ["prompt", "response", "score"]
    # combined reward with the same model as helpfulness and safety RM: threshold 0.99 routes
    # everything to safety, so R_c = σ(r) for every row and LOGIT(R_c) = r
    assert main(["score", f"input={rows}", f"helpful_model={tiny_dir}", f"safety_model={tiny_dir}", "threshold=0.99",
                 f"output={tmp_path / 'c.jsonl'}"]) == 0
    combined = [json.loads(line)["score"] for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert combined == pytest.approx([s["score"] for s in scored], abs=1e-4)
    capsys.readouterr()


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "rejected": "no"}, "pairs.jsonl:2: chosen: missing"),
    ({"prompt": "Hi", "chosen": "same", "rejected": " same "}, "pairs.jsonl:2: rejected: same text as chosen"),
    ({"prompt": "Hi", "chosen": "yes", "rejected": "no", "rating": "much better"}, "pairs.jsonl:2: rating: unknown rating 'much better'"),
])
def test_bad_preference_rows_stop_before_training(tiny_dir, tmp_path, capsys, row, message):
    data = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], row])
    run_dir = tmp_path / "run"
    assert main(["rm", f"model.path={tiny_dir}", f"data.path={data}", f"train.output_dir={run_dir}"]) == 1
    err = capsys.readouterr().err
    assert "alignkit rm: error: 1 problem in" in err and message in err
    assert not run_dir.exists()  # nothing trained, nothing written


def test_safety_and_helpfulness_subsets_split_the_pairs_by_their_labels():
    """Llama 2 trains two reward models: `data.subset` picks the safety pairs (flagged prompt or a
    reply labelled unsafe) or the others, in training and held-out data alike."""
    from alignkit.algorithms.reward_model import RMDataConfig, is_safety_pair, load_items

    _, train, held = load_items(RMDataConfig(builtin_pairs=200, builtin_eval_pairs=60), seed=0)
    _, safe_train, safe_held = load_items(RMDataConfig(builtin_pairs=200, builtin_eval_pairs=60, subset="safety"), seed=0)
    _, help_train, help_held = load_items(RMDataConfig(builtin_pairs=200, builtin_eval_pairs=60, subset="helpfulness"), seed=0)
    assert safe_train and help_train and len(safe_train) + len(help_train) == 200
    assert len(safe_held) + len(help_held) == 60
    assert all(p.prompt_unsafe or p.safety != "both_safe" for p in safe_train)
    assert not any(p.prompt_unsafe or p.safety in ("chosen_only_safe", "both_unsafe") for p in help_train)
    assert [p for p in train if is_safety_pair(p)] == safe_train
