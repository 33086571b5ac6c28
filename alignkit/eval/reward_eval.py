"""Reward-model evaluation (`alignkit rm-eval`): accuracy by rating, margin, calibration.

On held-out preference pairs (or ranked responses, turned into their untied pairs):

* accuracy, overall and per Llama 2 rating bucket, laid out like Llama 2's Table 8
  (significantly better / better / slightly better / negligibly better / avg); a pair counts as
  correct when r_chosen > r_rejected (a tie is wrong);
* mean margin r_chosen − r_rejected;
* calibration: the Bradley–Terry probability that the response the model prefers is the
  human-chosen one, σ(|r_c − r_r|) (that is, σ(r_c − r_r) read from the model's side), binned
  over [0.5, 1] and set against the observed accuracy in each bin, with the expected
  calibration error (ECE: bin-size-weighted mean |accuracy − predicted|).

Writes report.json, report.md and, when matplotlib is installed, calibration.png.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import at_least, one_of, opt
from alignkit.data.records import RATINGS, PreferencePair, RankedResponses
from alignkit.data.tasks.preferences import build_preferences
from alignkit.models.load import ModelConfig
from alignkit.rewards.combine import sigmoid
from alignkit.rewards.elo import pairs_from_scores
from alignkit.rewards.gold import gold_pair

log = logging.getLogger("alignkit")
UNRATED = "unrated"


def as_pairs(items: list) -> list[PreferencePair]:
    """Preference pairs as they are; ranked responses as all their untied (better, worse) pairs."""
    out = []
    for it in items:
        if isinstance(it, RankedResponses):
            out += [PreferencePair(it.prompt, it.responses[i], it.responses[j]) for i, j in pairs_from_scores(it.scores)]
        else:
            out.append(it)
    return out


def score_pairs(rm, pairs: list[PreferencePair]) -> tuple[list[float], list[float]]:
    """(chosen rewards, rejected rewards) from a RewardModel; a pair's two responses share its prompt."""
    prompts = [p.prompt for p in pairs for _ in (0, 1)]
    responses = [r for p in pairs for r in (p.chosen, p.rejected)]
    scores = rm.score_conversations(prompts, responses)
    return scores[0::2], scores[1::2]


def _accuracy(diffs: list[float]) -> float | None:
    return sum(d > 0 for d in diffs) / len(diffs) if diffs else None


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def calibration(diffs: list[float], bins: int = 5) -> dict:
    """Predicted σ(|d|) binned over [0.5, 1] against observed accuracy; ECE over all pairs."""
    rows = []
    for b in range(bins):
        lo, hi = 0.5 + 0.5 * b / bins, 0.5 + 0.5 * (b + 1) / bins
        inside = [d for d in diffs if lo <= sigmoid(abs(d)) < hi or (b == bins - 1 and sigmoid(abs(d)) >= hi)]
        predicted = _mean([sigmoid(abs(d)) for d in inside])
        rows.append({"bin": [round(lo, 3), round(hi, 3)], "n": len(inside), "predicted": predicted, "accuracy": _accuracy(inside)})
    ece = sum(r["n"] * abs(r["accuracy"] - r["predicted"]) for r in rows if r["n"]) / max(1, len(diffs))
    return {"bins": rows, "ece": ece}


def pair_report(chosen: list[float], rejected: list[float], ratings: list[str | None], bins: int = 5) -> dict:
    """Accuracy overall and per rating, mean margin and calibration of scored pairs."""
    diffs = [c - r for c, r in zip(chosen, rejected)]
    by_rating: dict[str, list[float]] = {r: [] for r in RATINGS}
    for d, rating in zip(diffs, ratings):
        by_rating.setdefault(rating or UNRATED, []).append(d)
    buckets = {r: {"n": len(ds), "accuracy": _accuracy(ds), "mean_margin": _mean(ds)} for r, ds in by_rating.items()}
    return {"n": len(diffs), "accuracy": _accuracy(diffs), "mean_margin": _mean(diffs), "mean_chosen": _mean(chosen),
            "mean_rejected": _mean(rejected), "buckets": buckets, "calibration": calibration(diffs, bins)}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def format_tables(report: dict) -> str:
    """Markdown: accuracy by rating (Llama 2 Table 8 layout) and the calibration table."""
    names = [r for r in report["buckets"] if report["buckets"][r]["n"] or r in RATINGS]
    head = " | ".join(n.title() if n != "negligibly better" else "Negligibly Better / Unsure" for n in names)
    b = report["buckets"]
    lines = [f"| | {head} | Avg |", "|---" * (len(names) + 2) + "|",
             "| accuracy (%) | " + " | ".join(_pct(b[n]["accuracy"]) for n in names) + f" | {_pct(report['accuracy'])} |",
             "| pairs | " + " | ".join(str(b[n]["n"]) for n in names) + f" | {report['n']} |",
             "| mean margin | " + " | ".join(_num(b[n]["mean_margin"]) for n in names) + f" | {_num(report['mean_margin'])} |", "",
             "| predicted P(preferred is chosen) | pairs | mean predicted (%) | observed accuracy (%) |", "|---|---|---|---|"]
    for row in report["calibration"]["bins"]:
        lo, hi = row["bin"]
        lines.append(f"| {lo:.2f}–{hi:.2f} | {row['n']} | {_pct(row['predicted'])} | {_pct(row['accuracy'])} |")
    lines.append(f"\nexpected calibration error: {100 * report['calibration']['ece']:.1f} points")
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> Path | None:
    """Reliability diagram and accuracy by rating as a PNG; None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no calibration plot (pip install 'alignkit[plot]')")
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [r for r in report["calibration"]["bins"] if r["n"]]
    left.plot([0.5, 1], [0.5, 1], "--", color="grey", label="perfect calibration")
    left.plot([r["predicted"] for r in rows], [r["accuracy"] for r in rows], "o-", label="reward model")
    left.set(xlabel="predicted σ(|r_c − r_r|)", ylabel="observed accuracy", xlim=(0.5, 1), ylim=(0, 1.02),
             title=f"calibration (ECE {100 * report['calibration']['ece']:.1f} pts)")
    left.legend()
    names = [r for r, b in report["buckets"].items() if b["n"]]
    right.bar(range(len(names)), [report["buckets"][n]["accuracy"] for n in names])
    right.set_xticks(range(len(names)), [n.replace(" ", "\n") for n in names])
    right.axhline(report["accuracy"], color="black", linestyle=":", label=f"avg {100 * report['accuracy']:.1f}%")
    right.set(ylabel="accuracy", ylim=(0, 1), title="accuracy by rating")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate_pairs(rm, pairs: list[PreferencePair], out_dir: str | Path | None = None, bins: int = 5) -> dict:
    """Score held-out pairs with a RewardModel and report; with `out_dir`, write report.json,
    report.md and calibration.png there."""
    chosen, rejected = score_pairs(rm, pairs)
    report = pair_report(chosen, rejected, [p.rating for p in pairs], bins)
    report["table"] = format_tables(report)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot = plot_report(report, out / "calibration.png")
        report["plot"] = str(plot) if plot else "skipped: matplotlib is not installed"
        (out / "report.md").write_text(report["table"] + "\n")
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


@dataclass
class RMEvalDataConfig:
    path: str = opt("", "held-out preference pairs or ranked responses; empty = built-in synthetic held-out pairs")
    format: str = opt("auto", "pairs, ranked, or auto")
    split: str | None = opt(None, "split of a DatasetDict directory")
    builtin_pairs: int = opt(400, "built-in held-out pairs when path is empty")
    seed: int = opt(0, "seed of the built-in pairs")
    max_length: int = opt(512, "tokens per prompt + response")


@dataclass
class RMEvalConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the reward model directory (model.path)")
    data: RMEvalDataConfig = opt(factory=RMEvalDataConfig, help="held-out data")
    output_dir: str = opt("runs/rm-eval", "where report.json, report.md and calibration.png go")
    bins: int = opt(5, "calibration bins over [0.5, 1]")
    max_tokens: int = opt(2048, "tokens per packed scoring row")
    precision: str = opt("fp32", "fp32, or bf16 autocast, or auto (bf16 where the device computes it natively)")
    threads: int = opt(0, "torch CPU threads (0 = torch default)")

    def __post_init__(self):
        one_of(self, "data.format", "auto", "pairs", "ranked")
        at_least(self, 1, "data.builtin_pairs", "data.max_length", "bins", "max_tokens")
        one_of(self, "precision", "fp32", "bf16", "auto")
        at_least(self, 0, "threads")


def run(cfg: RMEvalConfig) -> dict:
    import torch

    from alignkit.data.formats import load_feedback
    from alignkit.rewards.model import RewardModel, load_reward_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.data.path:
        pairs = as_pairs(load_feedback(cfg.data.path, cfg.data.split, cfg.data.format)[1])
    else:
        pairs = build_preferences(cfg.data.builtin_pairs, cfg.data.seed, "heldout", judge=gold_pair)
    model, tokenizer, path = load_reward_model(cfg.model, train=False)
    rm = RewardModel(model.eval(), tokenizer, max_length=cfg.data.max_length, max_tokens=cfg.max_tokens, precision=cfg.precision)
    report = evaluate_pairs(rm, pairs, cfg.output_dir, cfg.bins)
    print(report["table"])
    return {"model": path, "pairs": report["n"], "accuracy": report["accuracy"], "mean_margin": report["mean_margin"],
            "by_rating": {r: b["accuracy"] for r, b in report["buckets"].items()},
            "ece": report["calibration"]["ece"], "report": str(Path(cfg.output_dir) / "report.json"), "plot": report["plot"]}
