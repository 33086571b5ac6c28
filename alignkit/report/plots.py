"""The report's plots, drawn with matplotlib (Agg) into PNG bytes. Each function returns None
when it has nothing to draw. Every run keeps one colour in every plot (its place in the list)."""

from __future__ import annotations

import io
import math

from alignkit.report.collect import Run, number

NO_MATPLOTLIB = "matplotlib is not installed: the report has tables only (pip install 'alignkit[plot]')"

# training-curve panels in the order shown: (metrics key, title); a panel appears when a run logged the key
CURVES = [
    ("loss", "training loss"), ("eval/loss", "held-out loss"),
    ("reward", "reward of the rollouts"), ("eval/reward", "held-out reward"),
    ("kl", "KL to the reference (nats)"), ("eval/kl", "held-out KL (nats)"),
    ("accuracy", "pair accuracy (training batches)"), ("eval/accuracy", "held-out pair accuracy"),
    ("rewards/accuracy", "implicit reward accuracy"), ("rewards/margin", "implicit reward margin"),
    ("rank_accuracy", "rank accuracy"), ("eval/arithmetic_accuracy", "held-out arithmetic accuracy"),
    ("entropy", "policy entropy"), ("response_length", "response length (tokens)"),
    ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("tokens_per_s", "tokens/s"),
]
SPLITS = [("train", "-"), ("val", ":"), ("heldout", "--"), ("sample", "-.")]


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    fig.clear()
    pyplot().close(fig)
    return buf.getvalue()


def _color(index: int) -> str:
    return f"C{index % 10}"


def series(rows: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, y) of the rows that hold a finite `key`."""
    pts = [(number(r.get(x)), number(r[key])) for r in rows if key in r]
    pts = [(a, b) for a, b in pts if a is not None and b is not None]
    return [a for a, _ in pts], [b for _, b in pts]


def _grid(plt, panels: int, cols: int = 3, height: float = 2.9):
    cols = min(cols, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, height * rows + 0.6), squeeze=False)
    flat = [a for row in axes for a in row]
    for ax in flat[panels:]:
        ax.set_visible(False)
    return fig, flat[:panels]


def _legend(fig, handles: dict) -> None:
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(4, len(handles)), fontsize=8,
               frameon=False)


def _step_axes(ax, title: str) -> None:
    """A panel of a metric against the step: whole steps, values without an offset."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False, style="sci", scilimits=(-3, 4))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _step_rows(run: Run) -> list[dict]:
    """The rows a run logged per training step: none for a pipeline, whose metrics.jsonl holds a
    row per stage (its own section plots them)."""
    return [] if run.kind == "pipeline" else run.metrics


def curve_runs(runs: list[Run]) -> list[Run]:
    """The runs that logged a metric of CURVES."""
    return [r for r in runs if any(series(_step_rows(r), k)[0] for k, _ in CURVES)]


def training_curves(runs: list[Run]) -> bytes | None:
    """One panel per logged metric of CURVES, each run a line (a lone point as a dot)."""
    plt = pyplot()
    panels = [(k, t) for k, t in CURVES if any(series(_step_rows(r), k)[0] for r in runs)]
    if plt is None or not panels:
        return None
    fig, axes = _grid(plt, len(panels))
    handles = {}
    for ax, (key, title) in zip(axes, panels):
        for i, run in enumerate(runs):
            xs, ys = series(_step_rows(run), key)
            if xs:
                (line,) = ax.plot(xs, ys, color=_color(i), marker="o" if len(xs) < 12 else None, ms=3, lw=1.3)
                handles.setdefault(run.name, line)
        _step_axes(ax, title)
    _legend(fig, handles)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    return _png(fig)


def stage_curves(runs: list[Run]) -> bytes | None:
    """The train stages' loss and validation metrics (a sampling method's sub-directories),
    each stage a line in its run's colour."""
    plt = pyplot()
    keys = ["loss"] + sorted({k for r in runs for rows in r.stages.values() for row in rows for k in row
                              if k.startswith("eval/") and number(row[k]) is not None})
    keys = [k for k in keys if any(series(rows, k)[0] for r in runs for rows in r.stages.values())]
    if plt is None or not keys:
        return None
    fig, axes = _grid(plt, len(keys))
    handles, styles = {}, ["-", "--", ":", "-."]
    for ax, key in zip(axes, keys):
        for i, run in enumerate(runs):
            for j, (stage, rows) in enumerate(run.stages.items()):
                xs, ys = series(rows, key)
                if xs:
                    (line,) = ax.plot(xs, ys, color=_color(i), ls=styles[j % 4], marker="o" if len(xs) < 12 else None, ms=3)
                    handles.setdefault(f"{run.name} · {stage}", line)
        _step_axes(ax, f"train stages: {key}")
    _legend(fig, handles)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 * math.ceil(len(handles) / 4) / fig.get_figheight()))
    return _png(fig)


def frontier_point(run: Run) -> tuple[float, float] | None:
    """(KL, reward) of a run's last evaluation (eval/kl, eval/reward), else of its last logged
    row with both kl and reward."""
    for kl_key, reward_key in (("eval/kl", "eval/reward"), ("kl", "reward")):
        for row in reversed(run.metrics):
            kl, reward = number(row.get(kl_key)), number(row.get(reward_key))
            if kl is not None and reward is not None:
                return kl, reward
    return None


def reward_vs_kl(runs: list[Run]) -> bytes | None:
    """The reward–KL frontier: one point per run that measured both (PPO, and DPO where it logs
    them), labelled with its β, with its earlier evaluations as a faint path; best-of-n runs as curves of max reward against the KL bound
    log N − (N−1)/N, one per temperature."""
    plt = pyplot()
    points = [(i, r, frontier_point(r)) for i, r in enumerate(runs)]
    points = [(i, r, p) for i, r, p in points if p is not None]
    sweeps = [(i, r) for i, r in enumerate(runs) if r.sweep]
    if plt is None or not (points or sweeps):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run, (kl, reward) in points:
        xs, ys = series([r for r in run.metrics if "eval/reward" in r], "eval/reward", "eval/kl")
        if len(xs) > 1:  # the run's evaluations on the way to its point
            ax.plot(xs, ys, color=_color(i), lw=0.8, alpha=0.4, marker=".", ms=3)
        beta = run.beta()
        label = run.name + (f" (β={beta:g})" if beta is not None else "")
        ax.scatter([kl], [reward], color=_color(i), s=40, zorder=3, label=label)
        ax.annotate(label, (kl, reward), fontsize=7, xytext=(4, 4), textcoords="offset points")
    for i, run in sweeps:
        for j, t in enumerate(sorted({r["temperature"] for r in run.sweep})):
            rows = sorted((r for r in run.sweep if r["temperature"] == t), key=lambda r: r["N"])
            ax.plot([r["kl_bound"] for r in rows], [r["max_reward"] for r in rows], color=_color(i), marker="s", ms=4,
                    ls=["-", "--", ":", "-."][j % 4], label=f"{run.name}: best of N, T={t:g} (KL bound)")
    ax.set(xlabel="KL(policy ‖ reference), nats", ylabel="reward", title="Reward vs KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def best_of_n(runs: list[Run]) -> bytes | None:
    """Max and median reward among N samples against N, one line pair per temperature (Llama 2
    Fig. 7), and the max against the temperature, one line per N (Fig. 8)."""
    plt = pyplot()
    runs = [r for r in runs if r.sweep]
    if plt is None or not runs:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.3))
    markers = ["o", "s", "^", "D", "v"]
    ns = sorted({r["N"] for run in runs for r in run.sweep})
    for ri, run in enumerate(runs):
        prefix = f"{run.name}: " if len(runs) > 1 else ""
        temps = sorted({r["temperature"] for r in run.sweep})
        for ti, t in enumerate(temps):
            rows = sorted((r for r in run.sweep if r["temperature"] == t), key=lambda r: r["N"])
            color = _color(ti + ri * len(temps))
            left.plot([r["N"] for r in rows], [r["max_reward"] for r in rows], color=color, marker=markers[ri % 5],
                      label=f"{prefix}max, T={t:g}")
            left.plot([r["N"] for r in rows], [r["median_reward"] for r in rows], color=color, ls="--", marker=markers[ri % 5],
                      mfc="none", label=f"{prefix}median, T={t:g}")
        for ni, n in enumerate(sorted({r["N"] for r in run.sweep})):
            rows = sorted((r for r in run.sweep if r["N"] == n), key=lambda r: r["temperature"])
            right.plot([r["temperature"] for r in rows], [r["max_reward"] for r in rows], color=_color(ns.index(n)),
                       marker=markers[ri % 5], ls=["-", "--", ":"][ri % 3], label=f"{prefix}N={n}")
    left.set_xscale("log", base=2)
    left.set_xticks(ns, [str(n) for n in ns])
    left.set(xlabel="N samples per prompt", ylabel="reward (mean over prompts)", title="Max and median reward among N samples")
    right.set(xlabel="temperature", ylabel="max reward among N", title="Best of N against the temperature")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def rm_reports(runs: list[Run]) -> list[tuple[str, dict, str]]:
    """(label, report, colour) of every reward-model report: a run's own in the run's colour, then
    the reward-model stages of pipelines ("run · rm-helpful-1"), each in a colour after the runs'."""
    own = [(r.name, r.rm_report, _color(i)) for i, r in enumerate(runs) if r.rm_report]
    staged = [(f"{r.name} · {stage}", rep) for r in runs for stage, rep in r.stage_rm_reports.items()]
    return own + [(label, rep, _color(len(runs) + k)) for k, (label, rep) in enumerate(staged)]


def reward_model(reports: list[tuple[str, dict, str]]) -> bytes | None:
    """Accuracy by rating bucket (bars, one per report) and calibration (predicted against observed
    accuracy per bin, one line per report); `reports` as `rm_reports` gives them."""
    plt = pyplot()
    if plt is None or not reports:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.3))
    buckets = [b for b in dict.fromkeys(b for _, rep, _ in reports for b in rep["buckets"])
               if any(rep["buckets"].get(b, {}).get("n") for _, rep, _ in reports)]
    names = buckets + ["avg"]
    width = 0.8 / len(reports)
    for ri, (label, rep, color) in enumerate(reports):
        values = [number(rep["buckets"].get(b, {}).get("accuracy")) for b in buckets] + [number(rep.get("accuracy"))]
        xs = [k + (ri - (len(reports) - 1) / 2) * width for k in range(len(names))]
        left.bar(xs, [v if v is not None else 0 for v in values], width, color=color, label=label)
    left.set_xticks(range(len(names)), [n.replace(" ", "\n") for n in names], fontsize=8)
    left.set(ylabel="held-out pair accuracy", ylim=(0, 1), title="Accuracy by rating (Llama 2 Table 8)")
    left.axhline(0.5, color="grey", lw=0.8, ls=":")
    right.plot([0.5, 1], [0.5, 1], ls="--", color="grey", label="perfect calibration")
    for label, rep, color in reports:
        cal = rep.get("calibration") or {}
        rows = [b for b in cal.get("bins", []) if b.get("n") and number(b.get("predicted")) is not None]
        ece = number(cal.get("ece"))
        right.plot([b["predicted"] for b in rows], [b["accuracy"] for b in rows], marker="o", color=color,
                   label=label + (f" (ECE {100 * ece:.1f} pts)" if ece is not None else ""))
    right.set(xlabel="predicted P(preferred is chosen) = σ(|r_c − r_r|)", ylabel="observed accuracy", xlim=(0.48, 1.02),
              ylim=(0, 1.02), title="Calibration")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def iterations(run: Run) -> bytes | None:
    """A sampling method's per-iteration rows: held-out pass@k (solid) and maj@k (dashed) per
    iteration, and train / validation / held-out accuracy (or reward) and the E-step's sample
    accuracy per iteration."""
    plt = pyplot()
    rows = run.iteration_rows()
    if plt is None or not rows:
        return None
    key = "iteration" if any("iteration" in r for r in rows) else "stage" if any("stage" in r for r in rows) else "step"
    labels = [str(r.get(key, r.get("step"))) for r in rows]
    xs = list(range(len(rows)))
    ks = sorted({int(k.split("@")[1]) for r in rows for k in r if k.startswith(("pass@", "maj@"))})
    unit = "acc" if any(f"{s}_acc" in r for r in rows for s in ("train", "val", "heldout")) else "reward"
    splits = [(s, ls) for s, ls in SPLITS if any(number(r.get(f"{s}_{unit}")) is not None for r in rows)]
    panels = (["k"] if ks else []) + (["splits"] if splits else [])
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "k":
            for j, k in enumerate(ks):
                for what, ls in (("pass", "-"), ("maj", "--")):
                    pts = [(x, number(r.get(f"{what}@{k}"))) for x, r in zip(xs, rows)]
                    pts = [(x, y) for x, y in pts if y is not None]
                    if pts:
                        ax.plot(*zip(*pts), color=_color(j), ls=ls, marker="o", ms=4, label=f"{what}@{k}")
            ax.set(ylabel="held-out accuracy", title=f"{run.name}: pass@k and maj@k")
        else:
            for j, (s, ls) in enumerate(splits):
                pts = [(x, number(r.get(f"{s}_{unit}"))) for x, r in zip(xs, rows)]
                pts = [(x, y) for x, y in pts if y is not None]
                ax.plot(*zip(*pts), color=_color(j), ls=ls, marker="o", ms=4, label=f"{s}_{unit}")
            ax.set(ylabel="accuracy" if unit == "acc" else "mean reward", title=f"{run.name}: train vs held-out")
        ax.set_xticks(xs, labels)
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def heldout_by_iteration(runs: list[Run]) -> bytes | None:
    """Held-out accuracy (or reward) per iteration across the sampling runs, when there are several."""
    plt = pyplot()
    runs_rows = [(i, r, r.iteration_rows()) for i, r in enumerate(runs)]
    runs_rows = [(i, r, rows) for i, r, rows in runs_rows if rows]
    if plt is None or len(runs_rows) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for i, run, rows in runs_rows:
        xs = [number(r.get("iteration", r.get("stage"))) for r in rows]
        xs = xs if None not in xs else list(range(len(rows)))  # ReST's iterations are labels (G1.I1): their order
        for unit in ("acc", "reward"):
            pts = [(x, number(r.get(f"heldout_{unit}"))) for x, r in zip(xs, rows)]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), color=_color(i), marker="o", label=f"{run.name}: heldout_{unit}")
                drawn = True
                break
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="iteration (0 = starting model when it was evaluated)", ylabel="held-out", title="Held-out score per iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _stage_axes(ax, labels: list[str], title: str, ylabel: str) -> None:
    """A panel of a pipeline's stages: one tick per stage, in the order they ran."""
    ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=20 if len(labels) > 4 else 0)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3)


def pipeline_rates(run: Run) -> bytes | None:
    """A pipeline's win rate against the SFT model per stage, its 95% (Wilson) interval as error
    bars, and the safety rate (safe replies to unsafe prompts) where it was measured."""
    plt = pyplot()
    rows = (run.result or {}).get("stages") or []
    if plt is None or not rows:
        return None
    labels = [str(r.get("stage")) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows) + 2), 4))
    wins = [(x, w, number(r.get("win_ci95_low")), number(r.get("win_ci95_high")))
            for x, r in enumerate(rows) if (w := number(r.get("win_rate"))) is not None]
    if wins:
        xs, ws = [x for x, *_ in wins], [w for _, w, _, _ in wins]
        err = [[w - lo if lo is not None else 0 for _, w, lo, _ in wins], [hi - w if hi is not None else 0 for _, w, _, hi in wins]]
        ax.errorbar(xs, ws, yerr=err, color="C0", marker="o", capsize=4, label="win rate vs SFT (95% interval)")
    safety = [(x, v) for x, r in enumerate(rows) if (v := number(r.get("safety_rate"))) is not None]
    if safety:
        ax.plot(*zip(*safety), color="C3", marker="s", ls="--", label="safety rate (safe replies to unsafe prompts)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="as good as SFT")
    ax.set_ylim(-0.02, 1.02)
    title = f"{run.name}: win rate vs SFT and safety rate per stage"
    _stage_axes(ax, labels, title if safety else title + "\n(no safety rate: no unsafe held-out prompt)", "rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def pipeline_reward_kl(run: Run) -> bytes | None:
    """A pipeline's gold helpfulness reward and KL to the SFT model per stage, side by side."""
    plt = pyplot()
    rows = (run.result or {}).get("stages") or []
    if plt is None or not rows:
        return None
    labels = [str(r.get("stage")) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 2.0 * len(rows) + 3), 3.8))
    for ax, key, color, title, ylabel in ((axes[0], "judge_reward", "C2", "gold helpfulness reward", "mean gold reward"),
                                          (axes[1], "kl", "C4", "KL to the SFT model", "nats per reply")):
        pts = [(x, v) for x, r in enumerate(rows) if (v := number(r.get(key))) is not None]
        if pts:
            ax.plot(*zip(*pts), color=color, marker="o")
        if key == "kl":
            ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.ticklabel_format(axis="y", useOffset=False)
        _stage_axes(ax, labels, f"{run.name}: {title}", ylabel)
    fig.tight_layout()
    return _png(fig)


GATT_MODELS = [("sft", "SFT", "o", "-"), ("before", "before GAtt", "s", "--"), ("gatt", "GAtt", "^", "-")]


def gatt_turns(run: Run) -> bytes | None:
    """Ghost Attention: the share of replies that follow the first user turn's instruction, turn by
    turn, for the SFT model, the model GAtt started from and the GAtt model (Llama 2 Fig. 9's
    question: is the instruction kept over the dialogue?)."""
    plt = pyplot()
    gatt = (run.result or {}).get("gatt")
    models = [(name, gatt[key], marker, ls) for key, name, marker, ls in GATT_MODELS
              if isinstance(gatt, dict) and isinstance(gatt.get(key), dict) and gatt[key].get("by_turn")]
    if plt is None or not models:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (name, got, marker, ls) in enumerate(models):
        kept = number(got.get("kept_turns"))
        turns = range(1, len(got["by_turn"]) + 1)
        ax.plot(turns, got["by_turn"], color=_color(i), marker=marker, ls=ls, ms=6 - i,
                label=name + (f" (turns kept: {kept:.2f})" if kept is not None else ""))
    n = max(len(got["by_turn"]) for _, got, _, _ in models)
    ax.set_xticks(range(1, n + 1))
    ax.set(xlabel="user turn", ylabel="replies following the instruction", ylim=(-0.02, 1.02),
           title=f"{run.name}: Ghost Attention, the first turn's instruction by turn")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)
