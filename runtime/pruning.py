"""Persistent visual-token pruning: which tokens survive step 1, and which positions they keep.

docs/pruning.md: in the first denoising step, between decoder layers K-1 and K, drop
floor(V * P / 100) of the V visual tokens with the lowest attention saliency (ties: the lower
index survives), keep the rest in their original order, never drop text or response tokens,
and run every later step on the reduced sequence. Kept tokens keep their original RoPE
positions (FastV) or are re-packed to arange (RedVTP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.errors import expect

QUERY_SETS = ("response", "prompt", "last")  # masked response (RedVTP), prompt text, FastV's last token
POSITION_MODES = ("original", "compact")


@dataclass(frozen=True)
class PruneSettings:
    """K and P are the method; the rest choose among the papers' variants and ablations."""

    k: int = 15
    p: float = 0.0  # percent of visual tokens dropped, in [0, 100)
    query: str = "response"
    random: bool = False  # the ablation: drop the same number of tokens uniformly at random
    positions: str = "original"
    seed: int = 0  # for random pruning

    def validate(self, n_layers: int) -> "PruneSettings":
        expect(
            isinstance(self.k, int) and 1 <= self.k <= n_layers - 1,
            f"K: got {self.k!r}; expected an integer layer index in 1..{n_layers - 1} for a {n_layers}-layer decoder",
        )
        expect(0 <= self.p < 100, f"P: got {self.p!r}; expected a percentage in [0, 100)")
        expect(self.query in QUERY_SETS, f"query set: got {self.query!r}; expected one of {QUERY_SETS}")
        expect(
            self.positions in POSITION_MODES,
            f"positions: got {self.positions!r}; expected one of {POSITION_MODES}",
        )
        return self


@dataclass(frozen=True)
class SequenceLayout:
    """[prefix text | visual | suffix text | response] along the sequence."""

    n_prefix: int
    n_visual: int
    n_suffix: int
    n_response: int

    @property
    def total(self) -> int:
        return self.n_prefix + self.n_visual + self.n_suffix + self.n_response

    @property
    def visual(self) -> slice:
        return slice(self.n_prefix, self.n_prefix + self.n_visual)

    @property
    def response(self) -> slice:
        return slice(self.total - self.n_response, self.total)

    @property
    def n_prompt(self) -> int:
        return self.total - self.n_response

    def prompt_text_positions(self) -> np.ndarray:
        return np.concatenate([np.arange(self.n_prefix), np.arange(self.visual.stop, self.n_prompt)])


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


def keep_by_score(scores: np.ndarray, p: float) -> np.ndarray:
    """Visual indices kept: the V - floor(V*P/100) highest scores, ties to the lower index, sorted."""
    n_keep = scores.shape[0] - pruned_count(scores.shape[0], p)
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    return np.sort(order[:n_keep]).astype(np.int64)


def keep_at_random(n_visual: int, p: float, seed: int) -> np.ndarray:
    """The random-pruning ablation: the same count, chosen uniformly, sorted."""
    n_keep = n_visual - pruned_count(n_visual, p)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_visual, size=n_keep, replace=False)).astype(np.int64)


def kept_positions(layout: SequenceLayout, keep_visual: np.ndarray) -> np.ndarray:
    """Sequence positions that survive: all text and response, the kept visual tokens, in order."""
    return np.concatenate(
        [np.arange(layout.n_prefix), layout.n_prefix + keep_visual, np.arange(layout.visual.stop, layout.total)]
    ).astype(np.int64)


def reduced_position_ids(kept: np.ndarray, mode: str) -> np.ndarray:
    """RoPE position ids of the reduced sequence."""
    return kept.copy() if mode == "original" else np.arange(kept.shape[0], dtype=np.int64)
