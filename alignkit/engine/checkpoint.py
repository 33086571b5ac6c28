"""Atomic checkpoints: trainable weights, optimizer, RNG states and the caller's loop state.

A checkpoint is written to a temporary directory, its files flushed to disk, and the directory
renamed into place; `latest` is replaced atomically afterwards. A run killed at any moment leaves
the previous checkpoint or the new one, never a half-written one: a temporary directory is never
read (the next save removes it), and when `latest` names no complete checkpoint (a kill between
the rename and the pointer, or while a step's checkpoint was being rewritten) the newest complete
one is used. A write that fails (a full disk) stops with `CheckpointWriteError`, which names the
checkpoint and the last good one; the previous checkpoint and `latest` are left as they were.
"""

from __future__ import annotations

import errno as errno_codes
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignkit.files import temp_dir, write_text_atomic

log = logging.getLogger("alignkit")
FILES = ("trainable.safetensors", "state.pt", "loop.json")  # a checkpoint directory holds all three
_NAME = re.compile(r"^(?:\.old-)?step-(\d+)$")  # a checkpoint, or one moved aside while its step is rewritten


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_leftovers(root: Path) -> None:
    """Temporary files and directories of writes that were killed (one writer per run directory)."""
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def save_checkpoint(root: Path, step: int, model, optimizer, loop_state: dict, keep: int = 2,
                    tensors: dict[str, torch.Tensor] | None = None, rngs: list[dict] | None = None) -> Path:
    """Write checkpoint `step-NNNNNNN` under `root` atomically and prune old ones (`keep` newest;
    0 = all). `tensors`: the loop's own tensors (early stopping's best weights), returned by
    `load_checkpoint` under "tensors". `rngs`: every process's RNG states in rank order when
    several train together (this process's alone by default). `model` and `optimizer` may be given
    as their trainable weights and state dict (gathered from FSDP shards). A write that fails
    raises CheckpointWriteError and leaves the previous checkpoint and `latest` intact."""
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = root / f"step-{step:07d}"
    tmp = None
    try:
        tmp = temp_dir(root)
        save_file(model if isinstance(model, dict) else trainable_state(model), str(tmp / "trainable.safetensors"))
        rngs = rngs or [rng_state()]
        others = {"process_rngs": rngs[1:]} if len(rngs) > 1 else {}
        optimizer = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        torch.save({"optimizer": optimizer, "rng": rngs[0], **others, "tensors": tensors or {}}, tmp / "state.pt")
        (tmp / "loop.json").write_text(json.dumps({"step": step, **loop_state}))
        for name in FILES:  # on disk before the rename makes them a checkpoint (a machine crash too)
            _fsync(tmp / name)
    except OSError as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final, root, err) from err
    aside = root / f".old-{final.name}"
    if final.exists():  # the same step saved again (the end of a run that resumed at it): keep it until replaced
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    try:
        _fsync(root)
        write_text_atomic(root / "latest", final.name)
    except OSError as err:
        raise _write_error(final, root, err) from err
    for left in root.glob(".old-step-*"):  # `latest` names a newer complete checkpoint now
        shutil.rmtree(left, ignore_errors=True)
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_error(path: Path, root: Path, err: OSError) -> CheckpointWriteError:
    last = latest_checkpoint(root)
    why = "the disk is full" if err.errno == errno_codes.ENOSPC else (err.strerror or str(err))
    out = CheckpointWriteError(
        f"could not write checkpoint {path}: {why}; the run stops here. The last good checkpoint is "
        + (f"{last} (free space, then run the same command with --resume to continue from it)" if last else
           "none (the run has to start again)"))
    out.errno = err.errno
    return out


def complete(path: Path) -> bool:
    """Whether `path` is a checkpoint directory holding every file (temporary ones never are)."""
    return path.is_dir() and all((path / name).is_file() for name in FILES)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names, or, when it names none that is complete, the newest complete one."""
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if complete(path):
            return path
    found = [(int(m.group(1)), not p.name.startswith("."), p) for p in root.glob("*step-*")
             if (m := _NAME.match(p.name)) and complete(p)] if root.is_dir() else []
    return max(found)[2] if found else None


def load_checkpoint(path: Path, model, optimizer, rank: int = 0, world_size: int = 1) -> dict:
    """Restore weights, optimizer and the RNG states of process `rank` of `world_size`; return the
    loop state (with 'step', and the loop's own `tensors` saved with it under "tensors"). With
    `optimizer` None the optimizer's state is returned under "optimizer" instead (FSDP loads it
    once the model is sharded)."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"checkpoint {path} holds parameters this model lacks, e.g. {missing[0]}")
    absent = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if absent:
        raise ValueError(f"checkpoint {path} lacks trained parameters of this model, e.g. {absent[0]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    state = torch.load(path / "state.pt", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    rngs = [state["rng"], *state.get("process_rngs", [])]
    if len(rngs) != world_size:
        log.warning("%s was written by %d process(es), resumed by %d: every process takes the main one's random "
                    "state, so random draws (dropout) differ from the uninterrupted run", path, len(rngs), world_size)
    set_rng_state(rngs[rank] if len(rngs) == world_size else rngs[0])
    return {**json.loads((path / "loop.json").read_text()), "tensors": state.get("tensors", {}),
            **({"optimizer": state["optimizer"]} if optimizer is None else {})}
