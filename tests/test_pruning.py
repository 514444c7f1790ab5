"""The pruning rules' choices (runtime.pruning): exact counts, ties, the duplicate-aware rule against an
independent implementation, and what it keeps that saliency drops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.reference import pivot_similarity
from runtime.pruning import (PruneSettings, keep_by_score, keep_duplicate_aware, keep_visual, pick_pivots,
                             pruned_count)


def by_the_book(sim: np.ndarray, pivots: list[int], n_keep: int, pool: list[int] | None = None) -> list[int]:
    """The duplicate rule as the issue states it, written plainly: the pivots (most salient first) in the
    pool while the budget lasts; the rest split over all pivots (earlier pivots take the remainder one
    each); each pivot takes, from what is left of the pool, its share of the least similar tokens, lower
    index first on ties."""
    pool = list(range(sim.shape[1])) if pool is None else pool
    kept = [t for t in pivots if t in pool][:n_keep]
    left = [t for t in pool if t not in kept]
    rest = n_keep - len(kept)
    for i in range(len(pivots)):
        share = rest // len(pivots) + (i < rest % len(pivots))
        for _ in range(share):
            best = min(left, key=lambda t: (sim[i, t], t))
            kept.append(best)
            left.remove(best)
    return sorted(kept)


@pytest.mark.parametrize("v,m", [(1, 1), (7, 3), (40, 8), (97, 8), (200, 16)])
def test_the_duplicate_rule_matches_the_plain_statement_and_drops_exactly_floor_vp(v, m):
    rng = np.random.default_rng(v)
    x = torch.from_numpy(rng.standard_normal((v, 6)))
    scores = rng.random(v)
    pivots = pick_pivots(scores, m)
    sim = pivot_similarity(x, pivots)
    sim[:, : v // 3] = np.round(sim[:, : v // 3], 1)  # ties among the candidates
    for p in (0, 1, 25, 50, 70, 90, 99, 99.5):
        kept = keep_duplicate_aware(sim, pivots, p)
        assert kept.size == v - pruned_count(v, p) and np.unique(kept).size == kept.size
        assert kept.tolist() == by_the_book(sim, pivots.tolist(), v - pruned_count(v, p)), p
        assert set(pivots[: kept.size].tolist()) <= set(kept.tolist())  # the pivots first


def test_pivots_are_the_highest_scores_ties_to_the_lower_index():
    scores = np.array([0.1, 0.5, 0.5, 0.9, 0.5, 0.0])
    assert pick_pivots(scores, 3).tolist() == [3, 1, 2]
    assert pick_pivots(scores, 10).tolist() == [3, 1, 2, 4, 0, 5]  # at most V


def test_the_duplicate_rule_drops_the_near_copies_saliency_keeps():
    """Four distinct objects, each repeated in near-copies; saliency prefers the copies of one. With a
    budget of one pivot and three more, the rule keeps the pivot and no copy of it (the rest go to other
    objects); saliency keeps four copies of the same object."""
    rng = np.random.default_rng(0)
    objects = rng.standard_normal((4, 16))
    owner = np.repeat(np.arange(4), 10)  # tokens 0-9 object 0, 10-19 object 1, ...
    x = objects[owner] + 0.01 * rng.standard_normal((40, 16))
    scores = np.where(owner == 0, 1.0, 0.1) + 0.01 * rng.random(40)
    p = 90  # keep 4 of 40
    pivots = pick_pivots(scores, 1)
    kept = keep_duplicate_aware(pivot_similarity(torch.from_numpy(x), pivots), pivots, p)
    assert kept.size == 4 and pivots[0] in kept and np.sum(owner[kept] == 0) == 1
    assert owner[keep_by_score(scores, p)].tolist() == [0, 0, 0, 0]


def test_per_image_quotas_keep_each_image_its_share():
    rng = np.random.default_rng(3)
    v = (30, 50)
    x = torch.from_numpy(rng.standard_normal((sum(v), 8)))
    scores = np.concatenate([rng.random(v[0]) + 1.0, rng.random(v[1])])  # every pivot in image 0
    pivots = pick_pivots(scores, 4)
    sim = pivot_similarity(x, pivots)
    kept = keep_duplicate_aware(sim, pivots, 70, image_sizes=list(v))
    first = kept[kept < v[0]]
    assert first.size == v[0] - pruned_count(v[0], 70) and kept.size - first.size == v[1] - pruned_count(v[1], 70)
    assert set(pivots.tolist()) <= set(first.tolist())
    # each image by the same rule on its own tokens (image 1 has no pivot of its own: all shares)
    for lo, hi in ((0, v[0]), (v[0], sum(v))):
        want = by_the_book(sim, pivots.tolist(), (hi - lo) - pruned_count(hi - lo, 70), list(range(lo, hi)))
        assert kept[(kept >= lo) & (kept < hi)].tolist() == want
    # one image: the same as no split
    assert np.array_equal(keep_duplicate_aware(sim, pivots, 70, [sum(v)]), keep_duplicate_aware(sim, pivots, 70))


def test_keep_visual_reads_only_what_its_rule_needs():
    def never():
        raise AssertionError("read although the rule does not need it")

    scores = np.linspace(0, 1, 20)
    assert keep_visual(PruneSettings(p=0), 20, never, never).tolist() == list(range(20))
    assert keep_visual(PruneSettings(p=50, rule="random", seed=1), 20, never, never).size == 10
    assert keep_visual(PruneSettings(p=50, rule="saliency"), 20, lambda: scores, never).tolist() == list(range(10, 20))
    asked = []

    def similarity(pivots):
        asked.append(pivots.tolist())
        return np.zeros((len(pivots), 20))

    kept = keep_visual(PruneSettings(p=50, rule="duplicate", pivots=3), 20, lambda: scores, similarity)
    assert asked == [[19, 18, 17]] and kept.tolist() == [0, 1, 2, 3, 4, 5, 6, 17, 18, 19]  # ties: lower index


def test_rule_and_pivots_are_checked():
    with pytest.raises(Exception, match="rule: got 'dart'"):
        PruneSettings(rule="dart").validate(32)
    with pytest.raises(Exception, match="pivots: got 0"):
        PruneSettings(pivots=0).validate(32)
