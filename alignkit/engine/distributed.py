"""Data parallelism: several processes, each with a whole copy of the model.

Launch with `torchrun --nproc_per_node N -m alignkit <command> ...` or `accelerate launch
--num_processes N -m alignkit ...` (on a machine without GPUs, accelerate needs `--multi_gpu`
to start N processes; it starts one otherwise). accelerate's `PartialState` joins the process
group the launcher describes (gloo on CPU, nccl on GPUs, one GPU a process) and waits at
barriers. The commands that run data-parallel are `cli.DATA_PARALLEL`: sft, rm, dpo, the
sampling methods (rs, raft, rft, rest, rest-em) and ppo (with reinforce, rloo, grpo).

Training: the one loop takes its share of every optimizer step's micro-batches. Gradients and
step statistics are summed with torch.distributed directly, after the step's micro-batches are
back-propagated, not by DDP: the step functions call the decoder and the output head themselves
(there is no wrapped forward for DDP to hook), a process may get fewer micro-batches than
another in a step (or none), and the engine divides by the step's units only once they are
summed over the processes. So the global batch, accumulation and schedule mean what they mean
in one process.

Sampling (`map_shared`): a call's prompts are cut into shards whose size and seeds do not depend
on the process count; each process samples and scores its shards (the k-th of N takes shards
k, k+N, ...), and the scored shards are gathered in shard order onto every process, which then
selects, computes advantages and trains on the same pool: the pool of N processes is the pool
of one. Only the main process writes (metrics, checkpoints, stored phases, final/); the others
wait for it at barriers.

Launched as one process, every function here does nothing beyond calling what it is given, and
no process group is made.
"""

from __future__ import annotations

import atexit
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
    if dist.is_initialized() and dist.get_backend() == "gloo":
        atexit.register(_leave)


def _leave() -> None:
    """Leave the gloo group while the interpreter is still whole: gloo's worker threads torn down
    during interpreter finalization can abort the process at exit ("terminate called without an
    active exception") after a run that succeeded. Local to this process: no collective."""
    if dist.is_initialized():
        dist.destroy_process_group()


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


def map_shared(fn: Callable[[int], T], n: int, done: Callable[[int, T], None] | None = None) -> list[T]:
    """`[fn(0), ..., fn(n - 1)]` on every process, the calls shared out between the processes: in
    rounds of N (the process count), the k-th process computes `fn(i)` for the i = k of each round,
    then every process receives the round's results, and `done(i, result)` runs for each of them
    in index order on every process (the main process stores them, say). In one process: `fn(i)`
    then `done(i, ...)` for each i in turn. An exception in one process's `fn` ends the launch
    (the launcher stops the others)."""
    results: list = [None] * n
    size, me = (world_size(), rank()) if _state is not None else (1, 0)
    for first in range(0, n, size):
        i = first + me
        mine = (i, fn(i)) if i < n else (i, None)
        for j, value in sorted(gather(mine), key=lambda pair: pair[0]):
            if j < n:
                results[j] = value
                if done is not None:
                    done(j, value)
    return results


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
