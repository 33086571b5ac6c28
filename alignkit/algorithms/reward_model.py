"""Reward-model training (`alignkit rm`): pairwise ranking loss, Llama 2 margins, K-way rankings.

Data: preference pairs in any format `load_preferences` reads (TRL prompt/chosen/rejected,
conversational, Anthropic HH text), K ranked responses (`load_ranked`), or, when data.path is
empty, the built-in synthetic preferences (ratings and a gold reward are known). Each prompt
with its responses is one *group*; groups are packed padding-free into rows with the prompt
computed once (alignkit.data.packing, read as in alignkit.rewards.model), and the loss is

    pairs:  −log σ(r_c − r_r − m(rating)) + c·(r_c + r_r)²        (one unit per pair)
    ranked: mean over the group's C(K,2) untied pairs of −log σ(r_better − r_worse)  (one per prompt)

Held-out accuracy is measured during training (train.eval_every) and the final model goes
through the full `rm-eval` report (per rating bucket, calibration) before it is saved to
<output_dir>/final as a plain HF SequenceClassification directory.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alignkit.algorithms.sft import split_eval
from alignkit.config import ConfigError, at_least, in_range, one_of, opt
from alignkit.data.collate import pack_groups
from alignkit.data.formats import load_feedback
from alignkit.data.io import write_skipped
from alignkit.data.packing import Group, group_row, scoring_group, shuffled
from alignkit.data.records import PreferencePair
from alignkit.data.tasks.preferences import build_preferences
from alignkit.engine import zero
from alignkit.engine.config import EvalTrainConfig
from alignkit.engine.distributed import on_main
from alignkit.engine.trainer import Engine, fit, steps_for
from alignkit.eval.reward_eval import as_pairs, evaluate_pairs
from alignkit.losses.reward import MARGIN_TABLES, margin_for_ratings, pairwise_loss, ranked_loss
from alignkit.models.load import ModelConfig, save_model
from alignkit.rewards.gold import gold_pair
from alignkit.rewards.model import RewardModel, load_reward_model, sequence_rewards

log = logging.getLogger("alignkit")


@dataclass
class RMDataConfig:
    path: str = opt("", "preference pairs or ranked responses (JSONL, JSON, Parquet, datasets dir); empty = built-in synthetic preferences")
    format: str = opt("auto", "pairs, ranked, or auto (ranked when rows have responses/completions)")
    split: str | None = opt(None, "split of a DatasetDict directory")
    eval_path: str = opt("", "held-out data in the same formats (empty = hold out eval_fraction)")
    eval_fraction: float = opt(0.05, "fraction held out when eval_path is empty")
    on_invalid: str = opt("error", "a row that cannot be used is an error (listing every one), or skip: drop it with a "
                                   "warning and list it in <output_dir>/skipped.jsonl (no usable row at all is still an error)")
    builtin_pairs: int = opt(2000, "training pairs of the built-in synthetic preferences")
    builtin_eval_pairs: int = opt(400, "held-out pairs of the built-in preferences (prompts never seen in training)")
    max_length: int = opt(512, "tokens per prompt + response (longer ones lose prompt tokens from the left)")
    subset: str = opt("all", "pairs to train and evaluate on: all, safety (the prompt is flagged unsafe, or the "
                             "safety label says a reply is unsafe) or helpfulness (the others): Llama 2's two reward models")


@dataclass
class RMConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the backbone (a causal LM, usually the SFT/chat model) or a reward model to continue")
    train: EvalTrainConfig = opt(factory=lambda: EvalTrainConfig(output_dir="runs/rm", lr=1e-5, epochs=1.0, max_tokens_per_batch=1024),
                                 help="training loop (Llama 2: 1 epoch, cosine to 10%, warmup 3%, lr 1e-5 full / ~3e-4 LoRA)")
    data: RMDataConfig = opt(factory=RMDataConfig, help="training and held-out data")
    margin: str = opt("none", "Llama 2 rating margin m(rating): none, small or large (pairs without a rating get 0)")
    center_coef: float = opt(0.0, "centring term c·(r_c + r_r)² that keeps rewards near 0 (pairs only)")
    eval_pairs: int = opt(200, "held-out pairs scored at each train.eval_every (the final report uses all)")

    def __post_init__(self):
        if self.margin not in MARGIN_TABLES:
            raise ValueError(f"margin must be one of {', '.join(MARGIN_TABLES)}, not {self.margin!r}")
        if self.data.format not in ("auto", "pairs", "ranked"):
            raise ValueError(f"data.format must be auto, pairs or ranked, not {self.data.format!r}")
        in_range(self, "data.eval_fraction", 0.0, 1.0, high_open=True)
        one_of(self, "data.on_invalid", "error", "skip")
        one_of(self, "data.subset", "all", "safety", "helpfulness")
        at_least(self, 1, "data.builtin_pairs", "data.max_length", "eval_pairs")
        at_least(self, 0, "data.builtin_eval_pairs", "center_coef")
        if self.train.deepspeed and zero.check(self.train.deepspeed, self.train.max_grad_norm) == 3:
            raise ValueError("train.deepspeed: rm evaluates through a scorer of the model being trained, whose parameters "
                             "ZeRO stage 3 partitions over the processes: use stage 1 or 2 (or train.fsdp)")


def is_safety_pair(pair: PreferencePair) -> bool:
    """A pair of the safety data: its prompt is flagged unsafe, or a reply is labelled unsafe."""
    return bool(pair.prompt_unsafe) or pair.safety in ("chosen_only_safe", "both_unsafe")


def load_items(data: RMDataConfig, seed: int, skipped: list[dict] | None = None) -> tuple[str, list, list]:
    """(kind, train records, held-out records) of `data.subset`, all validated before any model is
    loaded; rows of the files dropped by data.on_invalid=skip go to `skipped`."""
    if not data.path:
        kind, train, held = ("pairs", build_preferences(data.builtin_pairs, seed, "train", judge=gold_pair),
                             build_preferences(data.builtin_eval_pairs, seed, "heldout", judge=gold_pair))
    else:
        kind, items = load_feedback(data.path, data.split, data.format, data.on_invalid, skipped)
        if data.eval_path:
            train, held = items, load_feedback(data.eval_path, data.split, data.format, data.on_invalid, skipped)[1]
        else:
            train, held = split_eval(items, data.eval_fraction, seed)
    if data.subset == "all":
        return kind, train, held
    if kind != "pairs":
        raise ConfigError(f"data.subset={data.subset} selects preference pairs by their safety labels; this data is ranked")
    keep = lambda items: [p for p in items if is_safety_pair(p) == (data.subset == "safety")]
    train, held = keep(train), keep(held)
    if not train:
        raise ConfigError(f"data.subset={data.subset}: no training pair of {data.path or 'the built-in data'} belongs to it")
    return kind, train, held


def encode_items(tokenizer, kind: str, items: list, max_length: int, margin: str) -> list[tuple[Group, dict]]:
    """Each item as (group of token ids, loss targets): margin for pairs, scores for rankings."""
    out = []
    for it in items:
        responses = [it.chosen, it.rejected] if kind == "pairs" else list(it.responses)
        group = scoring_group(tokenizer, it.prompt, responses, max_length)
        target = {"margin": float(margin_for_ratings([it.rating], margin)[0])} if kind == "pairs" else {"scores": list(it.scores)}
        out.append((group, target))
    cut = sum(g.truncated for g, _ in out)
    if cut:
        log.warning("%d of %d groups had a sequence longer than data.max_length=%d and were truncated", cut, len(out), max_length)
    return out


def collate(encoded: list[tuple[Group, dict]]) -> dict:
    """A row of whole responses (`group_row` with `keep_last`) plus the loss targets: margin
    [G], or scores and score_mask [G, K]."""
    batch = group_row([g for g, _ in encoded], keep_last=True)
    k = max(len(g.responses) for g, _ in encoded)
    mask = torch.zeros(len(encoded), k, dtype=torch.bool)
    scores = torch.zeros(len(encoded), k)
    for i, (g, target) in enumerate(encoded):
        mask[i, : len(g.responses)] = True
        if "scores" in target:
            scores[i, : len(g.responses)] = torch.tensor(target["scores"])
    batch["score_mask"] = mask
    if "margin" in encoded[0][1]:
        batch["margin"] = torch.tensor([t["margin"] for _, t in encoded])
    else:
        batch["scores"] = scores
    return batch


def epoch_batches_fn(encoded: list[tuple[Group, dict]], max_tokens: int, seed: int):
    """epoch -> micro-batches: groups packed once (first-fit decreasing), row order shuffled per epoch."""
    return shuffled([collate([encoded[i] for i in r]) for r in pack_groups([len(g) for g, _ in encoded], max_tokens)], seed)


def rm_step(model, center_coef: float = 0.0):
    """Step function: loss summed over pairs (or over prompts for rankings), metrics summed alike."""

    def step(batch: dict):
        mask = batch["score_mask"]
        rewards = torch.zeros(mask.shape, device=mask.device).masked_scatter(mask, sequence_rewards(model, batch))
        if "margin" in batch:
            loss, metrics = pairwise_loss(rewards[:, 0], rewards[:, 1], batch["margin"], center_coef)
        else:
            loss, metrics = ranked_loss(rewards, batch["scores"], mask)
        n = loss.shape[0]
        return loss.sum(), n, {k: v.item() * n for k, v in metrics.items() if k in ("accuracy", "margin", "rewards/chosen", "rewards/rejected")}

    return step


def eval_fn(engine: Engine, rm: RewardModel, pairs: list, n_during: int, report_dir: Path):
    """Held-out accuracy, overall and per rating, of the model being trained (`rm` wraps it):
    on the first `n_during` pairs during training, on all of them with the full report written
    to `report_dir` after the last step."""

    def evaluate(_model) -> dict:
        final = engine.step >= engine.total_steps
        report = evaluate_pairs(rm, pairs if final else pairs[:n_during], report_dir if final else None)
        return {"accuracy": report["accuracy"], "mean_margin": report["mean_margin"], "ece": report["calibration"]["ece"],
                **{f"accuracy/{r}": b["accuracy"] for r, b in report["buckets"].items() if b["n"]}}

    return evaluate


def run(cfg: RMConfig) -> dict:
    skipped: list[dict] = []
    kind, train_items, eval_items = load_items(cfg.data, cfg.train.seed, skipped)
    if kind == "ranked" and cfg.center_coef:
        raise ConfigError("center_coef applies to pairwise data only (this data is ranked)")
    write_skipped(cfg.train.output_dir, skipped)
    model, tokenizer, _ = load_reward_model(cfg.model, train=True, seed=cfg.train.seed)
    encoded = encode_items(tokenizer, kind, train_items, cfg.data.max_length, cfg.margin)
    held_out = as_pairs(eval_items)
    log.info("reward model on %d %s (%d tokens with shared prompts), %d held-out pairs", len(encoded), kind,
             sum(len(g) for g, _ in encoded), len(held_out))
    batches = epoch_batches_fn(encoded, cfg.train.max_tokens_per_batch, cfg.train.seed)
    engine = Engine(model, cfg.train, steps_for(len(batches(0)), cfg.train), asdict(cfg), cfg.train.resume)
    rm = RewardModel(engine.model, tokenizer, max_length=cfg.data.max_length,
                     max_tokens=cfg.train.max_tokens_per_batch, precision=cfg.train.precision)
    report_dir = Path(cfg.train.output_dir) / "eval"
    evaluate = eval_fn(engine, rm, held_out, cfg.eval_pairs, report_dir) if held_out else None
    metrics = fit(engine, rm_step(engine.model, cfg.center_coef), batches, evaluate)

    def finish() -> dict:  # on the main process (the others wait for it): report, save final/
        if held_out:
            log.info("held-out reward-model accuracy:\n%s", (report_dir / "report.md").read_text())
            metrics["eval/report"] = str(report_dir / "report.json")
        engine.metrics.close()  # every row is logged
        final = save_model(engine.model, tokenizer, Path(cfg.train.output_dir) / "final", merge_lora=cfg.train.merge_lora)
        return {**metrics, "final_model": str(final)}

    return on_main(finish) or metrics
