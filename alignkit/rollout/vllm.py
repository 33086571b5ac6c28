"""Sampling with vLLM: the `Generator` protocol over a vLLM engine (`pip install alignkit[vllm]`).

vLLM is imported when the first `VLLMGenerator` is built, never at import time, so alignkit
installs and runs without it. vLLM starts its engine in worker processes by spawn: a script
that samples with it guards its entry point with `if __name__ == "__main__":`.

One engine per model directory and dtype lives as long as the process (`_engine`): it takes tens
of seconds to start, and a training run builds a generator at every iteration. The engine holds
its own copy of the weights. Before it decodes, a generator pushes the weights of the torch model
it samples into the engine when they are not those the engine holds (changed in place since the
last push, or another model's): `load_weights`, a LoRA-wrapped model as its merged twin
(`rollout.merged.MergedTwin`), through the workers' `_WeightSync` method, without writing a
checkpoint; it then drops the engine's prefix cache, whose keys and values the old weights
computed. So, like `HFGenerator`, each `generate` samples the model as it is now.

Conventions (those of `HFGenerator`):
- prompts go in as token ids from the caller's tokenizer (no special tokens added), so both
  backends condition on the same tokens;
- `Completion.token_ids` ends with the eos id when generation stopped on eos, and holds the
  tokens that spell a stop string; `Completion.text` is cut before the stop string;
- `Completion.logprobs[i]` is log p(token_i | prefix) under the untempered distribution (vLLM's
  default `logprobs_mode`, raw logprobs);
- a seed gives each prompt its own seed drawn from it (vLLM's per-request seed; sample j of a
  prompt uses that seed + j), so the same seed, prompts and settings give the same completions
  whatever else the engine decodes with them; the streams are vLLM's, not HFGenerator's.
"""

from __future__ import annotations

import random

import torch

from alignkit.models.forward import unwrap
from alignkit.precision import native_bf16
from alignkit.rollout.base import Completion, SamplingParams, encode_prompts
from alignkit.rollout.merged import MergedTwin

_ENGINES: dict[tuple, object] = {}
_LOADED: dict[int, tuple] = {}
"""id of an engine -> `_weights_version` of the weights it holds (generators of several models share an engine)."""
_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}


class _WeightSync:
    """A method added to vLLM's workers (its `worker_extension_cls`), called through `collective_rpc`."""

    def alignkit_load_weights(self, packed: list) -> None:
        # the worker's reload_weights, not the model's load_weights: after loading, the engine
        # converts some weights to its kernels' layouts, which reload_weights does again
        self.reload_weights(weights_iterator=(_unpack(item) for item in packed), is_checkpoint_format=True)


def _pack(name: str, tensor: torch.Tensor) -> tuple:
    """A tensor as (name, dtype, shape, raw bytes): the RPC's serializer passes bytes as they are
    (a tensor argument would arrive as nested lists)."""
    t = tensor.detach().to("cpu").contiguous()
    return name, str(t.dtype).removeprefix("torch."), list(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _unpack(item) -> tuple[str, torch.Tensor]:
    name, dtype, shape, raw = item
    return name, torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape)


def engine_dtype(dtype) -> str:
    """vLLM's name for the dtype forms `HFGenerator` takes (None: float32; "auto": bf16 where the
    device computes it natively, `precision.native_bf16`)."""
    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if dtype == "auto":
        return "bfloat16" if native_bf16() else "float32"
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}: use fp32, bf16, fp16, auto or a torch dtype")


def _engine(path: str, dtype: str, engine_args: dict):
    key = (path, dtype, tuple(sorted(engine_args.items())))
    if key not in _ENGINES:
        from vllm import LLM
        from vllm.platforms import current_platform

        # on a CPU a seeded request fails ("CPU Generator does not use offset") when its prompt
        # is prefilled in chunks over several steps: prefill whole prompts there
        defaults = {"enable_chunked_prefill": False} if current_platform.is_cpu() else {}
        _ENGINES[key] = LLM(model=path, dtype=dtype, worker_extension_cls=f"{__name__}._WeightSync",
                            **{**defaults, **engine_args})
    return _ENGINES[key]


def _weights_version(model: torch.nn.Module, twin: MergedTwin | None) -> tuple:
    """Which parameters, as modified in place so far (optimizer steps, `load_state_dict`), and
    which adapters are on: what the engine's copy of the weights must be recomputed after."""
    adapters = tuple((m.disable_adapters, tuple(m.active_adapters)) for m in twin.layers.values()) if twin else ()
    return tuple((id(p), p._version) for p in model.parameters()), adapters


class VLLMGenerator:
    """A `Generator` over a vLLM engine that samples `model`'s current weights.

    model: the torch model (plain or peft-wrapped) whose weights the engine samples; its
        `config._name_or_path` names the directory the engine starts from (architecture and
        tokenizer; the weights come from `model`).
    batch_size: prompts handed to the engine per call of vLLM's `generate` (it schedules its own
        rows within them); `progress` is told after each.
    dtype: the engine's weights and compute, in the forms `HFGenerator` takes (`engine_dtype`).
    kv_cache_gib: memory the engine sets aside for keys and values (vLLM's `kv_cache_memory_bytes`;
        on a CPU its default share of the machine's memory fails where other processes hold much).
    engine_args: other `vllm.LLM` arguments (e.g. `max_model_len`, `enforce_eager`).
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, dtype=None, kv_cache_gib: float = 2.0,
                 engine_args: dict | None = None, progress=None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        lm = unwrap(model)
        path = getattr(lm.config, "_name_or_path", "")
        if not path:
            raise ValueError("the model has no config._name_or_path: vLLM starts from a model directory")
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress
        self.twin = MergedTwin.of(model)
        self.llm = _engine(path, engine_dtype(dtype), {"kv_cache_memory_bytes": int(kv_cache_gib * (1 << 30)),
                                                        **(engine_args or {})})
        ids = {tokenizer.eos_token_id} - {None}
        extra = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
        ids |= {extra} if isinstance(extra, int) else set(extra or ())
        if not ids:
            raise ValueError("no eos token id: set tokenizer.eos_token or model.generation_config.eos_token_id")
        self.eos_ids = sorted(int(i) for i in ids)

    def load_weights(self, model) -> None:
        """Push `model`'s weights (a LoRA-wrapped model's merged) into the engine and drop its prefix cache."""
        twin = self.twin if model is self.model else MergedTwin.of(model)
        source = twin.refresh() if twin is not None else unwrap(model)
        self.llm.collective_rpc("alignkit_load_weights", args=([_pack(k, t) for k, t in source.state_dict().items()],))
        self.llm.reset_prefix_cache()
        _LOADED[id(self.llm)] = _weights_version(model, twin)

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        from vllm import SamplingParams as VLLMParams
        from vllm.inputs import TokensPrompt

        encoded = encode_prompts(self.tokenizer, prompts)
        if not encoded:
            return []
        prompts = list(prompts)
        if _LOADED.get(id(self.llm)) != _weights_version(self.model, self.twin):
            self.load_weights(self.model)
        copies = params.n if params.greedy else 1  # vLLM decodes a greedy reply once (it refuses n > 1)
        draw = random.Random(params.seed)
        seeds = [draw.getrandbits(62) if params.seed is not None else None for _ in prompts]
        out = []
        for start in range(0, len(prompts), self.batch_size):
            batch = range(start, min(start + self.batch_size, len(prompts)))
            requests = self.llm.generate(
                [TokensPrompt(prompt_token_ids=encoded[i]) for i in batch],
                [VLLMParams(n=params.n // copies, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                            max_tokens=params.max_new_tokens, stop=list(params.stop), stop_token_ids=self.eos_ids,
                            logprobs=0 if params.logprobs else None, seed=seeds[i]) for i in batch],
                use_tqdm=False)
            for i, request in zip(batch, requests):
                replies = sorted(request.outputs, key=lambda o: o.index) * copies
                for s, o in enumerate(replies):
                    if o.finish_reason not in ("stop", "length"):
                        raise RuntimeError(f"vLLM ended prompt {i}'s sample {s} with finish reason {o.finish_reason!r}")
                    lps = [step[t].logprob for t, step in zip(o.token_ids, o.logprobs)] if params.logprobs else None
                    out.append(Completion(i, s, o.text, list(o.token_ids), o.finish_reason, lps))
            if self.progress is not None:
                self.progress(len(batch))
        return out
