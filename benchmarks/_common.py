"""Helpers shared by the online-RL benchmarks against TRL (ppo_vs_trl.py, rloo_vs_trl.py).

Each benchmark runs every side in its own subprocess (`child`), possibly under another virtual
environment's python (TRL's); a side prints one JSON line (`side_result`) that the parent
gathers into one markdown table (`table`). Imports of torch, transformers and TRL stay inside
the functions, so the parent process stays light and its peak RSS does not matter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def peak_rss_gib() -> float:
    """This process's peak resident set size so far (VmHWM), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def model_path(spec: str) -> str:
    from alignkit.models.load import resolve_model_path

    return resolve_model_path(spec)


def make_reward_model(policy: str, out: Path) -> Path:
    """The policy's backbone with a seeded one-output `score` head, saved as a plain HF directory."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def prompts(count: int) -> list[str]:
    """The first `count` built-in preference prompts (train split, seed 0): what alignkit's
    `prompts.source=preferences prompts.train=count` trains on."""
    from alignkit.data.tasks.preferences import build_prompts

    return build_prompts(count, seed=0, split="train")


def versions() -> dict:
    """Versions of the libraries this process runs with (absent ones left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{platform.platform()}, {cpu}, {os.cpu_count()} CPUs, torch threads {threads}"


def step_clock():
    """A TrainerCallback that stamps the end of every optimizer step (time.perf_counter) and the
    peak RSS at that moment, and keeps the logged completion lengths; returns (callback, record)."""
    import time

    from transformers import TrainerCallback

    record = {"stamps": [], "peak_rss_gib": float("nan"), "lengths": []}

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            record["stamps"].append(time.perf_counter())
            record["peak_rss_gib"] = peak_rss_gib()

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                record["lengths"].append(logs["completions/mean_length"])

    return Clock(), record


def iteration_times(stamps: list[float], steps_per_iteration: int = 1) -> list[float]:
    """Seconds of each iteration after the first (the warm-up), from per-optimizer-step stamps."""
    ends = stamps[steps_per_iteration - 1::steps_per_iteration]
    return [b - a for a, b in pairwise(ends)]


def side_result(side: str, times: list[float], peak: float | None = None, **extra) -> dict:
    """What a side prints as its last stdout line (the peak RSS defaults to the one so far)."""
    return {"side": side, "s_per_iteration": sum(times) / len(times), "iterations": len(times),
            "peak_rss_gib": peak_rss_gib() if peak is None else peak, "versions": versions(), **extra}


def parser(doc: str, work: str, trl_python: str, trl_help: str) -> argparse.ArgumentParser:
    """The options every benchmark here takes (the hidden ones are how the parent calls a side)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="policy: 'default' or a local HF directory")
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--trl-python", default=trl_python, help=trl_help)
    ap.add_argument("--trl-lora", action="store_true", help="also run TRL with a LoRA policy (peft_config)")
    ap.add_argument("--work", default=work)
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--rm", help=argparse.SUPPRESS)
    return ap


def prepare(args) -> None:
    """In the parent: resolve the policy directory and write the shared reward model once."""
    args.model_dir = model_path(args.model)
    args.rm = str(make_reward_model(args.model_dir, Path(args.work) / "reward-model"))


def child(script: str, side: str, args, python: str, extra: list[str] | tuple = ()) -> dict:
    """Run one side in a fresh process; its result is the last line of its stdout (JSON)."""
    cmd = [python, script, "--side", side, "--model-dir", args.model_dir, "--rm", args.rm, "--work", args.work,
           "--iterations", str(args.iterations), "--threads", str(args.threads), "--precision", args.precision, *extra]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-8000:])
        raise SystemExit(f"side {side!r} failed with exit status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(method: str, precision: str, rows: list[dict]) -> str:
    """One markdown row per side; the first row is alignkit's, the reference of both ratios
    (speed-up = side's s/iteration ÷ alignkit's; memory ratio = alignkit's peak RSS ÷ side's).
    A 'reply tokens' column appears when a row reports `reply_tokens` (blank for rows without)."""
    ours, lengths = rows[0], any("reply_tokens" in r for r in rows)
    lines = ["| method | precision | side | s / iteration | peak RSS (GiB) | speed-up | memory ratio |"
             + (" mean reply tokens |" if lengths else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if lengths else "")]
    for r in rows:
        speed = f"{r['s_per_iteration'] / ours['s_per_iteration']:.2f}x" if r is not ours else ""
        memory = f"{ours['peak_rss_gib'] / r['peak_rss_gib']:.2f}" if r is not ours else ""
        lines.append(f"| {method} | {precision} | {r['side']} | {r['s_per_iteration']:.2f} | {r['peak_rss_gib']:.2f} | {speed} "
                     f"| {memory} |" + (f" {r['reply_tokens']:.1f} |" if "reply_tokens" in r else " |" if lengths else ""))
    return "\n".join(lines)


def append_results(text: str) -> None:
    with RESULTS.open("a") as f:
        f.write(text)


def trl_models(args):
    """TRL's side of a benchmark: (tokenizer with left padding, fp32 policy, fp32 reward model,
    the LoRA peft_config when --trl-lora else None)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model_dir, padding_side="left")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    policy = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.rm, num_labels=1, dtype=torch.float32)
    peft_config = None
    if args.trl_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return tok, policy, reward, peft_config
