"""The step plan (runtime.steps): what each denoising step computes, the one plan the runtime's split
forward and the reference generator follow. Checked here against hand-written expectations; the
two forwards' tensor work is checked against each other in test_runtime and test_caching."""

from __future__ import annotations

import numpy as np
import torch

from runtime.caching import CacheSettings
from runtime.pruning import PruneSettings, SequenceLayout
from runtime.steps import CACHED, FIRST, FULL, StepPlan

LAY = SequenceLayout(3, 20, 2, 8)  # prefix 3, 20 visual tokens, suffix 2, response 8: 33 rows


def kinds(plan: StepPlan, steps: int, blocks=((0, 8),)) -> list[str]:
    out = []
    per_block = steps // len(blocks)
    for start, end in blocks:
        plan.start_block(start, end)
        for _ in range(per_block):
            step = plan.next_step()
            out.append(step.kind)
            if step.kind == FIRST:
                plan.prune_visual(lambda: np.arange(LAY.n_visual, dtype=np.float64), None)
    return out


def test_step_kinds_uncached_cached_and_unpruned():
    prune = PruneSettings(k=2, p=50, rule="saliency")
    assert kinds(StepPlan(LAY, prune), 4) == [FIRST, FULL, FULL, FULL]
    assert kinds(StepPlan(LAY, prune, CacheSettings("dual")), 4) == [FIRST, CACHED, CACHED, CACHED]
    assert kinds(StepPlan(LAY, prune, CacheSettings("dual")), 4, ((0, 4), (4, 8))) == [FIRST, CACHED, FULL, CACHED]
    assert kinds(StepPlan(LAY, prune, CacheSettings("prefix", refresh_every=2)), 4) == [FIRST, CACHED, FULL, CACHED]
    # compact positions re-number the survivors: the step after step 1 refreshes
    compact = PruneSettings(k=2, p=50, rule="saliency", positions="compact")
    assert kinds(StepPlan(LAY, compact, CacheSettings("dual")), 4) == [FIRST, FULL, CACHED, CACHED]
    assert kinds(StepPlan(LAY, None, CacheSettings("dual")), 3) == [FULL, CACHED, CACHED]  # the unpruned baseline


def test_first_step_keeps_the_rule_s_tokens_and_shrinks_the_windows():
    plan = StepPlan(LAY, PruneSettings(k=2, p=50, rule="saliency"), CacheSettings("dual"))
    plan.start_block(0, 8)
    assert plan.next_step().kind == FIRST
    scores = np.r_[np.zeros(10), np.ones(10)]  # the last ten visual tokens are the salient ones
    pruned = plan.prune_visual(lambda: scores, None)
    assert pruned.keep.tolist() == list(range(10, 20))
    assert pruned.kept.tolist() == [0, 1, 2, *range(13, 23), *range(23, 33)]
    assert np.array_equal(pruned.positions, pruned.kept)  # original positions
    step = plan.next_step()
    assert step.kind == CACHED and plan.n == 23
    assert step.window.compute.tolist() == list(range(15, 23))  # the block: the last 8 of 23 rows
    assert step.window.past.tolist() == list(range(15))


def test_score_rows_only_where_the_rule_reads_saliency():
    masked = np.ones(LAY.n_response, bool)
    assert StepPlan(LAY, PruneSettings(k=2, p=0)).score_rows(masked) is None  # nothing pruned
    assert StepPlan(LAY, PruneSettings(k=2, p=50, rule="random")).score_rows(masked) is None
    rows = StepPlan(LAY, PruneSettings(k=2, p=50, query="response")).score_rows(masked)
    assert rows.tolist() == list(range(25, 33))  # the masked response rows
    rows = StepPlan(LAY, PruneSettings(k=2, p=50, rule="duplicate", query="response")).score_rows(masked)
    assert rows.tolist() == list(range(25, 33))


def test_guidance_combines_the_branches_in_numpy_and_torch():
    logits = np.random.default_rng(0).standard_normal((2, 3, 5))
    want = logits[1] + 2.5 * (logits[0] - logits[1])  # cfg 1.5: uncond + (s + 1) (cond - uncond)
    plan = StepPlan(LAY, None, cfg_scale=1.5)
    assert plan.batch == 2
    assert np.allclose(plan.guide(logits), want)
    assert np.allclose(plan.guide(torch.from_numpy(logits)).numpy(), want)
    plain = StepPlan(LAY, None)
    assert plain.batch == 1 and np.array_equal(plain.guide(logits[:1]), logits[0])
