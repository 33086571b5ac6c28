"""Data parallelism for the one loop: several processes, each with a whole copy of the model,
each taking its share of every optimizer step's micro-batches.

Launch with `torchrun --nproc_per_node N -m alignkit <command> ...` or `accelerate launch
--num_processes N -m alignkit ...` (on a machine without GPUs, accelerate needs `--multi_gpu`
to start N processes; it starts one otherwise). accelerate's `PartialState` joins the process
group the launcher describes (gloo on CPU, nccl on GPUs, one GPU a process) and waits at
barriers. Gradients and step statistics are summed with torch.distributed directly, after the
step's micro-batches are back-propagated, not by DDP: the step functions call the decoder and
the output head themselves (there is no wrapped forward for DDP to hook), a process may get
fewer micro-batches than another in a step (or none), and the engine divides by the step's
units only once they are summed over the processes. Launched as one process, every function
here does nothing and no process group is made.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_state = None  # accelerate's PartialState once this process has joined the group


def world_size() -> int:
    """How many processes the launcher started (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """The process that writes metrics.jsonl, checkpoints and final/."""
    return rank() == 0


def start(device: torch.device) -> None:
    """Join the launcher's process group (once a process; nothing when launched as one process).
    Only the main process logs below warnings."""
    global _state
    if world_size() == 1 or _state is not None:
        return
    from accelerate import PartialState

    _state = PartialState(cpu=device.type == "cpu")
    if not is_main():
        logging.getLogger("alignkit").setLevel(logging.WARNING)


def barrier() -> None:
    if _state is not None:
        _state.wait_for_everyone()


def gather(obj: T) -> list[T]:
    """Every process's `obj` (picklable), in rank order."""
    if _state is None:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T) -> T:
    """The main process's `obj`, on every process."""
    if _state is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T | None:
    """`fn()` on the main process only (final evaluations, writing final/); the others wait for it
    at a barrier and get None."""
    result = fn() if is_main() else None
    barrier()
    return result


def broadcast_parameters(params: list[torch.Tensor]) -> None:
    """Copy the main process's values into every process's `params`, so that the replicas start
    equal (as DDP does when it wraps a model)."""
    if _state is None:
        return
    with torch.no_grad():
        for work in [dist.broadcast(p.data, src=0, async_op=True) for p in params]:
            work.wait()


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum each parameter's gradient over the processes. A process that has none for a parameter
    (it had no micro-batch in this step, or the parameter took no part) adds zeros; a parameter
    that no process has a gradient for keeps None, as in one process."""
    if _state is None:
        return
    device = params[0].device if params else torch.device("cpu")
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(present)
    live = [p for p, n in zip(params, present.tolist()) if n]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for work in [dist.all_reduce(p.grad, async_op=True) for p in live]:
        work.wait()
