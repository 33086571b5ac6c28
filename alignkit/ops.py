"""Pure tensor operations shared by the losses and the algorithms.

Imports torch only (a test checks it). Conventions:

* ``mask`` tensors are 0/1 (bool, int or float) with the shape of the values they mask;
  1 marks a position that counts (a response token, a valid response).
* Per-token tensors of responses are ``[B, T]`` and right-padded.
* Log-probability maths runs in float32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

__all__ = [
    "gather_logprobs",
    "linear_logprobs",
    "entropy_from_logits",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "gae",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_estimator",
    "KL_ESTIMATORS",
]


# ---------------------------------------------------------------------------
# log-probabilities and entropy from logits, chunked over rows
# ---------------------------------------------------------------------------


def _chunked_logprobs(rows: Callable[[int, int], torch.Tensor], labels: torch.Tensor, chunk_size: int):
    """(log p(label) [N] float32, 0 where label < 0; logsumexp [N]; labels clamped to >= 0 as
    [N, 1]; the valid mask [N]), from `rows(a, b)`: float32 logits of rows a..b-1, one chunk at a time."""
    n = labels.shape[0]
    valid = labels >= 0
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    out = torch.empty(n, dtype=torch.float32, device=labels.device)
    lse = torch.empty(n, dtype=torch.float32, device=labels.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        chunk = rows(start, stop)
        lse[start:stop] = torch.logsumexp(chunk, dim=-1)
        out[start:stop] = chunk.gather(-1, safe[start:stop]).squeeze(-1) - lse[start:stop]
    return torch.where(valid, out, torch.zeros_like(out)), lse, safe, valid


class _GatherLogprobs(torch.autograd.Function):
    """log softmax(logits)[label] row by row, in chunks of rows.

    Forward keeps only the per-row logsumexp ``[N]``; backward recomputes the softmax one
    chunk at a time, so no full-size float32 copy of the logits (and no log_softmax tensor)
    is ever held, whatever the vocabulary size.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk_size: int):  # type: ignore[override]
        out, lse, safe, valid = _chunked_logprobs(lambda a, b: logits[a:b].float(), labels, chunk_size)
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        logits, safe, valid, lse = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        g = torch.where(valid, grad_out.float(), torch.zeros_like(lse))
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], chunk_size):
            stop = min(start + chunk_size, logits.shape[0])
            gc = g[start:stop].unsqueeze(-1)
            # d/dx_v [x_y - lse(x)] = 1[v=y] - softmax(x)_v
            chunk = torch.exp(logits[start:stop].float() - lse[start:stop].unsqueeze(-1)).mul_(-gc)
            chunk.scatter_add_(-1, safe[start:stop], gc)
            grad[start:stop] = chunk.to(logits.dtype)
        return grad, None, None


def gather_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """log p(label) at every position: ``logits.gather(label) - logsumexp(logits)``.

    ``logits`` is ``[..., V]`` (any leading shape, any float dtype), ``labels`` is ``[...]``.
    Rows are processed ``chunk_size`` at a time in float32, so memory stays bounded by one
    chunk of float32 logits. Labels ``< 0`` (e.g. the ignore index -100) give 0 and no
    gradient. Returns float32 of shape ``labels.shape``; differentiable w.r.t. ``logits``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"gather_logprobs: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
            "must agree on the leading dimensions"
        )
    if chunk_size < 1:
        raise ValueError(f"gather_logprobs: chunk_size must be >= 1, got {chunk_size}")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1).long()
    if flat_logits.shape[0] == 0:
        return torch.zeros(labels.shape, dtype=torch.float32, device=logits.device) + 0 * logits.sum()
    out = _GatherLogprobs.apply(flat_logits, flat_labels, chunk_size)
    return out.reshape(labels.shape)


class _LinearLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / temperature)[label], chunks of rows at a time.

    Neither the logits nor their gradient is ever held whole: forward keeps the per-row
    logsumexp ``[N]``; backward recomputes one chunk of logits, turns it into that chunk's
    gradient, and multiplies it out into the hidden states' and the weight's gradients before
    the next chunk. It costs one more ``[chunk, H] x [H, V]`` product per chunk than the
    materialised head and saves two ``[N, V]`` float32 tensors (2 x 403 MB at N = 2,048,
    V = 49,152).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, temperature: float):  # type: ignore[override]
        out, lse, safe, valid = _chunked_logprobs(lambda a, b: _scaled_logits(hidden[a:b], weight, temperature),
                                                  labels, chunk_size)
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        g = torch.where(valid, grad_out.float(), torch.zeros_like(lse)) / ctx.temperature
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, hidden.shape[0])
            gc = g[start:stop].unsqueeze(-1)
            rows = _scaled_logits(hidden[start:stop], weight, ctx.temperature)
            # d/dx_v [x_y - lse(x)] = 1[v=y] - softmax(x)_v, times 1/temperature (in g)
            chunk = torch.exp(rows.sub_(lse[start:stop].unsqueeze(-1))).mul_(-gc)
            chunk = chunk.scatter_add_(-1, safe[start:stop], gc).to(hidden.dtype)
            if want_hidden:
                grad_hidden[start:stop] = chunk @ weight
            if want_weight and chunk.dtype == torch.float32:  # in place: no [V, H] temporary
                grad_weight.addmm_(chunk.T, hidden[start:stop])
            elif want_weight:  # a bf16 product, summed over the chunks in float32
                grad_weight += (chunk.T @ hidden[start:stop]).float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def _scaled_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    with torch.autocast(hidden.device.type, enabled=False):  # the caller chose the dtype
        logits = hidden @ weight.T
    return (logits / temperature if temperature != 1.0 else logits).float()


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    chunk_size: int = 512, temperature: float = 1.0) -> torch.Tensor:
    """``gather_logprobs(hidden @ weight.T / temperature, labels)`` without the ``[N, V]`` logits.

    ``hidden`` is ``[N, H]``, ``weight`` ``[V, H]`` (an output head without bias), ``labels``
    ``[N]`` (``< 0``: 0 and no gradient). The product runs in the autocast dtype when autocast
    is on (as ``nn.Linear`` would), else in ``hidden``'s dtype; the softmax maths in float32. Differentiable w.r.t.
    ``hidden`` and ``weight``; returns float32 ``[N]``.
    """
    if hidden.shape[:-1] != labels.shape or hidden.dim() != 2:
        raise ValueError(f"linear_logprobs: hidden {tuple(hidden.shape)} must be [N, H] with labels [N], "
                         f"got labels {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"linear_logprobs: chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=hidden.device) + 0 * (hidden.sum() + weight.sum())
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return _LinearLogprobs.apply(hidden.to(dtype), weight.to(dtype), labels.long(), chunk_size, temperature)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Entropy ``H = logsumexp(x) - sum softmax(x) * x`` of each row of ``logits [..., V]``.

    Computed in float32, ``chunk_size`` rows at a time. Returns float32 ``logits.shape[:-1]``.
    Meant for logging; it is differentiable (autograd keeps one float32 chunk per chunk).
    """
    if chunk_size < 1:
        raise ValueError(f"entropy_from_logits: chunk_size must be >= 1, got {chunk_size}")
    flat = logits.reshape(-1, logits.shape[-1])
    pieces = []
    for start in range(0, flat.shape[0], chunk_size):
        rows = flat[start : start + chunk_size].float()
        lse = torch.logsumexp(rows, dim=-1)
        p = torch.exp(rows - lse.unsqueeze(-1))
        pieces.append(lse - (p * rows).sum(-1))
    if not pieces:
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    return torch.cat(pieces).reshape(logits.shape[:-1])


# ---------------------------------------------------------------------------
# masked reductions
# ---------------------------------------------------------------------------


def _as_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(dtype=like.dtype if like.is_floating_point() else torch.float32)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is set (over everything, or along ``dim``).

    Masked-out entries are replaced by 0 before multiplying, so inf/nan there cannot leak.
    """
    m = _as_mask(mask, x)
    x = torch.where(m != 0, x, torch.zeros_like(x))
    prod = x * m
    return prod.sum() if dim is None else prod.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``x`` over the masked entries; 0 where the mask selects nothing."""
    total = masked_sum(x, mask, dim)
    count = _as_mask(mask, total).sum() if dim is None else _as_mask(mask, total).sum(dim)
    safe = torch.where(count > 0, count, torch.ones_like(count))
    return torch.where(count > 0, total / safe, torch.zeros_like(total))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all masked entries (a scalar).

    ``unbiased`` applies Bessel's correction n/(n-1) when n > 1 (with n = 1 the variance is 0).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = _as_mask(mask, var).sum()
        factor = torch.where(n > 1, n / (n - 1).clamp_min(1), torch.ones_like(n))
        var = var * factor
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with mean and (unbiased) variance over the mask.

    ``shift_mean=False`` keeps the original mean (only rescales). Entries outside the mask
    are set to 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(_as_mask(mask, x) != 0, out, torch.zeros_like(out))


# ---------------------------------------------------------------------------
# generalised advantage estimation
# ---------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses.

    ``rewards``, ``values``, ``mask``: ``[B, T]``; ``mask`` is 1 on response tokens. The value
    after the last response token is 0 (the episode ends there).

        δ_t = r_t + γ V_{t+1} − V_t,   A_t = δ_t + γλ A_{t+1},   returns_t = A_t + V_t.

    Returns ``(advantages, returns)``, float32, zero outside the mask, without gradient.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(
            "gae: rewards, values and mask must all be [B, T]; got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    with torch.no_grad():
        m = mask.float()
        r = torch.where(m != 0, rewards.float(), torch.zeros_like(m))
        v = torch.where(m != 0, values.float(), torch.zeros_like(m))
        T = r.shape[1]
        adv = torch.zeros_like(r)
        next_value = torch.zeros_like(r[:, 0])
        next_adv = torch.zeros_like(r[:, 0])
        for t in reversed(range(T)):
            delta = r[:, t] + gamma * next_value - v[:, t]
            a = (delta + gamma * lam * next_adv) * m[:, t]
            adv[:, t] = a
            # a padded (or masked) position ends the episode for the token before it
            next_value = v[:, t]
            next_adv = a
        returns = (adv + v) * m
    return adv, returns


# ---------------------------------------------------------------------------
# KL estimators (per token; samples drawn from the policy giving ``logp``)
# ---------------------------------------------------------------------------


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π − log π_ref (unbiased for KL(π‖π_ref), can be negative)."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π − log π_ref)² (low variance, biased, ≥ 0)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log π_ref − log π) − (log π_ref − log π) − 1 (unbiased, ≥ 0)."""
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimator(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-token KL estimator called ``name`` ("k1", "k2" or "k3")."""
    try:
        return KL_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {name!r}; choose one of {sorted(KL_ESTIMATORS)}"
        ) from None
