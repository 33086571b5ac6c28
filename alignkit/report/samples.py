"""Tables of sample replies: held-out answers before and after training, a sampling method's
first and last iteration, best-of-n's best replies, a pipeline's stages against its SFT model."""

from __future__ import annotations

import re

from alignkit.report.collect import Run, number
from alignkit.report.document import Table

ROWS = 8  # replies shown per table
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(text, limit: int = 240) -> str:
    """A reply as it can be shown: control characters written as \\xNN, cut at `limit` chars."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", "" if text is None else str(text))
    if not text.strip():
        return "(blank)" if text else "(empty)"
    return text if len(text) <= limit else text[:limit] + "…"


def _mark(row: dict) -> str:
    correct = row.get("correct")
    return "✓" if correct is True else "✗" if correct is False else ""


def _reward(value) -> str:
    v = number(value)
    return "" if v is None else f"{v:.3g}"


def before_after(run: Run) -> Table | None:
    """Held-out answers of the starting model beside the trained model's (sft, dpo, rrhf with
    eval.baseline), rows whose correctness changed first; the trained model's alone otherwise."""
    if not run.eval_after:
        return None
    key = "id" if all("id" in r for r in run.eval_after) else "question"
    before = {r.get(key): r for r in run.eval_before}
    after_correct = sum(r.get("correct") is True for r in run.eval_after)
    n = len(run.eval_after)
    if before:
        rows = sorted(run.eval_after, key=lambda r: before.get(r.get(key), {}).get("correct") == r.get("correct"))
        start = sum(r.get("correct") is True for r in run.eval_before)
        body = [[clean(r.get("question")), clean(r.get("answer")),
                 f"{_mark(before.get(r.get(key), {}))} {clean(before.get(r.get(key), {}).get('response'))}".strip(),
                 f"{_mark(r)} {clean(r.get('response'))}".strip()] for r in rows[:ROWS]]
        return Table(["question", "answer", "before training", "after training"], body,
                     f"{run.name}: held-out answers, correct before {start}/{len(run.eval_before)}, after {after_correct}/{n} "
                     f"(first {min(ROWS, n)}; answers that changed correctness first)")
    body = [[clean(r.get("question")), clean(r.get("answer")), f"{_mark(r)} {clean(r.get('response'))}".strip()] for r in run.eval_after[:ROWS]]
    return Table(["question", "answer", "reply"], body, f"{run.name}: held-out answers, {after_correct}/{n} correct (first {min(ROWS, n)})")


def _first_per_prompt(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r.get("prompt", ""), []).append(r)
    return out


def by_iteration(run: Run) -> Table | None:
    """The replies of the first and the last iteration: side by side per prompt when both
    iterations sampled the same prompts (ReST-EM's E-steps), listed one after the other otherwise
    (PPO's rollouts)."""
    if not run.iteration_samples:
        return None
    first_it, last_it = min(run.iteration_samples), max(run.iteration_samples)
    first = _first_per_prompt(run.iteration_samples[first_it])
    last = _first_per_prompt(run.iteration_samples[last_it])

    def cell(group: list[dict]) -> str:
        rewards = [number(r.get("reward")) for r in group]
        rewards = [x for x in rewards if x is not None]
        mean = f" (mean reward {sum(rewards) / len(rewards):.3g} over {len(rewards)})" if len(rewards) > 1 else \
            f" (reward {rewards[0]:.3g})" if rewards else ""
        return clean(group[0].get("response")) + mean

    shared = [p for p in first if p in last]
    if first_it != last_it and shared:
        body = [[clean(p), cell(first[p]), cell(last[p])] for p in shared[:ROWS]]
        return Table(["prompt", f"iteration {first_it}", f"iteration {last_it}"], body,
                     f"{run.name}: a sampled reply per prompt (the first of its samples) in iteration {first_it} and {last_it}")
    extra = [k for k in ("kl",) if any(k in r for rows in run.iteration_samples.values() for r in rows)]
    body = []
    for it in dict.fromkeys((first_it, last_it)):
        groups = list(_first_per_prompt(run.iteration_samples[it]).items())
        for prompt, group in groups[: ROWS // 2 if first_it != last_it else ROWS]:
            body.append([str(it), clean(prompt), cell(group), *[_reward(group[0].get(k)) for k in extra]])
    what = f"iteration {first_it}" + (f" and {last_it}" if first_it != last_it else "")
    return Table(["iteration", "prompt", "reply (the first sampled)", *extra], body, f"{run.name}: sampled replies of {what}")


def best_replies(run: Run) -> Table | None:
    """best-of-n's best reply per prompt (at its best temperature)."""
    if not run.best:
        return None
    r0 = run.best[0]
    body = [[clean(r.get("prompt")), clean(r.get("response")), _reward(r.get("reward"))] for r in run.best[:ROWS]]
    return Table(["prompt", f"best of N={r0.get('N', '?')} reply", "reward"], body,
                 f"{run.name}: the best reply per prompt at T={r0.get('temperature', '?')}")


def _safe(value) -> str:
    return "safe" if value is True else "unsafe" if value is False else "–"


def pipeline_replies(run: Run) -> list[Table]:
    """A pipeline's sample replies, one table per policy stage: the SFT model's reply (the
    baseline) beside the stage's, with their gold rewards and the judged outcome. The first stage
    is the SFT model against itself, shown only when it is the only one."""
    rows = (run.result or {}).get("stages") or []
    tables = []
    for row in [r for r in rows[1:] or rows if r.get("samples")]:
        stage, samples = str(row.get("stage")), row["samples"][:ROWS]
        unsafe = any(s.get("unsafe") for s in samples)
        body = [[clean(s.get("prompt")), clean(s.get("baseline_reply")), clean(s.get("reply")),
                 f"{_reward(s.get('baseline_score'))} → {_reward(s.get('score'))}", str(s.get("outcome") or ""),
                 *([f"{_safe(s.get('baseline_safe'))} → {_safe(s.get('safe'))}"] if unsafe else [])] for s in samples]
        win = number(row.get("win_rate"))
        against = f", win rate {win:.3g} over all held-out prompts" if win is not None else ""
        tables.append(Table(["prompt", "SFT reply", f"{stage} reply", "gold reward (SFT → stage)", "outcome",
                             *(["safety (SFT → stage)"] if unsafe else [])], body,
                            f"{run.name}: {stage} against SFT on the first {len(samples)} held-out prompts{against}"))
    return tables


def sample_tables(run: Run) -> list[Table]:
    return [t for t in (before_after(run), by_iteration(run), best_replies(run)) if t is not None]
