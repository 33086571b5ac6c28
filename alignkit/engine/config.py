"""Training settings (Llama 2 defaults): the keys of the one loop, and what each command adds.

Every command exposes only the keys it honours (docs/architecture.md), so the `train` section of
a command is one of these classes:

| class                | commands                   | adds to the one below it                              |
|----------------------|----------------------------|-------------------------------------------------------|
| LoopConfig           | (base)                     | optimizer, schedule, precision, device, seed, metrics,|
|                      |                            | fsdp, deepspeed                                       |
| StageConfig          | (base)                     | epochs, max_steps, grad_accum, packed micro-batches   |
| CheckpointConfig     | dpo's reference_train      | save_every, keep_checkpoints (resumes with `train`)   |
| SamplingTrainConfig  | rs raft rft rest rest-em   | CheckpointConfig + resume, batch_size (packing=pad)   |
| TrainConfig          | dpo rrhf                   | resume, merge_lora                                    |
| EvalTrainConfig      | rm                         | eval_every (held-out evaluation during training)      |
| SFTTrainConfig       | sft                        | batch_size (data.packing=false)                       |
| PPOTrainConfig       | ppo                        | its own batching and checkpoint keys, in iterations   |

A `Resumable` config has the `resume` key, which its command hands to the engine;
`alignkit <command> --resume` is an error for a command whose train config is not one.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.config import at_least, in_range, opt, positive
from alignkit.engine import zero
from alignkit.precision import resolve_precision

TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class LoopConfig:
    """What the engine reads for every optimizer step, whatever drives it."""
    output_dir: str = opt("runs/run", "run directory: metrics.jsonl, final/ (and checkpoints/ where the command checkpoints)")
    lr: float = opt(2e-5, "peak learning rate")
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
    on_nonfinite: str = opt("stop", "stop or skip a step whose loss or gradient is not finite")
    trackers: list[str] = opt(factory=list, help="extra trackers: tensorboard, wandb, mlflow")
    threads: int = opt(0, "torch CPU threads (0 = torch default)")
    fsdp: bool = opt(False, "launched as several processes: shard the model, its gradients and optimizer state over "
                            "them (FSDP2, engine/distributed.py) instead of a whole copy each")
    deepspeed: str = opt("", "launched as several processes: a DeepSpeed config (JSON) whose ZeRO stage partitions the "
                             "optimizer state, gradients (stage 2) and parameters (stage 3) over them; batch, optimizer, "
                             "schedule, clipping and precision stay alignkit's keys (engine/zero.py)")

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"precision must be fp32, bf16 or auto, not {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        self.precision = resolve_precision(self.precision, self.device)
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, not {self.schedule!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be stop or skip, not {self.on_nonfinite!r}")
        for key in ("warmup_ratio", "min_lr_ratio"):
            in_range(self, key, 0.0, 1.0)
        for key in ("beta1", "beta2"):
            in_range(self, key, 0.0, 1.0, high_open=True)
        positive(self, "eps")
        at_least(self, 0, "lr", "warmup_steps", "weight_decay", "max_grad_norm", "threads")
        unknown = [t for t in self.trackers if t not in TRACKERS]
        if unknown:
            raise ValueError(f"trackers: unknown tracker {unknown[0]!r} (expected {', '.join(TRACKERS)})")
        if self.deepspeed:
            if self.fsdp:
                raise ValueError("train.fsdp and train.deepspeed both shard the model: choose one")
            if self.on_nonfinite == "skip":
                raise ValueError("train.deepspeed: on_nonfinite=skip is not supported (DeepSpeed holds the step's "
                                 "gradients); use on_nonfinite=stop")
            zero.check(self.deepspeed, self.max_grad_norm)


@dataclass
class StageConfig(LoopConfig):
    """Passes over a fixed set of examples in token-packed micro-batches (`fit`, the sampling
    methods' train stage)."""
    epochs: float = opt(1.0, "passes over the data (fractions allowed)")
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = use epochs)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_tokens_per_batch: int = opt(2048, "tokens per packed micro-batch row (packing mode)")
    log_every: int = opt(1, "write metrics every N steps")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self):
        super().__post_init__()
        positive(self, "epochs")
        at_least(self, 0, "max_steps")
        at_least(self, 1, "grad_accum", "max_tokens_per_batch", "log_every")


@dataclass
class Resumable:
    """The `resume` key (`--resume`) of a command that continues a killed run."""
    resume: bool = opt(False, "continue the killed run in output_dir from its newest checkpoint (or stored phase)")




@dataclass
class CheckpointConfig(StageConfig):
    """`fit` with checkpoints (it saves at the end, and every save_every steps)."""
    save_every: int = opt(0, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep (0 = all)")

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 0, "save_every", "keep_checkpoints")


@dataclass
class SamplingTrainConfig(Resumable, CheckpointConfig):
    """The sampling methods' training: a run resumes from its stored phases
    (algorithms/sampling/run_state.py); a train stage killed half-way resumes from its newest
    checkpoint when save_every > 0, else it runs again from its stored samples."""
    save_every: int = opt(0, "checkpoint a train stage every N steps (0 = none: a killed stage runs again)")
    batch_size: int = opt(8, "examples per micro-batch (packing=pad)")

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 1, "batch_size")


@dataclass
class TrainConfig(Resumable, CheckpointConfig):
    """A command's own checkpointed, resumable training that saves the final model."""
    merge_lora: bool = opt(True, "save the final model with the LoRA adapter merged (false = adapter only)")


@dataclass
class EvalTrainConfig(TrainConfig):
    """TrainConfig with a held-out evaluation during training."""
    eval_every: int = opt(0, "evaluate every N steps (0 = only at the end)")

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 0, "eval_every")


@dataclass
class SFTTrainConfig(EvalTrainConfig):
    """EvalTrainConfig with padded micro-batches when packing is off."""
    batch_size: int = opt(8, "examples per micro-batch (data.packing=false)")

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 1, "batch_size")


@dataclass
class PPOTrainConfig(Resumable, LoopConfig):
    """`alignkit ppo`: its iterations set the schedule's length; rollouts are split in rows. With
    `fsdp` the actor-critic is sharded for the updates and gathered whole on every process for
    sampling and the no-grad passes (algorithms/ppo/loop.py; sampling.backend=hf only)."""
    batch_size: int = opt(8, "rollout rows per micro-batch (a minibatch's micro-batches accumulate into one step)")
    max_tokens_per_batch: int = opt(2048, "tokens per packed row of PPO-ptx SFT data (ptx.coef > 0)")
    save_every: int = opt(0, "checkpoint every N iterations (0 = only at the end)")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep (0 = all)")
    merge_lora: bool = opt(True, "save the final model with the LoRA adapter merged (false = adapter only)")

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 1, "batch_size", "max_tokens_per_batch")
        at_least(self, 0, "save_every", "keep_checkpoints")
        if self.deepspeed and zero.check(self.deepspeed, self.max_grad_norm) == 3:
            raise ValueError("train.deepspeed: ppo samples with the model between its updates, which ZeRO stage 3 "
                             "partitions over the processes: use stage 1 or 2 (or train.fsdp)")
