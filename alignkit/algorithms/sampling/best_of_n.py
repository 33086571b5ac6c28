"""Best-of-N (rejection sampling at inference): sample N responses, return the highest-reward one.

KL(pi_BoN || pi) <= log N - (N-1)/N (N=16: 1.835 nats, N=64: 3.175).

`alignkit best-of-n` sweeps N and the temperature as in Llama 2 Fig. 7/8: for each temperature
it samples sampling.n responses per prompt once and reads every smaller N of `ns` from the
first N of them (nested subsets: the max over N can only rise with N, and no sample is drawn
twice). The temperatures swept are sampling.temperature and those of `temperatures`.
For each (T, N) it reports the mean over prompts of the max and of the median reward among N
samples, writes `sweep.jsonl`, `table.md`, `best.jsonl` (the best of sampling.n per prompt at the
best temperature) and `curves.png` (when matplotlib is installed).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.algorithms.sampling.stages import Sample, best_per_prompt, by_prompt, collect, score
from alignkit.config import at_least, non_empty, one_of, opt
from alignkit.data.io import write_skipped
from alignkit.models.load import ModelConfig, load_model
from alignkit.precision import resolve_precision
from alignkit.rollout.base import SamplingConfig, SamplingParams
from alignkit.rollout.backends import make_generator
from alignkit.tasks import RewardConfig, TaskConfig, build_task

log = logging.getLogger("alignkit")


def kl_bound(n: int) -> float:
    """Upper bound on KL(best-of-n || base policy), in nats: log n - (n - 1) / n."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n(generator, tokenizer, prompts: list[str], reward_fn, params: SamplingParams) -> list[Sample]:
    """The highest-reward of `params.n` samples for each user prompt text."""
    return best_per_prompt(score(collect(generator, tokenizer, prompts, params), reward_fn))


@dataclass
class BestOfNConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the policy to sample from")
    task: TaskConfig = opt(factory=lambda: TaskConfig(source="preferences", train=0, val=0, heldout=32, heldout_seed=None),
                           help="the prompts: the task's held-out split (task.heldout of them); a prompts or problems "
                                "file without task.heldout_path: its rows (at most task.train of them)")
    reward: RewardConfig = opt(factory=RewardConfig, help="the reward (auto: gold for preferences, verifier for problems)")
    ns: list[int] = opt(factory=lambda: [1, 2, 4, 8], help="values of N reported besides sampling.n (each at most sampling.n: "
                                                       "the first N of the same samples)")
    temperatures: list[float] = opt(factory=lambda: [0.7, 1.3], help="temperatures swept besides sampling.temperature")
    sampling: SamplingConfig = opt(factory=lambda: SamplingConfig(n=16, max_new_tokens=48, batch_size=16),
                                   help="sampling (n: samples per prompt, the largest N)")
    precision: str = opt("fp32", "sampling precision: fp32, bf16 (autocast), or auto (bf16 where the device computes it natively)")
    threads: int = opt(0, "torch CPU threads (0 = default)")
    seed: int = opt(0, "sampling seed")
    output_dir: str = opt("runs/best_of_n", "sweep.jsonl, table.md, best.jsonl, curves.png")

    def __post_init__(self):
        non_empty(self, "ns", "temperatures")
        if min(self.ns) < 1:
            raise ValueError(f"ns must hold integers >= 1, got {self.ns}")
        one_of(self, "precision", "fp32", "bf16", "auto")
        at_least(self, 0, "threads")


def sweep_rows(samples: list[Sample], ns: list[int]) -> list[dict]:
    """Mean over prompts of the max and median reward among the first N samples, for each N."""
    groups = [sorted(g, key=lambda x: x.sample_index) for g in by_prompt(samples).values()]
    rows = []
    for n in ns:
        maxes = [max(x.reward for x in g[:n]) for g in groups]
        medians = [statistics.median(x.reward for x in g[:n]) for g in groups]
        rows.append({"N": n, "kl_bound": kl_bound(n), "max_reward": sum(maxes) / len(maxes),
                     "median_reward": sum(medians) / len(medians)})
    return rows


def plot(rows: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    temps = sorted({r["temperature"] for r in rows})
    ns = sorted({r["N"] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for t in temps:
        rs = [r for r in rows if r["temperature"] == t]
        line, = left.plot([r["N"] for r in rs], [r["max_reward"] for r in rs], marker="o", label=f"max, T={t}")
        left.plot([r["N"] for r in rs], [r["median_reward"] for r in rs], ls="--", color=line.get_color(), label=f"median, T={t}")
    left.set(xscale="log", xlabel="N samples", ylabel="reward (mean over prompts)", title="Reward among N samples (cf. Llama 2 Fig. 7)")
    left.set_xticks(ns, [str(n) for n in ns])
    left.legend(fontsize=7)
    for n in ns:
        rs = sorted((r for r in rows if r["N"] == n), key=lambda r: r["temperature"])
        right.plot([r["temperature"] for r in rs], [r["max_reward"] for r in rs], marker="o", label=f"N={n}")
    right.set(xlabel="temperature", ylabel="max reward among N", title="Best-of-N vs temperature (cf. Llama 2 Fig. 8)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def run(cfg: BestOfNConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = build_task(cfg.task, cfg.reward, resolve_precision(cfg.precision))
    prompts, reward_fn = task.heldout or task.train, task.reward
    if not prompts:
        raise ValueError("best-of-n: no prompts (task.heldout is 0 and the task has no training prompts)")
    model, tokenizer, _ = load_model(cfg.model, train=False)
    generator = make_generator(model, tokenizer, cfg.sampling.batch_size, resolve_precision(cfg.precision),
                               cfg.sampling.backend)
    ns, big = sorted({*cfg.ns, cfg.sampling.n}), cfg.sampling.n
    if ns[-1] > big:
        raise ValueError(f"ns must not exceed sampling.n={big} (the samples drawn per prompt), got {cfg.ns}")
    temperatures = sorted({*cfg.temperatures, cfg.sampling.temperature})
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_skipped(out, task.skipped)
    rows, best_rows = [], {}
    for t in temperatures:
        samples = score(collect(generator, tokenizer, prompts, cfg.sampling.params(cfg.seed, n=big, temperature=t)), reward_fn)
        rows.extend({"temperature": t, **r} for r in sweep_rows(samples, ns))
        best_rows[t] = best_per_prompt(samples)
        log.info("T=%.2f: %s", t, rows[-1])
    best_t = max(temperatures, key=lambda t: next(r["max_reward"] for r in rows if r["temperature"] == t and r["N"] == big))
    (out / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "best.jsonl").write_text("".join(json.dumps({"prompt": x.prompt, "response": x.response, "reward": x.reward,
                                                        "temperature": best_t, "N": big}) + "\n" for x in best_rows[best_t]))
    lines = ["| T | N | KL bound | max reward | median reward |", "|---|---|---|---|---|"]
    lines += [f"| {r['temperature']} | {r['N']} | {r['kl_bound']:.3f} | {r['max_reward']:.3f} | {r['median_reward']:.3f} |" for r in rows]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table, flush=True)
    note = plot(rows, out / "curves.png")
    if note:
        log.warning(note)
    return {"best_temperature": best_t, "rows": rows, "plot": note or str(out / "curves.png"), "output_dir": str(out)}
