"""The fused output head (models.forward.FUSED_HEAD) against the materialised one: peak RSS and
seconds of a training forward + backward, and of a no-gradient log-prob pass (a reference or
old-policy pass), on the default model, each mode in its own process (fair VmHWM).

The row is --tokens tokens of which --targets carry a loss (the last ones: a long reply, or a
PPO batch of responses). Both modes use the same decoder; only the head differs, so the peak
difference is the [targets, vocab] logits and their gradient (4 bytes x 49,152 per target, each).

    python benchmarks/head_memory.py --tokens 2048 --targets 1536 --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _common import machine, peak_rss_gib


def side(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.models import forward
    from alignkit.models.load import resolve_model_path

    torch.set_num_threads(args.threads)
    forward.FUSED_HEAD = args.side == "fused"
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    ids = torch.randint(100, 40000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : args.tokens - args.targets] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": None}
    base = peak_rss_gib()
    with torch.no_grad():
        start = time.perf_counter()
        ref, _ = forward.target_logprobs(model, batch)
        no_grad_s = time.perf_counter() - start
    no_grad_peak = peak_rss_gib()
    times, loss = [], None
    for _ in range(args.steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        logps, _ = forward.target_logprobs(model, batch)
        (-logps.mean()).backward()
        times.append(time.perf_counter() - start)
        loss = float(-logps.detach().mean())
    head_grad = model.lm_head.weight.grad.norm().item()
    return {"side": args.side, "loaded_gib": base, "no_grad_peak_gib": no_grad_peak, "no_grad_s": no_grad_s,
            "train_peak_gib": peak_rss_gib(), "train_s": statistics.median(times), "loss": loss,
            "ref_mean": float(ref.mean()), "head_grad_norm": head_grad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--targets", type=int, default=1536)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", choices=["fused", "plain"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(side(args)))
        return
    rows = []
    for mode in ("plain", "fused"):
        cmd = [sys.executable, __file__, "--side", mode, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    plain, fused = rows
    print(f"{machine(args.threads)}; {args.tokens} tokens, {args.targets} targets, fp32, median of {args.steps} steps")
    print("| head | no-grad pass: peak RSS (GiB) | s | train forward+backward: peak RSS (GiB) | s | loss | lm_head grad norm |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['no_grad_peak_gib']:.2f} | {r['no_grad_s']:.2f} | {r['train_peak_gib']:.2f} "
              f"| {r['train_s']:.2f} | {r['loss']:.6f} | {r['head_grad_norm']:.6f} |")
    print(f"fused saves {plain['no_grad_peak_gib'] - fused['no_grad_peak_gib']:.2f} GiB (no grad) and "
          f"{plain['train_peak_gib'] - fused['train_peak_gib']:.2f} GiB (train); "
          f"train time ratio fused/plain {fused['train_s'] / plain['train_s']:.3f}")


if __name__ == "__main__":
    main()
