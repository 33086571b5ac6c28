"""The generator that a command's `sampling.backend` names (`rollout.base.SamplingConfig`)."""

from __future__ import annotations

from alignkit.rollout.base import Generator
from alignkit.rollout.hf import HFGenerator


def make_generator(model, tokenizer, batch_size: int, dtype=None, backend: str = "hf", **hf_options) -> Generator:
    """A generator of `model` decoding `batch_size` prompts together in `dtype` (the forms
    `HFGenerator` takes: None, "fp32", "bf16", "auto", a torch dtype): `HFGenerator` for backend
    "hf", `rollout.vllm.VLLMGenerator` for "vllm". `hf_options` (`max_rows`, ...) tune the HF
    sampler only; vLLM schedules its own rows."""
    if backend == "vllm":
        from alignkit.rollout.vllm import VLLMGenerator

        return VLLMGenerator(model, tokenizer, batch_size, dtype)
    return HFGenerator(model, tokenizer, batch_size, dtype, **hf_options)
