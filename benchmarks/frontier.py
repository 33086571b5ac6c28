"""Reward-vs-KL frontier of DPO and PPO on the synthetic preference task (known gold reward).

Every trained policy is measured the same way against the same reference (the starting model):
sample one reply (T = 1, up to 48 new tokens) for each held-out preference prompt, score it with
the gold reward, and estimate KL(π‖π_ref) per reply as Σ_t log π − log π_ref on those samples
(`alignkit.algorithms.ppo.common.measure_policy`). The DPO paper's claim to check in spirit: DPO's
frontier dominates PPO's.

    # train and measure (each training run takes the heavy-job lock on its own)
    python benchmarks/frontier.py --ppo-betas 0,0.05,0.2 --dpo-betas 0.05,0.1,0.5
    # measure runs that already exist (directories holding final/)
    python benchmarks/frontier.py --ppo-run runs/ppo:0.05 --ppo-run runs/ppo-beta0:0 --dpo-run runs/dpo:0.1

Writes <work>/frontier.json and <work>/frontier.png.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def heavy_lock(path: str):
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def train_ppo(beta: float, args) -> Path:
    from alignkit.algorithms.ppo.loop import PPOConfig, run
    from alignkit.config import load_config

    out = Path(args.work) / f"ppo-beta{beta:g}"
    if not (out / "final" / "config.json").is_file():
        cfg = load_config(PPOConfig, str(ROOT / "recipes" / "ppo.yaml"),
                          [f"model.path={args.model}", f"kl.beta={beta}", f"train.output_dir={out}", f"iterations={args.ppo_iterations}",
                           f"train.threads={args.threads}", *args.ppo_override])
        run(cfg)
    return out


def train_dpo(beta: float, args) -> Path:
    from alignkit.algorithms.dpo import DPOConfig, run
    from alignkit.config import load_config
    from alignkit.data.tasks.preferences import build_preferences, write_jsonl
    from alignkit.rewards.gold import gold_pair

    pairs = Path(args.work) / "pairs.jsonl"
    if not pairs.is_file():
        write_jsonl(build_preferences(args.dpo_pairs, seed=0, split="train", judge=gold_pair), pairs)
    out = Path(args.work) / f"dpo-beta{beta:g}"
    if not (out / "final" / "config.json").is_file():
        cfg = load_config(DPOConfig, None, [
            f"model.path={args.model}", "model.lora.r=16", "model.lora.alpha=32", f"data.path={pairs}", f"beta={beta}",
            f"train.output_dir={out}", "train.lr=2e-4", "train.precision=bf16", f"train.threads={args.threads}",
            "train.max_tokens_per_batch=1024", f"train.epochs={args.dpo_epochs}", "train.progress=false",
            "eval.problems=0", *args.dpo_override])
        run(cfg)
    return out


def measure(run_dir: Path | None, args, reference, tokenizer) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.algorithms.ppo.actor_critic import response_logprobs
    from alignkit.algorithms.ppo.common import measure_policy
    from alignkit.data.tasks.preferences import build_prompts
    from alignkit.rewards.base import GoldReward
    from alignkit.rollout.base import SamplingParams
    from alignkit.rollout.hf import HFGenerator

    policy = reference if run_dir is None else AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).eval()
    prompts = build_prompts(args.prompts, seed=0, split="heldout")
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=args.seed)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return measure_policy(HFGenerator(policy, tokenizer, 32, dtype="bf16"), tokenizer, prompts, GoldReward(), params,
                              lambda b: response_logprobs(policy, b)[0], lambda b: response_logprobs(reference, b)[0], 16)


def parse_run(spec: str) -> tuple[float | None, Path]:
    """'DIR' or 'DIR:BETA'."""
    path, _, beta = spec.rpartition(":") if ":" in spec else (spec, "", "")
    return (float(beta) if beta else None), Path(path)


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, marker in (("base", "k*"), ("PPO", "o-"), ("DPO", "s-")):
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["kl"])
        if not pts:
            continue
        ax.plot([p["kl"] for p in pts], [p["reward"] for p in pts], marker, label=method, markersize=8)
        for p in pts:
            if p.get("beta") is not None:
                ax.annotate(f"β={p['beta']:g}", (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("KL(π ‖ π_ref) per reply (nats, held-out prompts)")
    ax.set_ylabel("gold reward (mean, held-out prompts)")
    ax.set_title("Reward vs KL: synthetic preferences, SmolLM2-135M (LoRA)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/frontier")
    ap.add_argument("--model", default="default", help="the starting model (policy and reference) of every run")
    ap.add_argument("--ppo-betas", default="", help="train PPO (recipes/ppo.yaml) with these β, comma-separated")
    ap.add_argument("--dpo-betas", default="", help="train DPO (LoRA) on the synthetic pairs with these β")
    ap.add_argument("--ppo-run", action="append", default=[], help="an existing PPO run, DIR or DIR:BETA (repeatable)")
    ap.add_argument("--dpo-run", action="append", default=[], help="an existing DPO run, DIR or DIR:BETA (repeatable)")
    ap.add_argument("--ppo-iterations", type=int, default=30)
    ap.add_argument("--ppo-override", action="append", default=[], help="extra key=value for the PPO runs")
    ap.add_argument("--dpo-pairs", type=int, default=1024)
    ap.add_argument("--dpo-epochs", type=float, default=1.0)
    ap.add_argument("--dpo-override", action="append", default=[], help="extra key=value for the DPO runs")
    ap.add_argument("--prompts", type=int, default=128, help="held-out prompts to measure on")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-only", action="store_true", help="train the runs asked for, measure nothing")
    ap.add_argument("--lock", default="/tmp/alignkit-heavy.lock", help="flock file taken around each heavy step ('' = none)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.models.load import load_tokenizer, resolve_model_path

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[str, float | None, Path]] = []
    for beta in [float(b) for b in args.ppo_betas.split(",") if b]:
        with heavy_lock(args.lock):
            runs.append(("PPO", beta, train_ppo(beta, args)))
    for beta in [float(b) for b in args.dpo_betas.split(",") if b]:
        with heavy_lock(args.lock):
            runs.append(("DPO", beta, train_dpo(beta, args)))
    if args.train_only:
        return
    runs += [("PPO", *parse_run(d)) for d in args.ppo_run]
    runs += [("DPO", *parse_run(d)) for d in args.dpo_run]

    base = resolve_model_path(args.model)
    tokenizer = load_tokenizer(base)
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    points = []
    with heavy_lock(args.lock):
        for method, beta, run_dir in [("base", None, None), *runs]:
            result = measure(run_dir, args, reference, tokenizer)
            points.append({"method": method, "beta": beta, "run": str(run_dir) if run_dir else "", **result})
            print(json.dumps(points[-1]), flush=True)
    (work / "frontier.json").write_text(json.dumps(points, indent=2) + "\n")
    plot(points, work / "frontier.png")
    print("| method | β | held-out gold reward | KL (nats/reply) | reply length |")
    print("|---|---|---|---|---|")
    for p in points:
        beta = "" if p["beta"] is None else f"{p['beta']:g}"
        print(f"| {p['method']} | {beta} | {p['reward']:.3f} | {p['kl']:.2f} | {p['length']:.1f} |")


if __name__ == "__main__":
    main()
