"""Training settings shared by every method (Llama 2 defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.config import opt
from alignkit.precision import resolve_precision


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/run", "run directory: metrics.jsonl, checkpoints/, final/")
    lr: float = opt(2e-5, "peak learning rate")
    epochs: float = opt(1.0, "passes over the data (fractions allowed)")
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = use epochs)")
    batch_size: int = opt(8, "examples per micro-batch (padding mode)")
    max_tokens_per_batch: int = opt(2048, "tokens per packed micro-batch row (packing mode)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    schedule: str = opt("cosine", "cosine (decays to min_lr_ratio) or constant (after warmup)")
    warmup_ratio: float = opt(0.03, "fraction of steps spent warming up linearly")
    warmup_steps: int = opt(0, "warmup steps (overrides warmup_ratio when > 0)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to biases and norms)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-5, "AdamW epsilon")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm (0 = off)")
    precision: str = opt("fp32", "fp32, bf16 (autocast; weights and optimizer stay fp32), or auto (bf16 where the "
                                  "device computes it natively, else fp32: precision.py)")
    device: str = opt("auto", "auto, cpu, cuda")
    seed: int = opt(0, "seed for data order, initialisation and sampling")
    log_every: int = opt(1, "write metrics every N steps")
    eval_every: int = opt(0, "evaluate every N steps (0 = only at the end)")
    save_every: int = opt(0, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep")
    resume: bool = opt(False, "continue from the newest checkpoint in output_dir")
    on_nonfinite: str = opt("stop", "stop or skip a step whose loss or gradient is not finite")
    trackers: list[str] = opt(factory=list, help="extra trackers: tensorboard, wandb, mlflow")
    progress: bool = opt(True, "show a progress bar")
    merge_lora: bool = opt(True, "save the final model with the LoRA adapter merged (false = adapter only)")
    threads: int = opt(0, "torch CPU threads (0 = torch default)")

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"precision must be fp32, bf16 or auto, not {self.precision!r}")
        self.precision = resolve_precision(self.precision, self.device)
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, not {self.schedule!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be stop or skip, not {self.on_nonfinite!r}")
        if self.grad_accum < 1 or self.batch_size < 1:
            raise ValueError("grad_accum and batch_size must be at least 1")
