"""A plain (adapter-free) twin of a LoRA-wrapped model, for decoding.

Decoding through peft runs every adapted linear as base(x) + B(A(x))·s: three matrix products
and an add per layer and step instead of one. `MergedTwin` keeps a plain model of the same
architecture whose adapted linears hold W + s·B·A and whose every other tensor (embeddings, norms,
output head, buffers) IS the wrapped model's (shared, not copied), so it costs the adapted
linears once more. `refresh()` recomputes the merged weights from the adapters as they are now
(the active adapter of each layer, nothing when adapters are off), so a generator that refreshes
before decoding always samples from the current policy. The wrapped model's weights are never
touched, unlike peft's merge/unmerge, whose round trip does not give the base weights back
bit for bit (and the base is the PPO reference).

This is the weight-sync step an external engine (vLLM) needs too: a fresh set of plain weights
computed from the trained adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from alignkit.models.forward import unwrap


def _lora_linears(lm: nn.Module) -> dict[str, nn.Module] | None:
    """{module name: LoRA linear layer}, or None when some adapted layer is not a LoRA linear."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = {name: m for name, m in lm.named_modules() if isinstance(m, BaseTunerLayer)}
    if not all(isinstance(m, LoraLinear) for m in layers.values()):
        return None
    return layers


class MergedTwin:
    """`model`: the plain twin (use it for forward passes without gradient); `refresh()` before use."""

    def __init__(self, wrapped: nn.Module, layers: dict[str, nn.Module]):
        lm = unwrap(wrapped)
        self.layers = layers
        with torch.device("meta"):
            twin = type(lm)(lm.config)
        for name, module in twin.named_modules():
            source = lm.get_submodule(name) if name else lm
            if name in layers:  # an adapted linear: own weight, the base layer's bias (shared)
                base = source.get_base_layer()
                module.weight = nn.Parameter(torch.empty_like(base.weight, device=base.weight.device), requires_grad=False)
                if base.bias is not None:
                    module.bias = base.bias
                continue
            if any(name.startswith(n + ".") for n in layers):
                continue
            for key, _ in list(module.named_parameters(recurse=False)):
                setattr(module, key, getattr(source, key))
            for key, _ in list(module.named_buffers(recurse=False)):
                module.register_buffer(key, getattr(source, key), persistent=key not in module._non_persistent_buffers_set)
            for key in ("original_inv_freq", "attention_scaling"):  # rotary state kept as plain attributes
                if hasattr(source, key):
                    setattr(module, key, getattr(source, key))
            module._forward_pre_hooks.update(source._forward_pre_hooks)  # hooks the user put on the model
            module._forward_hooks.update(source._forward_hooks)
        twin.generation_config = lm.generation_config
        self.model = twin.eval().requires_grad_(False)

    @classmethod
    def of(cls, model: nn.Module) -> "MergedTwin | None":
        """The twin of a model with LoRA linears, or None (no adapters, or kinds it cannot merge)."""
        if not hasattr(model, "peft_config"):
            return None
        layers = _lora_linears(unwrap(model))
        return cls(model, layers) if layers else None

    @torch.no_grad()
    def refresh(self) -> nn.Module:
        twin = self.model
        for name, layer in self.layers.items():
            base = layer.get_base_layer().weight
            merged = base.float()
            if not layer.disable_adapters:
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        merged = merged + layer.get_delta_weight(adapter).float()
            twin.get_submodule(name).weight.copy_(merged)
        return twin
