"""What each denoising step computes: the one plan the runtime's split forward (runtime.pipeline)
and the PyTorch reference generator (export.reference) both follow, each keeping only its tensor
work (ONNX Runtime or TensorRT graphs there, torch layers here).

    plan = StepPlan(layout, prune, cache, cfg_scale)
    step = plan.next_step()         # once per denoising step
    FIRST   layers < K over the full sequence, scored by plan.score_rows(...); plan.prune(...) says
            which tokens survive (runtime.pruning.keep_visual); layers >= K over the survivors
    FULL    every layer over the (reduced) sequence: a refresh, or every step without a KV cache
    CACHED  step.window.compute rows against the cached K/V of step.window.past (runtime.caching)
    logits = plan.guide(per_branch_logits)   # classifier-free guidance, when the batch holds both

With prune None (the reference's unpruned baseline) there is no FIRST step: step 1 is FULL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.caching import CacheSettings, CacheWindow, RefreshClock, cache_window
from runtime.pruning import (PruneSettings, SequenceLayout, dropped_count, keep_visual, kept_positions, query_rows,
                             reduced_position_ids)

FIRST, FULL, CACHED = "first", "full", "cached"


@dataclass(frozen=True)
class Step:
    kind: str  # FIRST, FULL or CACHED
    window: CacheWindow | None = None  # CACHED: the rows recomputed and the rows reused


@dataclass(frozen=True)
class Pruned:
    """Step 1's decision: which tokens survive, and where they sit."""

    keep: np.ndarray  # (V',) kept visual tokens, ascending indices into the V visual tokens
    kept: np.ndarray  # (n',) sequence rows that survive: text, kept visual tokens, response, in order
    positions: np.ndarray  # (n',) their RoPE position ids (PruneSettings.positions)


class StepPlan:
    """One generation's steps: which kind each is, what step 1 scores and keeps, how branches combine."""

    def __init__(self, layout: SequenceLayout, prune: PruneSettings | None, cache: CacheSettings | None = None,
                 cfg_scale: float = 0.0):
        self.layout, self.prune, self.cfg_scale = layout, prune, cfg_scale
        self.cache = cache or CacheSettings()
        self.clock = RefreshClock(self.cache)
        self.pruned = prune is None  # no FIRST step without pruning settings
        self.n = layout.total  # rows of the sequence the steps run over (reduced after step 1)

    @property
    def batch(self) -> int:
        """Sequences per step: the conditional one and, with guidance, the one whose prompt is all masks."""
        return 2 if self.cfg_scale > 0 else 1

    def start_block(self, start: int, end: int) -> None:
        self.clock.start_block(start, end)

    def next_step(self) -> Step:
        """The kind of the next step; call once per step."""
        refresh = self.clock.next_step_refreshes()
        if not self.pruned:
            return Step(FIRST)
        if refresh:
            return Step(FULL)
        return Step(CACHED, cache_window(self.cache.mode, self.n, self.layout.n_response, self.clock.block))

    def score_rows(self, masked_response: np.ndarray) -> np.ndarray | None:
        """The query rows whose attention at layer K-1 scores the visual tokens in step 1 (masked_response:
        which response rows are masks), or None when the rule reads no saliency (random, nothing pruned)."""
        p = self.prune
        if p.rule == "random" or dropped_count(p, self.layout.sizes) == 0:
            return None
        return query_rows(self.layout, p.query, masked_response)

    def prune_visual(self, saliency, similarity) -> Pruned:
        """Step 1's survivors under the rule (runtime.pruning.keep_visual: saliency() -> (V,) scores,
        similarity(pivots) -> (pivots, V), each called only when the rule reads it)."""
        keep = keep_visual(self.prune, self.layout.sizes, saliency, similarity, self.layout.fill)
        kept = kept_positions(self.layout, keep)
        self.clock.after_pruning(self.prune.positions)
        self.pruned, self.n = True, int(kept.size)
        return Pruned(keep, kept, reduced_position_ids(kept, self.prune.positions))

    def guide(self, logits):
        """(B, rows, V) -> (rows, V), numpy or torch: classifier-free guidance when the batch holds both
        branches (conditional first), else the one branch."""
        if self.cfg_scale > 0:
            return logits[1] + (self.cfg_scale + 1) * (logits[0] - logits[1])
        return logits[0]
