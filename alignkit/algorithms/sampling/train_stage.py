"""The train stage of the sampling methods: SFT (optionally reward-weighted) on selected samples.

Selected samples are usually short replies to templated prompts that all begin alike (system
prompt, start of the user turn). `shared_prefix_rows` packs them so that this common prefix is
computed once per row instead of once per example (each example attends to the prefix and to
itself only, as in `data.packing`): the same loss and gradient as plain packing, for roughly
half the tokens on the built-in arithmetic prompts.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from alignkit.algorithms.sft import sft_step
from alignkit.data.chat import IGNORE, Tokenized
from alignkit.data.collate import epoch_batches_fn, pack_groups
from alignkit.data.packing import Group, group_row, shuffled
from alignkit.engine.config import TrainConfig
from alignkit.engine.trainer import Engine, steps_for
from alignkit.models.forward import group_logprobs


def shared_prefix_rows(train: list[Tokenized], max_tokens: int) -> list[dict]:
    """Padding-free rows in which the prompt prefix that ALL examples share (the system prompt
    and the start of the user turn, for templated prompts) appears once per row: every example
    attends to it and to itself only (`data.packing`), so its tokens are computed once per row
    instead of once per example. Same loss and gradient as plain packing."""
    first = min(next(i for i, t in enumerate(e.labels) if t != IGNORE) for e in train)
    shared = train[0].input_ids[:first]
    for e in train[1:]:
        n = next((i for i, (a, b) in enumerate(zip(shared, e.input_ids)) if a != b), len(shared))
        shared = shared[:n]
    if not shared:
        raise ValueError("the examples share no prompt prefix; use plain packing")
    cut = len(shared)
    rows = pack_groups([len(e.input_ids) - cut for e in train], max(1, max_tokens - cut))
    out = []
    for row in rows:
        group = Group(shared, [train[i].input_ids[cut:] for i in row], [train[i].labels[cut:] for i in row])
        batch = group_row([group])
        batch["weights"] = torch.tensor([1.0 if train[i].weight is None else train[i].weight for i in row])
        out.append(batch)
    return out


def shared_prefix_step(model, weighted: bool = False):
    """Step function over `shared_prefix_rows`: summed (reward-weighted) NLL; units = target
    tokens (weighted by the rewards when `weighted`)."""

    def step(batch: dict):
        logps = group_logprobs(model, batch)
        w = batch["weights"].to(logps.dtype) if weighted else torch.ones_like(logps)
        return -(w * logps).sum(), float((w * batch["lengths"].to(w.dtype)).sum()), {"nll": -logps.detach().sum().item()}

    return step


PACKINGS = ("prefix", "pack", "pad")


def train_stage(model, tokenizer, train: list[Tokenized], cfg: TrainConfig, packing: str = "prefix",
                weighted: bool = False, val_fn: Callable | None = None, patience: int = 1,
                run_config: dict | None = None) -> tuple[object, dict]:
    """The train stage: SFT on the selected samples (reward-weighted NLL when `weighted`).

    packing: "prefix" (shared-prompt-prefix rows, the cheapest), "pack" (plain padding-free
    packing) or "pad" (padded batches of cfg.batch_size). With `val_fn(model) -> {"reward": ...}`
    the model is validated after every epoch and training stops after `patience` epochs without
    improvement (a tie is no worse); the best epoch's weights are restored, the latest of tied
    ones (ReST-EM's "until validation reward stops improving"). Returns (model, metrics). No
    checkpoints: a stage is short and re-runs from its samples.
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, not {packing!r}")
    if packing == "prefix":
        rows = shared_prefix_rows(train, cfg.max_tokens_per_batch)
        batches = shuffled(rows, cfg.seed)
    else:
        batches = epoch_batches_fn(train, tokenizer.pad_token_id, cfg.seed, packing == "pack", cfg.batch_size, cfg.max_tokens_per_batch)
    engine = Engine(model, cfg, steps_for(len(batches(0)), cfg), run_config)
    step_fn = shared_prefix_step(engine.model, weighted) if packing == "prefix" else sft_step(engine.model, weighted)
    best, best_state, best_epoch, worse, last, epoch = -math.inf, None, 0, 0, {}, 0
    with engine.progress() as bar:
        for epoch in range(max(1, math.ceil(cfg.epochs))):
            rows = batches(epoch)
            for s in range(0, len(rows), cfg.grad_accum):
                if engine.step >= engine.total_steps:
                    break
                last = engine.train_step(rows[s:s + cfg.grad_accum], step_fn)
                bar.update(1)
                if engine.step % cfg.log_every == 0:
                    engine.log({**last, "epoch": epoch + min(1.0, (s + cfg.grad_accum) / len(rows))})
            if val_fn is not None:
                value = engine.evaluate(val_fn)["reward"]
                # A tie goes to the later epoch (more training on the same verified data): on a
                # small validation set, ties between epochs that differ a lot are common.
                if value >= best:
                    best, best_epoch, worse = value, epoch + 1, 0
                    best_state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
                else:
                    worse += 1
                if worse >= patience:
                    break
            if engine.step >= engine.total_steps:
                break
    if best_state is not None and best_epoch != epoch + 1:
        engine.model.load_state_dict(best_state)
    metrics = {**last, "epochs_run": epoch + 1}
    if val_fn is not None:
        metrics.update({"val/reward": best, "val/best_epoch": best_epoch})
    return engine.model, metrics
