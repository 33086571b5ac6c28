"""The one training loop.

Methods hand the engine a step function `step(batch) -> (loss_sum, units, metric_sums)`:
the loss summed over its units (target tokens for SFT, pairs for DPO...), how many units the
micro-batch holds, and metrics summed the same way. The engine back-propagates each
micro-batch's *sum*, then divides the accumulated gradient by the total units of the whole
step, so N micro-batches of size b give exactly the gradient of one batch of N*b, whatever
their sizes. It also owns clipping, the schedule, mixed precision, checkpoints and logging.

Launched as several processes (`engine/distributed.py`), each process back-propagates its share
of every step's micro-batches (the k-th of N processes takes micro-batches k, k+N, ...); the
gradients, units and statistics are summed over the processes before the one division, so the
global batch, accumulation and schedule mean what they mean in one process. Only the main
process writes metrics.jsonl and checkpoints, and evaluates; the others wait for it. With
`train.fsdp` the model is sharded over the processes (FSDP2) from the optimizer's creation to
`unshard` (the end of `fit`, or of PPO's iterations) (`distributed.shard`); with `train.deepspeed`
DeepSpeed's ZeRO partitions it over them for that time (`zero.py`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from alignkit.engine import distributed
from alignkit.engine.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from alignkit.engine.config import LoopConfig, StageConfig
from alignkit.engine.logging import MetricsLogger, log, read_metrics
from alignkit.engine.zero import Zero

StepFn = Callable[[dict], "tuple[torch.Tensor, float, dict[str, float]]"]


class NonFiniteError(RuntimeError):
    """The loss or the gradient stopped being a finite number."""


def resolve_device(name: str) -> torch.device:
    """The device of `train.device`; with several processes on GPUs, `cuda` is this process's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.world_size() > 1:
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def lr_factor(step: int, total: int, cfg: LoopConfig) -> float:
    """Linear warmup to the peak, then cosine down to `min_lr_ratio` (or constant)."""
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg: LoopConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CPU and CUDA) updates all parameters in one pass instead of one loop per tensor.
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused or None)


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Engine:
    """Optimizer, schedule, precision, accumulation, checkpoints and metrics for one model.
    `resume` (a command's train.resume): continue from the newest checkpoint in output_dir."""

    def __init__(self, model, cfg: LoopConfig, total_steps: int, run_config: dict | None = None, resume: bool = False):
        self.device = resolve_device(cfg.device)
        distributed.start(self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.main = distributed.is_main()
        self.model = model.to(self.device)
        self.total_steps = max(1, total_steps)
        self.run_dir = Path(cfg.output_dir)
        # FSDP (train.fsdp) or DeepSpeed (train.deepspeed) under a launch of several processes: every
        # process runs as many passes a step. FSDP's optimizer is built on the shards.
        self.sharded = (cfg.fsdp or bool(cfg.deepspeed)) and distributed.world_size() > 1
        self.optimizer = None if self.sharded and cfg.fsdp else make_optimizer(model, cfg)
        self.zero: Zero | None = None
        if cfg.deepspeed and not self.sharded:
            log.warning("train.deepspeed: launched as one process, which trains without DeepSpeed")
        self.step = 0
        self.loop_state: dict = {}
        self.tensors: dict[str, torch.Tensor] = {}  # the loop's own tensors of the checkpoint resumed from
        self._run_config = run_config or {}
        checkpoint = latest_checkpoint(self.run_dir / "checkpoints") if resume else None
        self.last_checkpoint: Path | None = checkpoint  # the newest this run can continue from (named on a stop)
        if checkpoint is not None:
            # sharded, the optimizer takes its state once the model is sharded (FSDP) or partitioned (DeepSpeed)
            self.loop_state = load_checkpoint(checkpoint, self.model, None if self.sharded else self.optimizer,
                                              distributed.rank(), distributed.world_size())
            self.step = self.loop_state.pop("step")
            self.tensors = self.loop_state.pop("tensors")
            log.info("resumed from %s at step %d", checkpoint, self.step)
        else:
            # Python's and numpy's generators start from the OS's entropy in every process: seed them
            # (torch's was seeded by the method before it built the model), so that the RNG states a
            # checkpoint holds are the ones an uninterrupted run has at that step.
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            if resume:
                log.warning("resume requested but %s has no checkpoint; starting fresh", self.run_dir / "checkpoints")
        distributed.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
        if self.sharded and cfg.deepspeed:
            self.zero = Zero(self.model, self.optimizer, cfg.deepspeed, cfg.max_grad_norm)
            log.info("DeepSpeed ZeRO stage %d over %d processes", self.zero.stage, distributed.world_size())
            if checkpoint is not None:
                self.zero.load_optimizer_state(self.loop_state.pop("optimizer"))
        elif self.sharded:
            self._skeleton = distributed.shard(self.model)
            log.info("FSDP: the model's parameters, gradients and optimizer state are sharded over %d processes",
                     distributed.world_size())
            self.optimizer = make_optimizer(self.model, cfg)
            if checkpoint is not None:
                distributed.load_optimizer_state(self.model, self.optimizer, self.loop_state.pop("optimizer"))
        keep = self.loop_state.pop("metrics_lines", None) if checkpoint is not None else None
        if checkpoint is not None and keep is None and self.main:  # an older alignkit's checkpoint: the rows up to its step
            keep = sum(1 for row in read_metrics(self.run_dir) if row.get("step", 0) <= self.step)
        self.metrics = MetricsLogger(self.run_dir, cfg.trackers, self._run_config, keep_lines=keep, write=self.main)
        self._bar = None

    def autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def accumulate(self, micro_batches: Iterable[dict], step_fn: StepFn) -> dict | None:
        """Back-propagate each micro-batch's loss sum, then divide the gradient by the total units.
        With several processes, this one takes its share of the micro-batches and the gradients,
        units and statistics are summed over the processes first.

        Returns the summed statistics, or None when a loss was not finite (gradients cleared).
        """
        mine = {"units": 0.0, "loss": 0.0, "tokens": 0, "sums": {}, "bad": None}

        def add(batch: dict, loss: torch.Tensor, units: float, metric_sums: dict) -> None:
            mine["units"] += units
            mine["loss"] += loss.item()
            mine["tokens"] += int(batch["input_ids"].numel()) if "input_ids" in batch else 0
            for k, v in metric_sums.items():
                mine["sums"][k] = mine["sums"].get(k, 0.0) + float(v)

        if self.sharded:
            self._accumulate_sharded(list(micro_batches), step_fn, mine, add)
        else:
            for batch in itertools.islice(micro_batches, distributed.rank(), None, distributed.world_size()):
                batch = to_device(batch, self.device)
                with self.autocast():
                    loss, units, metric_sums = step_fn(batch)
                if not torch.isfinite(loss.detach()):
                    mine["bad"] = f"loss is {loss.item()}"
                    break
                loss.backward()
                add(batch, loss, units, metric_sums)
        every = distributed.gather(mine)
        self._bad = next((p["bad"] for p in every if p["bad"]), None)
        if self._bad is not None:
            return None
        total_units, loss_sum, tokens = (sum(p[k] for p in every) for k in ("units", "loss", "tokens"))
        sums: dict[str, float] = {}
        for p in every:
            for k, v in p["sums"].items():
                sums[k] = sums.get(k, 0.0) + v
        if total_units <= 0:
            raise ValueError("a training step had no units to learn from (no target tokens or pairs)")
        if not self.sharded:  # FSDP's reduce-scatter summed them
            distributed.sum_gradients([p for g in self.optimizer.param_groups for p in g["params"]])
        if self.zero is None:  # DeepSpeed holds the gradients: its step divides them (Zero.step)
            for p in self._params():
                p.grad.div_(total_units)
        return {"loss": loss_sum / total_units, **{k: v / total_units for k, v in sums.items()},
                "units": total_units, "tokens": tokens}

    def _accumulate_sharded(self, group: list[dict], step_fn: StepFn, mine: dict, add: Callable) -> None:
        """`accumulate` under FSDP or DeepSpeed: the k-th process takes micro-batches k, k+N, ...
        as without them, but every process runs as many passes (the all-gathers and reductions
        pair up across the processes): one short of micro-batches runs another's once more with
        its loss times zero. Under FSDP gradients accumulate unreduced until the step's last pass,
        whose backward sums them over the processes into each one's shard; ZeRO reduces them into
        its partitions as it goes (zero.py). A non-finite loss does not end the loop either (the
        step's gradients are dropped)."""
        size, me = distributed.world_size(), distributed.rank()
        passes = -(-len(group) // size)
        for i in range(passes):
            index = me + i * size
            batch = to_device(group[index % len(group)], self.device)
            if self.zero is None:
                self.model.set_requires_gradient_sync(i == passes - 1)
            with self.autocast():
                loss, units, metric_sums = (self.zero.forward if self.zero else self.model.alignkit_step)(step_fn, batch)
            if index >= len(group):
                loss = loss * 0.0
            elif not torch.isfinite(loss.detach()):
                mine["bad"] = mine["bad"] or f"loss is {loss.item()}"
            else:
                add(batch, loss, units, metric_sums)
            if self.zero is not None:
                self.zero.backward(loss)
            else:
                loss.backward()

    def _params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def train_step(self, micro_batches: Iterable[dict], step_fn: StepFn) -> dict:
        """One optimizer step over the micro-batches of an accumulation group."""
        start = time.perf_counter()
        self.model.train()
        stats = self.accumulate(micro_batches, step_fn)
        if stats is None:
            return self._nonfinite(self._bad)
        lr = self.cfg.lr * lr_factor(self.step, self.total_steps, self.cfg)
        if self.zero is not None:  # DeepSpeed clips (at train.max_grad_norm) and steps, or skips a non-finite step
            norm = self.zero.step(stats["units"], lr)
            if not math.isfinite(norm):
                return self._nonfinite(f"gradient norm is {norm}")
        else:
            clip = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
            norm = distributed.local(torch.nn.utils.clip_grad_norm_(self._params(), clip)).item()
            if not math.isfinite(norm):
                return self._nonfinite(f"gradient norm is {norm}")
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - start
        return {**stats, "lr": lr, "grad_norm": norm, "step_s": seconds,
                "tokens_per_s": stats["tokens"] / seconds if seconds > 0 else 0.0}

    def _nonfinite(self, what: str) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.on_nonfinite == "stop":
            last = self.last_checkpoint or "no checkpoint yet"
            raise NonFiniteError(f"step {self.step + 1}: {what}; stopping (last good checkpoint: {last}). Lower train.lr, "
                                 "or set train.on_nonfinite=skip to skip such steps")
        log.warning("step %d: %s; step skipped", self.step + 1, what)
        self.step += 1
        return {"skipped": 1.0}

    def log(self, metrics: dict, prefix: str = "") -> None:
        row = {f"{prefix}{k}": v for k, v in metrics.items()}
        self.metrics.log(self.step, row)
        if self._bar is not None and "loss" in metrics and not prefix:
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('lr', 0):.2e}",
                                  tok_s=f"{metrics.get('tokens_per_s', 0):.0f}")

    def progress(self):
        self._bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.cfg.progress and self.main), desc="train",
                         dynamic_ncols=True)
        return self._bar

    def save(self, loop_state: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Checkpoint the model, optimizer, RNG states and `loop_state`, with the number of lines
        metrics.jsonl holds now: a run that resumes from it drops every row logged after it (the
        final evaluation logged after the last checkpoint, half a line cut by a kill). With several
        processes the main one writes it, with every process's RNG states; the others wait. Under
        FSDP or DeepSpeed every process first gathers the full weights and optimizer state onto the
        main one's CPU: the checkpoint is the one a run without them writes."""
        rngs = distributed.gather(rng_state())
        if self.zero is not None:
            weights, optimizer = self.zero.weights(), self.zero.optimizer_state()
        elif self.sharded:
            weights, optimizer = distributed.trainable_weights(self.model), distributed.optimizer_state(self.model, self.optimizer)
        else:
            weights, optimizer = self.model, self.optimizer
        if self.main:
            self.last_checkpoint = save_checkpoint(self.run_dir / "checkpoints", self.step, weights, optimizer,
                                                   {**loop_state, "metrics_lines": self.metrics.lines()},
                                                   self.cfg.keep_checkpoints, tensors, rngs)
        self.last_checkpoint = distributed.broadcast(self.last_checkpoint)

    def unshard(self) -> None:
        """After training under FSDP or DeepSpeed: `model` becomes a plain module holding the whole
        trained model on every process (`distributed.unsharded_copy`, `Zero.whole`), which the main
        process saves (final/) alone and the sampling methods sample with (PPO takes its
        actor-critic back from `engine.model`). Without them, nothing. (Objects built on the
        sharded model before, a reward model's scorer, keep the sharded one.)"""
        if self.zero is not None:
            self.model, self.zero = self.zero.whole(final=True), None
            self.sharded = False
        elif self.sharded:
            self.model = distributed.unsharded_copy(self.model, self._skeleton)
            self.sharded = False

    def gathered(self):
        """A context in which every process holds the whole model (`distributed.gathered` under
        FSDP; nothing to do without it, or under ZeRO stages 1 and 2, which keep the parameters
        whole; PPO, its one user besides `evaluate`, refuses stage 3), so each can run forward
        passes of its own: evaluations, PPO's sampling and no-grad passes. Every process enters it."""
        return distributed.gathered(self.model) if self.sharded and self.zero is None else contextlib.nullcontext()

    def evaluate(self, eval_fn: Callable | None) -> dict:
        """`eval_fn(model)` on the main process; every process gets its result. Under FSDP every
        process gathers the whole model for it (`distributed.gathered`); under ZeRO stage 3 every
        process gathers a whole copy of it (`Zero.whole`), dropped afterwards."""
        if eval_fn is None:
            return {}
        result = None
        model = self.zero.whole() if self.zero is not None else self.model
        with self.gathered():
            if self.main:
                model.eval()
                with torch.no_grad(), self.autocast():
                    result = eval_fn(model)
                model.train()
        result = distributed.broadcast(result)
        self.log(result, prefix="eval/")
        return result


def steps_for(n_micro_batches: int, cfg: StageConfig) -> int:
    """Optimizer steps for `cfg.epochs` passes over `n_micro_batches` (or cfg.max_steps)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_micro_batches / cfg.grad_accum))


class EarlyStopping:
    """The end-of-epoch hook of `fit`: validate after every epoch, stop after `patience` epochs
    without improvement, and keep the best epoch's weights.

    `val_fn(model) -> {"reward": ...}` (higher is better) runs through `Engine.evaluate`. A tie
    counts as no worse and goes to the later epoch (more training on the same data): on a small
    validation set, ties between epochs that differ a lot are common. Its counters and the best
    weights go into `fit`'s checkpoints (`state`), so a resumed run stops where the whole one would."""

    def __init__(self, val_fn: Callable, patience: int = 1):
        self.val_fn, self.patience = val_fn, patience
        self.best, self.best_epoch, self.worse, self.state_dict = -math.inf, 0, 0, None

    def epoch_end(self, engine: Engine, epoch: int) -> bool:
        """Validate after `epoch` (0-based); True when training should stop."""
        value = engine.evaluate(self.val_fn)["reward"]
        if value >= self.best:
            self.best, self.best_epoch, self.worse = value, epoch + 1, 0
            self.state_dict = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
        else:
            self.worse += 1
        return self.worse >= self.patience

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(counters for the loop state, the best weights) to checkpoint."""
        counters = {"best": self.best if math.isfinite(self.best) else None, "best_epoch": self.best_epoch, "worse": self.worse}
        return counters, {f"best/{k}": v for k, v in (self.state_dict or {}).items()}

    def load(self, counters: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what `state` saved."""
        self.best = -math.inf if counters["best"] is None else counters["best"]
        self.best_epoch, self.worse = counters["best_epoch"], counters["worse"]
        best = {k.removeprefix("best/"): v for k, v in tensors.items() if k.startswith("best/")}
        self.state_dict = best or None

    def restore(self, engine: Engine, epochs_run: int) -> dict:
        """Load the best epoch's weights (unless it was the last one); its metrics."""
        if self.state_dict is not None and self.best_epoch != epochs_run:
            engine.model.load_state_dict(self.state_dict)
        return {"val/reward": self.best, "val/best_epoch": self.best_epoch}


def fit(engine: Engine, step_fn: StepFn, epoch_batches: Callable[[int], list[dict]], eval_fn: Callable | None = None,
        early_stopping: EarlyStopping | None = None, max_epochs: int | None = None, checkpoints: bool = True) -> dict:
    """Offline training: walk `epoch_batches(epoch)` (deterministic per epoch) for engine.total_steps.

    The data position (epoch, micro-batch index) is `engine.loop_state` and part of every
    checkpoint, so `--resume` continues exactly where the run stopped. An epoch ends when its
    micro-batches run out or the last step is taken; then `early_stopping` (if any) validates and
    may stop training, as may `max_epochs` (epochs run at most, even when steps remain); its
    counters and best weights are part of every checkpoint too. With `checkpoints=False` nothing
    is saved (a caller that re-runs the whole fit from its inputs). Under FSDP, `engine.model` is
    a plain module again once fit returns (`Engine.unshard`), after the final evaluation.
    """
    cfg = engine.cfg
    if engine.sharded and early_stopping is not None:  # its best weights would be this process's shards
        key = "train.deepspeed" if engine.zero is not None else "train.fsdp"
        raise ValueError(f"{key} does not keep early stopping's best weights (ReST-EM's validation, task.val > 0): "
                         f"set task.val=0 or train without {key}")
    epoch = engine.loop_state.get("epoch", 0)
    index = engine.loop_state.get("index", 0)
    if early_stopping is not None and engine.loop_state.get("early_stopping") is not None:
        early_stopping.load(engine.loop_state["early_stopping"], engine.tensors)
    batches = epoch_batches(epoch)
    last: dict = {}

    def save() -> None:
        state, tensors = early_stopping.state() if early_stopping is not None else (None, None)
        engine.save({"epoch": epoch, "index": index, **({"early_stopping": state} if state is not None else {})}, tensors)

    def epoch_end() -> bool:
        stop = early_stopping is not None and early_stopping.epoch_end(engine, epoch)
        return stop or (max_epochs is not None and epoch + 1 >= max_epochs)

    with engine.progress() as bar, engine.metrics.closing_on_error():  # a failed run closes its trackers
        stopped = False
        while engine.step < engine.total_steps:
            group = batches[index: index + cfg.grad_accum]
            if not group:
                if stopped := epoch_end():
                    break
                epoch, index = epoch + 1, 0
                batches = epoch_batches(epoch)
                continue
            last = engine.train_step(group, step_fn)
            index += len(group)
            bar.update(1)
            if engine.step % cfg.log_every == 0 or engine.step == engine.total_steps:
                engine.log({**last, "epoch": epoch + index / max(1, len(batches))})
            if eval_fn is not None and cfg.eval_every and engine.step % cfg.eval_every == 0 and engine.step < engine.total_steps:
                engine.evaluate(eval_fn)
            if checkpoints and cfg.save_every and engine.step % cfg.save_every == 0 and engine.step < engine.total_steps:
                save()
        if not stopped:
            epoch_end()  # the last epoch, ended by the step count
    engine.loop_state = {"epoch": epoch, "index": index}
    if early_stopping is not None:
        last = {**last, **early_stopping.restore(engine, epoch + 1)}
    if checkpoints:
        save()
    final_eval = engine.evaluate(eval_fn)
    engine.unshard()
    return {**last, **{f"eval/{k}": v for k, v in final_eval.items()}}
