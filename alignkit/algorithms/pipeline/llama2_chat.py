"""`alignkit pipeline`: the Llama 2-Chat loop as one resumable run (Touvron et al. 2023, §3).

    SFT -> for i in 1..k (RLHF-Vi):
              comparisons of the newest model's samples (two per prompt, gold-labelled) join all
              earlier data -> helpfulness and safety reward models trained again on it ->
              rejection sampling from the newest model with their combined reward (best of K,
              pooled over every iteration's samples)
        -> PPO on the last RS model with the combined reward (or DPO, or nothing)
        -> Ghost Attention: SFT of the final model on GAtt dialogues (optional)

Every policy stage is evaluated against the SFT model on held-out prompts (`eval.chat`): gold
helpfulness reward, win rate judged by the gold rules, safety rate on unsafe prompts, KL to the
SFT model, reply length; every reward model on the newest samples and on the original held-out
pairs; the GAtt model by how many turns it keeps an instruction, against the SFT model. One
table prints at the end (`table.md`, `result.json`).

Each stage is an alignkit command (sft, rm, rs, ppo, dpo) whose recipe section is the command's
own keys; the pipeline sets the model paths, data files and output directories. Stages live in
`<output_dir>/<stage>/` and are fingerprinted (`stages.Stages`): a re-run skips what is done,
resumes a killed stage inside it, and re-runs a stage whose config changed and what follows it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.algorithms.pipeline.comparisons import ComparisonsConfig, compare_samples
from alignkit.algorithms.pipeline.stages import Stages, command_config
from alignkit.config import at_least, one_of, opt
from alignkit.data.tasks.preferences import (
    build_flagged_prompts,
    build_preferences,
    pair_rows,
    unsafe_prompts,
)
from alignkit.engine.logging import MetricsLogger
from alignkit.files import read_jsonl, write_jsonl_atomic, write_text_atomic
from alignkit.models.load import ModelConfig, load_model
from alignkit.precision import resolve_precision
from alignkit.rewards.gold import gold_pair

log = logging.getLogger("alignkit")

FINALS = ("ppo", "dpo", "none")


@dataclass
class PipelineDataConfig:
    sft_pairs: int = opt(256, "built-in preference pairs whose chosen replies are the SFT demonstrations")
    rm_pairs: int = opt(384, "built-in comparisons the reward models start from (before any model sample)")
    rm_eval_pairs: int = opt(128, "the original held-out comparisons (prompts never trained on)")
    rl_prompts: int = opt(96, "built-in training prompts of rejection sampling and PPO")
    eval_prompts: int = opt(64, "held-out prompts of every stage's chat evaluation (its safety rate is measured on every "
                                "held-out harmful request of the built-in data)")
    seed: int = opt(0, "seed of the built-in data")

    def __post_init__(self):
        at_least(self, 1, "sft_pairs", "rm_pairs", "rm_eval_pairs", "rl_prompts", "eval_prompts")


@dataclass
class PipelineEvalConfig:
    max_new_tokens: int = opt(48, "tokens per greedy reply of the chat evaluation")
    batch_size: int = opt(32, "prompts decoded together")
    samples: int = opt(4, "sample replies kept per stage for the report")
    gatt_dialogues: int = opt(8, "held-out dialogues of the Ghost Attention evaluation (per instruction)")
    gatt_turns: int = opt(3, "user turns per Ghost Attention evaluation dialogue")

    def __post_init__(self):
        at_least(self, 1, "max_new_tokens", "batch_size", "gatt_dialogues", "gatt_turns")
        at_least(self, 0, "samples")


@dataclass
class PipelineConfig:
    model: str = opt("default", "the pretrained (or chat) model the SFT stage starts from: a directory or default")
    output_dir: str = opt("runs/llama2_chat", "the run directory: one folder per stage, table.md, result.json")
    iterations: int = opt(2, "RLHF versions V1..Vk (iterative reward models + rejection sampling)")
    final: str = opt("ppo", "the stage on the last rejection-sampling model: ppo (combined reward), dpo (all "
                            "comparisons) or none")
    gatt: bool = opt(True, "Ghost Attention SFT of the final model, evaluated turn by turn against the SFT model")
    precision: str = opt("auto", "fp32, bf16 (autocast) or auto (bf16 where the CPU/GPU computes it natively): every stage")
    threads: int = opt(0, "torch CPU threads of every stage (0 = default)")
    keep_checkpoints: bool = opt(False, "keep an ended stage's checkpoints/ (they only serve to resume it when killed)")
    data: PipelineDataConfig = opt(factory=PipelineDataConfig, help="the built-in data of the loop")
    comparisons: ComparisonsConfig = opt(factory=ComparisonsConfig, help="iterative reward modelling: new comparisons per iteration")
    eval: PipelineEvalConfig = opt(factory=PipelineEvalConfig, help="the evaluation after every stage")
    sft: dict[str, Any] = opt(factory=dict, help="keys of `alignkit sft` for the SFT stage (model.path, data.path and "
                                                "train.output_dir are the pipeline's)")
    reward_model: dict[str, Any] = opt(factory=dict, help="keys of `alignkit rm` for both reward models (model.path, data "
                                                         "paths, data.subset and train.output_dir are the pipeline's)")
    rejection_sampling: dict[str, Any] = opt(factory=dict, help="keys of `alignkit rs` for each RLHF version (model, task, "
                                                               "reward, iterations and pool_files are the pipeline's)")
    ppo: dict[str, Any] = opt(factory=dict, help="keys of `alignkit ppo` for final=ppo (model.path, prompts and the reward "
                                                "models are the pipeline's)")
    dpo: dict[str, Any] = opt(factory=dict, help="keys of `alignkit dpo` for final=dpo (model.path and data.path are the pipeline's)")
    gatt_sft: dict[str, Any] = opt(factory=dict, help="keys of `alignkit sft` for the Ghost Attention stage (model.path, "
                                                     "data.gatt.enabled and data.gatt.mix are the pipeline's)")

    RESUMES_ON_RERUN = True  # the CLI's --resume changes nothing: a re-run skips done stages, resumes a killed one

    def __post_init__(self):
        at_least(self, 1, "iterations")
        at_least(self, 0, "threads")
        one_of(self, "final", *FINALS)
        one_of(self, "precision", "fp32", "bf16", "auto")


def _common(cfg: PipelineConfig, folder: Path) -> dict:
    """The train keys every stage shares: its output directory, precision and threads."""
    return {"output_dir": str(folder), "precision": cfg.precision, "threads": cfg.threads}


class Llama2Chat:
    """One pipeline run: its stage configs (all built, so checked, before anything runs), the
    stages and the evaluation rows."""

    def __init__(self, cfg: PipelineConfig):
        from alignkit.algorithms.dpo import DPOConfig
        from alignkit.algorithms.ppo.loop import PPOConfig
        from alignkit.algorithms.reward_model import RMConfig
        from alignkit.algorithms.sampling.rejection_sampling import RSConfig
        from alignkit.algorithms.sft import SFTConfig

        self.cfg, self.root = cfg, Path(cfg.output_dir)
        self.stages = Stages(self.root, cfg.keep_checkpoints)
        self.precision = resolve_precision(cfg.precision)
        at = lambda name: self.root / name
        data = self.root / "data"
        self.sft_cfg = command_config(SFTConfig, "sft", cfg.sft, {
            "model": {"path": cfg.model}, "train": _common(cfg, at("sft")), "data": {"path": str(data / "sft.jsonl")}})
        self.rm_cfgs, self.rs_cfgs = {}, {}
        for i in range(1, cfg.iterations + 1):
            for kind in ("helpful", "safety"):
                name = f"rm-{kind}-{i}"
                self.rm_cfgs[name] = command_config(RMConfig, name, cfg.reward_model, {
                    "model": {"path": str(self.policy_dir(0))}, "train": _common(cfg, at(name)),
                    "data": {"path": str(at(f"comparisons-{i}") / "pairs.jsonl"),
                             "eval_path": str(data / "heldout_pairs.jsonl"),
                             "subset": "helpfulness" if kind == "helpful" else "safety"}})
            self.rs_cfgs[f"rs-{i}"] = command_config(RSConfig, f"rs-{i}", cfg.rejection_sampling, {
                "model": {"path": str(self.policy_dir(i - 1))}, "train": _common(cfg, at(f"rs-{i}")), "iterations": 1,
                "task": {"source": "preferences", "train": cfg.data.rl_prompts, "seed": cfg.data.seed, "val": 0, "heldout": 0},
                "reward": self.reward_keys(i), "pool_files": [str(at(f"rs-{j}") / "samples.jsonl") for j in range(1, i)],
                "min_reward": None, "metrics": {"baseline": False}})
        last, k = str(self.policy_dir(cfg.iterations)), cfg.iterations
        self.final_cfg = None
        if cfg.final == "ppo":
            self.final_cfg = command_config(PPOConfig, "ppo", cfg.ppo, {
                "model": {"path": last}, "train": _common(cfg, at("ppo")), "reward": self.reward_keys(k),
                "prompts": {"source": "preferences", "train": cfg.data.rl_prompts, "seed": cfg.data.seed,
                            "heldout_seed": cfg.data.seed + 1}})  # PPO's early stopping never sees the evaluation's prompts
        elif cfg.final == "dpo":
            self.final_cfg = command_config(DPOConfig, "dpo", cfg.dpo, {
                "model": {"path": last}, "train": _common(cfg, at("dpo")),
                "data": {"path": str(at(f"comparisons-{k}") / "pairs.jsonl")}})
        self.gatt_cfg = command_config(SFTConfig, "gatt", cfg.gatt_sft, {
            "model": {"path": str(self.final_dir())}, "train": _common(cfg, at("gatt")),
            "data": {"gatt": {"enabled": True, "mix": "replace"}}}) if cfg.gatt else None
        self.rows: list[dict] = []

    def stage_model(self, stage: str) -> Path:
        """The model a stage writes (`<run>/<stage>/final`)."""
        return self.root / stage / "final"

    def policy_dir(self, version: int) -> Path:
        """The model of RLHF-V`version` (V0: the SFT model)."""
        return self.stage_model("sft" if version == 0 else f"rs-{version}")

    def final_dir(self) -> Path:
        return self.stage_model(self.cfg.final) if self.cfg.final != "none" else self.policy_dir(self.cfg.iterations)

    def reward_keys(self, i: int) -> dict:
        """Llama 2's combined reward of iteration i's helpfulness and safety reward models."""
        return {"kind": "combined", "helpful_path": str(self.root / f"rm-helpful-{i}" / "final"),
                "safety_path": str(self.root / f"rm-safety-{i}" / "final")}

    # -- the stages that are not commands ------------------------------------------------------
    def write_data(self, folder: Path, resume: bool) -> dict:
        """The built-in data: SFT demonstrations (the gold-preferred reply of built-in pairs, never
        an unsafe one: a demonstration is what an annotator would write), the comparisons the
        reward models start from, and the original held-out comparisons."""
        d = self.cfg.data
        pairs = build_preferences(2 * d.sft_pairs, d.seed + 1, "train", judge=gold_pair)
        sft = [p for p in pairs if p.safety != "both_unsafe"][: d.sft_pairs]
        rows = [{"prompt": p.prompt[-1].content, "completion": p.chosen} for p in sft]
        write_jsonl_atomic(folder / "sft.jsonl", rows)
        write_jsonl_atomic(folder / "pairs.jsonl", pair_rows(build_preferences(d.rm_pairs, d.seed, "train", judge=gold_pair)))
        write_jsonl_atomic(folder / "heldout_pairs.jsonl",
                           pair_rows(build_preferences(d.rm_eval_pairs, d.seed, "heldout", judge=gold_pair)))
        return {"sft_examples": len(rows), "rm_pairs": d.rm_pairs, "rm_eval_pairs": d.rm_eval_pairs}

    def comparisons(self, i: int, folder: Path, resume: bool) -> dict:
        """Iteration i's comparisons of the newest model's samples: a share held out
        (`newest.jsonl`), the rest appended to all earlier comparisons (`pairs.jsonl`)."""
        c = self.cfg.comparisons
        earlier = (self.root / "data" if i == 1 else self.root / f"comparisons-{i - 1}") / "pairs.jsonl"
        seed = self.cfg.data.seed + 100 + i
        prompts = [p for p, _ in build_flagged_prompts(c.prompts, seed, "train")
                   + build_flagged_prompts(c.unsafe_prompts, seed, "train", family="unsafe")]
        model, tokenizer = self.load(self.policy_dir(i - 1))
        pairs, stats = compare_samples(model, tokenizer, prompts, c.sampling, self.precision, self.cfg.data.seed + i)
        random.Random(seed).shuffle(pairs)  # the held-out share is drawn from every kind of prompt, not the last ones
        cut = len(pairs) - round(len(pairs) * c.newest_eval_fraction)
        write_jsonl_atomic(folder / "newest.jsonl", pair_rows(pairs[cut:]))
        older = read_jsonl(earlier)
        write_jsonl_atomic(folder / "pairs.jsonl", older + pair_rows(pairs[:cut]))
        return {**stats, "appended": cut, "held_out": len(pairs) - cut}

    def load(self, path: Path):
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        model, tokenizer, _ = load_model(ModelConfig(path=str(path)), train=False)
        return model, tokenizer

    # -- evaluation ---------------------------------------------------------------------------
    def heldout(self) -> tuple[list[str], list[str]]:
        """The held-out prompts of the chat evaluation, and the prompts of its safety rate: every
        held-out harmful request of the built-in data once (the draw repeats a few of them)."""
        rows = build_flagged_prompts(self.cfg.data.eval_prompts, self.cfg.data.seed, "heldout")
        return [p for p, _ in rows], unsafe_prompts("heldout")

    def evaluate_policy(self, stage: str, folder: Path, resume: bool) -> dict:
        """Chat evaluation of a policy stage's model against the SFT model (`eval.chat`)."""
        from alignkit.eval.chat import evaluate_chat
        from alignkit.rewards.base import GoldReward
        from alignkit.rollout.base import SamplingParams

        e = self.cfg.eval
        model, tokenizer = self.load(self.stage_model(stage))
        sft = model if stage == "sft" else self.load(self.policy_dir(0))[0]
        prompts, unsafe = self.heldout()
        # the SFT model's replies are those of its own evaluation (eval-sft), not sampled again
        sft_samples = None if stage == "sft" else read_jsonl(self.root / "eval-sft" / "samples.jsonl")
        result = evaluate_chat(model, tokenizer, sft, prompts, unsafe, GoldReward(),
                               SamplingParams(temperature=0.0, max_new_tokens=e.max_new_tokens), self.precision,
                               self.cfg.data.seed, batch_size=e.batch_size, baseline_samples=sft_samples)
        samples = result.pop("samples")
        write_jsonl_atomic(folder / "samples.jsonl", samples)
        result["samples"] = samples[: e.samples]
        return result

    def evaluate_rms(self, i: int, folder: Path, resume: bool) -> dict:
        """Accuracy of iteration i's reward models on the newest samples' held-out comparisons and
        on the original held-out comparisons (each model on its own subset)."""
        from alignkit.algorithms.reward_model import is_safety_pair
        from alignkit.data.formats import load_preferences
        from alignkit.eval.reward_eval import evaluate_pairs
        from alignkit.rewards.model import RewardModel

        out = {}
        for kind in ("helpful", "safety"):
            rm = RewardModel.from_pretrained(self.root / f"rm-{kind}-{i}" / "final", precision=self.precision)
            for label, path in (("newest", self.root / f"comparisons-{i}" / "newest.jsonl"),
                                ("original", self.root / "data" / "heldout_pairs.jsonl")):
                rows = load_preferences(str(path)) if path.stat().st_size else []  # no new pair held out: no rows
                pairs = [p for p in rows if is_safety_pair(p) == (kind == "safety")]
                report = evaluate_pairs(rm, pairs, folder / f"{kind}-{label}") if pairs else {"accuracy": None}
                out[f"{kind}_{label}_accuracy"] = report["accuracy"]
                out[f"{kind}_{label}_pairs"] = len(pairs)
        return out

    def evaluate_gatt(self, folder: Path, resume: bool) -> dict:
        """Turns an instruction of the first user turn is kept: the SFT model, the model GAtt
        started from, and the GAtt model, on the same held-out dialogues."""
        from alignkit.data.gatt import INSTRUCTIONS
        from alignkit.eval.gatt import instruction_following_by_turn

        e, out = self.cfg.eval, {}
        names = list(self.gatt_cfg.data.gatt.instructions) or list(INSTRUCTIONS)
        for label, path in (("sft", self.policy_dir(0)), ("before", self.final_dir()), ("gatt", self.stage_model("gatt"))):
            model, tokenizer = self.load(path)
            got = instruction_following_by_turn(model, tokenizer, e.gatt_dialogues, names, e.gatt_turns, self.precision,
                                                e.max_new_tokens, self.cfg.data.seed)
            out[label] = {k: got[k] for k in ("by_turn", "mean", "kept_turns")}
        return out

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> dict:
        from alignkit.algorithms import dpo, reward_model, sft
        from alignkit.algorithms.ppo import loop as ppo
        from alignkit.algorithms.sampling import rejection_sampling as rs

        cfg, st = self.cfg, self.stages
        start = time.time()
        st.run("data", asdict(cfg.data), [], self.write_data)
        st.command("sft", self.sft_cfg, ["data"], sft.run)
        self.row("SFT", st.run("eval-sft", asdict(cfg.eval), ["sft"], lambda f, r: self.evaluate_policy("sft", f, r)))
        policy = "sft"
        for i in range(1, cfg.iterations + 1):
            st.run(f"comparisons-{i}", asdict(cfg.comparisons), [policy, "data"], lambda f, r, i=i: self.comparisons(i, f, r))
            for kind in ("helpful", "safety"):
                st.command(f"rm-{kind}-{i}", self.rm_cfgs[f"rm-{kind}-{i}"], ["sft", f"comparisons-{i}"], reward_model.run)
            rms = st.run(f"eval-rm-{i}", {}, [f"rm-helpful-{i}", f"rm-safety-{i}", f"comparisons-{i}"],
                         lambda f, r, i=i: self.evaluate_rms(i, f, r))
            inputs = [policy, f"rm-helpful-{i}", f"rm-safety-{i}", *[f"rs-{j}" for j in range(1, i)]]
            st.command(f"rs-{i}", self.rs_cfgs[f"rs-{i}"], inputs, rs.run)
            policy = f"rs-{i}"
            self.row(f"RLHF-V{i} (RS)", st.run(f"eval-{policy}", asdict(cfg.eval), [policy, "eval-sft"],
                                             lambda f, r, p=policy: self.evaluate_policy(p, f, r)), rms)
        if cfg.final != "none":
            inputs = [policy, f"rm-helpful-{cfg.iterations}", f"rm-safety-{cfg.iterations}"] if cfg.final == "ppo" \
                else [policy, f"comparisons-{cfg.iterations}"]
            st.command(cfg.final, self.final_cfg, inputs, ppo.run if cfg.final == "ppo" else dpo.run)
            policy = cfg.final
            self.row(cfg.final.upper(), st.run(f"eval-{policy}", asdict(cfg.eval), [policy, "eval-sft"],
                                              lambda f, r, p=policy: self.evaluate_policy(p, f, r)))
        gatt = None
        if self.gatt_cfg is not None:
            st.command("gatt", self.gatt_cfg, [policy], sft.run)
            gatt = st.run("eval-gatt", asdict(cfg.eval), ["gatt", "sft", policy], self.evaluate_gatt)
            gatt = {k: gatt[k] for k in ("sft", "before", "gatt")}
        return self.finish(gatt, start)

    def row(self, label: str, chat: dict, rms: dict | None = None) -> None:
        keep = ("judge_reward", "win_rate", "win_ci95_low", "win_ci95_high", "safety_rate", "kl", "reply_words")
        self.rows.append({"stage": label, **{k: chat.get(k) for k in keep},
                          "rm_helpful_newest": (rms or {}).get("helpful_newest_accuracy"),
                          "rm_helpful_original": (rms or {}).get("helpful_original_accuracy"),
                          "rm_safety_original": (rms or {}).get("safety_original_accuracy"),
                          "samples": chat.get("samples", [])})

    def finish(self, gatt: dict | None, start: float) -> dict:
        table = format_table(self.rows, gatt)
        print(table, flush=True)
        (self.root / "table.md").write_text(table + "\n")
        logger = MetricsLogger(self.root, [], config=asdict(self.cfg))
        for step, r in enumerate(self.rows):
            logger.log(step, {k: v for k, v in r.items() if k != "samples" and v is not None})
        logger.close()
        result = {"stages": self.rows, "gatt": gatt, "ran": self.stages.ran, "minutes": round((time.time() - start) / 60, 2),
                  "final_model": str(self.stage_model("gatt") if gatt else self.final_dir())}
        write_text_atomic(self.root / "result.json", json.dumps(result, indent=2, default=str) + "\n")
        return result


def _cell(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict], gatt: dict | None) -> str:
    """The pipeline's one table: per stage, gold helpfulness reward, win rate vs SFT (95%
    interval), safety rate, KL to SFT, reply words and the reward models' accuracy."""
    lines = [("| stage | gold reward | win rate vs SFT (95% CI) | safety rate | KL to SFT | reply words | "
              "helpfulness RM acc. (newest / original) | safety RM acc. (original) |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        win = f"{r['win_rate']:.3f} ({r['win_ci95_low']:.2f}–{r['win_ci95_high']:.2f})"
        rm = f"{_cell(r['rm_helpful_newest'])} / {_cell(r['rm_helpful_original'])}" if r["rm_helpful_original"] is not None else "–"
        lines.append(f"| {r['stage']} | {_cell(r['judge_reward'])} | {win} | {_cell(r['safety_rate'])} | {_cell(r['kl'])} | "
                     f"{_cell(r['reply_words'])} | {rm} | {_cell(r['rm_safety_original'])} |")
    if gatt:
        lines += ["", ("Ghost Attention: turns the first turn's instruction is kept (mean), and the share of replies "
                       "that follow it by turn"), "| model | turns kept | following by turn |", "|---|---|---|"]
        names = {"sft": "SFT", "before": "before GAtt", "gatt": "GAtt"}
        lines += [f"| {name} | {gatt[k]['kept_turns']:.2f} | {' / '.join(f'{x:.2f}' for x in gatt[k]['by_turn'])} |"
                  for k, name in names.items()]
    return "\n".join(lines)


def run(cfg: PipelineConfig) -> dict:
    return Llama2Chat(cfg).run()
