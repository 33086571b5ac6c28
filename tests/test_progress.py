"""Long phases of the sampling methods are visible: with train.progress off (or stderr not a
terminal) each phase logs one INFO line when it ends, naming it, its count, seconds and rate;
HFGenerator's progress hook counts decoded prompts without changing what is sampled."""

import logging
import re

import torch

from alignkit.models.tiny import tiny_model, tiny_tokenizer
from alignkit.rollout.base import SamplingParams
from alignkit.rollout.hf import HFGenerator
from test_sampling_methods import COMMON, answering_model, cli  # noqa: F401 (the module fixture)

LINE = re.compile(r"^(sample|score|train|evaluate)\b[^:]*: (\d+) (\w+) in [\d.]+s \([\d.]+ \w+/s\)$")


def test_rest_em_logs_one_line_per_phase(answering_model, tmp_path, capsys, caplog):
    torch.set_num_threads(1)
    caplog.set_level(logging.INFO, logger="alignkit")
    cli(["rest-em", f"model.path={answering_model}", f"train.output_dir={tmp_path / 'run'}", "train.epochs=1",
         "iterations=1", "metrics.eval_samples=2", "metrics.ks=[1,2]"] + COMMON, capsys)
    lines = [r.getMessage() for r in caplog.records if r.name == "alignkit" and LINE.match(r.getMessage())]
    phases = [(LINE.match(m)[1], int(LINE.match(m)[2]), LINE.match(m)[3]) for m in lines]
    # baseline evaluation (4 train + 4 val + 8 held-out greedy), E-step (16 problems x 4), its
    # scoring, the M-step, then the evaluation with pass@k (val measured by the M-step)
    assert phases == [("evaluate", 16, "prompts"), ("sample", 64, "samples"), ("score", 64, "samples"),
                      phases[3], ("evaluate", 4 + 8 + 8, "prompts")], lines
    assert phases[3][0] == "train" and phases[3][1] > 0 and phases[3][2] == "examples"
    assert "iteration 1" in lines[1] and "iter-1" in lines[3]
    assert "it/s" not in capsys.readouterr().err  # no bar with progress off


def test_generator_progress_hook_counts_prompts_and_changes_nothing():
    torch.set_num_threads(1)
    tok, model = tiny_tokenizer(), tiny_model(seed=0)
    prompts = ["1+2=", "3+4=", "5+6=", "7+8=", "9+9="]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=5, seed=11, top_k=0)
    plain = HFGenerator(model, tok, batch_size=2).generate(prompts, params)
    seen = []
    hooked = HFGenerator(model, tok, batch_size=2, progress=seen.append).generate(prompts, params)
    assert seen == [2, 2, 1]
    assert [c.token_ids for c in hooked] == [c.token_ids for c in plain]
