"""FLOPs accounting against docs/flops.md's formula and worked examples."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.flops import ORIN, Workload, floor_seconds, layer_macs, main, remaining, step_flops, total_flops

W = Workload(text=50, visual=729, gen=64, steps=64, head="none")


def reference_ratio(w: Workload, k: int, p: float) -> float:
    """R = [K C(n) + (L-K) C(n') + (S-1) L C(n')] / [S L C(n)], written out again."""
    def c(n):
        return 4 * n * w.d ** 2 + 2 * n * n * w.d + 3 * n * w.d * w.m

    n = w.text + w.visual + w.gen
    n2 = n - (w.visual * int(p)) // 100
    L, S = w.layers, w.steps
    return (k * c(n) + (L - k) * c(n2) + (S - 1) * L * c(n2)) / (S * L * c(n))


@pytest.mark.parametrize("visual", [729, 3645])
@pytest.mark.parametrize("k,p", [(15, 50), (15, 70), (3, 50), (3, 70)])
def test_remaining_follows_the_formula(visual, k, p):
    w = replace(W, visual=visual)
    assert remaining(w, k, p) == pytest.approx(reference_ratio(w, k, p), rel=1e-12)


def test_reference_worked_examples():
    assert remaining(W, 15, 50) == pytest.approx(0.56, abs=0.01)
    big = replace(W, visual=3645)
    assert remaining(big, 15, 50) == pytest.approx(0.488, abs=0.002)
    assert remaining(big, 3, 50) == pytest.approx(0.485, abs=0.002)
    assert remaining(W, None, 0) == 1.0 and remaining(W, 15, 0) == 1.0


def test_absolute_flops_match_the_reference_anchors():
    per_token = 2 * W.layers * layer_macs(1, W.d, W.m)  # FLOPs per token per pass, ignoring attention
    assert per_token == pytest.approx(14e9, rel=0.01)
    w = replace(W, text=0, visual=1600 - 64)
    assert step_flops(w, None, 0)[0] == pytest.approx(22e12, rel=0.1)
    assert floor_seconds(step_flops(w, None, 0)[0], "AGX Orin 64GB", "fp16") >= 0.5


def test_lm_head_only_for_the_response_is_cheaper():
    all_pos, resp = replace(W, head="all"), replace(W, head="response")
    assert total_flops(resp, None, 0) < total_flops(all_pos, None, 0)
    head_all = total_flops(all_pos, None, 0) - total_flops(W, None, 0)
    head_resp = total_flops(resp, None, 0) - total_flops(W, None, 0)
    assert head_all / head_resp == pytest.approx(W.n / W.gen)
    assert set(ORIN) == {"AGX Orin 64GB", "Orin NX 16GB"}


def test_command_prints_the_table(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for row in ("baseline", "K=15, P=50", "K=15, P=70", "K=3, P=50", "K=3, P=70", "AGX fp16", "NX int8"):
        assert row in out
    assert "Which input size reproduces" in out


def test_trace_flops_learns_caching():
    """A trace of refreshes only is total_flops; a cached step over r of n' rows costs L layers of
    r rows' linears plus r x n' attention, and the LM head on its r response rows."""
    from bench.flops import Workload, layer_macs, linear_macs, total_flops, trace_flops
    from runtime.pruning import pruned_count

    w = Workload(steps=4)
    n2 = w.n - pruned_count(w.visual, 50)
    assert trace_flops(w, 15, 50, [w.n, n2, n2, n2]) == pytest.approx(total_flops(w, 15, 50), rel=1e-12)
    assert trace_flops(w, None, 0, [w.n] * 4) == pytest.approx(total_flops(w, None, 0), rel=1e-12)
    r = 32
    cached = trace_flops(w, 15, 50, [w.n, n2, r, r]) - trace_flops(w, 15, 50, [w.n, n2])
    per_step = w.layers * 2 * (linear_macs(r, w.d, w.m) + 2 * r * n2 * w.d) + 2 * w.d * w.vocab * r
    assert cached == pytest.approx(2 * per_step, rel=1e-12)
    assert per_step < w.layers * 2 * layer_macs(n2, w.d, w.m) / 10  # a cached step is > 10x cheaper at 8B scale


def test_the_rule_costs_are_counted_and_tiny_on_the_8b():
    """Choosing the kept tokens: the duplicate rule adds pivots x V x d dot products and normalising V rows
    to saliency's q.k of the query rows (which both rules read); what it adds is, on the 8B (V = 3645,
    d = 4096), under 0.1% of one decoder layer."""
    from bench.flops import layer_flops, rule_flops

    w = Workload(visual=3645)
    dup, sal = rule_flops(w, "duplicate"), rule_flops(w, "saliency")
    assert dup - sal == 3 * 3645 * 4096 + 2 * 8 * 3645 * 4096 and rule_flops(w, "random") == 0
    layer = layer_flops(w.n, w.d, w.m)
    print(f"saliency scoring {sal / layer:.4%}, the duplicate rule's similarities {(dup - sal) / layer:.4%} of one layer")
    assert dup - sal < 1e-3 * layer
    assert total_flops(w, 15, 50, "duplicate") - total_flops(w, 15, 50) == dup  # step 1 only
    assert total_flops(w, 15, 0, "duplicate") == total_flops(w, None, 0)  # nothing dropped, nothing chosen
