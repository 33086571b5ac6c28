"""The train stage of the sampling methods: SFT (optionally reward-weighted) on selected samples.

Selected samples are usually short replies to templated prompts that all begin alike (system
prompt, start of the user turn). The default packing, `data.packing.shared_prefix_rows`, computes
that common prefix once per row instead of once per example: the same loss and gradient as
plain packing, for roughly half the tokens on the built-in arithmetic prompts. The loop is the
engine's (`engine.trainer.fit`), with its end-of-epoch validation when the method asks for it.
"""

from __future__ import annotations

import math
from typing import Callable

from alignkit.algorithms.sft import sft_step
from alignkit.data.chat import Tokenized
from alignkit.data.collate import epoch_batches_fn
from alignkit.data.packing import shared_prefix_rows, shuffled
from alignkit.engine.config import SamplingTrainConfig
from alignkit.engine.trainer import EarlyStopping, Engine, fit, steps_for

PACKINGS = ("prefix", "pack", "pad")


def train_stage(model, tokenizer, train: list[Tokenized], cfg: SamplingTrainConfig, packing: str = "prefix",
                weighted: bool = False, val_fn: Callable | None = None, patience: int = 1,
                run_config: dict | None = None, resume: bool = False) -> tuple[object, dict]:
    """The train stage: SFT on the selected samples (reward-weighted NLL when `weighted`).

    packing: "prefix" (shared-prompt-prefix rows, the cheapest), "pack" (plain padding-free
    packing) or "pad" (padded batches of cfg.batch_size). At most ceil(cfg.epochs) epochs, also
    when cfg.max_steps asks for more. With `val_fn(model) -> {"reward": ...}` the model is
    validated after every epoch and training stops after `patience` epochs without improvement;
    the best epoch's weights are kept, the latest of tied ones (ReST-EM's "until validation
    reward stops improving"; `engine.trainer.EarlyStopping`). Returns (model, metrics). With
    cfg.save_every > 0 the stage checkpoints in cfg.output_dir (early stopping's state too) and
    `resume` continues from the newest checkpoint there.
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, not {packing!r}")
    if packing == "prefix":
        batches = shuffled(shared_prefix_rows(train, cfg.max_tokens_per_batch), cfg.seed)
    else:
        batches = epoch_batches_fn(train, tokenizer.pad_token_id, cfg.seed, packing == "pack", cfg.batch_size, cfg.max_tokens_per_batch)
    engine = Engine(model, cfg, steps_for(len(batches(0)), cfg), run_config, resume)
    stopping = EarlyStopping(val_fn, patience) if val_fn is not None else None
    metrics = fit(engine, sft_step(engine.model, weighted), batches, early_stopping=stopping,
                  max_epochs=max(1, math.ceil(cfg.epochs)), checkpoints=cfg.save_every > 0)
    engine.metrics.close()
    return engine.model, {**metrics, "epochs_run": engine.loop_state["epoch"] + 1}
