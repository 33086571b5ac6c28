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
    return run_side(script, side, ["--model-dir", args.model_dir, "--rm", args.rm, "--work", args.work,
                                   "--iterations", str(args.iterations), "--threads", str(args.threads),
                                   "--precision", args.precision, *extra], python)


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
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

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


# --- Shared by the offline-training benchmarks (sft_vs_trl.py, rm_vs_trl.py) -------------------
#
# Each of these runs three children: the machine's matmul rate at the model's shapes ("matmul"),
# alignkit's side and TRL's side, every one in a fresh process. The parent tokenizes the data once
# and writes it to the work directory, so both sides train on the same token ids.

def run_side(script: str, side: str, argv: list[str], python: str) -> dict:
    """Run `script --side side argv...` under `python`; its result is the last line of its stdout (JSON)."""
    cmd = [python, script, "--side", side, *argv]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-8000:])
        raise SystemExit(f"side {side!r} failed with exit status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def model_shapes(model_dir: str) -> dict:
    """What the FLOP count needs from a Llama-style config.json: hidden size d, layers, the
    attention width (heads x head dim), the key/value width, the MLP width and the vocabulary."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return {"d": cfg["hidden_size"], "layers": cfg["num_hidden_layers"], "q": cfg["num_attention_heads"] * head_dim,
            "kv": cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim,
            "ff": cfg["intermediate_size"], "vocab": cfg["vocab_size"]}


def decoder_linears(s: dict) -> list[tuple[int, int]]:
    """(in, out) of the linear layers of one decoder layer: q, k, v, o, gate, up, down."""
    d, q, kv, ff = s["d"], s["q"], s["kv"], s["ff"]
    return [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)]


FLOPS_DOC = """model FLOPs of a step (counted on the logical sequences, each as if run alone, no padding):
  6·P·T + 6·L·A·Σ n(n+1) + 6·H·N  (full fine-tuning)
  4·P·T + 6·R·T + 6·L·A·Σ n(n+1) + 4·H·N  (LoRA: no weight gradients for the frozen base; 6·H·N for a
  reward head, which trains in full)
where P = weights of the decoder linears (q, k, v, o, gate, up, down: L·(2·d·A + 2·d·K + 3·d·F)), T = tokens,
n = each sequence's length (causal attention: QKᵀ and AV over n(n+1)/2 visible pairs, 2 FLOPs a multiply-add,
times 3 for forward + backward), L layers, A = attention width (heads x head dim), K = key/value width,
F = MLP width, H = output head weights (d·V for the LM head, applied only at the N target tokens, which is
what both sides compute; d·1 for a reward head, applied at each sequence's last token), R = LoRA weights
per token (r·(in+out) per adapted linear). Embedding lookups and norms count 0."""


FLOPS_SHORT = ("MFU = model FLOPs per step (6·P·T + 6·L·A·Σn(n+1) + 6·H·N; LoRA 4·P·T + 6·R·T + the same attention "
               "and head terms, the frozen LM head at 4·H·N: benchmarks/_common.py FLOPS_DOC) ÷ median s/step ÷ the "
               "measured matmul peak")


def cpu_description() -> str:
    """Family/model/stepping of the CPU and the flags that decide the matmul kernels (AVX2, AVX-512, bf16, AMX)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        return "cpuinfo unreadable"
    flags = set(info.get("flags", "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"]
    have = [f for f in wanted if f in flags]
    return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}, "
            f"stepping {info.get('stepping', '?')}); flags: {' '.join(have) or 'none of ' + ' '.join(wanted)}")


def step_flops(shapes: dict, lengths: list[int], head_tokens: int, head_width: int, lora_rank: int = 0,
               head_trained: bool = False) -> float:
    """Model FLOPs of one optimizer step over sequences of `lengths` (see FLOPS_DOC); with LoRA the
    head counts 4 FLOPs a weight and token unless `head_trained` (a reward head trains in full)."""
    s = shapes
    linears = decoder_linears(s)
    p = s["layers"] * sum(i * o for i, o in linears)
    tokens = sum(lengths)
    attention = 6 * s["layers"] * s["q"] * sum(n * (n + 1) for n in lengths)
    head = s["d"] * head_width * head_tokens
    if lora_rank:
        r = s["layers"] * sum(lora_rank * (i + o) for i, o in linears)
        return 4 * p * tokens + 6 * r * tokens + attention + (6 if head_trained else 4) * head
    return 6 * p * tokens + attention + 6 * head


def matmul_rate(shapes: dict, tokens: int, precision: str, threads: int, seconds: float = 0.5) -> dict:
    """The machine's matmul rate (TFLOP/s) at the model's own shapes, in the run's dtype: [tokens x d] @
    [d x A], [d x F], [F x d] and the LM head [d x V] (its rows capped at 2048). Each shape runs
    repeatedly for about `seconds` after a warm-up; its best repeat counts. The peak is the fastest shape."""
    import time

    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    d = shapes["d"]
    cases = {f"[{tokens}x{d}]@[{d}x{shapes['q']}]": (tokens, d, shapes["q"]),
             f"[{tokens}x{d}]@[{d}x{shapes['ff']}]": (tokens, d, shapes["ff"]),
             f"[{tokens}x{shapes['ff']}]@[{shapes['ff']}x{d}]": (tokens, shapes["ff"], d),
             f"[{min(tokens, 2048)}x{d}]@[{d}x{shapes['vocab']}]": (min(tokens, 2048), d, shapes["vocab"])}
    rates = {}
    gen = torch.Generator().manual_seed(0)
    for name, (m, k, n) in cases.items():
        a = torch.randn(m, k, generator=gen).to(dtype)
        b = torch.randn(k, n, generator=gen).to(dtype)
        for _ in range(2):
            torch.matmul(a, b)
        best, spent = float("inf"), 0.0
        while spent < seconds:
            start = time.perf_counter()
            torch.matmul(a, b)
            took = time.perf_counter() - start
            best, spent = min(best, took), spent + took
        rates[name] = 2 * m * k * n / best / 1e12
        del a, b
    return {"rates_tflops": rates, "peak_tflops": max(rates.values()), "dtype": str(dtype).removeprefix("torch."),
            "threads": threads, "versions": versions()}


def balanced_steps(lengths: list[int], steps: int, per_step: int) -> list[list[int]]:
    """Indices of `steps * per_step` examples dealt longest-first over the steps in a snake order
    (0, 1, ..., S-1, S-1, ..., 0, ...): every step gets `per_step` examples and about the same tokens."""
    order = sorted(range(steps * per_step), key=lambda i: -lengths[i])
    out: list[list[int]] = [[] for _ in range(steps)]
    for k, i in enumerate(order):
        lap, pos = divmod(k, steps)
        out[pos if lap % 2 == 0 else steps - 1 - pos].append(i)
    return [sorted(s) for s in out]


def offline_result(side: str, stamps: list[float], tokens: list[int], flops: list[float], loss: float,
                   computed: list[int] | None = None, **extra) -> dict:
    """A side's result from the perf_counter stamps at the end of every optimizer step (the first
    step is the warm-up), the logical tokens and model FLOPs of each step, and its step-1 loss.
    `computed`: the tokens the side actually ran through the model per step (padding included,
    shared prompts once)."""
    import statistics

    times = iteration_times(stamps)
    if not times:
        raise SystemExit("need at least 2 steps (the first is a warm-up)")
    median = statistics.median(times)
    timed = slice(1, 1 + len(times))
    out = {"side": side, "s_per_step": median, "times": times, "steps_timed": len(times),
           "tokens_per_step": statistics.mean(tokens[timed]), "flops_per_step": statistics.mean(flops[timed]),
           "loss_step1": loss, "peak_rss_gib": peak_rss_gib(), "versions": versions(), **extra}
    if computed is not None:
        out["computed_tokens_per_step"] = statistics.mean(computed[timed])
    return out


def offline_table(method: str, mode: str, precision: str, rows: list[dict], peak_tflops: float) -> str:
    """Markdown table of the sides (alignkit's first): median s/step, logical tokens/s, model
    TFLOP/s and MFU (against the measured matmul peak), peak RSS, step-1 loss, speed-up (the
    side's s/step ÷ alignkit's) and memory ratio (alignkit's peak RSS ÷ the side's)."""
    ours = rows[0]
    lines = [("| method | mode | precision | side | s / step (median) | tokens / step | computed tokens / step | tokens / s "
              "| model TFLOP/s | MFU | peak RSS (GiB) | step-1 loss | speed-up | memory ratio |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = r["flops_per_step"] / r["s_per_step"] / 1e12
        speed = f"{r['s_per_step'] / ours['s_per_step']:.2f}x" if r is not ours else ""
        memory = f"{ours['peak_rss_gib'] / r['peak_rss_gib']:.2f}" if r is not ours else ""
        computed = f"{r['computed_tokens_per_step']:.0f}" if "computed_tokens_per_step" in r else "–"
        lines.append(f"| {method} | {mode} | {precision} | {r['side']} | {r['s_per_step']:.3f} | {r['tokens_per_step']:.0f} "
                     f"| {computed} | {r['tokens_per_step'] / r['s_per_step']:.0f} | {rate:.3f} | {rate / peak_tflops:.1%} "
                     f"| {r['peak_rss_gib']:.2f} | {r['loss_step1']:.6f} | {speed} | {memory} |")
    return "\n".join(lines)


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, check=False)
    return out.stdout.strip() + (" (working tree modified)" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"


def offline_parser(doc: str, work: str) -> argparse.ArgumentParser:
    """The options of sft_vs_trl.py and rm_vs_trl.py (the hidden ones are how the parent calls a side)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF directory")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per side; the first is a warm-up (median of 2..N)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="fp32, or bf16 autocast with fp32 weights on both sides (only meaningful where bf16 is native)")
    ap.add_argument("--lora", action="store_true", help="LoRA r=16, alpha 32, all linear layers, on both sides (default: full)")
    ap.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (constant, no warm-up)")
    ap.add_argument("--trl-python", default="/work/trl-venv/bin/python", help="python of the venv with trl (1.16)")
    ap.add_argument("--trl-malloc", action="store_true",
                    help="also give TRL's process the glibc malloc settings alignkit's CLI applies (an ablation)")
    ap.add_argument("--loss-tol", type=float, default=None, help="allowed |step-1 loss difference| (default per script)")
    ap.add_argument("--work", default=work)
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    return ap


OPTIMIZER = {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "max_grad_norm": 1.0}


def trl_optimizer_args(args) -> dict:
    """TRL's (transformers TrainingArguments') names for the shared optimizer settings."""
    return {"learning_rate": args.lr, "lr_scheduler_type": "constant", "warmup_steps": 0,
            "weight_decay": OPTIMIZER["weight_decay"], "adam_beta1": OPTIMIZER["beta1"], "adam_beta2": OPTIMIZER["beta2"],
            "adam_epsilon": OPTIMIZER["eps"], "max_grad_norm": OPTIMIZER["max_grad_norm"], "optim": "adamw_torch_fused",
            "bf16": args.precision == "bf16", "fp16": False, "gradient_checkpointing": False, "use_cpu": True,
            "logging_steps": 1, "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "seed": 0,
            "dataloader_num_workers": 0, "train_sampling_strategy": "sequential", "max_steps": args.steps,
            "gradient_accumulation_steps": 1}


def alignkit_train_config(args, out: Path):
    """alignkit's engine settings for the same optimizer (the `train` section of `alignkit sft`/`rm`)."""
    from alignkit.engine.config import TrainConfig

    return TrainConfig(output_dir=str(out), lr=args.lr, schedule="constant", warmup_ratio=0.0, warmup_steps=0,
                       beta1=OPTIMIZER["beta1"], beta2=OPTIMIZER["beta2"], eps=OPTIMIZER["eps"],
                       weight_decay=OPTIMIZER["weight_decay"], max_grad_norm=OPTIMIZER["max_grad_norm"],
                       precision=args.precision, threads=args.threads, progress=False, device="cpu", seed=0)


def offline_record(title: str, command: str, notes: str, text: str, matmul: dict, rows: list[dict], threads: int) -> None:
    """Append a dated section to RESULTS.md: the command, the machine, the commit, the versions and the table."""
    import datetime

    trl = next((r["versions"].get("trl") for r in rows if "trl" in r["versions"]), "?")
    ours = rows[0]["versions"]
    append_results(f"\n### {title} ({datetime.date.today()}, commit {git_commit()})\n\n`{command}`\n\n"
                   f"Machine: {machine(threads)}; {cpu_description()}. alignkit side: torch {ours.get('torch')}, transformers "
                   f"{ours.get('transformers')}; TRL {trl}. Matmul peak {matmul['peak_tflops']:.3f} TFLOP/s "
                   f"({matmul['dtype']}, best of {', '.join(f'{k} {v:.3f}' for k, v in matmul['rates_tflops'].items())}). "
                   f"{notes}\n\n{text}\n")


def compare_sides(script: str, argv: list[str], args, title: str, mode: str, note: str) -> None:
    """The parent's part of an offline benchmark (sft_vs_trl, rm_vs_trl): the matmul peak, then
    alignkit's side and TRL's, each in its own process; print the machine, the peak, each side's
    times and the table; stop when the step-1 losses differ by more than the tolerance (1e-4 in
    fp32, 1e-2 under bf16, or --loss-tol); with --record, append it all to RESULTS.md."""
    argv = argv + (["--lora"] if args.lora else [])
    matmul = run_side(script, "matmul", argv, sys.executable)
    rows = [run_side(script, "alignkit", argv, sys.executable),
            run_side(script, "trl", argv + (["--trl-malloc"] if args.trl_malloc else []), args.trl_python)]
    text = offline_table(title, mode, args.precision, rows, matmul["peak_tflops"])
    print(f"{machine(args.threads)}; {cpu_description()}")
    print(f"matmul peak {matmul['peak_tflops']:.3f} TFLOP/s ({matmul['dtype']}): "
          + ", ".join(f"{k} {v:.3f}" for k, v in matmul["rates_tflops"].items()))
    for r in rows:
        print(f"{r['side']}: s/step {[round(t, 3) for t in r['times']]}, peak RSS {r['peak_rss_gib']:.2f} GiB, "
              f"step-1 loss {r['loss_step1']:.6f}, versions {r['versions']}")
    print(text)
    tol = args.loss_tol if args.loss_tol is not None else (1e-4 if args.precision == "fp32" else 1e-2)
    diff = abs(rows[0]["loss_step1"] - rows[1]["loss_step1"])
    if diff > tol:
        raise SystemExit(f"step-1 losses differ by {diff:.2e} > {tol:.0e}: the sides did not train on the same batch")
    if args.record:
        command = f"python benchmarks/{Path(script).name} " + " ".join(sys.argv[1:])
        offline_record(f"{title}, {mode}, {args.precision}", command,
                       f"{args.steps} steps, median of steps 2..{args.steps}; step-1 losses agree within {tol:.0e} "
                       f"(|diff| {diff:.1e}){note}. {FLOPS_SHORT}.", text, matmul, rows, args.threads)


def trl_side_setup(args) -> bool:
    """TRL's process: torch threads, and with --trl-malloc the glibc malloc settings alignkit's CLI
    applies (an ablation); returns whether malloc was tuned."""
    import torch

    tuned = False
    if args.trl_malloc:
        from alignkit.engine.allocator import tune_malloc

        tuned = tune_malloc()
    torch.set_num_threads(args.threads)
    return tuned
