"""PPO iteration time and peak memory: alignkit against TRL 1.12's PPOTrainer, in one run.

Both sides train the same policy (the default model unless --model), score with the same
reward model, and use the same batch and lengths: 8 prompts (the built-in preference prompts,
chat-formatted the same way), one reply each, up to 32 new tokens (stop at eos), 4 PPO epochs
over one minibatch of 8 (4 optimizer steps per iteration), KL β 0.05, clip 0.2, value clip 0.2,
vf_coef 0.1, γ 1, λ 0.95, the same precision. Each side runs in its own process (fair peak RSS,
read from /proc/self/status VmHWM); the first iteration is a warm-up and is not timed.

TRL removed PPO after 1.12.0, so its side runs in a separate virtual environment:

    python -m venv /work/trl112-venv && . /work/trl112-venv/bin/activate
    pip install torch==2.13.0 && pip install trl==1.12.0 transformers==5.23.0 && pip install -e . --no-deps

    python benchmarks/ppo_vs_trl.py --iterations 3                 # alignkit lora vs TRL (full)
    python benchmarks/ppo_vs_trl.py --trl-lora --record            # also TRL with a LoRA policy; append to RESULTS.md

The reward model is the policy's backbone with a fresh (seeded) scalar head, written once to
--work: its scores do not matter for timing. TRL's value model is that reward model (its usual
set-up); alignkit's critic is its default, a value head on the actor's own pass
(critic_trunk=shared); `--critic-trunk own` times the second-adapter critic instead. Both sides
stop a reply at eos; the table gives alignkit's mean reply length (TRL's rollouts have the same
32-token limit and are trained over the padded 32 columns).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

from _common import (
    ROOT,
    append_results,
    child,
    iteration_times,
    machine,
    parser,
    prepare,
    prompts,
    side_result,
    step_clock,
    table,
    trl_models,
)

sys.path.insert(0, str(ROOT))

PROMPTS, NEW_TOKENS, EPOCHS, BETA = 8, 32, 4, 0.05


def run_alignkit(args) -> dict:
    from alignkit.algorithms.ppo.loop import PPOConfig, run
    from alignkit.config import load_config
    from alignkit.engine.logging import read_metrics

    out = Path(args.work) / "alignkit-run"
    cfg = load_config(PPOConfig, None, [
        f"model.path={args.model_dir}", "memory=lora", f"iterations={args.iterations + 1}",
        f"prompts_per_iteration={PROMPTS}", f"prompts.train={PROMPTS}", "prompts.heldout=0",
        f"sampling.max_new_tokens={NEW_TOKENS}", f"ppo_epochs={EPOCHS}", f"minibatch_size={PROMPTS}", f"train.batch_size={PROMPTS}",
        f"kl.beta={BETA}", "reward.kind=model", f"reward.path={args.rm}", f"train.precision={args.precision}",
        f"train.threads={args.threads}", f"train.output_dir={out}", "samples_every=0",
        "eval.every=0", "train.lr=1e-5", f"critic_trunk={args.critic_trunk}"])
    run(cfg)
    rows = [r for r in read_metrics(out) if "iteration_s" in r][1:]
    return side_result(f"alignkit (lora, critic_trunk={args.critic_trunk})", [r["iteration_s"] for r in rows],
                       reply_tokens=sum(r["response_length"] for r in rows) / len(rows))


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok, policy, reward, peft_config = trl_models(args)
    chat = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts(PROMPTS)]
    data = Dataset.from_dict({"input_ids": [tok(c, add_special_tokens=False)["input_ids"] for c in chat]})
    ref = None if args.trl_lora else AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(args.rm, num_labels=1, dtype=torch.float32)
    config = PPOConfig(
        output_dir=str(Path(args.work) / "trl-run"), per_device_train_batch_size=PROMPTS, gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=EPOCHS, response_length=NEW_TOKENS, total_episodes=PROMPTS * (args.iterations + 1),
        local_rollout_forward_batch_size=PROMPTS, stop_token="eos", kl_coef=BETA, learning_rate=1e-5,
        num_sample_generations=0, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        bf16=args.precision == "bf16", seed=0, disable_tqdm=True, dataloader_num_workers=0)
    clock, record = step_clock()
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=data, value_model=value, peft_config=peft_config, callbacks=[clock])
    trainer.train()
    return side_result("TRL 1.12 PPOTrainer" + (" (lora policy)" if args.trl_lora else " (full)"),
                       iteration_times(record["stamps"]))


def main() -> None:
    ap = parser(__doc__, "/tmp/alignkit-ppo-bench", "/work/trl112-venv/bin/python", "python of the venv with trl==1.12.0")
    ap.add_argument("--critic-trunk", default="shared", choices=["shared", "own"], help="alignkit's critic layout")
    args = ap.parse_args()
    if args.side:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        result = run_alignkit(args) if args.side == "alignkit" else run_trl(args)
        print(json.dumps(result))
        return
    prepare(args)
    rows = [child(__file__, "alignkit", args, sys.executable, ["--critic-trunk", args.critic_trunk]),
            child(__file__, "trl", args, args.trl_python)]
    if args.trl_lora:
        rows.append(child(__file__, "trl", args, args.trl_python, ["--trl-lora"]))
    text = table("PPO", args.precision, rows)
    print(text)
    if args.record:
        append_results(f"\n### PPO vs TRL 1.12 ({datetime.date.today()}, {machine(args.threads)})\n\n"
                       f"`python benchmarks/ppo_vs_trl.py --iterations {args.iterations} --precision {args.precision}"
                       f"{' --trl-lora' if args.trl_lora else ''}{' --critic-trunk own' if args.critic_trunk == 'own' else ''}`: {PROMPTS} prompts, {NEW_TOKENS} new tokens, {EPOCHS} PPO epochs, "
                       f"mean of {args.iterations} iterations after a warm-up. speed-up = TRL s/iteration ÷ alignkit's; "
                       f"memory ratio = alignkit peak RSS ÷ TRL's.\n\n{text}\n")


if __name__ == "__main__":
    main()
