"""Per-item scores from pairwise comparisons, and pairs from scores.

`bradley_terry` fits P(i beats j) = p_i / (p_i + p_j) by Hunter's MM algorithm and returns
centred log-strengths; `elo` runs online Elo updates; `pairs_from_scores` turns scores back
into (better, worse) pairs for a pairwise reward-model loss.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["bradley_terry", "elo", "pairs_from_scores"]


def _check(n_items: int, comparisons: Sequence[tuple[int, int]]) -> None:
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    for w, l in comparisons:
        if not (0 <= w < n_items and 0 <= l < n_items):
            raise ValueError(f"comparison ({w}, {l}) names an item outside 0..{n_items - 1}")
        if w == l:
            raise ValueError(f"comparison ({w}, {l}) compares an item with itself")


def bradley_terry(
    n_items: int,
    comparisons: Sequence[tuple[int, int]],
    iters: int = 1000,
    prior: float = 0.1,
    tol: float = 1e-10,
) -> list[float]:
    """Bradley–Terry log-strengths from (winner, loser) comparisons, centred at mean 0.

    MM updates (Hunter 2004): p_i <- W_i / sum_j n_ij / (p_i + p_j). The prior adds, for each
    item, `prior` virtual wins and `prior` virtual losses against a fixed reference of strength
    1; it keeps every strength finite (an item that never wins or never loses) and the fit
    identifiable on disconnected comparison graphs. With prior=0 the result is the plain
    maximum-likelihood fit, which is finite only when every item both wins and loses within a
    connected comparison graph. Items with no comparisons (and prior=0) get score 0.
    """
    _check(n_items, comparisons)
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior}")
    if n_items == 0:
        return []
    wins = [0.0] * n_items
    counts: dict[tuple[int, int], int] = {}
    for w, l in comparisons:
        wins[w] += 1
        key = (w, l) if w < l else (l, w)
        counts[key] = counts.get(key, 0) + 1
    neighbours: list[list[tuple[int, int]]] = [[] for _ in range(n_items)]
    for (i, j), c in counts.items():
        neighbours[i].append((j, c))
        neighbours[j].append((i, c))
    p = [1.0] * n_items
    for _ in range(iters):
        new = []
        for i in range(n_items):
            denom = sum(c / (p[i] + p[j]) for j, c in neighbours[i]) + 2.0 * prior / (p[i] + 1.0)
            num = wins[i] + prior
            new.append(max(num / denom, 1e-300) if denom > 0 else p[i])
        if prior == 0:  # only ratios are identified: fix the geometric mean at 1
            g = math.exp(sum(math.log(x) for x in new) / n_items)
            new = [x / g for x in new]
        delta = max(abs(math.log(a) - math.log(b)) for a, b in zip(new, p))
        p = new
        if delta < tol:
            break
    logs = [math.log(x) for x in p]
    mean = sum(logs) / n_items
    return [x - mean for x in logs]


def elo(
    n_items: int,
    comparisons: Sequence[tuple[int, int]],
    k: float = 32.0,
    initial: float = 1000.0,
) -> list[float]:
    """Elo ratings after online updates in the given order of (winner, loser) games:
    E_w = 1 / (1 + 10^((R_l - R_w)/400)); R_w += k(1 - E_w); R_l -= k(1 - E_w)."""
    _check(n_items, comparisons)
    r = [float(initial)] * n_items
    for w, l in comparisons:
        expected = 1.0 / (1.0 + 10.0 ** ((r[l] - r[w]) / 400.0))
        delta = k * (1.0 - expected)
        r[w] += delta
        r[l] -= delta
    return r


def pairs_from_scores(scores: Sequence[float], min_gap: float = 0.0) -> list[tuple[int, int]]:
    """All (better, worse) index pairs whose scores differ by more than `min_gap` (strictly);
    ties (and gaps <= min_gap) are dropped. Pairs come in index order of (i, j), i < j."""
    out = []
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            gap = scores[i] - scores[j]
            if gap > min_gap:
                out.append((i, j))
            elif -gap > min_gap:
                out.append((j, i))
    return out
