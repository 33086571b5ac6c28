"""alignkit DPO vs TRL's DPOTrainer, side by side in one process.

Same model (the default, SmolLM2-135M-Instruct, full fine-tuning, a frozen copy as the live
reference in both), same data (4 toy arithmetic pairs: the gold answer against an off-by-one
answer, max length 128, all 4 pairs in every step), same optimizer settings (AdamW lr 1e-6,
betas (0.9, 0.999), eps 1e-8, no weight decay, constant lr, clip 1.0), same precision (fp32, or
bf16 autocast with fp32 weights). TRL runs without gradient checkpointing (its default is on,
which only makes it slower here). Seconds per optimizer step = median of steps 2..N.
Step 1 (policy == reference) must give the same loss and the same chosen/rejected log-probs.

Needs TRL, so run it from a separate venv (the project venv stays without TRL):
    python -m venv /work/trl-venv && . /work/trl-venv/bin/activate && pip install torch==2.13.0 \
        && pip install trl==1.16.0 && pip install -e /work/main --no-deps
    flock /tmp/alignkit-heavy.lock python benchmarks/dpo_vs_trl.py --steps 6
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import tempfile
import time

import torch

from alignkit.algorithms.dpo import DPOConfig, dpo_step, reference_fn, tokenize_pairs
from alignkit.algorithms.make_pairs import pair_record
from alignkit.data.packing import pack_rows
from alignkit.data.records import PreferencePair, user_prompt
from alignkit.data.tasks.arithmetic import generate_problems, prompt_text
from alignkit.engine.config import TrainConfig
from alignkit.engine.trainer import Engine
from alignkit.models.load import ModelConfig, load_model

LR, BETA, MAX_LENGTH = 1e-6, 0.1, 128


def toy_pairs() -> list[PreferencePair]:
    problems = generate_problems(4, seed=0, split="train")
    return [PreferencePair(user_prompt(prompt_text(p)), p.answer, str(int(p.answer) + 1)) for p in problems]


def run_alignkit(model, tokenizer, pairs, precision: str, steps: int) -> tuple[list[float], dict]:
    rows = pack_rows(tokenize_pairs(tokenizer, pairs, MAX_LENGTH), 4096)  # one row: 4 pairs, prompts shared
    cfg = TrainConfig(output_dir=tempfile.mkdtemp(), lr=LR, beta2=0.999, eps=1e-8, weight_decay=0.0,
                      schedule="constant", warmup_ratio=0.0, max_grad_norm=1.0, precision=precision, progress=False)
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    engine = Engine(model, cfg, steps)
    step = dpo_step(engine.model, DPOConfig(beta=BETA), reference_fn(engine.model, frozen))
    times, first = [], {}
    for i in range(steps):
        start = time.perf_counter()
        stats = engine.train_step(rows, step)
        times.append(time.perf_counter() - start)
        first = first or stats
    return times, first


def run_trl(model, tokenizer, pairs, precision: str, steps: int) -> tuple[list[float], dict]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.start)

    args = TRLConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(pairs), max_steps=steps,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, beta=BETA, max_length=MAX_LENGTH, bf16=precision == "bf16",
                     gradient_checkpointing=False, use_cpu=True, logging_steps=1, report_to="none",
                     save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    timer = Timer()
    data = Dataset.from_list([pair_record(p) for p in pairs])
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return timer.times, trainer.state.log_history[0]


def median_after_first(times: list[float]) -> float:
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pairs = toy_pairs()
    base, tokenizer, _ = load_model(ModelConfig(), train=False)
    rows = []
    for precision in args.precisions:
        results = {}
        for name, fn in (("trl", run_trl), ("alignkit", run_alignkit)):
            torch.manual_seed(0)
            times, first = fn(copy.deepcopy(base), tokenizer, pairs, precision, args.steps)
            results[name] = (median_after_first(times), first)
            print(f"{name:8s} {precision}: s/step {[round(t, 3) for t in times]} step-1 loss {first['loss']:.6f} "
                  f"logps/chosen {first['logps/chosen']:.4f} logps/rejected {first['logps/rejected']:.4f}", flush=True)
            gc.collect()
        (trl_s, trl_first), (ak_s, ak_first) = results["trl"], results["alignkit"]
        assert math.isclose(trl_first["loss"], ak_first["loss"], abs_tol=1e-4), "step-1 losses differ"
        for key in ("logps/chosen", "logps/rejected"):
            assert math.isclose(trl_first[key], ak_first[key], rel_tol=0.02, abs_tol=0.05), f"step-1 {key} differ"
        rows.append(f"| DPO (full FT, 4 pairs, live reference) | {precision} | {trl_s:.2f} | {ak_s:.2f} | {trl_s / ak_s:.2f}x |")
    print("\n| method | precision | TRL s/step | alignkit s/step | speed-up |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
