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

Fully sharded (`train.fsdp=true`, `shard`): torch's FSDP2 (`fully_shard`) on each decoder layer
and on the root, so each process holds 1/N of the parameters, gradients and optimizer state and
all-gathers a unit's parameters when it runs. The step function runs as a registered forward
method of the root (`register_fsdp_forward_method`), so the root's all-gather and reduce-scatter
hooks fire although the step calls the decoder and heads directly. Every process runs as many
passes in a step (one short of micro-batches runs another's with its loss times zero); gradients
accumulate locally and the step's last backward sums them (reduce-scatter, SUM, no averaging)
into each process's shard before the engine's one division by the summed units. Evaluation on
the main process runs with every unit gathered on every process (`gathered`); checkpoints hold
the gathered weights and optimizer state, numbered as one process numbers them, and a run
resumes from them at the same process count; when training ends the model becomes a plain module on
every process again (`unsharded_copy`), which the main process saves as final/ alone. Every
training command takes it. PPO (and reinforce, rloo, grpo) shards its actor-critic (the policy,
a value head, a critic's adapter or backbone; a separate frozen reference stays whole on every
process) and samples, scores and runs its no-grad passes inside `gathered`, each process its own
share; its micro-batch parts (policy, critic, PPO-ptx) come in the same order on every process.
Works on gloo (CPU) and nccl; a run equals one process's to float rounding (tests/test_fsdp.py:
sft, dpo, a LoRA rm, and PPO with a LoRA critic of its own adapter, resumed too, as 2 CPU
processes on gloo).

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
import contextlib
import copy
import logging
import os
import types
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

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


def shard(model) -> torch.nn.Module:
    """Shard `model` in place with FSDP2 (`torch.distributed.fsdp.fully_shard`) over the launch's
    processes: each decoder layer (the classes that `_no_split_modules` of the model or of its
    submodules names: PPO's actor-critic holds a policy, and maybe a critic backbone of another
    architecture) is one unit, the root (embeddings, final norm, output or score head, a value
    head, a peft wrapper) another. Gradients are summed, not averaged, by the reduce-scatter (the
    engine divides by the step's units).

    The step functions call the decoder and the heads directly, not `model.forward`, so the root's
    hooks (all-gather before, reduce-scatter in backward) run around `model.alignkit_step(step_fn,
    batch) = step_fn(batch)`, registered as a forward method (`register_fsdp_forward_method`);
    the layers' hooks run as the decoder calls them.

    Returns the unsharded model's `skeleton`, for `unsharded_copy`."""
    names = {n for m in model.modules() for n in getattr(m, "_no_split_modules", None) or ()}
    if not names:
        raise ValueError(f"train.fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules)")
    bare = skeleton(model)
    for module in model.modules():
        if type(module).__name__ in names:
            fully_shard(module, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=False)  # the root's parameters stay gathered until backward, as by default
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    model.alignkit_step = types.MethodType(lambda self, step_fn, batch: step_fn(batch), model)
    register_fsdp_forward_method(model, "alignkit_step")
    # FSDP takes the first unit whose forward runs for the root: run the root's now, or a layer that
    # runs first (PPO samples before its first step) would become one. Its parameters go back to
    # shards at once: the optimizer is built on the parameters registered now.
    with torch.no_grad():
        model.alignkit_step(lambda batch: None, None)
    model.reshard()
    model.reset_iter_state()
    return bare


def skeleton(model) -> torch.nn.Module:
    """A copy of `model` whose parameters are on the meta device (no storage), taken before its
    parameters are sharded, for `filled`; modules the root holds outside its tree (PPO's frozen
    reference) are shared with it, not copied."""
    memo = {id(m): m for m in vars(model).values() if isinstance(m, torch.nn.Module)}
    memo.update({id(p): torch.nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad) for p in model.parameters()})
    return copy.deepcopy(model, memo)


def filled(bare: torch.nn.Module, full: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`bare` (`skeleton`'s) holding the whole parameters `full` (by name): a plain module."""
    with torch.no_grad():
        for name, p in bare.named_parameters():  # tied parameters once: they stay tied
            torch.utils.swap_tensors(p, torch.nn.Parameter(full[name], requires_grad=p.requires_grad))
    return bare


def local(value: torch.Tensor) -> torch.Tensor:
    """A replicated or partial DTensor (a gradient norm under FSDP) as a plain tensor; others as they are."""
    return value.full_tensor() if isinstance(value, DTensor) else value


@contextlib.contextmanager
def gathered(model):
    """Every FSDP unit of the sharded `model` gathered whole on every process for the duration,
    and kept so after forward passes: each process can then run the model alone without
    collectives (an evaluation on the main process between optimizer steps; PPO's sampling and
    no-grad passes, a different number on each process). Every process enters and leaves it; on
    leaving, the units are sharded again (the optimizer works on the shards, and a checkpoint reads
    them) and the forward passes' traces that FSDP keeps for the next backward (the order it
    prefetches in) are dropped (`reset_iter_state`), which would otherwise differ between the
    processes."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not model, recurse=False)
            unit.reshard()
        model.reset_iter_state()


def trainable_weights(model) -> dict[str, torch.Tensor]:
    """The full trainable weights of a sharded `model` on the main process's CPU ({} on the others;
    every process calls it)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {n: full[n] for n, p in model.named_parameters() if p.requires_grad} if full else {}


def _param_names(model, optimizer) -> list[str]:
    """The names of the optimizer's parameters, in the order `optimizer.state_dict()` numbers them."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(model, optimizer) -> dict:
    """The full state of the optimizer of a sharded `model`, numbered as `optimizer.state_dict()`
    numbers parameters (a one-process checkpoint's), on the main process's CPU ({} on the others;
    every process calls it)."""
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:
        return {}
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": optimizer.state_dict()["param_groups"]}


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Shard a full optimizer state (`optimizer_state`'s, or a one-process checkpoint's; every
    process holds it) into the optimizer of a sharded `model`."""
    names = _param_names(model, optimizer)
    full = {"state": {names[int(i)]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def unsharded_copy(model, bare) -> torch.nn.Module:
    """`bare` (`shard`'s skeleton) holding the trained weights of the sharded `model`, on every
    process: a plain module again, which one process can evaluate and save alone. Every process
    calls it."""
    return filled(bare, get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
