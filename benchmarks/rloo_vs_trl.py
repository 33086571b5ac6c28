"""RLOO iteration time and peak memory: alignkit against TRL 1.16's RLOOTrainer, in one run.

alignkit runs `alignkit ppo` with algorithm=rloo (no critic); TRL runs `trl.RLOOTrainer`. Each
side runs in its own process (fair peak RSS, read from /proc/self/status VmHWM); the first
iteration is a warm-up and is not timed. What is matched:

- policy: the same directory (the default model unless --model), fp32 weights. alignkit trains
  its default LoRA (r 16, α 32, dropout 0, all linear layers but the head; reference = adapter
  off); TRL its default full fine-tuning with a frozen reference copy. --trl-lora adds a TRL run
  with that same LoRA (peft_config; reference = adapter off), the like-for-like comparison.
- reward: one reward model, the policy's backbone with a seeded scalar head (written once to
  --work; its scores do not matter for timing), reading the chat-formatted prompt + reply; raw
  scores on both sides (alignkit reward.whiten=false: TRL does not whiten scores).
- batch: 4 built-in preference prompts (train split, seed 0; the same 4 every iteration) in the
  model's chat template, k = 2 replies each: 8 sequences per iteration (alignkit
  prompts_per_iteration=4 sampling.n=2; TRL per_device_train_batch_size=8
  num_generations=2, so its generation batch is 8).
- sampling: temperature 1, top-p 1, no top-k, at most 32 new tokens, stop at eos (the
  tokenizer's and the generation config's).
- KL: fixed β 0.05 on the k1 estimate log π_old − log π_ref summed over the reply and taken
  off the score (TRL's RLOO does the same), so both advantages are r_i − mean_{j≠i} r_j of
  score − β·KL, then normalised over the batch (alignkit whiten_advantages, TRL
  normalize_advantages=True).
- update: --epochs optimizer steps per iteration (default 1, both libraries' RLOO default), each
  over all 8 sequences in one micro-batch (alignkit ppo_epochs=E minibatch_size=8
  train.batch_size=8; TRL num_iterations=E steps_per_generation=1 gradient_accumulation_steps=1),
  clip ε 0.2; AdamW lr 1e-5 constant without warm-up, betas (0.9, 0.999), eps 1e-8, no weight
  decay, gradient clip 1.0; seed 0; no gradient checkpointing (RLOOConfig turns it on by
  default: off here; alignkit has none); CPU, the same torch thread count.
- precision: fp32, or bf16 autocast with fp32 trained weights (TRL bf16=True, which RLOOConfig
  defaults to: set explicitly from --precision). alignkit also holds the frozen LoRA base in bf16.
- time per iteration: generate + score + no-grad log-probs (policy, reference) + the optimizer
  steps + logging. alignkit: its `iteration_s` metric; TRL: the time between the ends of the
  last optimizer step of consecutive iterations (a TrainerCallback).
- peak RSS: VmHWM at the end of the last iteration (alignkit: when it logs that iteration;
  TRL: at its last step end), so alignkit's final save (LoRA merge) is left out; TRL saves
  nothing (save_strategy="no").

Not matched exactly:
- the policy loss: TRL's RLOO clips one sequence-level ratio exp(Σ log π − Σ log π_old)·A and
  averages over sequences; alignkit clips per-token ratios. loss_reduction=sequence (mean per
  reply, then over replies) is the nearest; the forward/backward work is the same.
- advantage normalisation: alignkit whitens over the batch's response tokens, TRL over
  sequences (std + 1e-4). Entropy: alignkit computes it in the no-grad pass, TRL in the
  training forward.
- the sampled replies (each side has its own generator and RNG stream), hence their lengths:
  the table shows each side's mean reply tokens (eos included) next to its time.

TRL 1.16 runs in a separate virtual environment:

    python -m venv /work/trl-venv && . /work/trl-venv/bin/activate && pip install torch==2.13.0 \\
        && pip install trl==1.16.0 && pip install -e /work/main --no-deps

    python benchmarks/rloo_vs_trl.py --iterations 3                   # alignkit lora vs TRL (full)
    python benchmarks/rloo_vs_trl.py --trl-lora --record              # also TRL with a LoRA policy; append to RESULTS.md
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from _common import (
    ROOT,
    append_results,
    child,
    iteration_times,
    machine,
    parser,
    peak_rss_gib,
    prepare,
    prompts,
    side_result,
    step_clock,
    table,
    trl_models,
)

sys.path.insert(0, str(ROOT))

PROMPTS, K, NEW_TOKENS, BETA, CLIP, LR = 4, 2, 32, 0.05, 0.2, 1e-5
ROWS = PROMPTS * K


def run_alignkit(args) -> dict:
    from alignkit.algorithms.ppo.loop import PPOConfig, run
    from alignkit.config import load_config
    from alignkit.engine.logging import read_metrics

    peaks: list[float] = []

    class EndOfIteration(logging.Handler):  # ppo.run logs "iteration i/n: ..." once an iteration is done
        def emit(self, record):
            if str(record.msg).startswith("iteration "):
                peaks.append(peak_rss_gib())

    logger = logging.getLogger("alignkit")
    logger.setLevel(logging.INFO)
    logger.addHandler(EndOfIteration())
    out = Path(args.work) / "alignkit-run"
    cfg = load_config(PPOConfig, None, [
        f"model.path={args.model_dir}", "memory=lora", "algorithm=rloo", f"iterations={args.iterations + 1}",
        f"prompts_per_iteration={PROMPTS}", f"sampling.n={K}", f"prompts.train={PROMPTS}", "prompts.heldout=0",
        f"sampling.max_new_tokens={NEW_TOKENS}", "sampling.temperature=1.0", "sampling.top_p=1.0", f"ppo_epochs={args.epochs}",
        f"minibatch_size={ROWS}", f"train.batch_size={ROWS}", f"clip={CLIP}", "whiten_advantages=true",
        "loss_reduction=sequence", f"kl.beta={BETA}", "kl.adaptive=false", "kl.estimator=k1", "reward.kind=model",
        f"reward.path={args.rm}", "reward.whiten=false", f"train.precision={args.precision}", f"train.threads={args.threads}",
        "train.device=cpu", "train.seed=0", f"train.lr={LR}", "train.schedule=constant", "train.warmup_ratio=0",
        "train.beta1=0.9", "train.beta2=0.999", "train.eps=1e-8", "train.weight_decay=0", "train.max_grad_norm=1.0",
        f"train.output_dir={out}", "samples_every=0", "eval.every=0"])
    run(cfg)
    rows = [r for r in read_metrics(out) if "iteration_s" in r][1:]
    return side_result("alignkit (lora)", [r["iteration_s"] for r in rows], peaks[-1] if peaks else None,
                       reply_tokens=sum(r["response_length"] for r in rows) / len(rows))


def run_trl(args) -> dict:
    import trl
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    tok, policy, reward, peft_config = trl_models(args)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts(PROMPTS)]})
    config = RLOOConfig(
        output_dir=str(Path(args.work) / "trl-run"), per_device_train_batch_size=ROWS, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=K, num_iterations=args.epochs, max_steps=(args.iterations + 1) * args.epochs,
        max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, beta=BETA, epsilon=CLIP,
        normalize_advantages=True, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, gradient_checkpointing=False,
        bf16=args.precision == "bf16", use_cpu=True, seed=0, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0)
    clock, record = step_clock()
    trainer = RLOOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=data, processing_class=tok,
                          peft_config=peft_config, callbacks=[clock])
    trainer.train()
    lengths = record["lengths"][1:]  # one per generation; the first is the warm-up's
    return side_result(f"TRL {trl.__version__} RLOOTrainer" + (" (lora policy)" if args.trl_lora else " (full)"),
                       iteration_times(record["stamps"], args.epochs), record["peak_rss_gib"],
                       reply_tokens=sum(lengths) / len(lengths))


def main() -> None:
    ap = parser(__doc__, "/tmp/alignkit-rloo-bench", "/work/trl-venv/bin/python", "python of the venv with trl==1.16.0")
    ap.add_argument("--epochs", type=int, default=1, help="optimizer steps per iteration, each over all 8 sequences")
    args = ap.parse_args()
    if args.side:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        result = run_alignkit(args) if args.side == "alignkit" else run_trl(args)
        print(json.dumps(result))
        return
    command = shlex.join(["python", *sys.argv])
    prepare(args)
    epochs = ["--epochs", str(args.epochs)]
    rows = [child(__file__, "alignkit", args, sys.executable, epochs), child(__file__, "trl", args, args.trl_python, epochs)]
    if args.trl_lora:
        rows.append(child(__file__, "trl", args, args.trl_python, [*epochs, "--trl-lora"]))
    sides = {r["side"].split(" (")[0]: r["versions"] for r in rows}
    text = "\n".join([
        f"\n### RLOO vs TRL RLOOTrainer ({datetime.date.today()})\n",
        f"- command: `{command}`",
        f"- machine: {machine(args.threads)}",
        *(f"- {side}: " + ", ".join(f"{name} {version}" for name, version in found.items()) for side, found in sides.items()),
        (f"- setup: policy `{args.model}`, {PROMPTS} prompts × k={K} = {ROWS} replies per iteration, at most {NEW_TOKENS} "
        f"new tokens, {args.epochs} optimizer step(s) over all {ROWS} per iteration, β {BETA} (k1, in the reward), clip "
        f"{CLIP}, AdamW lr {LR}; mean of {args.iterations} iteration(s) after a warm-up. speed-up = TRL s/iteration ÷ "
        f"alignkit's; memory ratio = alignkit peak RSS ÷ TRL's (VmHWM at the end of the last iteration).\n"),
        table("RLOO", args.precision, rows), ""])
    print(text)
    if args.record:
        append_results(text)


if __name__ == "__main__":
    main()
