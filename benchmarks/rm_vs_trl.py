"""Reward-model step time, throughput, MFU and peak memory: alignkit against TRL's RewardTrainer.

Same model, data, batches, optimizer and precision on both sides, each side in its own process
(fair peak RSS: VmHWM of the process):

- model: the default (SmolLM2-135M-Instruct) unless --model, as a sequence classifier whose
  one-output `score` head is drawn once with seed 0 and saved to --work (both sides load that
  directory, so step 1 starts from the same weights).
- data (--data): `builtin`, the built-in synthetic preference pairs that `alignkit rm` trains on
  (short single-turn prompts), or `hh`, Anthropic-HH-style conversations generated here: 4, 6 or 8
  messages (user and assistant turns, the last one the reply being judged), 600-1000 tokens for the
  prompt plus the chosen reply; the chosen reply is a helpful step-by-step answer, the rejected one
  a short unhelpful one. Each pair is rendered through the chat template and tokenized ONCE in the
  parent (alignkit's `scoring_group`; no sequence is truncated) and written to --work: TRL gets the
  same ids as a processed dataset (`chosen_ids` = prompt + chosen, `rejected_ids` = prompt +
  rejected), alignkit the same ids as groups (the shared prompt once, then both replies).
- batches: --pairs-per-step pairs per optimizer step (16 built-in pairs, ~2,300 tokens; 2 HH pairs,
  ~3,300 tokens, by default), the same pairs in the same step on both
  sides (spread longest-first so that every step holds about the same tokens). TRL pads the 2k
  sequences of a step to the longest (its collator; right padding) and reads each reward at the
  last non-pad token; alignkit packs the step's groups, prompt computed once for both replies,
  into padding-free rows of at most --row-tokens tokens (as `alignkit rm` does with
  train.max_tokens_per_batch) and accumulates the rows into one optimizer step.
- loss: mean over the step's pairs of −log σ(r_chosen − r_rejected) (no margin, no centring) on
  both sides; step-1 losses must agree within --loss-tol (default 1e-4 absolute in fp32, 1e-2
  under bf16 autocast).
- optimizer: AdamW (fused) lr --lr constant, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on
  matrices only, clip 1.0; fp32 (or --precision bf16: autocast, fp32 weights); no gradient
  checkpointing. Full fine-tuning, or --lora: LoRA r=16, alpha 32, all linear layers, and the score
  head trained in full on both sides (peft's SEQ_CLS task).
- alignkit's side applies the glibc malloc settings its CLI applies; TRL's keeps the defaults
  unless --trl-malloc.

"tokens / step" counts the logical tokens (every chosen and rejected sequence whole, as TRL's
data holds them); "computed tokens / step" what each side ran through the model (TRL: padded
batch; alignkit: shared prompts once). Model FLOPs are counted on the logical tokens, so the
work alignkit saves by sharing prompts shows as a higher MFU (benchmarks/_common.py: FLOPS_DOC).

    python benchmarks/rm_vs_trl.py --steps 6                          # built-in pairs, full fine-tuning
    python benchmarks/rm_vs_trl.py --steps 6 --data hh                # long multi-turn conversations
    python benchmarks/rm_vs_trl.py --steps 6 --data hh --lora --record

TRL runs under --trl-python (default /work/trl-venv/bin/python: trl 1.16 and peft).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from _common import (
    ROOT,
    alignkit_train_config,
    balanced_steps,
    compare_sides,
    make_reward_model,
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

# --- HH-style conversations ------------------------------------------------------------------

TOPICS = {
    "a vegetable garden": ["tomato seedlings", "the compost heap", "raised beds", "morning watering", "slugs on the lettuce",
                           "crop rotation", "mulch around the roots", "a drip line"],
    "a family budget": ["the grocery bill", "an emergency fund", "the electricity contract", "a spreadsheet of expenses",
                        "monthly subscriptions", "the car insurance", "a savings goal", "the credit card balance"],
    "learning the guitar": ["barre chords", "a metronome", "the first song", "calluses on the fingertips",
                            "a practice schedule", "strumming patterns", "tuning by ear", "the capo"],
    "a small web service": ["the database index", "a slow endpoint", "the request logs", "a connection pool",
                            "the deployment script", "a cache in front of the API", "unit tests", "the error budget"],
    "training for a 10k run": ["easy runs", "the long run on Sunday", "interval sessions", "new running shoes",
                               "a sore knee", "rest days", "the race-day pace", "stretching after runs"],
    "moving to a new city": ["the lease", "a moving company", "the new neighbourhood", "public transport passes",
                             "boxes of books", "registering with a doctor", "the first week at work", "a local library"],
    "baking bread at home": ["the sourdough starter", "a hot oven", "the proofing basket", "whole-wheat flour",
                             "the crust", "an overnight rise", "kneading by hand", "a kitchen scale"],
    "writing a thesis": ["the literature review", "weekly meetings with the supervisor", "the methods chapter",
                         "a reference manager", "the first full draft", "figures and tables", "a writing routine",
                         "the defence date"],
}
USER_ASKS = ["Can you help me with {x}? I am not sure where to start.", "What should I know about {x} before I go on?",
             "I tried something with {x} last week and it did not work. What could have gone wrong?",
             "My friend says {x} is not worth the effort. Is that right?", "How would you handle {x} in my place?",
             "Could you explain {x} in simple terms?"]
USER_DETAILS = ["For context, I only have a few hours a week for this.", "I have read a couple of articles already.",
                "Money is a bit tight at the moment.", "I would like to get it right the first time.",
                "Last time I gave up after a month.", "My partner is also interested in helping."]
SENTENCES = ["{X} matters more than most people expect, so it is worth a little planning.",
             "A good first step is to look closely at {x} and write down what you see.",
             "Many people change {x} too quickly; small, steady adjustments work better.",
             "If {x} keeps causing trouble, it usually points to a problem somewhere upstream.",
             "Keep notes on {x} for a couple of weeks, and the pattern will become clearer.",
             "It helps to compare {x} with what worked for you before.",
             "You do not need expensive tools for {x}; consistency counts for much more.",
             "Ask someone with experience to look at {x} with you; a second pair of eyes saves time.",
             "When {x} goes well, the rest of the plan tends to follow.",
             "Set a simple goal for {x} and check it again at the end of the month."]
REJECTED = ["I don't know. You could search online for {x}.", "That is not really something I can help with.",
            "Just keep doing what you are doing with {x}, it will probably be fine.",
            "There are many opinions about {x}. It depends."]


def _say(rng: random.Random, topic: str, n: int) -> str:
    words = TOPICS[topic]
    out = []
    for _ in range(n):
        x = rng.choice(words)
        out.append(rng.choice(SENTENCES).format(x=x, X=x[0].upper() + x[1:]))
    return " ".join(out)


def hh_pair(rng: random.Random, tokenizer, target: int):
    """One conversation: 2, 3 or 4 user turns with assistant answers between them, the last
    answer being judged; earlier turns grow until prompt + chosen reaches `target` tokens."""
    from alignkit.data.chat import render_ids
    from alignkit.data.records import Message, PreferencePair

    topic = rng.choice(sorted(TOPICS))
    turns = rng.choice([2, 3, 4])
    messages: list[list[str]] = []  # [role, text], the prompt (ends with the last user turn)
    for t in range(turns):
        x = rng.choice(TOPICS[topic])
        messages.append(["user", rng.choice(USER_ASKS).format(x=x) + " " + rng.choice(USER_DETAILS)])
        if t < turns - 1:
            messages.append(["assistant", _say(rng, topic, 2)])
    x = rng.choice(TOPICS[topic])
    steps = [f"{k + 1}. {_say(rng, topic, 1)}" for k in range(rng.randint(3, 6))]
    chosen = f"Happy to help with {x}. Here is how I would go about it:\n" + "\n".join(steps) + "\nTell me how it goes."
    rejected = rng.choice(REJECTED).format(x=x)

    def pair():
        return PreferencePair(tuple(Message(r, c) for r, c in messages), chosen, rejected)

    while True:
        p = pair()
        length = len(render_ids(tokenizer, p.prompt + (Message("assistant", chosen),)))
        if length >= target:
            return p
        grow = [i for i, (role, _) in enumerate(messages) if role == "assistant"] or [len(messages) - 1]
        i = rng.choice(grow)
        messages[i][1] += " " + _say(rng, topic, max(1, (target - length) // 40))


def hh_pairs(n: int, tokenizer, seed: int = 0) -> list:
    rng = random.Random(f"hh:{seed}")
    return [hh_pair(rng, tokenizer, rng.randint(600, 1000)) for _ in range(n)]


# --- data, shared by both sides --------------------------------------------------------------

def prepare_data(args) -> Path:
    """Render and tokenize the pairs once; write them, grouped by optimizer step, to <work>/rm-data.json."""
    from alignkit.data.chat import render_ids
    from alignkit.data.packing import scoring_group
    from alignkit.data.records import Message
    from alignkit.data.tasks.preferences import build_preferences
    from alignkit.models.load import load_tokenizer
    from alignkit.rewards.gold import gold_pair

    need = args.steps * args.pairs_per_step
    tok = load_tokenizer(args.model_dir)
    pairs = hh_pairs(need, tok) if args.data == "hh" else build_preferences(need, 0, "train", judge=gold_pair)
    groups = []
    for p in pairs:
        g = scoring_group(tok, p.prompt, [p.chosen, p.rejected], args.max_length)
        if g.truncated:
            raise SystemExit(f"a pair is longer than --max-length {args.max_length}: raise it (no side may truncate)")
        for r, reply in zip(g.responses, (p.chosen, p.rejected)):
            assert g.prompt + r == render_ids(tok, p.prompt + (Message("assistant", reply),))
        groups.append({"prompt": g.prompt, "responses": g.responses})
    steps = balanced_steps([len(g["prompt"]) * 2 + sum(map(len, g["responses"])) for g in groups], args.steps,
                           args.pairs_per_step)
    path = Path(args.work) / "rm-data.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"steps": [[groups[i] for i in s] for s in steps]}))
    return path


def load_steps(args) -> list[list[dict]]:
    return json.loads((Path(args.work) / "rm-data.json").read_text())["steps"]


def step_counts(args, steps: list[list[dict]]) -> tuple[list[int], list[float]]:
    """Logical tokens (chosen and rejected sequences whole) and model FLOPs of each step."""
    shapes = model_shapes(args.model_dir)
    tokens, flops = [], []
    for step in steps:
        lengths = [len(g["prompt"]) + len(r) for g in step for r in g["responses"]]
        tokens.append(sum(lengths))
        flops.append(step_flops(shapes, lengths, len(lengths), 1, LORA_RANK if args.lora else 0, head_trained=True))
    return tokens, flops


def run_alignkit(args) -> dict:
    import torch

    from alignkit.algorithms.reward_model import collate, rm_step
    from alignkit.data.collate import pack_groups
    from alignkit.data.packing import Group
    from alignkit.engine.allocator import tune_malloc
    from alignkit.engine.trainer import Engine
    from alignkit.models.load import LoraConfig, ModelConfig
    from alignkit.rewards.model import load_reward_model

    malloc = tune_malloc()  # what the alignkit CLI does at start
    torch.set_num_threads(args.threads)
    steps = load_steps(args)
    lora = LoraConfig(r=LORA_RANK, alpha=LORA_ALPHA, dropout=0.0) if args.lora else None
    model, _, _ = load_reward_model(ModelConfig(path=args.rm, lora=lora), train=True, seed=0)
    engine = Engine(model, alignkit_train_config(args, Path(args.work) / "alignkit-run"), len(steps))
    step_fn = rm_step(engine.model)
    stamps, first, computed, n_rows = [], None, [], []
    for step in steps:
        encoded = [(Group(g["prompt"], g["responses"]), {"margin": 0.0}) for g in step]
        rows = [collate([encoded[i] for i in r]) for r in pack_groups([len(g) for g, _ in encoded], args.row_tokens)]
        stats = engine.train_step(rows, step_fn)
        stamps.append(time.perf_counter())
        first = first or stats
        computed.append(sum(int(r["input_ids"].numel()) for r in rows))
        n_rows.append(len(rows))
    tokens, flops = step_counts(args, steps)
    return offline_result("alignkit" + (" (lora)" if args.lora else ""), stamps, tokens, flops, first["loss"],
                          computed=computed, malloc_tuned=malloc, rows_per_step=n_rows)


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    malloc = trl_side_setup(args)
    steps = load_steps(args)
    groups = [g for step in steps for g in step]
    data = Dataset.from_dict({"chosen_ids": [g["prompt"] + g["responses"][0] for g in groups],
                              "rejected_ids": [g["prompt"] + g["responses"][1] for g in groups]})
    tok = AutoTokenizer.from_pretrained(args.rm)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(args.rm, num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="SEQ_CLS")
    config = RewardConfig(output_dir=str(Path(args.work) / "trl-run"), per_device_train_batch_size=args.pairs_per_step,
                          max_length=None, center_rewards_coefficient=None, **trl_optimizer_args(args))
    clock, record = step_clock()
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=peft_config,
                            callbacks=[clock])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens, flops = step_counts(args, steps)
    padded = [2 * len(step) * max(len(g["prompt"]) + len(r) for g in step for r in g["responses"]) for step in steps]
    return offline_result("TRL RewardTrainer" + (" (lora)" if args.lora else ""), record["stamps"], tokens, flops,
                          losses[0], computed=padded, malloc_tuned=malloc)


def main() -> None:
    ap = offline_parser(__doc__, "/tmp/alignkit-rm-bench")
    ap.add_argument("--data", default="builtin", choices=["builtin", "hh"], help="built-in pairs or long HH-style conversations")
    ap.add_argument("--pairs-per-step", type=int, default=None,
                    help="default: 16 (builtin, ~2,300 tokens), 2 (hh, ~3,300 tokens; TRL's padded batch of 4 "
                         "sequences then peaks near 11 GiB, so 4 pairs may not fit a 24 GiB machine)")
    ap.add_argument("--row-tokens", type=int, default=2048, help="alignkit's packed row length (train.max_tokens_per_batch)")
    ap.add_argument("--max-length", type=int, default=2048, help="longest sequence allowed (none may be truncated)")
    ap.add_argument("--rm", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.pairs_per_step = args.pairs_per_step or (2 if args.data == "hh" else 16)
    if args.side:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if args.side == "matmul":
            tokens = max(sum(len(g["prompt"]) + len(r) for g in s for r in g["responses"]) for s in load_steps(args))
            result = matmul_rate(model_shapes(args.model_dir), min(tokens, args.row_tokens), args.precision, args.threads)
        else:
            result = run_alignkit(args) if args.side == "alignkit" else run_trl(args)
        print(json.dumps(result))
        return
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first is a warm-up)")
    args.model_dir = model_path(args.model)
    args.rm = str(make_reward_model(args.model_dir, Path(args.work) / "reward-model"))
    prepare_data(args)
    argv = ["--model-dir", args.model_dir, "--rm", args.rm, "--work", args.work, "--steps", str(args.steps),
            "--threads", str(args.threads), "--precision", args.precision, "--lr", str(args.lr), "--data", args.data,
            "--pairs-per-step", str(args.pairs_per_step), "--row-tokens", str(args.row_tokens),
            "--max-length", str(args.max_length)]
    mode = f"LoRA r={LORA_RANK}" if args.lora else "full"
    what = "built-in pairs" if args.data == "builtin" else "HH-style multi-turn, 600-1000 tokens"
    compare_sides(__file__, argv, args, f"RM ({what}, {args.pairs_per_step} pair{'s' if args.pairs_per_step != 1 else ''}"
                  f"/step) vs TRL RewardTrainer", mode, f"; alignkit rows of at most {args.row_tokens} tokens")

if __name__ == "__main__":
    main()
