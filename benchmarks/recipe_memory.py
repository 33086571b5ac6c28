"""Peak resident memory of every recipe in recipes/ on the default model.

Each recipe runs as its own process (`python -m alignkit COMMAND recipes/NAME.yaml ...`), as a
user runs it. The parent samples the child's VmRSS every 0.5 s, remembers the last log line the
child printed before each sample (the phase it was in), and reads the child's peak (ru_maxrss
from wait4) when it exits. One JSON line per recipe goes to --out, and a markdown table to stdout:

    python benchmarks/recipe_memory.py --out /tmp/mem.jsonl                 # every recipe, full runs
    python benchmarks/recipe_memory.py --only sft dpo --short               # shortened runs
    python benchmarks/recipe_memory.py --only sft -- train.max_steps=3      # extra overrides for each
    python benchmarks/recipe_memory.py --short --jobs 2                     # two at a time, 1 thread each

`--short` adds each recipe's SHORT overrides: fewer steps or iterations with the same shapes
(batch, sequence lengths, sample counts per prompt), so the same per-step peak is reached sooner.
A recipe's run directory is --work/NAME (runs/ by default, where the recipes write). With --jobs
N, N recipes run at once with os.cpu_count() // N torch threads each (--threads sets it); their
wall times then say nothing, and peak RSS hardly depends on the thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# recipe file -> alignkit command
COMMANDS = {
    "sft": "sft", "rm": "rm", "dpo": "dpo", "rrhf": "rrhf", "ppo": "ppo", "ppo_llama2": "ppo", "grpo": "ppo",
    "rs": "rs", "raft": "raft", "rft": "rft", "rest": "rest", "rest_em": "rest-em", "best_of_n": "best-of-n",
    "eval": "eval", "generate": "generate", "flan_study": "flan-study", "llama2_chat": "pipeline",
}
# Same shapes, fewer steps or iterations (see the module docstring).
SHORT = {
    "sft": ["train.max_steps=4", "train.eval_every=0", "eval.problems=20"],
    "rm": ["train.max_steps=4"],
    "dpo": ["train.max_steps=4", "data.pairs.problems=128", "eval.problems=20"],
    "rrhf": ["train.max_steps=4"],
    "ppo": ["iterations=2", "eval.every=0"],
    "ppo_llama2": ["iterations=2", "eval.every=0"],
    "grpo": ["iterations=2", "eval.every=0"],
    "rs": ["iterations=1"],
    "raft": ["stages=1"],
    "rest": ["thresholds=[0.25]"],
    "rest_em": ["iterations=1"],
    # fewer problems and one epoch; samples per prompt, decode batch and 512-token rows kept
    "rft": ["task.train=192", "task.heldout=64", "metrics.train_problems=16", "train.epochs=1"],
    # one decode batch (16 prompts x 16 samples x 48 tokens) per temperature
    "best_of_n": ["task.heldout=16"],
    # the base model's evaluation and one arm (all six families), 4 steps of 2048-token rows;
    # 32 items per held-out family: one decode batch of eval.batch_size each
    "flan_study": ["task_counts=[6]", "cot_ablation=false", "train.max_steps=4", "train.save_every=0", "eval.items=32"],
}


def rss_kib(pid: int) -> int:
    """Resident memory of `pid` and its live descendants, in KiB (0 once gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (OSError, ValueError):
            pass
    return total


THREADS_KEY = {"best_of_n": "threads", "llama2_chat": "threads", "eval": None, "generate": None}  # else train.threads


def run_recipe(name: str, extra: list[str], work: Path, log_dir: Path, threads: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "alignkit", COMMANDS[name], f"recipes/{name}.yaml", *extra]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        key = THREADS_KEY.get(name, "train.threads")
        cmd += [f"{key}={threads}"] if key else []
    if name == "generate":
        cmd.append(f"output={work / name / 'samples.jsonl'}")
    else:
        cmd.append(f"{'output_dir' if name in ('best_of_n', 'eval', 'llama2_chat') else 'train.output_dir'}={work / name}")
    log_path = log_dir / f"{name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        phase = {"line": ""}
        samples: list[tuple[float, int, str]] = []

        def read() -> None:
            for line in child.stdout:
                log.write(line)
                log.flush()
                if line.strip():
                    phase["line"] = line.strip()[:160]

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                child.returncode = os.waitstatus_to_exitcode(status)
                break
            samples.append((time.perf_counter() - start, rss_kib(child.pid), phase["line"]))
            time.sleep(0.5)
        reader.join()
    wall = time.perf_counter() - start
    top = max(samples, key=lambda s: s[1]) if samples else (0.0, 0, "")
    return {"recipe": name, "command": " ".join(["alignkit", *cmd[3:]]), "rc": child.returncode,
            "wall_min": round(wall / 60, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "sampled_peak_gib": round(top[1] / 2**20, 2),
            "peak_at_min": round(top[0] / 60, 2), "phase_at_peak": top[2], "log": str(log_path),
            "timeline": [(round(t, 1), kib) for t, kib, _ in samples[:: max(1, len(samples) // 400)]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="recipe names (default: all but flan_study and llama2_chat)")
    ap.add_argument("--short", action="store_true", help="add each recipe's SHORT overrides")
    ap.add_argument("--work", default="runs", help="parent of the run directories")
    ap.add_argument("--out", default="/tmp/recipe_memory.jsonl")
    ap.add_argument("--jobs", type=int, default=1, help="recipes run at once")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per recipe (default: the recipe's; with --jobs N, cores / N)")
    ap.add_argument("overrides", nargs="*", help="extra overrides for every recipe (after --)")
    args = ap.parse_args()
    names = args.only or [n for n in COMMANDS if n not in ("flan_study", "llama2_chat")]
    log_dir = Path(args.out).with_suffix(".logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    print("| recipe | peak RSS (GiB) | phase at the peak | wall (min) | exit |")
    print("|---|---|---|---|---|")
    threads = args.threads or (max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None)
    lock = threading.Lock()

    def one(name: str) -> None:
        extra = (SHORT.get(name, []) if args.short else []) + args.overrides
        r = run_recipe(name, extra, Path(args.work).resolve(), log_dir, threads)
        with lock, open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")
            print(f"| {name} | {r['peak_rss_gib']:.2f} | {r['phase_at_peak'][:80]} | {r['wall_min']:.1f} | {r['rc']} |", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, names))


if __name__ == "__main__":
    main()
