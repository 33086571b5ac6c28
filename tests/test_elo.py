import math
import random

import pytest

from alignkit.rewards.elo import bradley_terry, elo, pairs_from_scores


def test_bt_recovers_known_order():
    rng = random.Random(0)
    strengths = [-1.5, -0.6, 0.0, 0.7, 1.6]
    n = len(strengths)
    comps = []
    for _ in range(3000):
        i, j = rng.sample(range(n), 2)
        p_i = 1 / (1 + math.exp(strengths[j] - strengths[i]))
        comps.append((i, j) if rng.random() < p_i else (j, i))
    scores = bradley_terry(n, comps)
    assert sorted(range(n), key=scores.__getitem__) == list(range(n))
    assert sum(scores) == pytest.approx(0.0, abs=1e-9)
    # centred true strengths are recovered roughly
    mean = sum(strengths) / n
    for s, t in zip(scores, strengths):
        assert s == pytest.approx(t - mean, abs=0.25)


def test_bt_hand_example():
    scores = bradley_terry(2, [(0, 1)] * 3 + [(1, 0)], prior=0.0)
    assert scores[0] - scores[1] == pytest.approx(math.log(3), abs=1e-6)
    assert sum(scores) == pytest.approx(0.0, abs=1e-12)
    # the prior shrinks toward equal strength and keeps an undefeated item finite
    shrunk = bradley_terry(2, [(0, 1)] * 3 + [(1, 0)], prior=1.0)
    assert 0 < shrunk[0] - shrunk[1] < math.log(3)
    finite = bradley_terry(3, [(0, 1), (0, 2)])
    assert all(math.isfinite(x) for x in finite) and finite[0] == max(finite)
    assert bradley_terry(0, []) == []
    with pytest.raises(ValueError):
        bradley_terry(2, [(0, 2)])


def test_elo_one_game():
    r = elo(2, [(1, 0)], k=32, initial=1000)
    assert r == pytest.approx([984.0, 1016.0])
    # an upset moves ratings more than an expected win
    r2 = elo(2, [(0, 1)], k=32, initial=1000)
    r3 = elo(2, [(0, 1), (1, 0)], k=32)
    # game 2: item 1 (984) beats item 0 (1016); its expected score is below 1/2
    e_1 = 1 / (1 + 10 ** ((1016 - 984) / 400))
    assert r3[1] == pytest.approx(984 + 32 * (1 - e_1))
    assert r3[1] - r2[1] > 16.0 and sum(r3) == pytest.approx(2000.0)


def test_pairs_from_scores():
    assert pairs_from_scores([1.0, 3.0, 1.0, 2.0]) == [(1, 0), (3, 0), (1, 2), (1, 3), (3, 2)]
    assert pairs_from_scores([1.0, 1.0]) == []
    assert pairs_from_scores([0.0, 0.5, 2.0], min_gap=0.5) == [(2, 0), (2, 1)]
