"""Direct preference optimisation: `alignkit dpo` (DPO, conservative DPO, IPO).

The whole story:
1. Pairs: a file in TRL's formats (or HH-RLHF text), or, with no data.path, the built-in
   correct/incorrect arithmetic pairs sampled from the starting model (algorithms/make_pairs.py).
2. Optionally (`sft_reference`) fit the reference by SFT on the chosen responses first, when
   the user has no SFT model; the policy then starts from that reference.
3. Every micro-batch is one padding-free row of [prompt, chosen, rejected] groups: the prompt is
   prefilled once for both responses and the output head runs on response tokens only.
4. Reference log-probs: with LoRA the same weights with the adapter disabled (one copy of the
   base in memory); without LoRA a frozen copy; or, with `precompute_ref`, one inference pass
   over all rows before training (then full fine-tuning keeps no reference model at all).
5. losses.dpo (dpo_loss with label smoothing, or ipo_loss) through the engine's one loop, which
   adds accumulation, bf16 autocast and checkpoints; then held-out arithmetic accuracy.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from alignkit.algorithms.make_pairs import PairsConfig, make_pairs, write_pairs
from alignkit.algorithms.sft import tokenize_examples, train_sft
from alignkit.config import at_least, in_range, one_of, opt, positive
from alignkit.data.formats import load_preferences
from alignkit.data.io import write_skipped
from alignkit.data.packing import Group, pack_rows, shuffled, tokenize_group
from alignkit.data.records import Message, PreferencePair, SFTExample
from alignkit.engine.config import CheckpointConfig, LoopConfig, TrainConfig
from alignkit.engine.distributed import on_main
from alignkit.engine.trainer import Engine, fit, resolve_device, steps_for, to_device
from alignkit.eval.arithmetic import TrainingEvalConfig, evaluate_arithmetic, heldout_problems, starting_accuracy
from alignkit.losses.dpo import dpo_loss, ipo_loss
from alignkit.models.forward import group_logprobs
from alignkit.models.load import ModelConfig, add_lora, load_model, save_model

log = logging.getLogger("alignkit")


@dataclass
class DPODataConfig:
    path: str = opt("", "preference pairs (JSONL, JSON, Parquet or a datasets dir; TRL formats or HH-RLHF text); empty = built-in arithmetic pairs")
    split: str | None = opt(None, "split of a DatasetDict directory")
    on_invalid: str = opt("error", "a row that cannot be used is an error (listing every one), or skip: drop it with a "
                                   "warning and list it in <output_dir>/skipped.jsonl (no usable row at all is still an error)")
    max_length: int = opt(512, "tokens of prompt + longer response; longer pairs lose prompt tokens from the left, then response tokens")
    pairs: PairsConfig = opt(factory=PairsConfig, help="the built-in correct/incorrect pairs (used when path is empty)")


@dataclass
class DPOConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="the starting model (policy and reference)")
    train: TrainConfig = opt(factory=lambda: TrainConfig(output_dir="runs/dpo", lr=1e-6, warmup_ratio=0.1), help="training loop")
    data: DPODataConfig = opt(factory=DPODataConfig, help="preference pairs")
    loss: str = opt("dpo", "dpo: -log sigmoid(beta h) (label_smoothing > 0 = conservative DPO); ipo: (h - 1/(2 beta))^2 on length-averaged log-probs")
    beta: float = opt(0.1, "strength of the implicit KL penalty to the reference")
    label_smoothing: float = opt(0.0, "conservative DPO: probability that a pair's label is flipped (0..0.5)")
    nll_weight: float = opt(0.0, "RPO / DPO+NLL (Pang et al. 2024): add this times the chosen response's per-token NLL")
    precompute_ref: bool = opt(False, "compute reference log-probs in one inference pass before training (no reference model kept)")
    sft_reference: bool = opt(False, "first fit the reference by SFT on the chosen responses (when there is no SFT model)")
    reference_train: CheckpointConfig = opt(factory=lambda: CheckpointConfig(output_dir="", lr=2e-5, epochs=1.0),
                                            help="the SFT of the reference (output_dir empty = <train.output_dir>/reference; "
                                                 "resumes with train.resume)")
    eval: TrainingEvalConfig = opt(factory=lambda: TrainingEvalConfig(problems=200), help="held-out arithmetic accuracy after training")

    def __post_init__(self):
        if self.loss not in ("dpo", "ipo"):
            raise ValueError(f"loss must be dpo or ipo, not {self.loss!r}")
        if self.label_smoothing and self.loss != "dpo":
            raise ValueError("label_smoothing (conservative DPO) applies to loss=dpo only")
        positive(self, "beta")
        in_range(self, "label_smoothing", 0.0, 0.5, high_open=True)
        at_least(self, 0, "nll_weight")
        at_least(self, 1, "data.max_length")
        one_of(self, "data.on_invalid", "error", "skip")


def tokenize_pairs(tokenizer, pairs: list[PreferencePair], max_length: int) -> list[Group]:
    """One group [prompt, chosen, rejected] per pair; pairs with no response token left are dropped (and counted)."""
    groups = [tokenize_group(tokenizer, p.prompt, [p.chosen, p.rejected], max_length) for p in pairs]
    kept = [g for g in groups if g is not None]
    cut = sum(g.truncated for g in kept)
    if cut:
        log.warning("%d of %d pair(s) longer than data.max_length=%d were truncated (prompt tokens from the left, then "
                    "response tokens at the right)", cut, len(groups), max_length)
    if len(kept) < len(groups):
        log.warning("%d pair(s) dropped: no response token fits in data.max_length=%d", len(groups) - len(kept), max_length)
    if not kept:
        raise ValueError("no usable preference pairs")
    return kept


def pair_loss(policy: torch.Tensor, reference: torch.Tensor, lengths: torch.Tensor, cfg: DPOConfig):
    """Per-pair loss and metrics from per-response log-probs [2P] ordered chosen, rejected, chosen, ..."""
    nll = -policy[0::2] / lengths[0::2]  # per-token NLL of the chosen responses
    if cfg.loss == "ipo":
        policy, reference = policy / lengths, reference / lengths
        losses, metrics = ipo_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2], cfg.beta)
    else:
        losses, metrics = dpo_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2], cfg.beta, cfg.label_smoothing)
    if cfg.nll_weight:
        losses = losses + cfg.nll_weight * nll
        metrics = {**metrics, "nll/chosen": nll.detach().mean()}
    return losses, metrics


def reference_fn(model, frozen=None):
    """Reference log-probs of a row: a frozen copy's, or (LoRA) the model's with its adapter disabled."""

    @torch.no_grad()
    def reference(batch: dict) -> torch.Tensor:
        if frozen is not None:
            return group_logprobs(frozen, batch)
        with model.disable_adapter():
            return group_logprobs(model, batch)

    return reference


def dpo_step(model, cfg: DPOConfig, reference=None):
    """Step function: summed pair losses, units = pairs. Reference log-probs come from the batch
    ('ref_logps', precomputed) or from `reference(batch)`."""

    def step(batch: dict):
        ref = batch["ref_logps"] if "ref_logps" in batch else reference(batch)
        losses, metrics = pair_loss(group_logprobs(model, batch), ref, batch["lengths"], cfg)
        n = losses.shape[0]
        return losses.sum(), float(n), {k: v.item() * n for k, v in metrics.items()}

    return step


def precompute_reference(rows: list[dict], reference, cfg: LoopConfig) -> None:
    """Store each row's reference log-probs in it (under the training precision)."""
    device = resolve_device(cfg.device)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else contextlib.nullcontext()
    with bf16:
        for row in rows:
            row["ref_logps"] = reference(to_device(row, device)).float().cpu()


def fit_reference(model, tokenizer, pairs: list[PreferencePair], cfg: DPOConfig):
    """SFT on the chosen responses; returns the fitted model (a LoRA adapter is merged into it)."""
    examples = [SFTExample(p.prompt + (Message("assistant", p.chosen),)) for p in pairs]
    train = tokenize_examples(tokenizer, examples, cfg.data.max_length)
    rt = cfg.reference_train
    rt = replace(rt, output_dir=rt.output_dir or str(Path(cfg.train.output_dir) / "reference"))
    if cfg.model.lora is not None:
        model = add_lora(model, cfg.model.lora)
    log.info("fitting the reference by SFT on %d chosen responses", len(train))
    engine, _ = train_sft(model, tokenizer, train, rt, resume=cfg.train.resume)
    engine.metrics.close()
    return engine.model.merge_and_unload() if cfg.model.lora is not None else engine.model


def run(cfg: DPOConfig) -> dict:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.train.output_dir)
    saved = run_dir / "pairs.jsonl"  # built-in pairs of this run; a resumed run reads them back
    path = cfg.data.path or (str(saved) if cfg.train.resume and saved.is_file() else "")
    skipped: list[dict] = []
    pairs = load_preferences(path, cfg.data.split if cfg.data.path else None, cfg.data.on_invalid, skipped) if path else None
    write_skipped(run_dir, skipped)
    torch.manual_seed(cfg.train.seed)
    model, tokenizer, _ = load_model(cfg.model, train=False)
    result = starting_accuracy(model, tokenizer, cfg.eval, run_dir)
    if pairs is None:
        pairs, stats = make_pairs(model, tokenizer, cfg.data.pairs, cfg.train.precision)
        result.update({f"pairs/{k}": v for k, v in stats.items()})
        result["pairs_file"] = str(write_pairs(pairs, saved))
    rows = pack_rows(tokenize_pairs(tokenizer, pairs, cfg.data.max_length), cfg.train.max_tokens_per_batch)
    log.info("DPO on %d pairs in %d packed rows", len(pairs), len(rows))
    if cfg.sft_reference:
        model = fit_reference(model, tokenizer, pairs, cfg)
    model.to(resolve_device(cfg.train.device))
    if cfg.model.lora is not None:
        model = add_lora(model, cfg.model.lora)
        reference = reference_fn(model)
    else:
        reference = reference_fn(model, model if cfg.precompute_ref else copy.deepcopy(model).requires_grad_(False).eval())
    if cfg.precompute_ref:  # before the engine: a resumed run loads trained weights into `model`
        precompute_reference(rows, reference, cfg.train)
        reference = None
    engine = Engine(model, cfg.train, steps_for(len(rows), cfg.train), asdict(cfg), cfg.train.resume)
    result.update(fit(engine, dpo_step(engine.model, cfg, reference), shuffled(rows, cfg.train.seed)))
    return {**result, **(on_main(lambda: finish(engine, tokenizer, cfg.eval, run_dir, cfg.train.merge_lora)) or {})}


def finish(engine: Engine, tokenizer, eval_cfg: TrainingEvalConfig, run_dir: Path, merge_lora: bool) -> dict:
    """Held-out arithmetic accuracy of the trained policy (when asked), then save it as a plain HF model."""
    out = {}
    if eval_cfg.problems > 0:
        out["eval/arithmetic_accuracy"] = evaluate_arithmetic(engine.model, tokenizer, heldout_problems(eval_cfg), eval_cfg,
                                                              run_dir / "eval_samples.jsonl")["accuracy"]
        engine.log({"arithmetic_accuracy": out["eval/arithmetic_accuracy"]}, prefix="eval/")
    engine.metrics.close()  # every row is logged
    out["final_model"] = str(save_model(engine.model, tokenizer, run_dir / "final", merge_lora=merge_lora))
    return out
