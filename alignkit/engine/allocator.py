"""glibc malloc settings for CPU training and sampling.

A training step frees and re-allocates the same large buffers every time (bf16 copies of the
weights under autocast, their fp32 gradients, the [vocab, hidden] gradient of the tied
embedding). glibc serves blocks above its mmap threshold (128 KiB at first, adapting up to
32 MiB) with fresh mappings and gives freed heap memory back to the system above 128 KiB of
free top, so each step pays page faults to touch that memory anew. On the default model's
train stage (2 CPU cores) this was ~17% of a step (benchmarks/train_step.py).

`tune_malloc` raises the mmap threshold to its maximum (32 MiB), keeps up to 2 GiB of freed
memory in the heap and grows the heap 256 MiB at a time, as PyTorch's CPU tuning guides do with
jemalloc or tcmalloc, through glibc's `mallopt` so that no preload is needed. The process keeps
its peak heap instead of returning it. Nothing is changed when the user already chose: any
MALLOC_* variable, GLIBC_TUNABLES or LD_PRELOAD in the environment, or ALIGNKIT_MALLOC=default.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger("alignkit")

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, (2 << 30) - 1), (M_TOP_PAD, 256 << 20))


def user_chose(environ=os.environ) -> bool:
    """True when the environment already sets the allocator (or asks us to leave it alone)."""
    return (environ.get("ALIGNKIT_MALLOC") == "default" or "GLIBC_TUNABLES" in environ or "LD_PRELOAD" in environ
            or any(k.startswith("MALLOC_") for k in environ))


def tune_malloc(environ=os.environ) -> bool:
    """Apply SETTINGS with glibc's mallopt; True when applied, False when not on Linux/glibc or
    when the user already chose (see the module docstring)."""
    if not sys.platform.startswith("linux") or user_chose(environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = all(libc.mallopt(option, value) == 1 for option, value in SETTINGS)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    if not applied:
        log.debug("mallopt refused a setting; the allocator keeps its defaults for it")
    return applied
