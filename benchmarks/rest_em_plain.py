"""The issue's reference point for ReST-EM: a plain loop with transformers `generate` and a
hand-written fine-tuning loop (no alignkit generator, trainer or packing), on the same built-in
arithmetic prompts, verifier and held-out problems as `alignkit rest-em recipes/rest_em.yaml`.
Each iteration samples N per training problem from the current model, keeps the distinct correct
answers, fully fine-tunes the BASE model on them (prompt tokens masked), and reports greedy
held-out accuracy and the minutes so far. bf16 autocast for generation and training, as the
recipe.

    python benchmarks/rest_em_plain.py --problems 256 --n 8 --iterations 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alignkit.data.records import user_prompt  # noqa: E402
from alignkit.models.load import ModelConfig, load_model  # noqa: E402
from alignkit.rewards.verifiers import verify  # noqa: E402
from alignkit.rollout.base import chat_prompts  # noqa: E402
from alignkit.tasks import RewardConfig, TaskConfig, build_task  # noqa: E402
from benchmarks._common import machine  # noqa: E402


def generate(model, tok, prompts: list[str], n: int, sample: bool, max_new_tokens: int, batch: int) -> list[str]:
    """Replies, n per prompt in prompt order, from transformers `generate` (left padding)."""
    out = []
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i: i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        kw = {"do_sample": True, "temperature": 1.0, "top_k": 40} if sample else {"do_sample": False}
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=n,
                                 pad_token_id=tok.pad_token_id, **kw)
        out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def fine_tune(model, tok, pairs: list[tuple[str, str]], epochs: int, lr: float, batch: int, seed: int) -> None:
    """Full fine-tuning on (prompt, reply) pairs: padded batches, loss on the reply and end token."""
    rows = []
    for prompt, reply in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((p + r, [-100] * len(p) + r))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(rows), generator=gen).split(batch):
            chunk = [rows[i] for i in idx]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in chunk])
            labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in chunk])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in chunk])
            with torch.autocast("cpu", torch.bfloat16):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--problems", type=int, default=256)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.time()
    task = build_task(TaskConfig(train=args.problems, val=0, heldout=200), RewardConfig())
    policy, tok, _ = load_model(ModelConfig(path=args.model), train=False)
    tok.padding_side = "left"
    chat = lambda prompts: chat_prompts(tok, [user_prompt(q) for q in prompts])
    train_prompts, heldout_prompts = chat(task.train), chat(task.heldout)

    def heldout_acc(model) -> float:
        replies = generate(model, tok, heldout_prompts, 1, False, args.max_new_tokens, 64)
        return sum(verify(r, task.answer_for(q)) for r, q in zip(replies, task.heldout)) / len(task.heldout)

    print(f"iteration 0: held-out {heldout_acc(policy):.3f}, {(time.time() - start) / 60:.2f} min", flush=True)
    for it in range(1, args.iterations + 1):
        replies = generate(policy, tok, train_prompts, args.n, True, args.max_new_tokens, 16)
        kept = {(prompt, r.strip()) for j, (prompt, q) in enumerate(zip(train_prompts, task.train))
                for r in replies[j * args.n: (j + 1) * args.n] if verify(r, task.answer_for(q)) == 1.0}
        policy, _, _ = load_model(ModelConfig(path=args.model), train=True)
        fine_tune(policy, tok, sorted(kept), args.epochs, args.lr, 16, seed=it)
        print(f"iteration {it}: kept {len(kept)}, held-out {heldout_acc(policy):.3f}, "
              f"{(time.time() - start) / 60:.2f} min", flush=True)
    print(f"{machine(args.threads)}; {args.problems} problems x {args.n}, {args.iterations} iterations, "
          f"{args.epochs} epochs at lr {args.lr}")


if __name__ == "__main__":
    main()
