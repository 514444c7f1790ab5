"""Persistent visual-token pruning: which tokens survive step 1, and which positions they keep.

docs/pruning.md: in the first denoising step, between decoder layers K-1 and K, drop exactly
floor(V * P / 100) of the V visual tokens, keep the rest in their original order, never drop
text or response tokens, and run every later step on the reduced sequence. Kept tokens keep
their original RoPE positions (FastV) or are re-packed to arange (RedVTP). Which tokens, by rule:

    saliency    the highest attention saliency at layer K-1 (ties: the lower index survives)
    duplicate   duplicate-aware, after DART (Wen et al. 2025): the `pivots` highest-saliency
                tokens are kept, the rest of the budget is split over them, and each pivot in
                turn keeps the remaining tokens least cosine-similar to it (hidden states entering
                layer K), taken out of the pool as they are kept
    random      the ablation: the same count, uniformly at random

A padded view (several cameras) holds fill tokens: patches of the mean-colour square that show no pixel
of the frame (runtime.anyres.pad_fill_tokens). With fill "first" (the default) they are the first to go:
a budget whose fill covers its drop count loses only fill (the rule picks which); otherwise it loses all
its fill and the rule drops the rest from the frame. The count dropped is the same either way.

Every choice here is pure numpy on host arrays, written once for the runtime and the reference
generator; what the rules read (saliency, similarities) comes from the graphs or the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.errors import expect

QUERY_SETS = ("response", "prompt", "last")  # masked response (RedVTP), prompt text, FastV's last token
POSITION_MODES = ("original", "compact")
RULES = ("saliency", "duplicate", "random")
# several images: rank every camera's tokens together (global), or give each camera its own
# V_i - floor(V_i*P/100) (per_camera: no camera wiped out)
BUDGETS = ("global", "per_camera")
# several cameras: a padded view's fill tokens go before any frame token (first), or the rule ranks them
# like any token (rule: the ablation)
FILL_MODES = ("first", "rule")
DEFAULT_RULE = "duplicate"
DEFAULT_PIVOTS = 8
RULE_HELP = {
    "saliency": "keep the tokens the query rows attend to most at layer K-1",
    "duplicate": "duplicate-aware (after DART): keep the PIVOTS most salient tokens, then per pivot the tokens "
                 "least similar to it, so near-copies go first",
    "random": "ablation: drop as many tokens uniformly at random (--seed)",
}


@dataclass(frozen=True)
class PruneSettings:
    """K and P are the method; the rest choose among the papers' variants and ablations."""

    k: int = 15
    p: float = 0.0  # percent of visual tokens dropped, in [0, 100)
    query: str = "response"
    rule: str = DEFAULT_RULE  # which tokens survive: RULES
    positions: str = "original"
    seed: int = 0  # for random pruning
    pivots: int = DEFAULT_PIVOTS  # the duplicate rule's pivots
    budget: str = "global"  # several images: BUDGETS
    fill: str = "first"  # several images: FILL_MODES

    def validate(self, n_layers: int) -> "PruneSettings":
        expect(
            isinstance(self.k, int) and 1 <= self.k <= n_layers - 1,
            f"K: got {self.k!r}; expected an integer layer index in 1..{n_layers - 1} for a {n_layers}-layer decoder",
        )
        expect(0 <= self.p < 100, f"P: got {self.p!r}; expected a percentage in [0, 100)")
        expect(self.query in QUERY_SETS, f"query set: got {self.query!r}; expected one of {QUERY_SETS}")
        expect(self.rule in RULES, f"rule: got {self.rule!r}; expected one of {RULES}")
        expect(self.budget in BUDGETS, f"budget: got {self.budget!r}; expected one of {BUDGETS}")
        expect(self.fill in FILL_MODES, f"fill: got {self.fill!r}; expected one of {FILL_MODES}")
        expect(isinstance(self.pivots, int) and self.pivots >= 1,
               f"pivots: got {self.pivots!r}; expected an integer >= 1")
        expect(
            self.positions in POSITION_MODES,
            f"positions: got {self.positions!r}; expected one of {POSITION_MODES}",
        )
        return self


@dataclass(frozen=True)
class SequenceLayout:
    """[prefix text | visual | suffix text | response] along the sequence. With several images
    (cameras) the visual part is one segment per image, with text between them:
    [prefix | image 0 | gap 0 | image 1 | ... | image n-1 | suffix | response]."""

    n_prefix: int
    n_visual: int  # all images' visual tokens
    n_suffix: int
    n_response: int
    image_sizes: tuple[int, ...] = ()  # several images: each one's visual tokens (they add up to n_visual)
    gaps: tuple[int, ...] = ()  # several images: the text tokens between image i and image i + 1
    fill: tuple[int, ...] = ()  # visual indices of padded views' fill tokens (runtime.anyres.pad_fill_tokens)

    def __post_init__(self):
        assert not self.image_sizes or sum(self.image_sizes) == self.n_visual, "image sizes add up to n_visual"
        assert all(0 <= i < self.n_visual for i in self.fill), "fill tokens are visual tokens"
        assert len(self.gaps) == max(len(self.image_sizes) - 1, 0), "one gap between consecutive images"

    @property
    def sizes(self) -> tuple[int, ...]:
        """Each image's visual tokens (one image: (n_visual,))."""
        return self.image_sizes or (self.n_visual,)

    @property
    def total(self) -> int:
        return self.n_prefix + self.n_visual + sum(self.gaps) + self.n_suffix + self.n_response

    def segments(self) -> list[slice]:
        """Each image's rows in the sequence."""
        out, start = [], self.n_prefix
        for size, gap in zip(self.sizes, (*self.gaps, 0)):
            out.append(slice(start, start + size))
            start += size + gap
        return out

    @property
    def visual_rows(self) -> np.ndarray:
        """(V,) the sequence rows of the visual tokens, image by image (int64)."""
        return np.concatenate([np.arange(s.start, s.stop) for s in self.segments()]).astype(np.int64)

    @property
    def visual(self) -> slice:
        """The visual rows of a one-image layout as a slice."""
        assert not self.gaps, "several images: use visual_rows"
        return slice(self.n_prefix, self.n_prefix + self.n_visual)

    @property
    def response(self) -> slice:
        return slice(self.total - self.n_response, self.total)

    @property
    def n_prompt(self) -> int:
        return self.total - self.n_response

    def prompt_text_positions(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.n_prompt), self.visual_rows).astype(np.int64)


def pruned_count(n_visual: int, p: float) -> int:
    """floor(V * P / 100), exact for integer P."""
    if float(p).is_integer():
        return n_visual * int(p) // 100
    return math.floor(n_visual * p / 100)


def query_rows(layout: SequenceLayout, query: str, masked_response: np.ndarray) -> np.ndarray:
    """Sequence positions whose attention scores the visual tokens."""
    if query == "response":
        rows = layout.response.start + np.flatnonzero(masked_response)
    elif query == "prompt":
        rows = layout.prompt_text_positions()
    else:
        rows = np.array([layout.n_prompt - 1])
    assert rows.size > 0, "no query rows: nothing to score the visual tokens with"
    return rows.astype(np.int64)


def budget_sizes(prune: PruneSettings, image_sizes) -> list[int]:
    """The visual tokens' split into budgets: one per image with the per_camera budget, else one.
    image_sizes: each image's visual tokens, or one count (one image)."""
    sizes = [int(image_sizes)] if np.ndim(image_sizes) == 0 else [int(x) for x in image_sizes]
    return sizes if prune.budget == "per_camera" and len(sizes) > 1 else [sum(sizes)]


def dropped_count(prune: PruneSettings, image_sizes) -> int:
    """How many visual tokens step 1 drops: floor(V_b * P / 100) summed over the budgets."""
    return sum(pruned_count(size, prune.p) for size in budget_sizes(prune, image_sizes))


def keep_visual(prune: PruneSettings, image_sizes, saliency, similarity, fill=()) -> np.ndarray:
    """The kept visual indices (sorted) under prune's rule: the one place the runtime and the reference
    generator decide. image_sizes: each image's visual tokens (one image: V); saliency() -> (V,)
    scores; similarity(pivots) -> (len(pivots), V) cosine similarities of those visual tokens' hidden
    states entering layer K to every visual token's. Neither is called when the rule does not read it
    (nothing dropped, or random). Each budget (budget_sizes) keeps V_b - floor(V_b*P/100) of its own.
    fill: visual indices of padded views' fill tokens, dropped first unless prune.fill is "rule"."""
    sizes = budget_sizes(prune, image_sizes)
    n_visual = sum(sizes)
    if dropped_count(prune, sizes) == 0:
        return np.arange(n_visual, dtype=np.int64)
    is_fill = np.zeros(n_visual, bool)
    if prune.fill == "first":
        is_fill[np.asarray(fill, np.int64)] = True
    budgets = rule_pools(sizes, prune.p, is_fill)
    if prune.rule == "random":
        picks = [pick_at_random(pool, n, prune.seed + i) for i, (_, pool, n) in enumerate(budgets)]
    elif prune.rule == "saliency":
        scores = saliency()
        picks = [pick_by_score(scores, pool, n) for _, pool, n in budgets]
    else:
        scores = saliency()
        pivots = pick_pivots(scores, prune.pivots, among=np.flatnonzero(~is_fill))
        sim = np.asarray(similarity(pivots), np.float64)
        picks = [_keep_from_pool(sim, pivots, _mask(pool, n_visual), n) for _, pool, n in budgets]
    return np.sort(np.concatenate([kept for kept, _, _ in budgets] + picks)).astype(np.int64)


def rule_pools(sizes: list[int], p: float, is_fill: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Per budget: (kept whatever the rule says, the pool the rule picks from, how many it keeps). A budget
    dropping no more than its fill keeps its frame and lets the rule choose which fill survives; else all
    its fill goes and the rule keeps V_b - floor(V_b*P/100) of the frame."""
    out, start = [], 0
    for size in sizes:
        own = np.arange(start, start + size)
        drop, fill, frame = pruned_count(size, p), own[is_fill[own]], own[~is_fill[own]]
        if fill.size and fill.size >= drop:
            out.append((frame, fill, int(fill.size - drop)))
        else:
            out.append((own[:0], frame, int(size - drop)))
        start += size
    return out


def _mask(indices: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, bool)
    out[indices] = True
    return out


def pick_by_score(scores: np.ndarray, pool: np.ndarray, n_keep: int) -> np.ndarray:
    """The n_keep of the pool (ascending visual indices) with the highest scores, ties to the lower index."""
    order = np.argsort(-scores[pool].astype(np.float64), kind="stable")
    return pool[order[:n_keep]].astype(np.int64)


def keep_by_score(scores: np.ndarray, p: float) -> np.ndarray:
    """Visual indices kept: the V - floor(V*P/100) highest scores, ties to the lower index, sorted."""
    n_visual = scores.shape[0]
    return np.sort(pick_by_score(scores, np.arange(n_visual), n_visual - pruned_count(n_visual, p)))


def pick_pivots(scores: np.ndarray, n: int, among: np.ndarray | None = None) -> np.ndarray:
    """The duplicate rule's pivots: the min(n, V) highest scores, highest first, ties to the lower index;
    among: the visual indices (ascending) they may be (default: all)."""
    among = np.arange(scores.shape[0]) if among is None else np.asarray(among, np.int64)
    return among[np.argsort(-scores[among].astype(np.float64), kind="stable")[:n]].astype(np.int64)


def keep_duplicate_aware(similarity: np.ndarray, pivots: np.ndarray, p: float,
                         image_sizes: list[int] | None = None) -> np.ndarray:
    """Visual indices kept by the duplicate rule, sorted. similarity (len(pivots), V): cosine similarity
    of each pivot's hidden state to every visual token's; pivots: visual indices, most salient first.

    V - floor(V*P/100) are kept: the pivots first (most salient first, while the budget lasts); the
    rest of the budget is split over the pivots in order (the first ones take one more when it does
    not divide), and each pivot in turn takes its share of the tokens still in the pool least similar
    to it (ties: the lower index). image_sizes: the visual tokens' split into images (several cameras);
    each image then keeps V_i - floor(V_i*P/100) of its own tokens by the same rule, its own pivots
    first and every pivot's similarities to it."""
    sim, pivots = np.asarray(similarity, np.float64), np.asarray(pivots, np.int64)
    n_visual = sim.shape[1]
    assert sim.shape[0] == pivots.size, "one similarity row per pivot"
    sizes = [n_visual] if image_sizes is None else list(image_sizes)
    assert sum(sizes) == n_visual, "image sizes must add up to the visual tokens"
    budgets = rule_pools(sizes, p, np.zeros(n_visual, bool))  # no fill: each image's pool is all of it
    kept = [_keep_from_pool(sim, pivots, _mask(pool, n_visual), n) for _, pool, n in budgets]
    return np.sort(np.concatenate(kept)).astype(np.int64)


def _keep_from_pool(sim: np.ndarray, pivots: np.ndarray, pool: np.ndarray, n_keep: int) -> np.ndarray:
    """n_keep indices from `pool` (a mask over the visual tokens, changed in place)."""
    own = [int(t) for t in pivots if pool[t]][:n_keep]
    pool[own] = False
    kept, rest = list(own), n_keep - len(own)
    m = len(pivots)
    for i in range(m if rest > 0 else 0):
        share = rest // m + (1 if i < rest % m else 0)
        candidates = np.flatnonzero(pool)
        order = candidates[np.argsort(sim[i, candidates], kind="stable")][:share]
        pool[order] = False
        kept += order.tolist()
    assert len(kept) == n_keep, "the pool held fewer tokens than the budget"
    return np.array(kept, np.int64)


def pick_at_random(pool: np.ndarray, n_keep: int, seed: int) -> np.ndarray:
    """The random-pruning ablation: n_keep of the pool (ascending visual indices), chosen uniformly."""
    rng = np.random.default_rng(seed)
    return pool[np.sort(rng.choice(pool.size, size=n_keep, replace=False))].astype(np.int64)


def kept_positions(layout: SequenceLayout, keep_visual: np.ndarray) -> np.ndarray:
    """Sequence positions that survive: all text and response, the kept visual tokens, in order."""
    dropped = np.delete(layout.visual_rows, keep_visual)
    return np.setdiff1d(np.arange(layout.total), dropped).astype(np.int64)


def reduced_position_ids(kept: np.ndarray, mode: str) -> np.ndarray:
    """RoPE position ids of the reduced sequence."""
    return kept.copy() if mode == "original" else np.arange(kept.shape[0], dtype=np.int64)
