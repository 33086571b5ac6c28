"""The four PPO roles on as few weights as possible: actor, critic, reference (+ reward model).

`ActorCritic` is the one module the engine trains (so one optimizer, one checkpoint): the
policy, and a `Critic` when the method has one. The frozen reference is held beside it, not
inside it (never optimized, never checkpointed). Two layouts (`build_actor_critic`):

* ``memory="lora"``: ONE frozen base model. The actor is LoRA adapter "policy"; the reference is
  the same weights with every adapter switched off; the critic is a second adapter "critic" on
  the same base plus a scalar value head. Adapters are switched per forward pass by flipping
  peft's layer flags (`adapter_scope`), never through peft's `set_adapter`/`disable_adapter`,
  which also change `requires_grad` and would silently freeze the other adapter.
* ``memory="full"``: separate full copies of actor, critic backbone and a frozen reference.

The critic's trunk (`critic_trunk`): ``"own"`` is the layout above (a second adapter, or a second
full backbone); ``"shared"`` puts the value head on the actor's own hidden states, so one
forward pass gives log-probs and values and one backward trains both (the value loss also moves
the policy adapter, weighted by vf_coef). It halves the critic's cost: no second adapter or
backbone, no second pass.

A critic initialised from a reward model (InstructGPT) gets the reward model's backbone and
score head (with LoRA: its own frozen copy of that backbone plus a "critic" adapter).

Per-token outputs are [B, T] tensors in the layout of `alignkit.rollout.batch` (right-padded
responses). The decoder itself runs on `shared_prefix_row(batch)`: one padding-free row in which
a prompt shared by several replies (and the system prompt shared by all) appears once; the
output head runs on response positions only.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from alignkit.models.forward import group_hidden, head_logprobs, unwrap
from alignkit.models.load import (
    LoraConfig,
    ModelConfig,
    add_lora,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from alignkit.ops import entropy_from_logits
from alignkit.rollout.batch import shared_prefix_row

log = logging.getLogger("alignkit")
MEMORY_MODES = ("lora", "full")
CHUNK = 512  # rows of float32 vocabulary-wide logits alive at once in log-prob / entropy maths
CRITIC_INITS = ("policy", "reward_model")
CRITIC_TRUNKS = ("own", "shared")


@contextmanager
def adapter_scope(module: nn.Module, adapter: str | None):
    """Run `module` with only LoRA adapter `adapter` active (None: all adapters off, i.e. the
    base weights). Only the layers' active/disabled flags change; requires_grad is untouched."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    for m in layers:
        if adapter is None:
            m._disable_adapters = True
        else:
            m._active_adapter, m._disable_adapters = [adapter], False
    try:
        yield
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled


def _hidden(decoder: nn.Module, batch: dict) -> torch.Tensor:
    """Hidden states [B, T, H] that predict the response tokens (see the module docstring). The
    decoder runs once over `shared_prefix_row(batch)`: no padding, and a prompt (or the system
    prompt) that several rows share is computed once."""
    row = shared_prefix_row(batch)
    device = batch["input_ids"].device
    hidden = group_hidden(decoder, {k: row[k].to(device) for k in ("input_ids", "position_ids", "group_ids", "parts")})
    return hidden[0, row["index"].to(device)]


def response_logprobs(model, batch: dict, temperature: float = 1.0, entropy: bool = False):
    """(log π(response token) [B, T], entropy of π at those positions [B, T] or None), float32,
    zero outside `response_mask`. Logits are divided by `temperature` (the sampling
    distribution); the output head runs on the masked response positions only."""
    lm = unwrap(model)
    return _logprobs(lm, _hidden(lm.get_decoder(), batch), batch, temperature, entropy)


def _logprobs(lm: nn.Module, hidden: torch.Tensor, batch: dict, temperature: float, entropy: bool):
    """`response_logprobs` from the hidden states `_hidden` returned."""
    mask = batch["response_mask"].bool()
    picked = hidden[mask]
    logp = hidden.new_zeros(mask.shape, dtype=torch.float32)
    logp = logp.masked_scatter(mask, head_logprobs(lm, picked, batch["response_ids"][mask], CHUNK, temperature))
    ent = None
    if entropy:  # for the logs only: no graph, and CHUNK rows of logits at a time
        head = lm.get_output_embeddings()
        with torch.no_grad():
            ent = torch.cat([logp.new_zeros(0)] + [entropy_from_logits(head(rows) / temperature) for rows in picked.split(CHUNK)])
        ent = torch.zeros_like(logp).masked_scatter(mask, ent)
    return logp, ent


class Critic(nn.Module):
    """V(s_t) for every response position: a decoder backbone plus a linear head [H -> 1].

    `shared=True` means the backbone belongs to the policy (LoRA mode): it is not registered
    here, so its parameters are counted, optimized and checkpointed once."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, adapter: str | None = None, shared: bool = False):
        super().__init__()
        if shared:
            self.__dict__["backbone"] = backbone
        else:
            self.backbone = backbone
        self.head = head
        self.adapter = adapter

    def forward(self, batch: dict) -> torch.Tensor:
        backbone = unwrap(self.backbone)
        if self.adapter is None:
            hidden = _hidden(backbone, batch)
        else:
            with adapter_scope(backbone, self.adapter):
                hidden = _hidden(backbone, batch)
        return self.values_from(hidden, batch)

    def values_from(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.head(hidden).squeeze(-1).float() * batch["response_mask"]


class ActorCritic(nn.Module):
    """The trainable roles (policy, optional critic) plus access to the frozen reference."""

    def __init__(self, policy: nn.Module, critic: Critic | None = None, reference: nn.Module | None = None,
                 base_path: str = "", shared_trunk: bool = False):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.shared_trunk = shared_trunk  # the critic's head sits on the policy's own hidden states
        self.__dict__["reference"] = reference  # frozen; not a submodule (no optimizer, no checkpoint)
        self.base_path = base_path  # where the base weights can be reloaded from (see store_frozen_base)

    @property
    def lora(self) -> bool:
        return hasattr(self.policy, "peft_config")

    def to(self, *args, **kwargs):
        if self.reference is not None:
            self.reference.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def policy_logprobs(self, batch: dict, temperature: float = 1.0, entropy: bool = False):
        if not self.lora:
            return response_logprobs(self.policy, batch, temperature, entropy)
        with adapter_scope(self.policy, "policy"):
            return response_logprobs(self.policy, batch, temperature, entropy)

    def policy_outputs(self, batch: dict, temperature: float = 1.0, entropy: bool = False):
        """(log-probs, entropy or None, values): with a shared trunk from ONE forward pass,
        otherwise the policy's pass plus the critic's."""
        if not self.shared_trunk:
            return (*self.policy_logprobs(batch, temperature, entropy), self.values(batch))
        lm = unwrap(self.policy)
        with adapter_scope(self.policy, "policy") if self.lora else nullcontext():
            hidden = _hidden(lm.get_decoder(), batch)
        return (*_logprobs(lm, hidden, batch, temperature, entropy), self.critic.values_from(hidden, batch))

    def reference_logprobs(self, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        if self.reference is not None:
            return response_logprobs(self.reference, batch, temperature)[0]
        with adapter_scope(self.policy, None):
            return response_logprobs(self.policy, batch, temperature)[0]

    def values(self, batch: dict) -> torch.Tensor:
        if self.critic is None:
            raise RuntimeError("this method has no critic")
        return self.critic(batch)

    def policy_model(self) -> nn.Module:
        """The policy, ready to save: critic adapter removed, original base weights back (the
        module stops being a critic)."""
        if self.lora:
            if "critic" in self.policy.peft_config:
                self.policy.delete_adapter("critic")
            if self.base_path:
                restore_frozen_base(self.policy, self.base_path)
        self.critic = None
        return self.policy


def lora_base_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The frozen base layers inside LoRA layers, by the name of the LoRA layer in the unwrapped model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m.get_base_layer() for name, m in unwrap(module).named_modules() if isinstance(m, BaseTunerLayer)}


def store_frozen_base(module: nn.Module, dtype: torch.dtype) -> None:
    """Keep the frozen base weights of LoRA layers, and the frozen output head, in `dtype` (bf16
    under bf16 autocast). Under autocast this changes no number (autocast casts them to bf16
    anyway) but it stops the re-cast at every forward pass and decoding step, which autocast does
    not cache for weights without gradient, and it halves their memory. A tied output head gets
    its own copy (the input embeddings stay as they are). `restore_frozen_base` undoes it all."""
    for base in lora_base_layers(module).values():
        base.weight.data = base.weight.data.to(dtype)
    lm = unwrap(module)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is not None and not head.weight.requires_grad:  # a frozen (often tied) output head: a copy in dtype
        head.weight = nn.Parameter(head.weight.detach().to(dtype), requires_grad=False)
    for p in lm.parameters():  # the rest leaves the memory-mapped checkpoint, so its pages can be unmapped
        if not p.requires_grad and p.dtype != dtype:
            p.data = p.data.clone()


def restore_frozen_base(module: nn.Module, path: str) -> None:
    """Reload the original base weights of the LoRA layers (and re-tie or reload the output
    head) from the model directory `path`."""
    from safetensors import safe_open

    layers = {f"{name}.weight": base for name, base in lora_base_layers(module).items()}
    lm = unwrap(module)
    dtype = lm.get_input_embeddings().weight.dtype
    head = lm.get_output_embeddings()
    if getattr(lm.config, "tie_word_embeddings", False):
        head.weight = lm.get_input_embeddings().weight
    else:
        layers[next(n for n, m in lm.named_modules() if m is head) + ".weight"] = head
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key in layers:
                    layers[key].weight.data = f.get_tensor(key).to(layers[key].weight.device, dtype)


def trainable_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def build_actor_critic(model_cfg: ModelConfig, memory: str = "lora", critic: str | None = "policy",
                       critic_path: str = "", seed: int = 0, frozen_dtype: torch.dtype | None = None,
                       critic_trunk: str = "own"):
    """(ActorCritic, tokenizer, model path). `critic`: None (critic-free methods), "policy"
    (critic initialised from the policy, zero value head) or "reward_model" (from `critic_path`).
    `frozen_dtype` (LoRA only): store the frozen base weights in this dtype (`store_frozen_base`).
    `critic_trunk`: "own" (second adapter / backbone) or "shared" (value head on the policy's pass)."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, not {memory!r}")
    if critic not in (None, *CRITIC_INITS):
        raise ValueError(f"critic init must be one of {CRITIC_INITS}, not {critic!r}")
    if critic_trunk not in CRITIC_TRUNKS:
        raise ValueError(f"critic_trunk must be one of {CRITIC_TRUNKS}, not {critic_trunk!r}")
    if critic == "reward_model" and not critic_path:
        raise ValueError("a critic initialised from a reward model needs its path (critic_path)")
    if critic == "reward_model" and critic_trunk == "shared":
        raise ValueError("critic_trunk=shared puts the value head on the policy: it cannot start from a reward model "
                         "(use critic_init=policy, or critic_trunk=own)")
    shared = critic == "policy" and critic_trunk == "shared"
    path = resolve_model_path(model_cfg.path)
    tokenizer = load_tokenizer(path)
    torch.manual_seed(seed)
    base = load_causal_lm(path, model_cfg)  # the adapters are added below
    lora = model_cfg.lora or LoraConfig()
    reference = None
    if memory == "lora":
        policy = add_lora(base, lora, adapter_name="policy")
        if critic == "policy" and not shared:
            policy.add_adapter("critic", copy.deepcopy(policy.peft_config["policy"]))
        for name, p in policy.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        if model_cfg.lora is not None:
            log.info("memory=full trains every weight: the model.lora settings are not used")
        policy = base
        reference = copy.deepcopy(base).eval().requires_grad_(False)
    value = None
    if critic == "policy":
        head = nn.Linear(unwrap(policy).config.hidden_size, 1, bias=False)
        nn.init.zeros_(head.weight)
        decoder = unwrap(policy).get_decoder()
        if shared:
            value = Critic(decoder, head, "policy" if memory == "lora" else None, shared=True)
        elif memory == "lora":
            value = Critic(decoder, head, "critic", shared=True)
        else:
            value = Critic(copy.deepcopy(decoder), head)
    elif critic == "reward_model":
        from alignkit.rewards.model import load_reward_model

        rm, _, _ = load_reward_model(ModelConfig(path=critic_path, dtype=model_cfg.dtype), train=False)
        backbone, head = rm.base_model, rm.score
        head.requires_grad_(True)
        if memory == "lora":
            backbone.requires_grad_(False)
            backbone = add_lora(backbone, lora, adapter_name="critic", task_type=None)
            value = Critic(backbone, head, "critic")
        else:
            value = Critic(backbone, head)
    if memory == "lora" and frozen_dtype is not None:
        store_frozen_base(policy, frozen_dtype)
        if value is not None and "backbone" in value._modules:
            store_frozen_base(value.backbone, frozen_dtype)
    base_path = path if memory == "lora" and frozen_dtype is not None else ""
    return ActorCritic(policy, value, reference, base_path, shared), tokenizer, path
