"""DeepSpeed ZeRO (`train.deepspeed: ds_config.json`), for a launch of several processes.

What comes from where: alignkit's own keys keep defining the global batch and accumulation
(`train.grad_accum`, the micro-batch keys), the optimizer (the engine's AdamW), the learning-rate
schedule, clipping (`train.max_grad_norm`) and precision (`train.precision`: bf16 autocast, weights
and optimizer state in fp32). The DeepSpeed file contributes `zero_optimization` (stage 1, 2 or 3,
CPU offload, bucket sizes...) and DeepSpeed's other engine options. Its keys that would say
something else than alignkit's are refused when the recipe is read, before any model loads
(`check`), or filled in from alignkit's (`ds_config`).

How a step runs (`Engine._accumulate_sharded`, shared with FSDP): DeepSpeed wraps `Steps`, whose
forward runs the step function, so that its direct decoder and head calls run inside DeepSpeed's
forward (stage 3 gathers parameters as submodules run, and only its engine's forward starts a
pass's gradient bookkeeping: without it stage 3 overwrites the gradients of a step's earlier
micro-batches instead of adding to them). Every process runs as many passes (ZeRO 2 and 3 reduce
gradients in each backward, so the processes' collectives must pair up); one short of
micro-batches runs another's with its loss times zero. alignkit calls DeepSpeed's `step` once an
optimizer step (`managed_gradient_accumulation: false`). DeepSpeed averages gradients over the N
processes where alignkit sums them and divides by the step's units T: the losses go back
unscaled, and the step's loss scale is set to T/N before DeepSpeed's `step`, which divides the
gradients by it (and reports and clips the norm of the divided ones): the gradient of one process
given the same global batch. A step whose gradient is not finite is skipped by DeepSpeed itself.

A checkpoint holds the whole trainable weights and the AdamW state gathered from the partitions
(`weights`, `optimizer_state`), numbered as one process numbers them: the checkpoint a run
without DeepSpeed writes. A run resumes from it at the same process count: the weights are loaded
into the model before DeepSpeed partitions it, the AdamW state into the partitions afterwards
(`load_optimizer_state`). After training (`whole`), the model is a plain module on every process.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from alignkit.engine import distributed

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
PRECISION_KEYS = ("fp16", "bf16", "amp", "torch_autocast")


def _read(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"train.deepspeed: no such file: {path}")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"train.deepspeed: {path} is not JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"train.deepspeed: {path} must hold a JSON object")
    return config


def check(path: str, max_grad_norm: float) -> int:
    """Refuse a DeepSpeed config that contradicts alignkit's keys, or a missing deepspeed; its
    ZeRO stage."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError("train.deepspeed needs DeepSpeed: pip install 'alignkit[deepspeed]'")
    config = _read(path)

    def refuse(key: str, why: str) -> ValueError:
        return ValueError(f"train.deepspeed: {path}: {key}: {why}")

    for key in ("optimizer", "scheduler"):
        if key in config:
            raise refuse(key, "alignkit's AdamW and learning-rate schedule are used (train.lr, train.beta1, train.beta2, "
                              "train.eps, train.weight_decay, train.schedule, train.warmup_*): remove the key")
    for key in BATCH_KEYS:
        if config.get(key, "auto") != "auto":
            raise refuse(key, "the batch is alignkit's (train.grad_accum and the command's micro-batch keys): remove the "
                              "key or set it to \"auto\"")
    if config.get("gradient_clipping", "auto") not in ("auto", max_grad_norm):
        raise refuse("gradient_clipping", f"the clip is train.max_grad_norm ({max_grad_norm}): remove the key or set it "
                                          "to \"auto\"")
    for key in PRECISION_KEYS:
        section = config.get(key, {})
        if not isinstance(section, dict) or section.get("enabled", False) not in (False, "auto"):
            raise refuse(key, "precision is train.precision (bf16 autocast, weights and optimizer state in fp32): remove "
                              "the section or set its enabled to false")
    if "managed_gradient_accumulation" in config:
        raise refuse("managed_gradient_accumulation", "alignkit runs the accumulation: remove the key")
    if config.get("zero_force_ds_cpu_optimizer", False):
        raise refuse("zero_force_ds_cpu_optimizer", "alignkit's AdamW is the optimizer, offloaded or not: remove the key")
    if config.get("zero_optimization", {}).get("compute_grad_norm", True) is not True:
        raise refuse("zero_optimization.compute_grad_norm", "alignkit clips with the gradient norm and logs it: remove the key")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise refuse("zero_optimization.stage", f"must be 1, 2 or 3, not {stage!r} (without ZeRO, alignkit's own data "
                                                "parallelism does the same: leave train.deepspeed out)")
    return stage


def ds_config(path: str, max_grad_norm: float) -> dict:
    """The config handed to DeepSpeed: the file's, with alignkit's batch, clip and precision. The
    batch keys only count for DeepSpeed's own reports: alignkit calls its `step` once a step."""
    config = {k: v for k, v in _read(path).items() if k not in PRECISION_KEYS}
    return {**config, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "train_batch_size": distributed.world_size(), "gradient_clipping": max_grad_norm,
            "managed_gradient_accumulation": False, "zero_force_ds_cpu_optimizer": False}


class Steps(torch.nn.Module):
    """The module DeepSpeed wraps: the model, and a forward that runs a step function on a batch."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, step_fn, batch):
        return step_fn(batch)


class Zero:
    """`model` and its AdamW `optimizer` under a DeepSpeed engine built from `path` (every process)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str, max_grad_norm: float):
        import deepspeed

        self.stage = check(path, max_grad_norm)
        self.model, self.optimizer = model, optimizer
        # what a one-process checkpoint numbers and holds, read before DeepSpeed regroups the parameters
        by_id = {id(p): (n, p) for n, p in model.named_parameters()}
        self._params = [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]
        self._group_params = [list(g["params"]) for g in optimizer.param_groups]
        self._shapes = {n: p.shape for n, p in self._params}
        self._groups = optimizer.state_dict()["param_groups"]
        self._skeleton = distributed.skeleton(model) if self.stage == 3 else None
        self.engine, *_ = deepspeed.initialize(model=Steps(model), optimizer=optimizer, config=ds_config(path, max_grad_norm))

    def forward(self, step_fn, batch):
        return self.engine(step_fn, batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, units: float, lr: float) -> float:
        """The optimizer step on gradients summed over `units`: DeepSpeed's averaged gradients
        divided by units / N, clipped, and AdamW at `lr`; the gradient norm (inf: the step was skipped)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.optimizer.override_loss_scale(units / distributed.world_size())
        self.engine.step()
        self.engine.optimizer.override_loss_scale(1.0)  # the next step's backward passes take the losses as they are
        return float(self.engine.get_global_grad_norm())

    def weights(self) -> dict[str, torch.Tensor]:
        """The whole trainable weights, on the CPU of every process (every process calls it)."""
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).reshape(self._shapes[n]).cpu() for n, p in self._params}

    def _link(self) -> None:
        """Stages 1 and 2 link each parameter to its part of the optimizer state after the first
        step's first parameter group only, before the other groups have state: link them all."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        if self.stage < 3:
            for params, group in zip(self._group_params, self.optimizer.param_groups):
                lazy_init_hp_params_optimizer_state(params, group["params"][0], self.optimizer.state)

    def optimizer_state(self) -> dict:
        """AdamW's whole state as `optimizer.state_dict()` of one process holds it (every process
        calls it). Every partition takes every step, so one step count serves all parameters."""
        from deepspeed.utils import safe_get_full_optimizer_state

        self._link()
        step = next(iter(self.optimizer.state.values()))["step"]
        state = {i: {"step": step.detach().clone().cpu(),
                     **{k: safe_get_full_optimizer_state(p, k).reshape(self._shapes[n]).cpu() for k in ("exp_avg", "exp_avg_sq")}}
                 for i, (n, p) in enumerate(self._params)}
        groups = [{**g, **{k: live[k] for k in g if k != "params"}} for g, live in zip(self._groups, self.optimizer.param_groups)]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, state: dict) -> None:
        """Fill the partitions' AdamW state from a whole one (`optimizer_state`'s, or a run's without
        DeepSpeed; every process holds it). AdamW makes its state at its first step: it is made here
        on the partitions DeepSpeed steps, then each parameter's part is copied in."""
        from deepspeed.utils import safe_set_full_optimizer_state

        step = next(iter(state["state"].values()))["step"]
        # the flat partitions AdamW steps: stage 3 hands them to it only for the duration of its step
        flats = (self.engine.optimizer.fp32_partitioned_groups_flat if self.stage == 3
                 else [group["params"][0] for group in self.optimizer.param_groups])
        for flat in flats:
            held = self.optimizer.state[flat]
            for key in ("exp_avg", "exp_avg_sq"):
                held.setdefault(key, torch.zeros_like(flat))
            held["step"] = step.clone().to(flat.device)
        self._link()
        for i, (_, p) in enumerate(self._params):
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, state["state"][i][key].to(p.device), key)

    def whole(self, final: bool = False) -> torch.nn.Module:
        """The model with all its parameters whole on every process (every process calls it): the
        model itself under stages 1 and 2, which keep them whole; under stage 3 a copy gathered from
        the partitions. `final`: training is over; DeepSpeed's hooks leave the model."""
        model = self.model
        if self.stage == 3:
            import deepspeed

            full = {}
            for name, p in self.model.named_parameters():
                with deepspeed.zero.GatheredParameters([p]):
                    full[name] = p.detach().clone()
            model = distributed.filled(self._skeleton if final else distributed.skeleton(self._skeleton), full)
        if final:
            self.engine.destroy()
        return model
