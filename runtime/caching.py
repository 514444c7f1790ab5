"""Block KV caching for masked diffusion (Fast-dLLM), on top of step-1 pruning: docs/caching.md.

Between two refreshes, only the current response block's tokens change. A refresh runs the whole
(reduced) sequence and keeps every layer's keys (after RoPE) and values; a cached step recomputes
only some rows, which attend to their own fresh K/V and to the cached K/V of the others:

    prefix   recompute the current block and everything after it; reuse the rows before the block
    dual     recompute the current block only; reuse the rows before and after it

Attention has no mask and positions live in the keys (RoPE before caching), so the reused rows
may be handed over in any order. Refreshes: the first step (which prunes), the first step of
every block, the step after step 1 when pruning re-numbers positions (`compact`: step 1's layers
< K hold keys rotated at the old positions), and, with `refresh_every` = r > 0, every r-th step
inside a block (r = 1 makes the
cached path compute exactly what the uncached one does: the exactness check).
The reference generator (export/reference.py) and the runtime share these rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import expect

CACHE_MODES = ("none", "prefix", "dual")


@dataclass(frozen=True)
class CacheSettings:
    mode: str = "none"
    refresh_every: int = 0  # inside a block, refresh every r-th step too (0: only at block starts)

    def validate(self) -> "CacheSettings":
        expect(self.mode in CACHE_MODES, f"cache: got {self.mode!r}; expected one of {CACHE_MODES}")
        expect(isinstance(self.refresh_every, int) and self.refresh_every >= 0,
               f"refresh_every: got {self.refresh_every!r}; expected an integer >= 0 (0: at block starts only)")
        return self

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class CacheWindow:
    """One cached step over a sequence of n rows: which rows are recomputed, which are reused."""

    compute: np.ndarray  # sequence rows recomputed, ascending (int64)
    past: np.ndarray  # sequence rows whose cached keys and values the computed rows attend to (int64)


def cache_window(mode: str, n: int, n_response: int, block: tuple[int, int]) -> CacheWindow:
    """The rows of a cached step: the response is the last n_response rows of the sequence and
    `block` = (start, end) is the current block in response positions."""
    assert mode in ("prefix", "dual") and 0 <= block[0] < block[1] <= n_response <= n
    first, last = n - n_response + block[0], n - n_response + block[1]
    if mode == "prefix":
        return CacheWindow(np.arange(first, n, dtype=np.int64), np.arange(0, first, dtype=np.int64))
    past = np.concatenate([np.arange(0, first), np.arange(last, n)]).astype(np.int64)
    return CacheWindow(np.arange(first, last, dtype=np.int64), past)


class RefreshClock:
    """When a step must refresh: the first step, each block's first step, and every r-th step."""

    def __init__(self, settings: CacheSettings):
        self.settings = settings
        self.block: tuple[int, int] | None = None
        self.since = 0  # steps since the last refresh
        self.pending = True

    def start_block(self, start: int, end: int) -> None:
        self.block, self.pending = (start, end), True

    def after_pruning(self, positions: str) -> None:
        """Step 1 pruned with `positions` (runtime.pruning.PruneSettings.positions). Re-numbered positions
        make the next step refresh too: step 1's keys of layers < K were rotated at the full sequence's
        positions, which a cached window at the new ones must not attend to."""
        if self.settings.enabled and positions != "original":
            self.pending = True

    def next_step_refreshes(self) -> bool:
        """Call once per step; True when this step refreshes."""
        r = self.settings.refresh_every
        refresh = self.pending or not self.settings.enabled or (r > 0 and self.since >= r)
        self.pending = False
        self.since = 1 if refresh else self.since + 1
        return refresh
