"""RLHF with PPO, and the critic-free REINFORCE / RLOO / GRPO on the same machinery: `alignkit ppo`.

One iteration (DESIGN.md: online methods are stages):
1. collect: `prompts_per_iteration` training prompts, `samples_per_prompt` replies each, sampled
   from the actor through the Generator protocol (HFGenerator here, vLLM on GPUs).
2. score: any RewardFn (gold rules, arithmetic verifier, a trained RM, Llama 2's combined
   helpfulness/safety with logit, or your function); whitened over the batch (default), optional
   clipping and a penalty for replies cut at max_new_tokens.
3. recompute, without gradient: actor log-probs (never the engine's), reference log-probs,
   entropy and (PPO) critic values; r_t = −β·KL_t with the score added at the last token.
4. advantages, the only thing that differs between methods:
   ppo: GAE(γ, λ) over the critic's values, whitened; reinforce: sequence return minus the
   batch mean; rloo: minus the mean of the other k−1 samples of the prompt; grpo: group-
   normalised scores, with β·KL(π‖π_ref) (k3) as a loss term instead of a reward term.
5. train: `ppo_epochs` passes over shuffled minibatches, one optimizer step each (micro-batches
   of train.batch_size rows accumulate), clipped policy loss + vf_coef·clipped value loss
   (+ γ_ptx·NLL on SFT data, InstructGPT's PPO-ptx); then the KL controller updates β.
Every iteration logs reward mean/std, KL, β, entropy, clip fraction, approx-KL, value loss,
explained variance, response length and tokens/s; warns when KL or length runs away; writes
samples to samples.jsonl; evaluates held-out reward and KL (optional early stopping); and
checkpoints the loop state (iteration, β, early-stopping state; the engine adds RNG states).

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

import torch

from alignkit.algorithms.ppo.common import (KLConfig, PromptsConfig, PTXConfig, RewardConfig, RLEvalConfig, build_task, collect,
                                           early_stop, mean_stats, measure_policy, per_token, prompts_for,
                                           ptx_stream, score, trim_samples, warn_runaway, write_samples)
from alignkit.config import opt
from alignkit.engine.config import TrainConfig
from alignkit.engine.trainer import Engine, resolve_device, to_device
from alignkit.losses.ppo import (AdaptiveKLController, FixedKLController, explained_variance, grpo_advantages,
                                 kl_loss, kl_penalized_rewards, policy_loss, ptx_loss, reinforce_advantages,
                                 rloo_advantages, value_loss)
from alignkit.algorithms.ppo.actor_critic import build_actor_critic, trainable_parameters
from alignkit.models.forward import target_logprobs
from alignkit.models.load import LoraConfig, ModelConfig, save_model
from alignkit.ops import gae, masked_mean, masked_whiten
from alignkit.rollout.base import SamplingParams
from alignkit.rollout.batch import select_rows
from alignkit.rollout.hf import HFGenerator

log = logging.getLogger("alignkit")
ALGORITHMS = ("ppo", "reinforce", "rloo", "grpo")


@dataclass
class PPOConfig:
    model: ModelConfig = opt(factory=lambda: ModelConfig(lora=LoraConfig()), help="the policy to train (and reference)")
    train: TrainConfig = opt(factory=lambda: TrainConfig(output_dir="runs/ppo", lr=5e-5, schedule="constant", warmup_ratio=0.0,
                                                         weight_decay=0.0), help="optimizer and loop (save_every counts iterations)")
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
    samples_per_prompt: int = opt(1, "replies per prompt (k; rloo and grpo need >= 2)")
    max_new_tokens: int = opt(48, "tokens per reply at most")
    temperature: float = opt(1.0, "sampling temperature (log-probs are of the tempered policy)")
    top_p: float = opt(1.0, "nucleus sampling")
    generation_batch_size: int = opt(32, "prompts prefilled together; also the row chunk of no-grad forwards")
    ppo_epochs: int = opt(4, "passes over each iteration's rollouts")
    minibatch_size: int = opt(16, "replies per optimizer step")
    clip: float = opt(0.2, "policy ratio clip ε")
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
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, not {self.algorithm!r}")
        if self.algorithm in ("rloo", "grpo") and self.samples_per_prompt < 2:
            raise ValueError(f"algorithm={self.algorithm} compares k samples of a prompt: set samples_per_prompt >= 2")
        if self.critic_trunk == "auto":
            self.critic_trunk = "own" if self.critic_init == "reward_model" else "shared"
        if self.critic_trunk not in ("shared", "own"):
            raise ValueError(f"critic_trunk must be shared, own or auto, not {self.critic_trunk!r}")
        if self.critic_trunk == "shared" and self.critic_init == "reward_model":
            raise ValueError("critic_trunk=shared puts the value head on the policy's own pass, so the critic cannot start "
                             "from a reward model: use critic_trunk=own with critic_init=reward_model")
        if self.loss_reduction not in ("token", "sequence"):
            raise ValueError(f"loss_reduction must be token or sequence, not {self.loss_reduction!r}")


def compute_advantages(cfg: PPOConfig, rewards, values, mask):
    """(advantages [B, T], returns [B, T]) from the KL-shaped per-token rewards (see module doc)."""
    if cfg.algorithm == "ppo":
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    else:
        seq = rewards.sum(1)  # score − β·KL of each reply (grpo: β = 0 here, the score)
        k = cfg.samples_per_prompt
        fn = {"reinforce": lambda r: reinforce_advantages(r, r.mean()), "rloo": lambda r: rloo_advantages(r.view(-1, k)),
              "grpo": lambda r: grpo_advantages(r.view(-1, k))}[cfg.algorithm]
        adv = fn(seq).reshape(-1, 1) * mask
        returns = adv
    if cfg.whiten_advantages and cfg.algorithm != "grpo":
        adv = masked_whiten(adv, mask)
    return adv, returns


def units_of(cfg: PPOConfig, mask: torch.Tensor) -> float:
    """What a micro-batch's loss is a sum over: response tokens, or replies (loss_reduction)."""
    return float(mask.sum()) if cfg.loss_reduction == "token" else float(mask.shape[0])


def micro_batches(batch: dict, rows: torch.Tensor, cfg: PPOConfig, critic: bool, ptx) -> list[dict]:
    """The engine's micro-batches for one minibatch. Each row chunk is a "policy" part and, with a
    critic of its own trunk, a "critic" part (and a "ptx" part): each part runs its own forward
    and backward, so activation memory peaks at one model pass (a shared-trunk critic is trained
    inside the policy part). Only policy parts carry units; the engine divides the summed gradient
    by them, which gives exactly ∇(policy + vf_coef·value (+ γ_ptx·NLL))."""
    out = []
    for i in range(0, len(rows), cfg.train.batch_size):
        chunk = select_rows(batch, rows[i:i + cfg.train.batch_size])
        out.append({**chunk, "part": "policy"})
        if critic:
            out.append({**chunk, "part": "critic"})
        if ptx is not None:
            out.append({"part": "ptx", "batch": next(ptx), "weight": units_of(cfg, chunk["response_mask"])})
    return out


def make_step(ac, cfg: PPOConfig, beta: list):
    """The engine's step function over one part of a micro-batch: (loss sum, units, metric sums)."""
    def value_terms(values, mb: dict, units: float):  # (vf_coef × value loss summed over units, metric sums)
        vl, vm = value_loss(values, mb["old_values"], mb["returns"], mb["response_mask"], cfg.vf_clip or None, cfg.loss_reduction)
        return cfg.vf_coef * vl.mean() * units, {"vf_loss": vl.mean().item() * units, "vf_clip_frac": vm["vf_clip_frac"].item() * units}

    def step(mb: dict):
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
            logp, _, values = ac.policy_outputs(mb, cfg.temperature)
        else:
            logp, _ = ac.policy_logprobs(mb, cfg.temperature)
        pg, metrics = policy_loss(logp, mb["old_logp"], mb["advantages"], mask, cfg.clip, cfg.loss_reduction)
        loss = pg.mean()
        metrics = {"pg_loss": loss.detach(), "clip_frac": metrics["clip_frac"], "approx_kl": metrics["approx_kl"]}
        if cfg.algorithm == "grpo" and beta[0] > 0:
            kl_l, _ = kl_loss(logp, mb["ref_logp"], mask, "k3", cfg.loss_reduction)
            loss = loss + beta[0] * kl_l.mean()
            metrics["kl_loss"] = kl_l.mean().detach()
        sums = {k: float(v) * units for k, v in metrics.items()}
        loss = loss * units
        if ac.shared_trunk:
            vf, vf_metrics = value_terms(values, mb, units)
            loss, sums = loss + vf, {**sums, **vf_metrics}
        return loss, units, sums
    return step


def run(cfg: PPOConfig, reward_fn=None) -> dict:
    """`alignkit ppo`. `reward_fn` (a RewardFn) overrides cfg.reward for Python callers."""
    train_prompts, heldout, task_reward = build_task(cfg.prompts, cfg.reward, cfg.train.precision)
    reward_fn = reward_fn or task_reward
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    critic = cfg.critic_init if cfg.algorithm == "ppo" else None
    bf16 = cfg.train.precision == "bf16"
    ac, tokenizer, _ = build_actor_critic(cfg.model, cfg.memory, critic, cfg.critic_path or cfg.reward.path, cfg.train.seed,
                                          torch.bfloat16 if bf16 else None, cfg.critic_trunk)
    rows = cfg.prompts_per_iteration * cfg.samples_per_prompt
    engine = Engine(ac, cfg.train, cfg.iterations * cfg.ppo_epochs * math.ceil(rows / cfg.minibatch_size), asdict(cfg))
    state = {"iteration": 0, "beta": cfg.kl.beta, "best": None, "bad_evals": 0, "ptx_index": 0, "first_length": None, **engine.loop_state}
    trained, total = trainable_parameters(ac)
    log.info("%s, memory=%s: %.2fM of %.1fM parameters trained", cfg.algorithm, cfg.memory, trained / 1e6, total / 1e6)
    kl_ctl = AdaptiveKLController(state["beta"], cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive else FixedKLController(state["beta"])
    beta = [kl_ctl.beta]
    ptx = ptx_stream(cfg.ptx, tokenizer, cfg.train.seed, cfg.train.max_tokens_per_batch, state["ptx_index"]) if cfg.ptx.coef > 0 else None
    step_fn = make_step(ac, cfg, beta)
    device, run_dir = resolve_device(cfg.train.device), Path(cfg.train.output_dir)
    generator = HFGenerator(ac.policy, tokenizer, cfg.generation_batch_size, dtype="bf16" if bf16 else None)
    sampling = lambda seed, n: SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=seed)
    policy_logp = lambda b: ac.policy_logprobs(b, cfg.temperature)[0]
    ref_logp = lambda b: ac.reference_logprobs(b, cfg.temperature)

    def no_grad(fn, batch):  # fn over row chunks of the batch, on the device, without gradient
        with torch.no_grad(), engine.autocast():
            return per_token(lambda b: fn(to_device(b, device)), batch, cfg.generation_batch_size)

    def evaluate(iteration: int) -> dict:
        if not heldout:
            return {}
        ac.eval()
        with torch.no_grad(), engine.autocast():
            result = measure_policy(generator, tokenizer, heldout, reward_fn, sampling(cfg.eval.seed, 1), policy_logp, ref_logp,
                                    cfg.generation_batch_size, device)
        engine.log({"iteration": iteration, **result}, prefix="eval/")
        log.info("eval @ %d: reward %.3f, KL %.2f", iteration, result["reward"], result["kl"])
        return result

    if state["iteration"] == 0:
        early_stop(evaluate(0), state, 0)
    else:
        trim_samples(run_dir / "samples.jsonl", state["iteration"])
    stop = False
    while state["iteration"] < cfg.iterations and not stop:
        it, start = state["iteration"], time.perf_counter()
        # collect and score
        prompts = prompts_for(train_prompts, it, cfg.prompts_per_iteration, cfg.train.seed)
        batch, completions = collect(generator, tokenizer, prompts, sampling(cfg.train.seed * 1_000_003 + it, cfg.samples_per_prompt))
        gen_s = time.perf_counter() - start
        scores, raw = score(reward_fn, prompts, completions, cfg.reward)
        # recompute log-probs, reference, values; shape rewards; advantages
        ac.eval()
        mask = batch["response_mask"]
        if ac.critic is not None:
            old_logp, entropy, values = no_grad(lambda b: ac.policy_outputs(b, cfg.temperature, entropy=True), batch)
        else:
            old_logp, entropy = no_grad(lambda b: ac.policy_logprobs(b, cfg.temperature, entropy=True), batch)
            values = torch.zeros_like(mask)
        ref = no_grad(ref_logp, batch)
        beta_used = beta[0]
        rewards, kl_seq = kl_penalized_rewards(scores, old_logp, ref, mask, 0.0 if cfg.algorithm == "grpo" else beta_used, cfg.kl.estimator)
        kl = ((old_logp - ref) * mask).sum(1)  # k1 per reply: what is logged and compared across runs
        adv, returns = compute_advantages(cfg, rewards, values, mask)
        batch.update(old_logp=old_logp, ref_logp=ref, advantages=adv, returns=returns, old_values=values)
        # train: epochs over shuffled minibatches, one optimizer step each
        ac.train()
        stats, order_gen = [], torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + it)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(rows, generator=order_gen)
            for s in range(0, rows, cfg.minibatch_size):
                mb = order[s:s + cfg.minibatch_size]
                micro = micro_batches(batch, mb, cfg, ac.critic is not None and not ac.shared_trunk, ptx)
                stats.append(engine.train_step(micro, step_fn))
                state["ptx_index"] += sum(m["part"] == "ptx" for m in micro)
        beta[0] = kl_ctl.update(kl_seq.mean().item(), rows)
        state.update(iteration=it + 1, beta=beta[0])
        # log
        lengths, seconds = mask.sum(1), time.perf_counter() - start
        row = {"iteration": it + 1, "reward": raw.mean().item(), "reward_std": raw.std().item() if rows > 1 else 0.0,
               "score": scores.mean().item(), "kl": kl.mean().item(), "beta": beta_used, "entropy": masked_mean(entropy, mask).item(),
               "response_length": lengths.mean().item(), "truncated_frac": sum(c.finish_reason == "length" for c in completions) / rows,
               **mean_stats(stats), "gen_s": gen_s, "iteration_s": seconds,
               "gen_tokens_per_s": lengths.sum().item() / max(gen_s, 1e-9), "tokens_per_s": lengths.sum().item() / seconds}
        if ac.critic is not None:
            row["explained_variance"] = explained_variance(values, returns, mask).item()
        engine.log(row)
        log.info("iteration %d/%d: reward %.3f ± %.3f, KL %.3f, β %.4g, length %.1f, %.1f s", it + 1, cfg.iterations,
                 row["reward"], row["reward_std"], row["kl"], beta_used, row["response_length"], seconds)
        warn_runaway(row, state, cfg.warn_kl)
        if cfg.samples_every and (it % cfg.samples_every == 0 or it + 1 == cfg.iterations):
            write_samples(run_dir / "samples.jsonl", it + 1, prompts, completions, raw, kl)
        if cfg.eval.every and (it + 1) % cfg.eval.every == 0 and it + 1 < cfg.iterations:
            stop = early_stop(evaluate(it + 1), state, cfg.eval.patience)
        if stop or (cfg.train.save_every and (it + 1) % cfg.train.save_every == 0):
            engine.save(state)
    final = evaluate(state["iteration"])
    engine.save(state)
    path = save_model(ac.policy_model(), tokenizer, run_dir / "final", merge_lora=cfg.train.merge_lora)
    return {"iterations": state["iteration"], "early_stopped": stop, "beta": beta[0], "best_eval_reward": state["best"],
            **{f"eval/{k}": v for k, v in final.items()}, "final_model": str(path)}
