"""Decoding linears through oneDNN on weights reordered into its layout (fp32 on x86 CPUs).

`F.linear` on the CPU runs MKL's sgemm against the weight as stored. At decoding shapes (a few
to a few hundred rows) that is far from the machine's speed, worst for the output head; oneDNN's
inner product over the weight reordered into its blocked layout is faster there, and about even
at larger shapes (`benchmarks/linear_kernels.py`; the figures are in benchmarks/RESULTS.md).
PyTorch exposes that path as `torch.ops.mkldnn._reorder_linear_weight` /
`_linear_pointwise` (what its compiler's CPU freezing uses); it computes the same product,
rounded differently in the last bits.

`packed_linears(model)` makes every fp32 `nn.Linear` of the model run that way for the duration
of a `with` block (an instance `forward`, removed again afterwards). The weights are reordered
on entering the block, so it always computes with the weights as they are then: about as much
work as one decoding step's products, which a sampling pass repays within its first few steps.
(Reordered weights cannot be kept from one block to the next safely: PyTorch's fused AdamW
updates weights in place without bumping their version counters, so nothing cheap tells that a
weight changed.) Only under inference (no autograd), only on x86 CPUs where PyTorch has oneDNN,
only for fp32 weights and inputs, not under autocast; anything else runs `F.linear` as before.
`HFGenerator(pack_linears=False)` decodes without it.
"""

from __future__ import annotations

import platform
from contextlib import contextmanager

import torch
from torch import nn

# The rows a reordered weight is laid out for (oneDNN's batch hint); in an ad-hoc comparison of
# hints 1, 16, 128 and 512, 128 was as fast as the best of them at 1 to 2000 rows.
ROWS_HINT = 128


def available() -> bool:
    """Whether this PyTorch build and CPU have the path (x86, oneDNN built in, the ops present)."""
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packed_forward(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x @ W^T + b with W as reordered by `torch.ops.mkldnn._reorder_linear_weight`."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
        raise RuntimeError("packed linears run fp32 CPU inference only")
    rows = x.reshape(-1, x.shape[-1])
    y = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return y.reshape(*x.shape[:-1], out_features)


def eligible(module: nn.Module) -> bool:
    """A plain fp32 CPU `nn.Linear` whose forward nobody has replaced."""
    w = getattr(module, "weight", None)
    return (type(module) is nn.Linear and "forward" not in module.__dict__ and isinstance(w, torch.Tensor)
            and w.dtype == torch.float32 and w.device.type == "cpu"
            and (module.bias is None or module.bias.dtype == torch.float32))


@contextmanager
def packed_linears(model: nn.Module):
    """Within the block (under no_grad/inference_mode, no autocast) the model's fp32 linears run
    through oneDNN on weights reordered on entry; yields how many. Without the path
    (`available()`) or under autocast the block changes nothing."""
    patched = []
    if available() and not torch.is_autocast_enabled("cpu"):
        for module in model.modules():
            if eligible(module):
                packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), ROWS_HINT)
                bias = None if module.bias is None else module.bias.detach()
                module.forward = lambda x, p=packed, b=bias, n=module.out_features: packed_forward(x, p, b, n)
                patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
