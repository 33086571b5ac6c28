"""SFT step time, throughput, MFU and peak memory: alignkit against TRL's SFTTrainer, in one run.

Same model (the default, SmolLM2-135M-Instruct, unless --model), same data, same batches, same
optimizer, same precision, each side in its own process (fair peak RSS: VmHWM of the process):

- data: the built-in Flan-style instruction mixture that `alignkit sft` trains on (--data mixture,
  the default) or its arithmetic examples (--data arithmetic), chat-formatted and tokenized ONCE by
  alignkit's tokenizer code in the parent (assistant tokens are the targets, max length
  --max-length), written to --work as token ids and labels; both sides read those ids.
- batches: --examples-per-step examples per optimizer step (≈2,450 tokens of the mixture with the
  default 16), the same examples in the same step on both sides (the examples are spread over the steps
  longest-first in a snake order, so every step holds about the same number of tokens), one
  micro-batch per step, no gradient accumulation.
- both sides padding-free: alignkit packs the step's examples into one row (its `data.collate`
  packer, `position_ids` restarting per example), as `alignkit sft` does with data.packing=true;
  TRL gets the token ids and labels as a processed dataset (`input_ids`, `labels`) with
  `padding_free=True`, `packing=False` (its collator flattens the batch into one row the same way;
  TRL's own bfd packing would regroup the examples, so the steps would no longer hold the same
  tokens), a sequential sampler and no truncation (max_length=None: the examples are already cut to
  --max-length). Neither side computes any padding token; on both, transformers builds the
  block-diagonal causal mask from the restarting `position_ids` (SDPA attention).
- loss: the mean NLL over the step's target tokens on both sides (TRL divides the summed NLL by
  `num_items_in_batch`, the count of labels != -100, alignkit by its target-token count; both
  drop the label of the first token of every packed example). Step-1 losses must agree within
  --loss-tol (default 1e-4 absolute in fp32, 1e-2 under bf16 autocast).
- optimizer: AdamW (fused) lr --lr constant, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on
  matrices only, clip 1.0; fp32 (or bf16 autocast with fp32 weights: --precision bf16); no
  gradient checkpointing (TRL's default is on; it only costs time on CPU).
- full fine-tuning, or --lora: LoRA r=16, alpha 32, dropout 0, all linear layers but the head.
- alignkit's side applies the glibc malloc settings its CLI applies (engine/allocator.py);
  TRL's process keeps the defaults unless --trl-malloc.

Reported per side: median seconds per optimizer step over steps 2..N (step 1 is a warm-up; each
step's time runs from the end of the previous step to the end of this one, so batch building and
logging count), logical tokens per step and per second, model TFLOP/s and MFU against the matmul
peak measured in the same run at the model's shapes (benchmarks/_common.py: FLOPS_DOC, matmul_rate),
peak RSS, step-1 loss, speed-up (TRL s/step ÷ alignkit's) and memory ratio (alignkit ÷ TRL).

    python benchmarks/sft_vs_trl.py --steps 6                 # full fine-tuning, fp32
    python benchmarks/sft_vs_trl.py --steps 6 --lora          # LoRA
    python benchmarks/sft_vs_trl.py --steps 6 --record        # append the table to benchmarks/RESULTS.md

TRL runs under --trl-python (default /work/trl-venv/bin/python: trl 1.16, peft, and alignkit
installed there with --no-deps; alignkit's own venv stays without TRL).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from _common import (
    ROOT,
    alignkit_train_config,
    balanced_steps,
    compare_sides,
    matmul_rate,
    model_path,
    model_shapes,
    offline_parser,
    offline_result,
    step_clock,
    step_flops,
    trl_optimizer_args,
    trl_side_setup,
)

sys.path.insert(0, str(ROOT))

LORA_RANK, LORA_ALPHA = 16, 32


def prepare_data(args) -> Path:
    """Tokenize the examples once (alignkit's chat tokenization, assistant tokens as targets) and
    write them, grouped by optimizer step, to <work>/sft-data.json."""
    from alignkit.algorithms.sft import (
        SFTExamplesConfig,
        builtin_examples,
        tokenize_examples,
    )
    from alignkit.models.load import load_tokenizer

    need = args.steps * args.examples_per_step
    cfg = SFTExamplesConfig(builtin=args.data, arithmetic_examples=max(need, 512))
    examples = builtin_examples(cfg, seed=0)
    if len(examples) < need:
        raise SystemExit(f"--data {args.data} has {len(examples)} examples; {need} are needed")
    tok = load_tokenizer(args.model_dir)
    tokenized = tokenize_examples(tok, examples[:need], args.max_length)
    if len(tokenized) < need:
        raise SystemExit(f"only {len(tokenized)} of {need} examples are usable")
    steps = balanced_steps([len(t.input_ids) for t in tokenized], args.steps, args.examples_per_step)
    data = {"steps": [[{"input_ids": tokenized[i].input_ids, "labels": tokenized[i].labels} for i in s] for s in steps]}
    path = Path(args.work) / "sft-data.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def load_steps(args) -> list[list[dict]]:
    return json.loads((Path(args.work) / "sft-data.json").read_text())["steps"]


def step_counts(args, steps: list[list[dict]]) -> tuple[list[int], list[float]]:
    """Logical tokens and model FLOPs of each step (head on target tokens only, as both sides run it)."""
    shapes = model_shapes(args.model_dir)
    tokens, flops = [], []
    for step in steps:
        lengths = [len(e["input_ids"]) for e in step]
        targets = sum(sum(1 for t in e["labels"][1:] if t != -100) for e in step)
        tokens.append(sum(lengths))
        flops.append(step_flops(shapes, lengths, targets, shapes["vocab"], LORA_RANK if args.lora else 0))
    return tokens, flops


def run_alignkit(args) -> dict:
    import torch

    from alignkit.algorithms.sft import sft_step
    from alignkit.data.chat import Tokenized
    from alignkit.data.collate import packed_row
    from alignkit.engine.allocator import tune_malloc
    from alignkit.engine.trainer import Engine
    from alignkit.models.load import LoraConfig, ModelConfig, load_model

    malloc = tune_malloc()  # what the alignkit CLI does at start
    torch.set_num_threads(args.threads)
    steps = load_steps(args)
    torch.manual_seed(0)
    lora = LoraConfig(r=LORA_RANK, alpha=LORA_ALPHA, dropout=0.0) if args.lora else None
    model, _, _ = load_model(ModelConfig(path=args.model_dir, lora=lora))
    engine = Engine(model, alignkit_train_config(args, Path(args.work) / "alignkit-run"), len(steps))
    step_fn = sft_step(engine.model)
    stamps, first = [], None
    for step in steps:
        row = packed_row([Tokenized(e["input_ids"], e["labels"]) for e in step])
        stats = engine.train_step([row], step_fn)
        stamps.append(time.perf_counter())
        first = first or stats
    tokens, flops = step_counts(args, steps)
    return offline_result("alignkit" + (" (lora)" if args.lora else ""), stamps, tokens, flops, first["loss"],
                          computed=tokens, malloc_tuned=malloc)


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    malloc = trl_side_setup(args)
    steps = load_steps(args)
    rows = [e for step in steps for e in step]
    data = Dataset.from_dict({"input_ids": [e["input_ids"] for e in rows], "labels": [e["labels"] for e in rows]})
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    config = SFTConfig(output_dir=str(Path(args.work) / "trl-run"), per_device_train_batch_size=args.examples_per_step,
                       padding_free=True, packing=False, max_length=None, **trl_optimizer_args(args))
    clock, record = step_clock()
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=peft_config,
                         callbacks=[clock])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens, flops = step_counts(args, steps)
    return offline_result("TRL SFTTrainer" + (" (lora)" if args.lora else ""), record["stamps"], tokens, flops, losses[0],
                          computed=tokens, malloc_tuned=malloc)


def main() -> None:
    ap = offline_parser(__doc__, "/tmp/alignkit-sft-bench")
    ap.add_argument("--data", default="mixture", choices=["mixture", "arithmetic"], help="built-in SFT data")
    ap.add_argument("--examples-per-step", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512, help="tokens per example (longer ones are truncated)")
    args = ap.parse_args()
    if args.side:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if args.side == "matmul":
            steps = load_steps(args)
            tokens = max(sum(len(e["input_ids"]) for e in s) for s in steps)
            result = matmul_rate(model_shapes(args.model_dir), tokens, args.precision, args.threads)
        else:
            result = run_alignkit(args) if args.side == "alignkit" else run_trl(args)
        print(json.dumps(result))
        return
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first is a warm-up)")
    args.model_dir = model_path(args.model)
    prepare_data(args)
    argv = ["--model-dir", args.model_dir, "--work", args.work, "--steps", str(args.steps), "--threads", str(args.threads),
            "--precision", args.precision, "--lr", str(args.lr), "--data", args.data,
            "--examples-per-step", str(args.examples_per_step), "--max-length", str(args.max_length)]
    mode = f"LoRA r={LORA_RANK}" if args.lora else "full"
    compare_sides(__file__, argv, args, f"SFT ({args.data}, {args.examples_per_step} example"
                  f"{'s' if args.examples_per_step != 1 else ''}/step) vs TRL SFTTrainer", mode, "")

if __name__ == "__main__":
    main()
