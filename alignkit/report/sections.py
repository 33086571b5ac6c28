"""Which sections the report has, and what is in them. A section appears only when some run
holds its data: pipeline (`alignkit pipeline`: its stages' win rate, safety, gold reward and KL,
Ghost Attention, stage table, replies against SFT), training curves (any run with metrics),
reward vs KL (runs that measured both, best-of-n sweeps), best-of-n, reward model (accuracy by
rating, calibration; a pipeline's reward-model stages too), iterations of the sampling methods
(pass@k, maj@k, train vs held-out), sample replies. The runs' summary is always there."""

from __future__ import annotations

import json
import time

from alignkit.report import plots
from alignkit.report.collect import Run, number
from alignkit.report.document import (
    Document,
    Figure,
    Section,
    Table,
    Text,
    parse_markdown_table,
)
from alignkit.report.samples import pipeline_replies, sample_tables

# the last value of these keys, when logged, is a run's headline in the summary
HEADLINE = ["loss", "eval/loss", "eval/arithmetic_accuracy", "eval/accuracy", "eval/ece", "rewards/accuracy", "reward", "kl",
            "eval/reward", "eval/kl", "heldout_acc", "heldout_reward", "pass@1", "minutes"]


def fmt(value) -> str:
    v = number(value)
    if v is None:
        return "" if value is None else str(value)
    if isinstance(value, int) or v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.4g}"


def _last(rows: list[dict], key: str):
    for row in reversed(rows):
        if number(row.get(key)) is not None:
            return row[key]
    return None


def pipeline_headline(run: Run) -> list[str]:
    """The last stage's figures and the run's time, for the summary."""
    last = run.result["stages"][-1] if run.result["stages"] else {}
    figures = [f"{name} {fmt(last.get(k))}" for k, name in (("judge_reward", "gold reward"), ("win_rate", "win rate vs SFT"),
                                                             ("safety_rate", "safety rate"), ("kl", "KL to SFT"))
               if number(last.get(k)) is not None]
    parts = [f"{last.get('stage', '?')}: " + ", ".join(figures)]
    if number(run.result.get("minutes")) is not None:
        parts.append(f"{fmt(run.result['minutes'])} minutes")
    return parts


def headline(run: Run) -> str:
    if run.kind == "pipeline":
        return ", ".join(pipeline_headline(run))
    parts = [f"{k} {fmt(v)}" for k in HEADLINE if (v := _last(run.metrics, k)) is not None]
    if run.sweep:
        top = max(run.sweep, key=lambda r: (r["N"], r["max_reward"]))
        parts.append(f"best of N={top['N']}: max reward {fmt(top['max_reward'])} at T={fmt(top['temperature'])}")
    if run.rm_report and not run.metrics:
        parts.append(f"pair accuracy {fmt(run.rm_report.get('accuracy'))} on {run.rm_report.get('n')} pairs")
    for k, v in (run.result or {}).items():
        if k in ("best_iteration", "accuracy", "heldout_acc") and number(v) is not None:
            parts.append(f"result {k} {fmt(v)}")
    return ", ".join(parts)


def summary(runs: list[Run]) -> Section:
    rows = [[r.name, r.kind, str(r.path), str(len(r.metrics)), fmt(_last(r.metrics, "step")), headline(r)] for r in runs]
    parts: list = [Table(["run", "command", "directory", "rows logged", "last step", "last values"], rows)]
    for r in runs:
        if r.config:
            parts.append(Text(json.dumps(r.config, indent=2, default=str), preformatted=True, summary=f"{r.name}: config"))
    return Section("runs", "Runs", parts)


def training(runs: list[Run]) -> Section | None:
    parts: list = []
    if png := plots.training_curves(runs):
        parts.append(Figure("training-curves", png, "training curves of " + ", ".join(r.name for r in plots.curve_runs(runs))))
    if png := plots.stage_curves(runs):
        parts.append(Text("Train stages: the training runs in a run's sub-directories (each iteration of a sampling method, "
                          "each stage of a pipeline)."))
        parts.append(Figure("train-stages", png, "loss of the train stages"))
    return Section("training", "Training curves", parts) if parts else None


def frontier(runs: list[Run]) -> Section | None:
    png = plots.reward_vs_kl(runs)
    points = [(r, p) for r in runs if (p := plots.frontier_point(r)) is not None]
    if png is None and not points:
        return None
    parts: list = [Text("One point per run that measured both its reward and its KL to the reference policy (its last "
                        "evaluation), as in the DPO paper's frontier; best-of-n sweeps appear as curves at their KL bound "
                        "log N − (N−1)/N.")]
    if png:
        parts.append(Figure("reward-vs-kl", png, "reward against KL, one point per run"))
    if points:
        parts.append(Table(["run", "command", "β", "KL (nats)", "reward"],
                           [[r.name, r.kind, fmt(r.beta()), fmt(kl), fmt(reward)] for r, (kl, reward) in points]))
    return Section("reward-vs-kl", "Reward vs KL", parts)


def best_of_n(runs: list[Run]) -> Section | None:
    sweeps = [r for r in runs if r.sweep]
    if not sweeps:
        return None
    parts: list = [Text("For each temperature, the mean over prompts of the max and of the median reward among the first N "
                        "samples (Llama 2 Fig. 7), and the max against the temperature (Fig. 8).")]
    if png := plots.best_of_n(runs):
        parts.append(Figure("best-of-n", png, "max and median reward against N per temperature"))
    for r in sweeps:
        parts.append(Table(["T", "N", "KL bound", "max reward", "median reward"],
                           [[fmt(x.get("temperature")), fmt(x.get("N")), fmt(x.get("kl_bound")), fmt(x.get("max_reward")),
                             fmt(x.get("median_reward"))] for x in r.sweep], r.name))
    return Section("best-of-n", "Best of N", parts)


def reward_models(runs: list[Run]) -> Section | None:
    reps = plots.rm_reports(runs)
    if not reps:
        return None
    parts: list = []
    if png := plots.reward_model(reps):
        parts.append(Figure("reward-model", png, "reward-model accuracy by rating and calibration"))
    buckets = list(dict.fromkeys(b for _, rep, _ in reps for b in rep["buckets"]))
    pct = lambda x: "–" if number(x) is None else f"{100 * x:.1f}"
    parts.append(Table(["run", *buckets, "avg", "pairs", "ECE (pts)"],
                       [[label, *[pct(rep["buckets"].get(b, {}).get("accuracy")) for b in buckets],
                         pct(rep.get("accuracy")), fmt(rep.get("n")),
                         pct((rep.get("calibration") or {}).get("ece"))] for label, rep, _ in reps],
                       "held-out pair accuracy (%) by rating"))
    for label, rep, _ in reps:
        bins = (rep.get("calibration") or {}).get("bins", [])
        if bins:
            parts.append(Table(["predicted P(preferred is chosen)", "pairs", "mean predicted (%)", "observed accuracy (%)"],
                               [[f"{b['bin'][0]:.2f}–{b['bin'][1]:.2f}", fmt(b.get("n")), pct(b.get("predicted")),
                                 pct(b.get("accuracy"))] for b in bins], f"{label}: calibration"))
    return Section("reward-model", "Reward model", parts)


def iterations(runs: list[Run]) -> Section | None:
    looped = [(i, r) for i, r in enumerate(runs) if r.iteration_rows()]
    if not looped:
        return None
    parts: list = [Text("Per iteration of the sampling methods: held-out pass@k and maj@k, and accuracy on training, "
                        "validation and held-out problems (iteration 0 is the starting model when it was evaluated).")]
    if png := plots.heldout_by_iteration(runs):
        parts.append(Figure("heldout-by-iteration", png, "held-out score per iteration across runs"))
    for i, r in looped:
        if png := plots.iterations(r):
            parts.append(Figure(f"iterations-{i + 1}", png, f"{r.name}: pass@k, maj@k and accuracy per iteration"))
        if r.table:
            title, table = parse_markdown_table(r.table)
            if table:
                table.caption = f"{r.name}: {title}" if title else r.name
                parts.append(table)
    return Section("iterations", "Iterations", parts)


def pipeline(runs: list[Run]) -> Section | None:
    """Per pipeline run: its stages' win rate vs SFT and safety rate, gold reward and KL, the Ghost
    Attention curves, the stage table (table.md) and sample replies against the SFT model."""
    piped = [(i, r) for i, r in enumerate(runs) if r.kind == "pipeline"]
    if not piped:
        return None
    parts: list = [Text("Every policy stage of `alignkit pipeline` against the SFT model on the same held-out prompts: win "
                        "rate judged by the gold rules (its 95% Wilson interval), safety rate on unsafe prompts, mean gold "
                        "helpfulness reward, KL to the SFT model; Ghost Attention as the share of replies that keep the first "
                        "turn's instruction, turn by turn. The stages' own training runs are under Train stages, their "
                        "reward models under Reward model.")]
    for i, r in piped:
        res = r.result
        parts.append(Text(f"{r.name}: {len(res['stages'])} evaluated stages, final model {res.get('final_model', '?')}; "
                          f"stages run by its last invocation: {', '.join(res.get('ran') or []) or 'none (all were done)'}."))
        for name, make, alt in (("rates", plots.pipeline_rates, "win rate vs SFT (95% interval) and safety rate per stage"),
                                ("reward-kl", plots.pipeline_reward_kl, "gold reward and KL to SFT per stage"),
                                ("gatt", plots.gatt_turns, "Ghost Attention: instruction following by turn")):
            if png := make(r):
                parts.append(Figure(f"pipeline-{i + 1}-{name}", png, f"{r.name}: {alt}"))
        for block in (r.table or "").split("\n\n"):
            title, table = parse_markdown_table(block)
            if table:
                table.caption = f"{r.name}: {title}" if title else f"{r.name}: stages"
                parts.append(table)
        parts.extend(pipeline_replies(r))
    return Section("pipeline", "Pipeline", parts)


def samples(runs: list[Run]) -> Section | None:
    tables = [t for r in runs for t in sample_tables(r)]
    return Section("samples", "Sample replies", tables) if tables else None


def build(runs: list[Run], title: str | None = None) -> Document:
    sections = [summary(runs)]
    for make in (pipeline, training, frontier, best_of_n, reward_models, iterations, samples):
        if (s := make(runs)) is not None:
            sections.append(s)
    if plots.pyplot() is None:
        sections[0].parts.insert(0, Text(plots.NO_MATPLOTLIB))
    names = ", ".join(r.name for r in runs)
    return Document(title or f"alignkit report: {names}",
                    f"{len(runs)} run{'s' if len(runs) > 1 else ''}, written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
                    sections)
