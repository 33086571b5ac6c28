"""`auto` precision: bf16 only where the hardware computes it natively, fp32 elsewhere.

bf16 autocast halves the bytes each matrix product reads, and pays on CUDA GPUs that support it
and on x86 CPUs with AVX-512 BF16 or AMX instructions. On other CPUs PyTorch converts bf16 in
software, several times slower than fp32 (`benchmarks/precision.py` measures both; the figures are
in benchmarks/RESULTS.md). So `auto` (the recipes' setting for `train.precision` and
`model.dtype`) picks bf16 only where it is native.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instruction sets with bf16 dot products


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU lists one of CPU_BF16_FLAGS (Linux `flags` lines); False where unknown."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()}
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def native_bf16(device: str | torch.device = "auto") -> bool:
    """Whether bf16 runs natively on `device` ("auto": CUDA when available, else the CPU)."""
    kind = torch.device(device).type if str(device) != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return kind == "cpu" and cpu_has_native_bf16()


def resolve_precision(value: str, device: str | torch.device = "auto") -> str:
    """"auto" -> "bf16" where `native_bf16(device)`, else "fp32"; any other value unchanged."""
    if value != "auto":
        return value
    return "bf16" if native_bf16(device) else "fp32"
