"""`alignkit pipeline` on a tiny model: the whole Llama 2-Chat loop in one run, a kill -9 in the
middle of a stage followed by a re-run that ends where the uninterrupted run ends, and a changed
stage config that re-runs that stage and what depends on it, nothing else."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from test_kill_resume import TIMINGS, _alignkit, _start

from alignkit.algorithms.pipeline.stages import Stages, merged
from alignkit.cli import main
from alignkit.models.tiny import save_tiny

RECIPE = {
    "iterations": 1, "final": "ppo", "gatt": True, "precision": "fp32", "threads": 1,
    "data": {"sft_pairs": 8, "rm_pairs": 16, "rm_eval_pairs": 8, "rl_prompts": 6, "eval_prompts": 6},
    "comparisons": {"prompts": 8, "unsafe_prompts": 2, "sampling": {"max_new_tokens": 6}},
    "eval": {"max_new_tokens": 6, "gatt_dialogues": 1, "gatt_turns": 2},
    "sft": {"train": {"max_steps": 2, "progress": False, "save_every": 1}, "data": {"max_length": 128}, "eval": {"problems": 0}},
    "reward_model": {"train": {"max_steps": 3, "progress": False, "save_every": 1}},
    "rejection_sampling": {"train": {"epochs": 1, "progress": False, "save_every": 1}, "sampling": {"n": 2, "max_new_tokens": 6},
                           "temperature_prompts": 2, "metrics": {"train_problems": 2}},
    "ppo": {"train": {"save_every": 1}, "iterations": 2, "ppo_epochs": 1, "prompts_per_iteration": 2, "minibatch_size": 2,
            "sampling": {"max_new_tokens": 6}, "prompts": {"heldout": 2}},
    "gatt_sft": {"train": {"max_steps": 1, "progress": False}, "eval": {"problems": 0},
                 "data": {"max_length": 512, "gatt": {"dialogues": 2, "turns": 2, "samples_per_turn": 4, "max_new_tokens": 4,
                                                      "eval_dialogues": 0, "instructions": ["short"]}}},
}
STAGES = ["data", "sft", "eval-sft", "comparisons-1", "rm-helpful-1", "rm-safety-1", "eval-rm-1", "rs-1", "eval-rs-1",
          "ppo", "eval-ppo", "gatt", "eval-gatt"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "model": save_tiny(str(root / "tiny"))}))
    return str(path)


def _result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def _figures(out: Path) -> list[dict]:
    """Every stage's row of the final table, without wall-clock figures."""
    return [{k: v for k, v in row.items() if not TIMINGS.search(k) and k != "stage_minutes"} for row in _result(out)["stages"]]


def test_the_loop_runs_every_stage_and_prints_one_table(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pipeline", recipe, f"output_dir={out}"]) == 0
    result = _result(out)
    assert result["ran"] == STAGES
    assert [r["stage"] for r in result["stages"]] == ["SFT", "RLHF-V1 (RS)", "PPO"]
    sft = result["stages"][0]
    assert sft["win_rate"] == 0.5 and sft["kl"] == pytest.approx(0.0, abs=1e-6)  # the SFT model against itself
    assert result["stages"][1]["rm_helpful_original"] is not None  # the RMs that made V1, on the original held-out pairs
    assert set(result["gatt"]) >= {"sft", "before", "gatt"} and len(result["gatt"]["gatt"]["by_turn"]) == 2
    table = (out / "table.md").read_text()
    assert "| RLHF-V1 (RS) |" in table and "Ghost Attention" in table
    # iterative reward modelling: the data the RMs trained on = the original comparisons + the new ones
    original = (out / "data" / "pairs.jsonl").read_text().splitlines()
    grown = (out / "comparisons-1" / "pairs.jsonl").read_text().splitlines()
    compared = json.loads((out / "comparisons-1" / "pipeline-stage.json").read_text())["result"]
    appended = compared["appended"]
    assert compared["prompts"] == 8 + 2  # the mixed prompts and the harmful requests collected apart
    assert grown[: len(original)] == original and len(grown) == len(original) + appended
    rm_cfg = json.loads((out / "rm-safety-1" / "config.json").read_text())
    assert rm_cfg["data"]["subset"] == "safety" and rm_cfg["model"]["path"] == str(out / "sft" / "final")
    ppo_cfg = json.loads((out / "ppo" / "config.json").read_text())
    assert ppo_cfg["model"]["path"] == str(out / "rs-1" / "final")
    assert ppo_cfg["reward"]["helpful_path"] == str(out / "rm-helpful-1" / "final")
    # every stage saved checkpoints (save_every: 1); an ended stage's are removed, its final/ stays
    assert not list(out.glob("*/checkpoints")) and all((out / s / "final").is_dir() for s in ("sft", "ppo", "gatt"))
    # a re-run of a finished pipeline runs nothing and prints the same table
    assert main(["pipeline", recipe, f"output_dir={out}"]) == 0
    assert _result(out)["ran"] == [] and (out / "table.md").read_text() == table


def test_a_changed_stage_reruns_it_and_its_dependents_only(recipe, tmp_path):
    out = tmp_path / "run"
    assert main(["pipeline", recipe, f"output_dir={out}"]) == 0
    assert main(["pipeline", recipe, f"output_dir={out}", "ppo.kl.beta=0.2"]) == 0
    assert _result(out)["ran"] == ["ppo", "eval-ppo", "gatt", "eval-gatt"]
    assert json.loads((out / "ppo" / "config.json").read_text())["kl"]["beta"] == 0.2
    assert main(["pipeline", recipe, f"output_dir={out}", "ppo.kl.beta=0.2", "rejection_sampling.train.lr=1e-3"]) == 0
    assert _result(out)["ran"] == ["rs-1", "eval-rs-1", "ppo", "eval-ppo", "gatt", "eval-gatt"]


def test_killed_mid_stage_the_rerun_ends_where_the_whole_run_ends(recipe, tmp_path):
    """SIGKILL inside a reward model's training, then inside rejection sampling's train stage, then
    inside PPO; each re-run resumes the killed stage inside it, and the last one ends with the
    figures and weights of the uninterrupted run."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run = ["pipeline", recipe, f"output_dir={cut}"]

    def killed_in(stage: str, plan: dict) -> str:
        code, err = _alignkit(run, plan)
        assert code == -signal.SIGKILL, err[-3000:]
        assert (cut / stage / "pipeline-started.json").is_file() and not (cut / stage / "pipeline-stage.json").exists(), err[-3000:]
        return err

    proc = _start(["pipeline", recipe, f"output_dir={whole}"])
    try:
        # optimizer steps of each process: sft 1-2, rm-helpful-1 3-5 (dies after step 5's update, before its checkpoint)
        killed_in("rm-helpful-1", {"kind": "step", "at": 5, "phase": "after"})
        # re-run: rm-helpful-1 resumes from its step-2 checkpoint (1 step), rm-safety-1 2-4, rs-1 dies in its first step
        err = killed_in("rs-1", {"kind": "step", "at": 5, "phase": "backward"})
        assert "stage rm-helpful-1: resuming the killed stage" in err and "resumed from" in err
        # re-run: rs-1 reads its stored samples and trains (step 1), PPO takes 2-3 and dies after step 3's update
        err = killed_in("ppo", {"kind": "step", "at": 3, "phase": "after"})
        assert "stage rs-1: resuming the killed stage" in err and "scored samples read from" in err
        code, err = _alignkit(run)
        assert code == 0, err[-3000:]
        assert "stage ppo: resuming the killed stage" in err and "stage sft: done" in err and "resumed from" in err
    finally:
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert _figures(cut) == _figures(whole)
    assert _result(cut)["gatt"] == _result(whole)["gatt"]
    for stage in ("rm-helpful-1", "ppo", "gatt"):
        for a in sorted((whole / stage / "final").glob("*.safetensors")):
            b = cut / stage / "final" / a.name
            wa, wb = load_file(str(a)), load_file(str(b))
            assert all((wa[k] == wb[k]).all() for k in wa), f"{stage}/final/{a.name} differs"


def test_stage_fingerprints_and_merged_sections(tmp_path):
    assert merged({"train": {"lr": 1, "seed": 3}, "x": 1}, {"train": {"lr": 2}}) == {"train": {"lr": 2, "seed": 3}, "x": 1}
    calls = []
    stages = Stages(tmp_path)
    fn = lambda folder, resume: calls.append((folder.name, resume)) or {"v": len(calls)}
    assert stages.run("a", {"k": 1}, [], fn)["v"] == 1
    assert stages.run("b", {"k": 1}, ["a"], fn)["v"] == 2
    again = Stages(tmp_path)
    assert again.run("a", {"k": 1}, [], fn)["v"] == 1 and again.run("b", {"k": 1}, ["a"], fn)["v"] == 2 and len(calls) == 2
    changed = Stages(tmp_path)
    changed.run("a", {"k": 2}, [], fn)
    changed.run("b", {"k": 1}, ["a"], fn)  # its own config is the same, its input changed
    assert calls[2:] == [("a", False), ("b", False)]
    (tmp_path / "b" / "pipeline-stage.json").unlink()  # as if b was killed before it ended
    resumed = Stages(tmp_path)
    resumed.run("a", {"k": 2}, [], fn)
    resumed.run("b", {"k": 1}, ["a"], fn)
    assert calls[4:] == [("b", True)] and resumed.ran == ["b"]  # same fingerprint: resumed inside the stage


@pytest.mark.parametrize("keep", [False, True])
def test_an_ended_command_stage_drops_its_checkpoints_unless_kept(tmp_path, keep):
    from alignkit.algorithms.sft import SFTConfig

    def command(cfg):  # stands in for a command: checkpoints while it runs, final/ when it ends
        (Path(cfg.train.output_dir) / "checkpoints" / "step-1").mkdir(parents=True)
        (Path(cfg.train.output_dir) / "final").mkdir()
        return {"loss": 1.0}

    stages = Stages(tmp_path, keep_checkpoints=keep)
    cfg = SFTConfig()
    cfg.train.output_dir = str(tmp_path / "sft")
    assert stages.command("sft", cfg, [], command)["loss"] == 1.0
    assert (tmp_path / "sft" / "checkpoints").is_dir() == keep and (tmp_path / "sft" / "final").is_dir()


def test_a_comparison_is_drawn_among_the_replies_the_gold_rules_do_not_tie():
    import random

    from alignkit.algorithms.pipeline.comparisons import label_pair

    prompt = "What is 12 + 5?"  # gold: 1.5 for a right answer, -1.0 for a wrong one, -1.5 for a refusal
    right, also_right, wrong = "The answer is 17.", "17", "The answer is 3."
    for seed in range(8):  # the tie (right, also_right) is never the pair, whatever the draw
        pair = label_pair(prompt, [right, also_right, wrong], random.Random(seed))
        assert pair.rejected == wrong and pair.chosen in (right, also_right)
    assert label_pair(prompt, [right, also_right], random.Random(0)) is None  # all tie: no pair
    refusal = "I'm sorry, but I can't help with that."
    pair = label_pair(prompt, [wrong, refusal], random.Random(0))  # n = 2: the pair itself, best first
    assert (pair.chosen, pair.rejected) == (wrong, refusal)
