"""RLHF with PPO, and the critic-free REINFORCE / RLOO / GRPO on the same machinery: `alignkit ppo`.

One iteration (docs/architecture.md: online methods are stages):
1. collect: `prompts_per_iteration` training prompts, `sampling.n` replies each, sampled from the
   actor through the Generator protocol (`sampling.backend`: `rollout.hf.HFGenerator` or vLLM).
2. score: any RewardFn (gold rules, arithmetic verifier, a trained RM, Llama 2's combined
   helpfulness/safety with logit, or your function); whitened over the batch (default), optional
   clipping and a penalty for replies cut at sampling.max_new_tokens.
3. recompute, without gradient: actor log-probs (never the sampler's), reference log-probs,
   entropy and (PPO) critic values; r_t = −β·KL_t with the score added at the last token.
4. advantages, where the methods differ (the `ALGORITHMS` table):
   ppo: GAE(γ, λ) over the critic's values, whitened; reinforce: sequence return minus the
   batch mean; rloo: minus the mean of the other k−1 samples of the prompt; grpo: group-
   normalised scores, with β·KL(π‖π_ref) (k3) as a loss term instead of a reward term.
5. train: `ppo_epochs` passes over shuffled minibatches, one optimizer step each (micro-batches
   of train.batch_size rows accumulate), clipped policy loss + vf_coef·clipped value loss
   (+ γ_ptx·NLL on SFT data, InstructGPT's PPO-ptx); then the KL controller, which owns β,
   updates it.
Every iteration logs reward mean/std, KL, β, entropy, clip fraction, approx-KL, ratio max and share over ratio_cap, value loss,
explained variance, response length and tokens/s; warns when KL or length runs away; writes
samples to samples.jsonl; evaluates held-out reward and KL every `eval.every` iterations
(optional early stopping); and checkpoints the loop state every `train.save_every` iterations
(iteration, the KL controller's state, early-stopping state; the engine adds RNG states).

Launched as several processes (`engine/distributed.py`), the processes sample and score the
iteration's prompts shard by shard (shards of sampling.batch_size prompts, each with its own
seed, so that the rollouts do not depend on the process count: `common.collect_shared`; spread
over N processes when prompts_per_iteration >= N × sampling.batch_size), gather them in shard
order, share out the no-grad passes by row chunks, and compute the shaped scores and advantages
over the whole batch, the same on every process; the engine then shares out each minibatch's
micro-batches. The main process evaluates and writes every file; `shards.jsonl` records which
process sampled each shard of each iteration, with digests of the shards and of the pool. With
`train.fsdp` the engine shards the actor-critic (FSDP2) for the updates; sampling, scoring, the
no-grad passes and evaluations run inside `engine.gathered()`, the whole model on every process,
and the micro-batches' parts come in the same order on every process (`micro_batches`).

Memory (N = parameters of the model; fp32 weights 4N bytes, gradients 4N, AdamW moments 8N) and
compute (passes of the model per micro-batch of training, and per iteration without gradient):

| memory | critic_trunk | held in memory                             | trained (grads + AdamW)  | 135M    | passes        |
|--------|--------------|--------------------------------------------|--------------------------|---------|---------------|
| lora   | shared       | one frozen base 4N + adapter + value head  | adapter + head (~7% of N)| ~0.55 GB| 1 fwd/bwd; 2  |
| lora   | own          | one frozen base 4N + 2 adapters + head     | 2 adapters + head        | ~0.6 GB | 2 fwd/bwd; 3  |
| full   | shared       | actor 4N + frozen reference 4N             | actor 12N                | ~2.7 GB | 1 fwd/bwd; 2  |
| full   | own          | actor 4N + critic 4N + frozen reference 4N | actor 12N + critic 12N   | ~4.9 GB | 2 fwd/bwd; 3  |

lora: the reference costs nothing (adapters off); with train.precision=bf16 the frozen base
linears are held in bf16 (`store_frozen_base`: no number changes under autocast). shared: the
value head reads the actor's hidden states, so one forward and one backward serve the policy and
value losses, and the no-grad pass that gives the old log-probs also gives the old values; the
value loss (× vf_coef) then also moves the actor's weights. own: the critic has its own adapter
(lora) or backbone (full), so it is free of the policy but costs a pass of the model of its own.
A trained reward model (reward.kind=model) adds 4N in every mode, and a critic initialised from a
reward model (critic_trunk=own) adds its own frozen backbone in lora mode. Critic-free methods
(reinforce, rloo, grpo) drop the critic and its optimizer state. Activations come on top.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from alignkit.algorithms.ppo.actor_critic import build_actor_critic, trainable_parameters
from alignkit.algorithms.ppo.common import (KLConfig, PromptsConfig, PTXConfig, RewardConfig, RLEvalConfig, collect_shared,
                                           early_stop, mean_stats, measure_policy, per_token, prompts_for,
                                           ptx_stream, shape_scores, trim_samples, warn_runaway)
from alignkit.algorithms.sampling.stages import record_shards, write_samples
from alignkit.config import opt
from alignkit.data.io import write_skipped
from alignkit.engine import distributed
from alignkit.engine.config import PPOTrainConfig
from alignkit.engine.trainer import Engine, to_device
from alignkit.losses.ppo import (AdaptiveKLController, FixedKLController, explained_variance, grpo_advantages,
                                 kl_loss, kl_penalized_rewards, policy_loss, ptx_loss, reinforce_advantages,
                                 rloo_advantages, value_loss)
from alignkit.models.forward import target_logprobs
from alignkit.models.load import LoraConfig, ModelConfig, save_model
from alignkit.ops import gae, masked_mean, masked_whiten
from alignkit.rollout.base import SamplingConfig
from alignkit.rollout.batch import select_rows
from alignkit.rollout.backends import make_generator
from alignkit.tasks import build_task

log = logging.getLogger("alignkit")


@dataclass(frozen=True)
class Algorithm:
    """What sets one method of the family apart (`ALGORITHMS`)."""

    critic: bool  # a value model: built by `run`, trained by `make_step`'s value loss
    min_samples: int  # replies per prompt the advantages compare (sampling.n, checked by PPOConfig)
    advantages: Callable  # (cfg, per-token rewards, old values or None, mask) -> (advantages [B, T], returns or None)
    whiten: bool  # whiten_advantages applies; grpo's advantages are normalised per group already
    kl_in_loss: bool  # β·KL(π‖π_ref) (k3) is a loss term (`make_step`), not −β·KL_t in the reward (`run`)


def gae_advantages(cfg, rewards, values, mask):
    """GAE(γ, λ) over the critic's values; returns = advantages + values."""
    return gae(rewards, values, mask, cfg.gamma, cfg.lam)


def per_reply(baseline: Callable[[torch.Tensor], torch.Tensor]):
    """Critic-free advantages: each reply's return (score − β·KL; grpo: the score) against a
    baseline over the [prompts, k] returns, on every token of the reply. Nothing learns a value,
    so there are no returns."""
    def advantages(cfg, rewards, values, mask):
        return baseline(rewards.sum(1).view(-1, cfg.sampling.n)).reshape(-1, 1) * mask, None
    return advantages


def minus_batch_mean(returns: torch.Tensor) -> torch.Tensor:
    """REINFORCE's baseline: the mean return of the whole batch."""
    return reinforce_advantages(returns, returns.mean())


ALGORITHMS = {  # the family, one method a row
    "ppo":       Algorithm(critic=True,  min_samples=1, advantages=gae_advantages,              whiten=True,  kl_in_loss=False),
    "reinforce": Algorithm(critic=False, min_samples=1, advantages=per_reply(minus_batch_mean), whiten=True,  kl_in_loss=False),
    "rloo":      Algorithm(critic=False, min_samples=2, advantages=per_reply(rloo_advantages),  whiten=True,  kl_in_loss=False),
    "grpo":      Algorithm(critic=False, min_samples=2, advantages=per_reply(grpo_advantages),  whiten=False, kl_in_loss=True),
}


@dataclass
class PPOConfig:
    model: ModelConfig = opt(factory=lambda: ModelConfig(lora=LoraConfig()), help="the policy to train (and reference)")
    train: PPOTrainConfig = opt(factory=lambda: PPOTrainConfig(output_dir="runs/ppo", lr=5e-5, schedule="constant", warmup_ratio=0.0,
                                                               weight_decay=0.0),
                                help="optimizer, micro-batches, checkpoints, and fsdp: the actor-critic sharded over the "
                                     "processes for the updates, gathered whole on each for sampling and no-grad passes")
    prompts: PromptsConfig = opt(factory=PromptsConfig, help="training and held-out prompts")
    reward: RewardConfig = opt(factory=RewardConfig, help="the reward")
    algorithm: str = opt("ppo", "ppo (critic + GAE), reinforce (batch-mean baseline), rloo (leave-one-out over k samples), grpo")
    memory: str = opt("lora", "lora: one frozen base, adapters for actor and critic, reference = adapters off; full: separate models")
    critic_init: str = opt("policy", "initialise the critic from the policy or from a reward_model (InstructGPT)")
    critic_path: str = opt("", "reward model for critic_init=reward_model (empty = reward.path)")
    critic_trunk: str = opt("auto", "shared: value head on the actor's own pass (one forward/backward for both losses); "
                                    "own: the critic has its own adapter (lora) or backbone (full); "
                                    "auto: shared for critic_init=policy, own for reward_model")
    iterations: int = opt(50, "collect-and-train iterations")
    prompts_per_iteration: int = opt(16, "prompts sampled per iteration")
    sampling: SamplingConfig = opt(factory=lambda: SamplingConfig(max_new_tokens=48),
                                   help="the rollouts: n = replies per prompt (k; rloo and grpo need >= 2), temperature > 0 "
                                        "(log-probs are of the tempered policy), batch_size = prompts prefilled together "
                                        "and the row chunk of no-grad forwards")
    ppo_epochs: int = opt(4, "passes over each iteration's rollouts")
    minibatch_size: int = opt(16, "replies per optimizer step")
    clip: float = opt(0.2, "policy ratio clip ε")
    ratio_cap: float = opt(0.0, "dual-clip cap c on the policy ratio for negative advantages: the per-token loss is at "
                                "most c·|A| (Ye et al. 2020; e.g. 3; 0 = off). ratio_max and ratio_over_cap are logged")
    vf_clip: float = opt(0.2, "value clip ε_v (0 = off)")
    vf_coef: float = opt(0.1, "value loss coefficient")
    gamma: float = opt(1.0, "GAE discount γ")
    lam: float = opt(0.95, "GAE λ")
    whiten_advantages: bool = opt(True, "whiten advantages over the batch (ppo, reinforce, rloo)")
    loss_reduction: str = opt("token", "token (mean over all tokens) or sequence (mean per reply, then over replies)")
    kl: KLConfig = opt(factory=KLConfig, help="KL penalty to the reference")
    ptx: PTXConfig = opt(factory=PTXConfig, help="PPO-ptx: SFT loss mixed into every step")
    eval: RLEvalConfig = opt(factory=RLEvalConfig, help="held-out evaluation")
    samples_every: int = opt(5, "write a few sampled replies to samples.jsonl every N iterations (0 = never)")
    warn_kl: float = opt(20.0, "warn when the KL per reply exceeds this (nats)")

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {tuple(ALGORITHMS)}, not {self.algorithm!r}")
        if self.sampling.n < self.method.min_samples:
            raise ValueError(f"algorithm={self.algorithm} compares k samples of a prompt: set sampling.n >= {self.method.min_samples}")
        if self.sampling.temperature <= 0:
            raise ValueError("sampling.temperature must be > 0: the loss needs the log-probs of the tempered policy, "
                             "and greedy decoding (0) has none")
        if self.critic_trunk == "auto":
            self.critic_trunk = "own" if self.critic_init == "reward_model" else "shared"
        if self.critic_trunk not in ("shared", "own"):
            raise ValueError(f"critic_trunk must be shared, own or auto, not {self.critic_trunk!r}")
        if self.critic_trunk == "shared" and self.critic_init == "reward_model":
            raise ValueError("critic_trunk=shared puts the value head on the policy's own pass, so the critic cannot start "
                             "from a reward model: use critic_trunk=own with critic_init=reward_model")
        if self.ratio_cap != 0 and self.ratio_cap < 1:
            raise ValueError(f"ratio_cap must be 0 (off) or >= 1, not {self.ratio_cap!r}")
        if self.loss_reduction not in ("token", "sequence"):
            raise ValueError(f"loss_reduction must be token or sequence, not {self.loss_reduction!r}")
        if self.train.deepspeed and self.sampling.backend == "vllm":
            raise ValueError("train.deepspeed cannot sample with sampling.backend=vllm yet (untested): use sampling.backend=hf")
        if self.train.fsdp and self.sampling.backend == "vllm":
            raise ValueError("train.fsdp cannot sample with sampling.backend=vllm: its engine takes the policy's whole "
                             "weights from the model, and under FSDP each process holds only its shard of them; use "
                             "sampling.backend=hf")

    @property
    def method(self) -> Algorithm:
        return ALGORITHMS[self.algorithm]


def kl_controller(cfg: KLConfig, saved: dict | None = None):
    """The owner of β, fixed or adaptive; `saved` is its state in the checkpoint being resumed."""
    ctl = AdaptiveKLController(cfg.beta, cfg.target, cfg.horizon) if cfg.adaptive else FixedKLController(cfg.beta)
    if saved is not None:
        ctl.load_state_dict(saved)
    return ctl


def recompute(ac, engine: Engine, cfg: PPOConfig, batch: dict) -> dict:
    """Without gradient, in row chunks of sampling.batch_size shared out between the processes (every
    process gets the whole batch's numbers): the actor's old log-probs and entropy
    (never the sampler's numbers), the reference's log-probs, with a critic the old values (else
    None), and the k1 KL per reply, Σ_t log π_old − log π_ref (logged, comparable across runs)."""
    def no_grad(fn):
        with torch.no_grad(), engine.autocast():
            return per_token(lambda b: fn(to_device(b, engine.device)), batch, cfg.sampling.batch_size, shared=True)

    ac.eval()
    temperature = cfg.sampling.temperature
    if ac.critic is not None:
        old_logp, entropy, values = no_grad(lambda b: ac.policy_outputs(b, temperature, entropy=True))
    else:
        (old_logp, entropy), values = no_grad(lambda b: ac.policy_logprobs(b, temperature, entropy=True)), None
    ref_logp = no_grad(lambda b: ac.reference_logprobs(b, temperature))
    kl = ((old_logp - ref_logp) * batch["response_mask"]).sum(1)
    return {"old_logp": old_logp, "entropy": entropy, "old_values": values, "ref_logp": ref_logp, "kl": kl}


def compute_advantages(cfg: PPOConfig, rewards, values, mask):
    """(advantages [B, T], returns [B, T] or None) from the KL-shaped per-token rewards: the method's
    advantage function, then whitening over the batch where it applies."""
    adv, returns = cfg.method.advantages(cfg, rewards, values, mask)
    if cfg.whiten_advantages and cfg.method.whiten:
        adv = masked_whiten(adv, mask)
    return adv, returns


def units_of(cfg: PPOConfig, mask: torch.Tensor) -> float:
    """What a micro-batch's loss is a sum over: response tokens, or replies (loss_reduction)."""
    return float(mask.sum()) if cfg.loss_reduction == "token" else float(mask.shape[0])


def micro_batches(batch: dict, rows: torch.Tensor, cfg: PPOConfig, critic: bool, ptx, processes: int = 1,
                  fsdp: bool = False) -> list[dict]:
    """The engine's micro-batches for one minibatch. Each row chunk is a "policy" part and, with a
    critic of its own trunk, a "critic" part (and a "ptx" part): each part runs its own forward
    and backward, so activation memory peaks at one model pass (a shared-trunk critic is trained
    inside the policy part). Only policy parts carry units; the engine divides the summed gradient
    by them, which gives exactly ∇(policy + vf_coef·value (+ γ_ptx·NLL)).

    The chunks come in rounds of `processes`: a round's policy parts, then its critic parts, then
    its ptx parts. The engine gives the k-th of N processes micro-batches k, k+N, ..., so each
    takes one chunk of a round, part after part (in one process: chunk after chunk). Under FSDP
    every process must run the same part at each pass (the part decides which units are gathered
    and which parameters get gradients, and FSDP's collectives pair up across the processes), so
    a round short of chunks is filled with "pad" parts: copies of its first chunk's that count
    for nothing."""
    size = cfg.train.batch_size
    chunks = [select_rows(batch, rows[i:i + size]) for i in range(0, len(rows), size)]
    out = []
    for first in range(0, len(chunks), processes):
        round_ = chunks[first:first + processes]
        kinds = [[{**chunk, "part": "policy"} for chunk in round_]]
        if critic:
            kinds.append([{**chunk, "part": "critic"} for chunk in round_])
        if ptx is not None:
            kinds.append([{"part": "ptx", "batch": next(ptx), "weight": units_of(cfg, chunk["response_mask"])} for chunk in round_])
        for parts in kinds:
            out += parts + ([{"part": "pad", "of": parts[0]}] * (processes - len(parts)) if fsdp else [])
    return out


def make_step(ac, cfg: PPOConfig, kl_ctl):
    """The engine's step function over one part of a micro-batch: (loss sum, units, metric sums).
    β is read from the KL controller at each step."""
    def value_terms(values, mb: dict, units: float):  # (vf_coef × value loss summed over units, metric sums)
        vl, vm = value_loss(values, mb["old_values"], mb["returns"], mb["response_mask"], cfg.vf_clip or None, cfg.loss_reduction)
        return cfg.vf_coef * vl.mean() * units, {"vf_loss": vl.mean().item() * units, "vf_clip_frac": vm["vf_clip_frac"].item() * units}

    def step(mb: dict):
        if mb["part"] == "pad":  # a pass that FSDP needs every process to run (micro_batches)
            return step(mb["of"])[0] * 0.0, 0.0, {}
        if mb["part"] == "ptx":  # InstructGPT's PPO-ptx: γ_ptx × token-mean NLL, weighted like its rollout chunk
            logps, _ = target_logprobs(ac.policy, mb["batch"])
            nll, _ = ptx_loss(logps[None], torch.ones_like(logps[None]))
            return cfg.ptx.coef * nll.mean() * mb["weight"], 0.0, {"ptx_nll": nll.mean().item() * mb["weight"]}
        mask = mb["response_mask"]
        units = units_of(cfg, mask)
        if mb["part"] == "critic":
            vf, vf_metrics = value_terms(ac.values(mb), mb, units)
            return vf, 0.0, vf_metrics
        if ac.shared_trunk:  # one pass: log-probs and values from the same hidden states
            logp, _, values = ac.policy_outputs(mb, cfg.sampling.temperature)
        else:
            logp, _ = ac.policy_logprobs(mb, cfg.sampling.temperature)
        pg, metrics = policy_loss(logp, mb["old_logp"], mb["advantages"], mask, cfg.clip, cfg.loss_reduction,
                                  cfg.ratio_cap or None)
        loss = pg.mean()
        metrics = {"pg_loss": loss.detach(), **{k: metrics[k] for k in ("clip_frac", "approx_kl", "ratio_max", "ratio_over_cap")}}
        if cfg.method.kl_in_loss and kl_ctl.beta > 0:
            kl_l, _ = kl_loss(logp, mb["ref_logp"], mask, "k3", cfg.loss_reduction)
            loss = loss + kl_ctl.beta * kl_l.mean()
            metrics["kl_loss"] = kl_l.mean().detach()
        sums = {k: float(v) * units for k, v in metrics.items()}
        loss = loss * units
        if ac.shared_trunk:
            vf, vf_metrics = value_terms(values, mb, units)
            loss, sums = loss + vf, {**sums, **vf_metrics}
        return loss, units, sums
    return step


def train_on(engine: Engine, ac, step_fn, batch: dict, cfg: PPOConfig, seed: int, ptx, state: dict) -> list[dict]:
    """`ppo_epochs` passes over the rollouts in shuffled minibatches, one optimizer step each; counts
    the PTX micro-batches used in state["ptx_index"] (where the stream resumes)."""
    rows, stats, order_gen = batch["response_mask"].shape[0], [], torch.Generator().manual_seed(seed)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(rows, generator=order_gen)
        for s in range(0, rows, cfg.minibatch_size):
            micro = micro_batches(batch, order[s:s + cfg.minibatch_size], cfg, ac.critic is not None and not ac.shared_trunk, ptx,
                                  distributed.world_size(), engine.sharded)
            stats.append(engine.train_step(micro, step_fn))
            state["ptx_index"] += sum(m["part"] == "ptx" for m in micro)
    return stats


def iteration_row(iteration: int, batch: dict, completions, scores, raw, old: dict, beta: float, stats: list[dict],
                  gen_s: float, seconds: float) -> dict:
    """The metrics of one iteration: reward, KL and the β it was trained with, entropy, length, the
    means over its optimizer steps, speeds."""
    mask, rows = batch["response_mask"], len(completions)
    lengths = mask.sum(1)
    row = {"iteration": iteration, "reward": raw.mean().item(), "reward_std": raw.std().item() if rows > 1 else 0.0,
           "score": scores.mean().item(), "kl": old["kl"].mean().item(), "beta": beta,
           "entropy": masked_mean(old["entropy"], mask).item(), "response_length": lengths.mean().item(),
           "truncated_frac": sum(c.finish_reason == "length" for c in completions) / rows,
           **mean_stats(stats), "gen_s": gen_s, "iteration_s": seconds,
           "gen_tokens_per_s": lengths.sum().item() / max(gen_s, 1e-9), "tokens_per_s": lengths.sum().item() / seconds}
    if old["old_values"] is not None:
        row["explained_variance"] = explained_variance(old["old_values"], batch["returns"], mask).item()
    return row


def log_iteration(engine: Engine, row: dict, state: dict, cfg: PPOConfig) -> None:
    """Write the row to the metrics, say it in one line, warn when KL or length runs away."""
    engine.log(row)
    log.info("iteration %d/%d: reward %.3f ± %.3f, KL %.3f, β %.4g, length %.1f, %.1f s", row["iteration"], cfg.iterations,
             row["reward"], row["reward_std"], row["kl"], row["beta"], row["response_length"], row["iteration_s"])
    warn_runaway(row, state, cfg.warn_kl)


def run(cfg: PPOConfig, reward_fn=None) -> dict:
    """`alignkit ppo`. `reward_fn` (a RewardFn) overrides cfg.reward for Python callers."""
    task = build_task(cfg.prompts, cfg.reward, cfg.train.precision)
    train_prompts, heldout, task_reward = task.train, task.heldout, task.reward
    reward_fn = reward_fn or task_reward
    bf16 = cfg.train.precision == "bf16"
    ac, tokenizer, _ = build_actor_critic(cfg.model, cfg.memory, cfg.critic_init if cfg.method.critic else None,
                                          cfg.critic_path or cfg.reward.path, cfg.train.seed, torch.bfloat16 if bf16 else None,
                                          cfg.critic_trunk)
    rows = cfg.prompts_per_iteration * cfg.sampling.n
    engine = Engine(ac, cfg.train, cfg.iterations * cfg.ppo_epochs * math.ceil(rows / cfg.minibatch_size), asdict(cfg),
                    cfg.train.resume)
    trained, total = trainable_parameters(ac)
    log.info("%s, memory=%s: %.2fM of %.1fM parameters trained", cfg.algorithm, cfg.memory, trained / 1e6, total / 1e6)
    state = {"iteration": 0, "best": None, "bad_evals": 0, "ptx_index": 0, "first_length": None, **engine.loop_state}
    kl_ctl = kl_controller(cfg.kl, state.pop("kl", None))
    skipped = list(task.skipped)  # rows of the prompts and PPO-ptx files dropped by on_invalid=skip
    ptx = ptx_stream(cfg.ptx, tokenizer, cfg.train.seed, cfg.train.max_tokens_per_batch, state["ptx_index"],
                     skipped) if cfg.ptx.coef > 0 else None
    step_fn = make_step(ac, cfg, kl_ctl)
    run_dir = Path(cfg.train.output_dir)
    main = distributed.is_main()
    if main:
        write_skipped(run_dir, skipped)
    # Under FSDP the policy's parameters are shards, swapped for gathered copies inside engine.gathered()
    # only: the sampler decodes through the adapters then, not through a merged twin made once, which
    # would keep the parameters it was made with.
    generator = make_generator(ac.policy, tokenizer, cfg.sampling.batch_size, "bf16" if bf16 else None,
                               cfg.sampling.backend, **({"merge_lora": False} if engine.sharded else {}))

    def measure() -> dict:
        ac.eval()
        temperature = cfg.sampling.temperature
        with torch.no_grad(), engine.autocast():
            return measure_policy(generator, tokenizer, heldout, reward_fn, cfg.sampling.params(cfg.eval.seed, n=1),
                                  lambda b: ac.policy_logprobs(b, temperature)[0], lambda b: ac.reference_logprobs(b, temperature),
                                  cfg.sampling.batch_size, engine.device)

    def evaluate(iteration: int) -> dict:
        """Held-out reward and KL, measured by the main process; every process gets them."""
        if not heldout:
            return {}
        with engine.gathered():
            result = distributed.broadcast(distributed.on_main(measure))
        engine.log({"iteration": iteration, **result}, prefix="eval/")
        log.info("eval @ %d: reward %.3f, KL %.2f", iteration, result["reward"], result["kl"])
        return result

    def checkpoint():
        engine.save({**state, "kl": kl_ctl.state_dict()})

    with engine.metrics.closing_on_error():  # a run that fails closes its trackers, as fit does
        if main:  # a new run's shard records start afresh; a resumed one's keep those up to its checkpoint
            trim_samples(run_dir / "shards.jsonl", state["iteration"], lambda row: int(row["phase"].split("-")[1]))
        if state["iteration"] == 0:
            early_stop(evaluate(0), state, 0)
        elif main:
            trim_samples(run_dir / "samples.jsonl", state["iteration"])
        stop = False
        while state["iteration"] < cfg.iterations and not stop:
            it, start = state["iteration"], time.perf_counter()
            seed = cfg.train.seed * 1_000_003 + it
            prompts = prompts_for(train_prompts, it, cfg.prompts_per_iteration, cfg.train.seed)
            with engine.gathered():  # under FSDP each process samples and runs its share of the no-grad passes alone
                batch, completions, shards = collect_shared(generator, tokenizer, prompts, cfg.sampling.params(seed), reward_fn,
                                                            cfg.sampling.batch_size, it + 1)
                gen_s = time.perf_counter() - start  # sampling and scoring
                old = recompute(ac, engine, cfg, batch)
            scores, raw = shape_scores(completions, cfg.reward)
            mask = batch["response_mask"]
            rewards, kl_seq = kl_penalized_rewards(scores, old["old_logp"], old["ref_logp"], mask,
                                                   0.0 if cfg.method.kl_in_loss else kl_ctl.beta, cfg.kl.estimator)
            advantages, returns = compute_advantages(cfg, rewards, old["old_values"], mask)
            batch.update(old_logp=old["old_logp"], ref_logp=old["ref_logp"], advantages=advantages)
            if returns is not None:
                batch.update(old_values=old["old_values"], returns=returns)
            stats = train_on(engine, ac, step_fn, batch, cfg, seed, ptx, state)
            row = iteration_row(it + 1, batch, completions, scores, raw, old, kl_ctl.beta, stats, gen_s, time.perf_counter() - start)
            kl_ctl.update(kl_seq.mean().item(), rows)
            state["iteration"] = it + 1
            log_iteration(engine, row, state, cfg)
            if main:
                record_shards(run_dir / "shards.jsonl", f"iteration-{it + 1}", shards, completions)
            if main and cfg.samples_every and (it % cfg.samples_every == 0 or it + 1 == cfg.iterations):
                write_samples(run_dir / "samples.jsonl", completions[:4], mode="a", kl=old["kl"][:4])
            if cfg.eval.every and (it + 1) % cfg.eval.every == 0 and it + 1 < cfg.iterations:
                stop = early_stop(evaluate(it + 1), state, cfg.eval.patience)
            if stop or (cfg.train.save_every and (it + 1) % cfg.train.save_every == 0):
                checkpoint()
        final = evaluate(state["iteration"])
        checkpoint()
    engine.metrics.close()  # every row is logged
    engine.unshard()  # under FSDP: the whole trained actor-critic on every process again
    ac = engine.model
    path = distributed.on_main(lambda: save_model(ac.policy_model(), tokenizer, run_dir / "final", merge_lora=cfg.train.merge_lora))
    path = path or run_dir / "final"
    return {"iterations": state["iteration"], "early_stopped": stop, "beta": kl_ctl.beta, "best_eval_reward": state["best"],
            **{f"eval/{k}": v for k, v in final.items()}, "final_model": str(path)}
