import pytest
import torch

from alignkit.algorithms.rrhf import (
    CandidatesConfig,
    RRHFConfig,
    RRHFDataConfig,
    rank_candidates,
    rrhf_step,
    run,
    to_grid,
)
from alignkit.algorithms.sampling.stages import Sample
from alignkit.data.formats import load_ranked
from alignkit.data.packing import pack_rows, tokenize_group
from alignkit.data.records import Message
from alignkit.engine.config import TrainConfig
from alignkit.engine.logging import read_metrics
from alignkit.engine.trainer import Engine, fit
from alignkit.eval.arithmetic import TrainingEvalConfig
from alignkit.models.load import LoraConfig, ModelConfig
from alignkit.models.tiny import save_tiny, tiny_model
from alignkit.rewards.base import FunctionReward
from alignkit.rollout.base import SamplingConfig
from alignkit.tasks import TaskConfig

RANKED = [
    ("what is 2+2?", ["4", "5", "it is 22", "four"], [1.0, 0.0, -1.0, 0.5]),
    ("reverse abc", ["cba", "abc", "bca"], [2.0, 0.0, 1.0]),
    ("say hi", ["hi", "no thanks", "hello", "bye"], [1.0, -1.0, 1.0, 0.0]),
]


def test_to_grid_pads_groups_in_order():
    grid, mask = to_grid(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([2, 3]))
    assert grid.tolist() == [[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]


def test_overfit_batch_rank_accuracy_rises(tok, tmp_path):
    groups = [tokenize_group(tok, (Message("user", p),), rs, 512, sc) for p, rs, sc in RANKED]
    rows = pack_rows(groups, 4096)
    cfg = TrainConfig(output_dir=str(tmp_path), lr=3e-3, max_steps=20, warmup_steps=0, schedule="constant",
                      progress=False, weight_decay=0.0)
    engine = Engine(tiny_model(seed=0), cfg, cfg.max_steps)
    fit(engine, rrhf_step(engine.model, RRHFConfig()), lambda epoch: rows)
    log = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert log[0]["rank_accuracy"] < 0.8
    assert log[-1]["rank_accuracy"] == 1.0 and log[-1]["loss/rank"] < log[0]["loss/rank"] / 4
    assert log[-1]["loss/ft"] < log[0]["loss/ft"]


def test_run_builtin_arithmetic_candidates(tmp_path):
    save_tiny(str(tmp_path / "tiny"))
    cfg = RRHFConfig(
        model=ModelConfig(path=str(tmp_path / "tiny"), lora=LoraConfig(r=4, alpha=8)),
        train=TrainConfig(output_dir=str(tmp_path / "run"), lr=1e-3, max_steps=2, progress=False, max_tokens_per_batch=400),
        data=RRHFDataConfig(candidates=CandidatesConfig(task=TaskConfig(train=3, val=0, heldout=0, word_problems=True),
                                                        sampling=SamplingConfig(n=2, max_new_tokens=4, batch_size=3))),
        eval=TrainingEvalConfig(problems=2, max_new_tokens=4),
    )
    result = run(cfg)
    assert result["prompts"] == 3 and 0.0 <= result["rank_accuracy"] <= 1.0
    assert result["loss"] == pytest.approx(result["loss/rank"] + result["loss/ft"], rel=1e-5)
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    saved = load_ranked(str(tmp_path / "run" / "candidates.jsonl"))  # what a resumed run trains on
    assert len(saved) == 3 and all(r.scores[0] == 1.0 for r in saved)  # the gold answer comes first


def test_rank_candidates_cut_off_replies_score_zero_and_ties_drop():
    texts = ["What is 2 + 3?", "What is 9 - 4?", "What is 1 + 1?"]
    gold = {"What is 2 + 3?": "5", "What is 9 - 4?": "5", "What is 1 + 1?": "2"}
    reward = FunctionReward(lambda prompt, response: float(response.split()[-1] == gold[prompt]), "last word")
    said = [(0, "6", "stop"), (0, "it is 5", "length"), (0, "so 5", "stop"), (0, "so 5", "length"),
            (1, "4", "stop"), (1, "so 5", "length"),   # its only right one was cut off: all score 0
            (2, "2", "stop"), (2, "so 2", "stop")]     # both right: a tie
    samples = [Sample(texts[i], text, i, k, finish_reason=reason) for k, (i, text, reason) in enumerate(said)]
    ranked = rank_candidates(texts, texts, samples, reward, None, cut_is_wrong=True)
    assert [(r.prompt, r.responses, r.scores) for r in ranked] == [("What is 2 + 3?", ("6", "it is 5", "so 5"), (0.0, 0.0, 1.0))]
    kept = rank_candidates(texts, texts, samples, reward, None, drop_ties=False, cut_is_wrong=True)
    assert [r.scores for r in kept] == [(0.0, 0.0, 1.0), (0.0, 0.0), (1.0, 1.0)]
    with_gold = rank_candidates(texts, texts, samples, reward, ["5", "5", "2"], cut_is_wrong=True)
    assert [(r.responses[0], r.scores) for r in with_gold] == [("5", (1.0, 0.0, 0.0, 1.0)), ("5", (1.0, 0.0, 0.0))]
