"""Supervised fine-tuning (Llama 2 style): loss on assistant tokens only, packed sequences.

`train_sft` is the checkpointed SFT loop (also DPO's SFT reference); `sft_step` is the step
that the sampling methods' train stage uses too; `run` is `alignkit sft`: load the model and data (a file, or the built-in Flan-style mixture), validate,
train, save a plain HF model, and report held-out loss and arithmetic accuracy. With `data.gatt.enabled`
it first samples Ghost Attention dialogues from the starting model (`data.gatt`, `eval.gatt`) and
trains on them too (or only on them), loss on each example's last reply only, and reports
instruction following per turn on held-out dialogues before and after training.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alignkit.config import at_least, in_range, one_of, opt
from alignkit.data.chat import Tokenized, tokenize_conversation, truncate
from alignkit.data.collate import epoch_batches_fn, pad_batch
from alignkit.data.formats import load_sft
from alignkit.data.gatt import GAttConfig
from alignkit.data.io import write_skipped
from alignkit.data.mixture import MixtureConfig, build_mixture
from alignkit.data.records import Message, SFTExample, user_prompt
from alignkit.data.tasks.arithmetic import ArithmeticConfig, generate_problems
from alignkit.data.tasks.arithmetic import prompt_text as arithmetic_prompt
from alignkit.data.tasks.arithmetic import target_text
from alignkit.engine.config import CheckpointConfig, SFTTrainConfig
from alignkit.engine.distributed import on_main
from alignkit.engine.trainer import Engine, fit, steps_for
from alignkit.eval.arithmetic import TrainingEvalConfig, evaluate_arithmetic, heldout_problems, starting_accuracy
from alignkit.eval.gatt import build_gatt_examples, instruction_following_by_turn
from alignkit.losses.sft import sft_loss
from alignkit.models.forward import group_token_logprobs, target_logprobs
from alignkit.models.load import ModelConfig, load_model, save_model

log = logging.getLogger("alignkit")


@dataclass
class SFTExamplesConfig:
    """Where SFT examples come from and how they are tokenized (also PPO-ptx's data, which packs always)."""

    path: str = opt("", "training data (JSONL, JSON, Parquet or a datasets dir); empty = built-in data")
    split: str | None = opt(None, "split of a DatasetDict directory")
    eval_path: str = opt("", "held-out data in the same formats (empty = hold out eval_fraction)")
    eval_fraction: float = opt(0.05, "fraction held out for eval loss when eval_path is empty")
    on_invalid: str = opt("error", "a row that cannot be used is an error (listing every one), or skip: drop it with a "
                                   "warning and list it in <output_dir>/skipped.jsonl (no usable row at all is still an error)")
    builtin: str = opt("mixture", "built-in data when path is empty: mixture or arithmetic")
    mixture: MixtureConfig = opt(factory=MixtureConfig, help="the built-in Flan-style mixture")
    arithmetic_examples: int = opt(512, "examples for builtin=arithmetic")
    arithmetic_style: str = opt("answer", "target style for builtin=arithmetic: answer or cot")
    targets: str = opt("all", "assistant turns that are targets: all or last")
    max_length: int = opt(512, "tokens per example")
    on_overlong: str = opt("truncate", "truncate (prompt from the left, then response at the right), drop, or error")

    def __post_init__(self):
        in_range(self, "eval_fraction", 0.0, 1.0, high_open=True)
        one_of(self, "builtin", "mixture", "arithmetic")
        at_least(self, 1, "arithmetic_examples", "max_length")
        one_of(self, "arithmetic_style", "answer", "cot")
        one_of(self, "targets", "all", "last")
        one_of(self, "on_overlong", "truncate", "drop", "error")
        one_of(self, "on_invalid", "error", "skip")


@dataclass
class SFTDataConfig(SFTExamplesConfig):
    packing: bool = opt(True, "pack examples into rows of train.max_tokens_per_batch tokens (padding-free)")
    gatt: GAttConfig = opt(factory=GAttConfig, help="Ghost Attention (Llama 2): multi-turn dialogues sampled from the "
                                                    "starting model that keep an instruction given in the first turn")


@dataclass
class SFTConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the model to fine-tune")
    train: SFTTrainConfig = opt(factory=lambda: SFTTrainConfig(output_dir="runs/sft", epochs=2.0), help="training loop")
    data: SFTDataConfig = opt(factory=SFTDataConfig, help="training data")
    eval: TrainingEvalConfig = opt(factory=lambda: TrainingEvalConfig(problems=100), help="held-out arithmetic accuracy after training")


class OverlongError(ValueError):
    """An example longer than data.max_length with data.on_overlong=error."""


def tokenize_examples(tokenizer, examples: list[SFTExample], max_length: int, targets: str = "all",
                      on_overlong: str = "truncate") -> list[Tokenized]:
    """Tokenize with assistant-only labels; over-long examples are truncated, dropped or refused,
    and every one that is changed or dropped is counted in the log (never silently)."""
    out, cut, dropped = [], 0, []
    for i, ex in enumerate(examples):
        tok = tokenize_conversation(tokenizer, ex.messages, targets)
        if len(tok.input_ids) > max_length:
            if on_overlong == "error":
                raise OverlongError(f"example {i + 1}: {len(tok.input_ids)} tokens > data.max_length={max_length}")
            fitted = truncate(tok, max_length) if on_overlong == "truncate" else None
            if fitted is None:
                dropped.append(i + 1)
                continue
            cut += 1
            tok = fitted
        if tok.n_targets == 0:
            dropped.append(i + 1)
            continue
        out.append(tok)
    if cut:
        log.warning("%d example(s) longer than %d tokens were truncated", cut, max_length)
    if dropped:
        log.warning("%d example(s) dropped (over-long with no response left, or no target tokens): %s%s",
                    len(dropped), dropped[:10], " ..." if len(dropped) > 10 else "")
    if not out:
        raise ValueError("no usable training examples")
    return out


def sft_step(model, weighted: bool = False):
    """Step function: summed NLL over target tokens (`losses.sft`), units = target tokens, or
    with `weighted` their total weight. Takes padded or packed batches (`data.collate`, per-token
    `weights`) and prompt-sharing rows (`data.packing.shared_prefix_rows`, one weight per example)."""

    def step(batch: dict):
        if "source" in batch:  # a prompt-sharing row
            logps = group_token_logprobs(model, batch)
            weights = batch["weights"][batch["segments"]] if weighted else None
            units = float((batch["weights"] * batch["lengths"]).sum()) if weighted else float(logps.numel())
        else:
            logps, mask = target_logprobs(model, batch)
            weights = batch["weights"][:, 1:][mask] if weighted else None
            units = float(weights.sum()) if weighted else float(logps.numel())
        per_token, metrics = sft_loss(logps, weights)
        return per_token.sum(), units, {"nll": metrics["nll_sum"].item()}

    return step


def eval_loss_fn(tokenized: list[Tokenized], pad_id: int, batch_size: int = 8):
    """Mean NLL per target token on held-out examples."""

    def evaluate(model) -> dict:
        total, count = 0.0, 0
        device = next(model.parameters()).device
        for s in range(0, len(tokenized), batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(tokenized[s: s + batch_size], pad_id).items()}
            logps, _ = target_logprobs(model, batch)
            total -= logps.float().sum().item()
            count += logps.numel()
        return {"loss": total / max(1, count)}

    return evaluate


def train_sft(model, tokenizer, train: list[Tokenized], cfg: CheckpointConfig, packing: bool = True,
              eval_fn=None, run_config: dict | None = None, weighted: bool = False,
              resume: bool = False) -> tuple[Engine, dict]:
    """The SFT stage: fit `model` on tokenized examples with the engine; returns (engine, metrics).
    `weighted`: scale each example's NLL by its `Tokenized.weight` (reward-weighted NLL). `cfg` is
    an SFTTrainConfig when packing is off (batch_size) or `eval_fn` is given (eval_every)."""
    batch_size = 0 if packing else cfg.batch_size
    batches = epoch_batches_fn(train, tokenizer.pad_token_id, cfg.seed, packing, batch_size, cfg.max_tokens_per_batch)
    engine = Engine(model, cfg, steps_for(len(batches(0)), cfg), run_config, resume)
    metrics = fit(engine, sft_step(engine.model, weighted), batches, eval_fn)
    return engine, metrics


def builtin_examples(data: SFTExamplesConfig, seed: int) -> list[SFTExample]:
    if data.builtin == "mixture":
        return build_mixture(data.mixture)
    if data.builtin == "arithmetic":
        problems = generate_problems(data.arithmetic_examples, seed=seed, split="train", config=ArithmeticConfig())
        return [SFTExample(user_prompt(arithmetic_prompt(p, data.arithmetic_style))
                           + (Message("assistant", target_text(p, data.arithmetic_style)),)) for p in problems]
    raise ValueError(f"data.builtin must be mixture or arithmetic, not {data.builtin!r}")


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, int(len(examples) * fraction))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def load_examples(data: SFTExamplesConfig, seed: int,
                  skipped: list[dict] | None = None) -> tuple[list[SFTExample], list[SFTExample]]:
    """Training and held-out examples, all validated before any model is loaded; rows of the
    files dropped by data.on_invalid=skip go to `skipped`."""
    examples = load_sft(data.path, data.split, data.on_invalid, skipped) if data.path else builtin_examples(data, seed)
    if data.eval_path:
        return examples, load_sft(data.eval_path, data.split, data.on_invalid, skipped)
    return split_eval(examples, data.eval_fraction, seed)


def gatt_following(model, tokenizer, gatt: GAttConfig, precision: str, prefix: str) -> dict:
    """Instruction following per turn on held-out dialogues (`eval.gatt`), as flat metrics."""
    result = instruction_following_by_turn(model, tokenizer, gatt.eval_dialogues, list(dict.fromkeys(gatt.instructions)),
                                           gatt.turns, precision, gatt.max_new_tokens, gatt.seed)
    out = {f"{prefix}gatt_following_turn_{k + 1}": share for k, share in enumerate(result["by_turn"])}
    out.update({f"{prefix}gatt_following_mean": result["mean"], f"{prefix}gatt_kept_turns": result["kept_turns"]})
    log.info("GAtt following per turn (%s): %s, kept for %.2f turns on average", prefix.rstrip("/"),
             " ".join(f"{s:.2f}" for s in result["by_turn"]), result["kept_turns"])
    return out


def gatt_data(model, tokenizer, cfg: SFTConfig) -> tuple[list[Tokenized], dict]:
    """The GAtt examples sampled from the starting model, tokenized with the loss on the last reply
    only; an over-long one is dropped rather than cut from the left, which would cut the instruction."""
    gatt = cfg.data.gatt
    examples, stats = build_gatt_examples(model, tokenizer, gatt, cfg.train.precision)
    log.info("GAtt: kept %d of %d dialogues (%s), %d examples", stats["kept"], stats["tried"],
             ", ".join(f"{n} {c['kept']}/{c['tried']}" for n, c in stats["per_instruction"].items()), stats["examples"])
    metrics = {"gatt/dialogues_tried": stats["tried"], "gatt/dialogues_kept": stats["kept"], "gatt/examples": stats["examples"]}
    if not examples:
        if gatt.mix == "replace":
            raise ValueError(f"data.gatt: none of {stats['tried']} dialogues followed the instruction in every turn; "
                             "raise data.gatt.samples_per_turn or data.gatt.dialogues")
        log.warning("data.gatt: no dialogue kept; training on the other data only")
        return [], metrics
    overlong = "error" if cfg.data.on_overlong == "error" else "drop"
    return tokenize_examples(tokenizer, examples, cfg.data.max_length, "last", overlong), metrics


def run(cfg: SFTConfig) -> dict:
    skipped: list[dict] = []
    gatt = cfg.data.gatt
    only_gatt = gatt.enabled and gatt.mix == "replace"
    train_examples, eval_examples = ([], []) if only_gatt else load_examples(cfg.data, cfg.train.seed, skipped)
    torch.manual_seed(cfg.train.seed)
    model, tokenizer, _ = load_model(cfg.model)
    run_dir = Path(cfg.train.output_dir)
    write_skipped(run_dir, skipped)
    start = starting_accuracy(model, tokenizer, cfg.eval, run_dir)
    gatt_train, gatt_metrics = gatt_data(model, tokenizer, cfg) if gatt.enabled else ([], {})
    gatt_eval = gatt.enabled and gatt.eval_dialogues > 0
    if gatt_eval:
        start.update(gatt_following(model, tokenizer, gatt, cfg.train.precision, "eval/start_"))
    tok = lambda exs: tokenize_examples(tokenizer, exs, cfg.data.max_length, cfg.data.targets, cfg.data.on_overlong)
    train = (tok(train_examples) if train_examples else []) + gatt_train
    held_out = tok(eval_examples) if eval_examples else []
    log.info("SFT on %d examples (%d target tokens), %d held out", len(train), sum(t.n_targets for t in train), len(held_out))
    eval_fn = eval_loss_fn(held_out, tokenizer.pad_token_id) if held_out else None
    engine, metrics = train_sft(model, tokenizer, train, cfg.train, cfg.data.packing, eval_fn, asdict(cfg),
                                resume=cfg.train.resume)
    metrics.update(start)
    metrics.update(gatt_metrics)

    def finish() -> dict:  # on the main process (the others wait for it): evaluate, save final/
        if gatt_eval:
            result = gatt_following(engine.model, tokenizer, gatt, cfg.train.precision, "")
            engine.log(result, prefix="eval/")
            metrics.update({f"eval/{k}": v for k, v in result.items()})
        if cfg.eval.problems > 0:
            result = evaluate_arithmetic(engine.model, tokenizer, heldout_problems(cfg.eval), cfg.eval,
                                         run_dir / "eval_samples.jsonl")
            engine.log({"arithmetic_accuracy": result["accuracy"]}, prefix="eval/")
            metrics["eval/arithmetic_accuracy"] = result["accuracy"]
        engine.metrics.close()  # every row is logged
        final = save_model(engine.model, tokenizer, run_dir / "final", merge_lora=cfg.train.merge_lora)
        metrics["final_model"] = str(final)
        return metrics

    return on_main(finish) or metrics
