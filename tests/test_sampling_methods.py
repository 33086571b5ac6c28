"""Smoke runs of best-of-n, rs, raft, rft, rest-em and rest on a tiny model.

The tiny model is first taught the answer format on one-digit sums (a few seconds), so that some
of its samples are correct and every selection stage has something to keep.
"""

import json

import pytest
import torch

from alignkit.algorithms.sampling.stages import Sample, tokenize_samples
from alignkit.algorithms.sampling.train_stage import train_stage
from alignkit.cli import main
from alignkit.engine.config import SamplingTrainConfig
from alignkit.engine.logging import read_metrics
from alignkit.models.load import save_model
from alignkit.models.tiny import tiny_model, tiny_tokenizer
from alignkit.tasks import RewardConfig, TaskConfig, build_task

TASK = ["task.min_digits=1", "task.max_digits=1", "task.ops=[+]", "task.train=16", "task.val=4", "task.heldout=8"]
COMMON = TASK + ["train.threads=1", "train.progress=false", "sampling.max_new_tokens=4", "sampling.n=4",
                 "metrics.train_problems=4", "train.max_tokens_per_batch=512"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny models run fastest on one thread


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory):
    """A tiny model trained for a few seconds on one-digit sums: it answers with digits."""
    torch.set_num_threads(1)
    tok, model = tiny_tokenizer(), tiny_model(seed=0)
    task = problems_task(train=40, val=4, heldout=8, min_digits=1, max_digits=1, ops=["+"])
    data = tokenize_samples(tok, [Sample(p, task.answer_for(p)) for p in task.train])
    out = tmp_path_factory.mktemp("answering")
    cfg = SamplingTrainConfig(output_dir=str(out / "run"), lr=3e-3, epochs=40, max_tokens_per_batch=512, progress=False, warmup_ratio=0.05)
    model, _ = train_stage(model, tok, data, cfg)
    return str(save_model(model, tok, out / "model"))


def problems_task(**kw):
    return build_task(TaskConfig(**kw), RewardConfig())


def cli(args, capsys):
    """Run a command; return the JSON result it prints last (a table may come before it)."""
    assert main(args) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.rindex("\n{\n") + 1:] if not out.startswith("{\n") else out)


def test_best_of_n_sweep(answering_model, tmp_path, capsys):
    out = tmp_path / "bon"
    result = cli(["best-of-n", f"model.path={answering_model}", "task.source=arithmetic", "task.heldout=6", "ns=[1,2]",
                  "sampling.n=4", "sampling.temperature=0.7", "temperatures=[1.3]",
                  "sampling.max_new_tokens=4", "threads=1", f"output_dir={out}"], capsys)
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and result["best_temperature"] in (0.7, 1.3)
    for t in (0.7, 1.3):
        curve = [r for r in rows if r["temperature"] == t]
        assert [r["N"] for r in curve] == [1, 2, 4]
        maxes = [r["max_reward"] for r in curve]
        assert maxes == sorted(maxes)  # nested subsets: the best of N can only improve with N
        assert curve[0]["max_reward"] == curve[0]["median_reward"]  # N=1: one sample
        assert all(0.0 <= r["median_reward"] <= r["max_reward"] <= 1.0 for r in curve)
    assert rows[2]["kl_bound"] == pytest.approx(1.3862944 - 0.75)
    assert (out / "curves.png").stat().st_size > 0 and (out / "table.md").is_file()
    best = [json.loads(line) for line in (out / "best.jsonl").read_text().splitlines()]
    assert len(best) == 6


def test_best_of_n_gold_reward_on_preference_prompts(answering_model, tmp_path, capsys):
    out = tmp_path / "bon"
    cli(["best-of-n", f"model.path={answering_model}", "task.heldout=4", "ns=[1]", "sampling.n=3", "temperatures=[1.0]",
         "sampling.max_new_tokens=6", "threads=1", f"output_dir={out}"], capsys)
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert rows[1]["max_reward"] >= rows[0]["max_reward"] and -3.5 <= rows[0]["median_reward"] <= 2.0


def test_rest_em_logs_accuracy_pass_and_maj(answering_model, tmp_path, capsys, monkeypatch):
    from alignkit.algorithms.sampling.frame import SamplingRun

    trained, train = [], SamplingRun.train

    def record(job, *a, **k):  # each M-step's model, as it was trained
        out = train(job, *a, **k)
        trained.append({n: t.detach().clone() for n, t in job.policy.state_dict().items()})
        return out

    monkeypatch.setattr(SamplingRun, "train", record)
    out = tmp_path / "rest_em"
    result = cli(["rest-em", f"model.path={answering_model}", f"train.output_dir={out}", "train.lr=1e-3", "train.epochs=2",
                  "iterations=2", "stop_when_worse=false", "metrics.eval_samples=4", "metrics.ks=[1,2,4]",
                  "metrics.baseline_samples=true"] + COMMON, capsys)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0 <= r["heldout_acc"] <= 1 and r["pass@1"] <= r["pass@2"] <= r["pass@4"] <= 1
        assert {"maj@1", "maj@4", "train_acc", "val_acc"} <= set(r)
    assert rows[1]["kept"] > 0 and rows[1]["sample_acc"] > 0 and "train_pass@4" in rows[1]
    assert (out / "iter-1" / "metrics.jsonl").is_file() and (out / "final" / "model.safetensors").is_file()
    assert "| iteration |" in (out / "table.md").read_text()
    assert result["best_iteration"] in (0, 1, 2)
    # final/ is the best iteration's model (read back from its stored train stage, or the start)
    from safetensors.torch import load_file

    final = load_file(out / "final" / "model.safetensors")
    expected = trained[result["best_iteration"] - 1] if result["best_iteration"] else load_file(f"{answering_model}/model.safetensors")
    assert len(trained) == 2 and final.keys() <= expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


def test_rejection_sampling_pools_iterations(answering_model, tmp_path, capsys):
    out = tmp_path / "rs"
    cli(["rs", f"model.path={answering_model}", f"train.output_dir={out}", "train.lr=1e-3", "iterations=2",
         "temperatures=[0.5]", "temperature_prompts=4", "reward.kind=verifier"] + COMMON, capsys)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[1]["kept_from_older"] == 0 and rows[2]["kept"] >= rows[1]["kept"]  # the pool only grows
    assert rows[2]["temperature"] in (0.5, 1.0) and "best_of_k@T=0.5" in rows[2]


def test_rejection_sampling_on_preference_prompts_with_the_gold_reward(answering_model, tmp_path, capsys):
    """A task without answers: the samples are scored by the gold rules, and every evaluation
    reports the greedy replies' mean reward instead of an accuracy (no pass@k)."""
    out = tmp_path / "rs_pref"
    result = cli(["rs", f"model.path={answering_model}", f"train.output_dir={out}", "train.lr=1e-3", "iterations=1",
                  "temperatures=[1.0]", "temperature_prompts=4", "task.source=preferences", "task.train=6", "task.heldout=4",
                  "reward.kind=gold", "min_reward=null", "metrics.eval_samples=4"]
                 + [a for a in COMMON if not a.startswith("task.")], capsys)
    rows = result["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1] and rows[1]["kept"] == 6  # the best sample of every prompt
    for r in rows:
        assert {"train_reward", "heldout_reward"} <= set(r) and -3.5 <= r["heldout_reward"] <= 2.0
        assert not any(k.endswith("_acc") or k.startswith(("pass@", "maj@")) for k in r)


def test_rejection_sampling_with_the_greedy_reply_among_the_candidates(answering_model, tmp_path, capsys):
    """`greedy=true`: each prompt's greedy reply joins its K samples, so the chosen reply's
    reward is at least the greedy reply's on every prompt, and the pool says how many were kept."""
    out = tmp_path / "rs_greedy"
    result = cli(["rs", f"model.path={answering_model}", f"train.output_dir={out}", "train.lr=1e-3", "iterations=1",
                  "temperatures=[1.0]", "temperature_prompts=4", "task.source=preferences", "task.train=6", "task.heldout=4",
                  "reward.kind=gold", "min_reward=null", "greedy=true"]
                 + [a for a in COMMON if not a.startswith("task.")], capsys)
    pool = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    greedy = {x["prompt"]: x for x in pool if x["source"].endswith("-greedy")}
    assert len(greedy) == 6 and len(pool) == 6 * 5  # K = 4 samples and the greedy reply per prompt
    best = {p: max(x["reward"] for x in pool if x["prompt"] == p) for p in greedy}
    assert all(best[p] >= greedy[p]["reward"] for p in greedy)
    row = result["iterations"][1]
    # ties go to the earliest candidate, a sample: the greedy reply is kept where it beats all K
    beats = sum(all(x["reward"] < greedy[p]["reward"] for x in pool if x["prompt"] == p and x is not greedy[p])
                for p in greedy)
    assert row["kept"] == 6 and row["kept_greedy"] == beats


def test_rejection_sampling_with_safety_context_distillation(answering_model, tmp_path, capsys, monkeypatch):
    """`safety_preprompt`: K more replies to each prompt flagged unsafe, sampled with the preprompt as
    the system message; their prompts leave it out (scored and trained on the plain prompt), and
    one is kept only where it outscores the plain samples."""
    import alignkit.algorithms.sampling.frame as frame
    from alignkit.rewards.gold import is_unsafe_prompt

    systems, real = [], frame.collect
    monkeypatch.setattr(frame, "collect", lambda *a, **kw: systems.append((list(a[2]), kw.get("system"))) or real(*a, **kw))
    out, preprompt = tmp_path / "rs_safety", "Decline harmful requests."
    result = cli(["rs", f"model.path={answering_model}", f"train.output_dir={out}", "train.lr=1e-3", "iterations=1",
                  "temperatures=[1.0]", "temperature_prompts=4", "task.source=preferences", "task.train=12", "task.heldout=2",
                  "reward.kind=gold", "min_reward=null", f"safety_preprompt={preprompt}"]
                 + [a for a in COMMON if not a.startswith("task.")], capsys)
    pool = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    unsafe = sorted({x["prompt"] for x in pool if is_unsafe_prompt(x["prompt"])})
    assert 0 < len(unsafe) < 12  # the built-in draw of 12 holds harmful requests and others
    pre = [x for x in pool if x["source"].endswith("-preprompt")]
    assert len(pre) == 4 * len(unsafe) and sorted({x["prompt"] for x in pre}) == unsafe
    assert [system for prompts, system in systems if system] == [preprompt] and all(
        sorted(set(prompts)) == unsafe for prompts, system in systems if system)
    kept = sum(max(x["reward"] for x in pre if x["prompt"] == p) > max(x["reward"] for x in pool if x["prompt"] == p
                                                                       and x not in pre) for p in unsafe)
    row = result["iterations"][1]
    assert row["preprompted"] == len(unsafe) and row["kept_preprompt"] == kept and row["kept"] == 12


@pytest.mark.parametrize("selection,online", [("local", True), ("global", False)])
def test_raft(answering_model, tmp_path, capsys, selection, online):
    out = tmp_path / "raft"
    cli(["raft", f"model.path={answering_model}", f"train.output_dir={out}", "stages=2", "prompts_per_stage=8",
         f"selection={selection}", f"online={str(online).lower()}", "fraction=0.25", "metrics.baseline=false"] + COMMON, capsys)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    # local keeps one sample per prompt; global keeps a quarter of the b*K = 32 samples
    assert all(r["kept"] == (8 if selection == "local" else 8) for r in rows)
    if selection == "local":
        assert all(r["kept_prompts"] == 8 for r in rows)
    assert all(r["kept_reward"] >= r["sample_reward"] for r in rows)


def test_rft_union_of_two_samplers(answering_model, tmp_path, capsys):
    out = tmp_path / "rft"
    result = cli(["rft", f"model.path={answering_model}", f"train.output_dir={out}", f"sampler_models=[self,{answering_model}]",
                  "sampling.n=6", "train.epochs=1", "metrics.eval_samples=0"] + COMMON, capsys)
    data = result["data"]
    assert data["paths"] > 0 and data["paths_per_covered_problem"] >= 1
    # the union is deduplicated: never more than both models' paths together
    assert data["paths"] <= data["self/paths"] + data[f"{answering_model}/paths"]
    assert [r["iteration"] for r in result["iterations"]] == [0, 1]


def test_rest_grow_and_improve_thresholds(answering_model, tmp_path, capsys):
    out = tmp_path / "rest"
    result = cli(["rest", f"model.path={answering_model}", f"train.output_dir={out}", "thresholds=[0.2,1.0]",
                  "metrics.baseline=false", "train.lr=1e-3"] + COMMON, capsys)
    steps = result["steps"]
    assert [s["threshold"] for s in steps] == [0.2, 1.0]
    assert steps[0]["kept"] >= steps[1]["kept"] > 0  # a higher threshold keeps fewer samples
    assert steps[1]["kept_reward"] == 1.0



def test_rest_with_lora_repeats_exactly(answering_model, tmp_path, capsys):
    """Fresh LoRA adapters draw from the global generator, which the run seeds: two runs agree."""
    runs = [cli(["rest", f"model.path={answering_model}", f"train.output_dir={tmp_path / name}", "thresholds=[0.2]",
                 "metrics.baseline=false", "train.lr=1e-3", "model.lora.r=4", "model.lora.alpha=8"] + COMMON, capsys)
            for name in ("a", "b")]
    losses = [[r["loss"] for r in read_metrics(tmp_path / name / "grow-1-improve-1") if "loss" in r] for name in ("a", "b")]
    assert losses[0] and losses[0] == losses[1]
    drop_time = lambda steps: [{k: v for k, v in s.items() if k != "minutes"} for s in steps]
    assert drop_time(runs[0]["steps"]) == drop_time(runs[1]["steps"])

@pytest.mark.parametrize("command,recipe", [("best-of-n", "best_of_n"), ("rs", "rs"), ("raft", "raft"), ("rft", "rft"),
                                            ("rest-em", "rest_em"), ("rest", "rest")])
def test_recipes_load(command, recipe):
    import importlib

    from alignkit.cli import COMMANDS
    from alignkit.config import load_config

    module, cls, _, _ = COMMANDS[command]
    cfg = load_config(getattr(importlib.import_module(module), cls), f"recipes/{recipe}.yaml")
    assert cfg.model.path == "default"


@pytest.mark.parametrize("scores, kept_epoch", [([0.5, 0.5, 0.4], 2), ([0.5, 0.4, 0.6], 1), ([0.3, 0.5, 0.5], 3)])
def test_train_stage_keeps_the_best_validated_epoch_and_ties_go_later(tmp_path, scores, kept_epoch):
    """Patience 1: training stops at the first epoch that validates worse than the best so far
    and restores the best weights; an equal score counts as no worse (the later epoch is kept)."""
    tok = tiny_tokenizer()
    task = problems_task(train=8, val=0, heldout=0, min_digits=1, max_digits=1, ops=["+"])
    data = tokenize_samples(tok, [Sample(p, task.answer_for(p)) for p in task.train])
    cfg = SamplingTrainConfig(output_dir=str(tmp_path), lr=1e-3, epochs=3, max_tokens_per_batch=128, progress=False)
    snapshots, calls = [], iter(scores)

    def val_fn(model):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"reward": next(calls)}

    model, metrics = train_stage(tiny_model(seed=0), tok, data, cfg, val_fn=val_fn, patience=1)
    assert metrics["val/best_epoch"] == kept_epoch and metrics["epochs_run"] == min(3, len(snapshots))
    assert len({round(float(s["lm_head.weight"].sum()), 6) for s in snapshots}) == len(snapshots)  # each epoch moved
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshots[kept_epoch - 1][k], rtol=0, atol=0)


@pytest.mark.parametrize("allow_negative", [True, False])
def test_built_in_task_negative_results_knob(allow_negative):
    """task.allow_negative=false keeps every answer of the built-in task (train, validation and
    held-out) at zero or above; the default draws some 'a - b' with a < b."""
    task = problems_task(train=200, val=20, heldout=50, ops=["-"], allow_negative=allow_negative)
    answers = [int(task.answer_for(p)) for p in task.train + task.val + task.heldout]
    assert len(answers) == 270
    assert any(a < 0 for a in answers) == allow_negative


def test_rest_em_final_model_is_an_earlier_best_iteration_read_back(answering_model, tmp_path, capsys, monkeypatch):
    """The best iteration's model is not kept in memory through later M-steps: when validation
    falls, final/ is the best iteration's stored model read back, equal to what it trained."""
    from safetensors.torch import load_file

    from alignkit.algorithms.sampling.frame import SamplingRun

    trained, train, evaluate = [], SamplingRun.train, SamplingRun.evaluate

    def record(job, *a, **k):
        out = train(job, *a, **k)
        trained.append({n: t.detach().clone() for n, t in job.policy.state_dict().items()})
        return out

    def falling(job, *a, **k):  # validation accuracy 0.5 at the start, 1.0 after iteration 1, 0.0 after 2
        return {**evaluate(job, *a, **k), "val_acc": [0.5, 1.0, 0.0][len(trained)]}

    monkeypatch.setattr(SamplingRun, "train", record)
    monkeypatch.setattr(SamplingRun, "evaluate", falling)
    out = tmp_path / "rest_em"
    result = cli(["rest-em", f"model.path={answering_model}", f"train.output_dir={out}", "train.lr=1e-3", "train.epochs=1",
                  "iterations=2", "stop_when_worse=false"] + COMMON, capsys)
    assert result["best_iteration"] == 1 and len(trained) == 2
    final = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(final[k], trained[0][k]) for k in final)
    assert not all(torch.equal(final[k], trained[1][k]) for k in final)


def test_rest_em_e_step_rounds_stop_sampling_solved_problems(answering_model, tmp_path, capsys):
    """N=4 in two rounds of 2 with cap 1: a problem solved in round 1 gets no round-2 samples, an
    unsolved one gets all 4; the kept answers are still one per solved problem."""
    out = tmp_path / "rounds"
    cli(["rest-em", f"model.path={answering_model}", f"train.output_dir={out}", "train.lr=1e-3", "train.epochs=1",
         "iterations=1", "cap_per_problem=1", "e_step_round_size=2", "metrics.eval_samples=0"] + COMMON, capsys)
    rows = [json.loads(line) for line in (out / "samples-iter-1.jsonl").read_text().splitlines()]
    by = {}
    for r in rows:
        by.setdefault(r["prompt"], []).append(r["reward"])
    assert len(by) == 16
    solved_early = [p for p, rs in by.items() if max(rs[:2]) == 1.0]
    assert solved_early and len(solved_early) < 16  # both cases occur, so the check below can fail
    for p, rs in by.items():
        assert len(rs) == (2 if p in solved_early else 4)
    log = read_metrics(out)[-1]
    assert log["samples"] == len(rows) < 4 * 16 and "train_pass@2" in log and "train_pass@4" not in log
    assert log["kept"] == sum(max(rs) == 1.0 for rs in by.values())
    assert main(["rest-em", f"model.path={answering_model}", f"train.output_dir={tmp_path / 'bad'}", "e_step_round_size=-1"]
                + COMMON) != 0
    assert "e_step_round_size must be >= 0 (0: all N samples in one round), got -1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before any work


def test_rest_em_e_step_samples_by_iteration(answering_model, tmp_path, capsys):
    """e_step_samples=[2, 4]: iteration 1 draws 2 per problem (one round of 2), iteration 2 (and
    any later) 4 (two rounds of 2); an unsolved problem gets them all."""
    out = tmp_path / "by_iteration"
    cli(["rest-em", f"model.path={answering_model}", f"train.output_dir={out}", "train.lr=1e-3", "train.epochs=1",
         "iterations=2", "cap_per_problem=1", "e_step_round_size=2", "e_step_samples=[2,4]", "stop_when_worse=false",
         "metrics.eval_samples=0"] + COMMON, capsys)
    for it, n in ((1, 2), (2, 4)):
        by = {}
        for line in (out / f"samples-iter-{it}.jsonl").read_text().splitlines():
            r = json.loads(line)
            by.setdefault(r["prompt"], []).append(r["reward"])
        assert len(by) == 16
        unsolved = [rs for rs in by.values() if max(rs) == 0.0]
        assert unsolved and all(len(rs) == n for rs in unsolved)  # every sample of N was drawn
        assert all(len(rs) in {2, n} for rs in by.values())
    solved_in_round_1 = [rs for rs in by.values() if max(rs[:2]) == 1.0]
    assert solved_in_round_1 and all(len(rs) == 2 for rs in solved_in_round_1)  # iteration 2 stopped them early
    for bad in ("e_step_samples=[4,0]", "e_step_samples=[2,x]"):
        assert main(["rest-em", f"model.path={answering_model}", f"train.output_dir={tmp_path / 'bad'}", bad]
                    + COMMON) != 0
        assert "e_step_samples" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_rest_em_few_shot_exemplars_only_in_the_first_e_step(answering_model, tmp_path, capsys, monkeypatch):
    """shots.exemplars go before the E-step prompts of iterations up to shot_iterations (1 here),
    never before the evaluation's; a malformed exemplar is refused before any work."""
    import alignkit.algorithms.sampling.problems as problems
    import alignkit.algorithms.sampling.frame as frame

    calls = []

    def spy(module):
        real = module.collect

        def collect(*args, **kwargs):
            calls.append((module.__name__.rsplit(".", 1)[-1], kwargs.get("iteration"), kwargs.get("shots", ())))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, "collect", collect)

    spy(frame)
    spy(problems)
    shots = 'shots.exemplars=[["What is 2 + 2?", "2 + 2 = 4"]]'
    cli(["rest-em", f"model.path={answering_model}", f"train.output_dir={tmp_path / 'fs'}", "train.lr=1e-3",
         "train.epochs=1", "iterations=2", "stop_when_worse=false", "metrics.eval_samples=0", "metrics.baseline=false",
         shots] + COMMON, capsys)
    e_steps = [(it, len(s)) for where, it, s in calls if where == "frame"]
    assert e_steps == [(1, 2), (2, 0)]  # one exemplar = a user and an assistant turn, in iteration 1 only
    assert [len(s) for where, _, s in calls if where == "problems"] and all(
        not s for where, _, s in calls if where == "problems")
    assert main(["rest-em", f"model.path={answering_model}", f"train.output_dir={tmp_path / 'bad'}",
                 'shots.exemplars=[["What is 2 + 2?"]]'] + COMMON) != 0
    assert "shots.exemplars[0]: expected a [question, reply] pair" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_problems_file_with_bad_rows_under_skip_writes_skipped_jsonl(answering_model, tmp_path, capsys):
    rows = [json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) for a in range(4) for b in range(5)]
    rows[3] = '{"question": "What is 1 + 1?"'  # cut short
    rows[7] = json.dumps({"question": "What is 2 + 2?"})  # no answer
    path = tmp_path / "problems.jsonl"
    path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    cli(["rest-em", f"model.path={answering_model}", f"train.output_dir={out}", "iterations=1", "train.epochs=1",
         "metrics.eval_samples=0", "metrics.ks=[1]"] + COMMON + ["task.source=problems", f"task.path={path}",
         "task.on_invalid=skip", "task.train=10", "task.val=2", "task.heldout=4"], capsys)
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["file"], s["line"]) for s in skipped] == [(str(path), 4), (str(path), 8)]
    assert all(s["reason"] for s in skipped)


def test_rejection_sampling_on_a_prompts_file_scored_by_a_reward_model(answering_model, tmp_path, capsys):
    """Llama 2's rejection sampling on open prompts: no answers, a reward-model directory scores
    the K samples, and the kept response of each prompt is the RM's favourite of all samples."""
    from alignkit.models.tiny import save_tiny
    from alignkit.rewards.model import RewardModel

    rm_dir = save_tiny(str(tmp_path / "rm"), seed=3)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n"
                               for w in ("tea", "rain", "cats", "maps", "bread", "snow")))
    out = tmp_path / "rs_rm"
    result = cli(["rs", f"model.path={answering_model}", f"train.output_dir={out}", "train.lr=1e-3", "iterations=1",
                  "temperatures=[1.0]", "temperature_prompts=2", "task.source=prompts", f"task.path={prompts}",
                  "reward.kind=model", f"reward.path={rm_dir}", "min_reward=null", "metrics.train_problems=2"]
                 + [a for a in COMMON if not a.startswith(("task.", "metrics."))], capsys)
    assert [r["iteration"] for r in result["iterations"]] == [0, 1] and result["iterations"][1]["kept"] == 6
    # the evaluation's greedy train reward is the RM's mean score of the final model's greedy replies
    from alignkit.algorithms.sampling.problems import greedy_score
    from alignkit.models.load import ModelConfig, load_model
    from alignkit.rollout.hf import HFGenerator

    task = build_task(TaskConfig(source="prompts", path=str(prompts)), RewardConfig(kind="model", path=rm_dir))
    assert isinstance(task.reward, RewardModel)
    final, tok, _ = load_model(ModelConfig(path=str(out / "final")), train=False)
    again = greedy_score(HFGenerator(final, tok, 8), tok, task, task.train[:2], max_new_tokens=4)
    assert result["iterations"][1]["train_reward"] == pytest.approx(again, abs=1e-4)


def test_rejection_sampling_pools_an_earlier_runs_samples(answering_model, tmp_path, capsys):
    """An iterative pipeline runs rs once per RLHF version: the next run scores the earlier pool
    again with its own reward and selects over both, so a prompt keeps its best sample so far."""
    first, second = tmp_path / "v1", tmp_path / "v2"
    args = ["train.lr=1e-3", "iterations=1", "temperatures=[1.0]", "temperature_prompts=2", "reward.kind=graded",
            "min_reward=null", "metrics.baseline=false"] + COMMON
    cli(["rs", f"model.path={answering_model}", f"train.output_dir={first}"] + args, capsys)
    older = [json.loads(line) for line in (first / "samples.jsonl").read_text().splitlines()]
    assert len(older) == 16 * 4 and all(s["iteration"] == 1 for s in older)
    cli(["rs", f"model.path={first / 'final'}", f"train.output_dir={second}", f"pool_files=[{first / 'samples.jsonl'}]"] + args, capsys)
    pooled = [json.loads(line) for line in (second / "samples.jsonl").read_text().splitlines()]
    assert len(pooled) == 2 * 16 * 4 and sum(s["iteration"] == 0 for s in pooled) == 16 * 4
    top = lambda p, it: max(s["reward"] for s in pooled if s["prompt"] == p and s["iteration"] == it)
    row = read_metrics(second)[-1]  # a tie goes to the older sample (the pool lists it first)
    assert row["kept"] == 16 and row["kept_from_older"] == sum(top(p, 0) >= top(p, 1) for p in {s["prompt"] for s in pooled})


def test_best_of_n_on_a_prompts_file_with_a_reward_model(answering_model, tmp_path, capsys):
    """Best-of-N on open prompts: a prompts file's rows, scored by a reward-model directory."""
    from alignkit.models.tiny import save_tiny

    rm_dir = save_tiny(str(tmp_path / "rm"), seed=5)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Describe {w}."}) + "\n" for w in ("fog", "sand", "moss")))
    out = tmp_path / "bon"
    cli(["best-of-n", f"model.path={answering_model}", "task.source=prompts", f"task.path={prompts}", "reward.kind=model",
         f"reward.path={rm_dir}", "ns=[1,2]", "sampling.n=4", "temperatures=[1.0]", "sampling.max_new_tokens=4", "threads=1",
         f"output_dir={out}"], capsys)
    best = [json.loads(line) for line in (out / "best.jsonl").read_text().splitlines()]
    assert [b["prompt"] for b in best] == ["Describe fog.", "Describe sand.", "Describe moss."]
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert rows[-1]["max_reward"] == pytest.approx(sum(b["reward"] for b in best) / 3)  # the RM's best of 4, per prompt
