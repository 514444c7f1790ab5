"""The reference generator with persistent pruning, observed from inside the decoder layers."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from export.reference import ReferenceForward, generate, prompt_embeddings
from runtime.anyres import SINGLE
from runtime.errors import LladaVError
from runtime.preprocess import prepare_image
from runtime.pruning import PruneSettings, SequenceLayout, pruned_count, query_rows
from runtime.schedule import GenerationSettings
from tests.conftest import gradient_image

GEN = GenerationSettings(steps=4, gen_length=8, block_length=8)


@pytest.fixture(scope="module")
def inputs(tiny, tokenizer):
    _, ckpt = tiny
    image = prepare_image(gradient_image(300, 200), ckpt.config.geometry, SINGLE)
    return tokenizer.encode_prompt("What is ahead of the car?"), image


class LayerSpy:
    """Records, per decoder layer call, the sequence length and the RoPE positions it sees."""

    def __init__(self, model):
        self.model, self.lens, self.positions = model, [], []
        self.hooks = [layer.register_forward_pre_hook(self._record(i)) for i, layer in enumerate(model.model.layers)]
        self._run = model.run_layers_kv
        model.run_layers_kv = self._run_layers

    def _record(self, i):
        return lambda module, args: self.lens.append((i, args[0].shape[1]))

    def _run_layers(self, h, pos, lo, hi, score_rows=None, past=None):
        self.positions.append((lo, hi, pos[0].clone()))
        return self._run(h, pos, lo, hi, score_rows, past)

    def close(self):
        for hook in self.hooks:
            hook.remove()
        del self.model.run_layers_kv

    def forwards(self):
        """[[tokens seen by layer 0..L-1] per forward pass]"""
        out = []
        for i, n in self.lens:
            if i == 0:
                out.append([])
            out[-1].append(n)
        return out


def run(model, tokenizer, inputs, prune, gen=GEN):
    spy = LayerSpy(model)
    try:
        result = generate(model, tokenizer.ids, *inputs, gen, prune)
    finally:
        spy.close()
    return result, spy


@pytest.mark.parametrize("k,p", [(15, 50), (3, 70), (31, 25)])
def test_every_forward_after_layer_k_of_step_1_sees_the_reduced_sequence(tiny, tokenizer, inputs, k, p):
    model, _ = tiny
    result, spy = run(model, tokenizer, inputs, PruneSettings(k=k, p=p))
    lay = result.layout
    n, v = lay.total, lay.n_visual
    reduced = n - pruned_count(v, p)
    assert pruned_count(v, p) == v * p // 100 and v == 729
    forwards = spy.forwards()
    assert len(forwards) == GEN.steps
    assert forwards[0] == [n] * k + [reduced] * (32 - k)
    for later in forwards[1:]:
        assert later == [reduced] * 32
    assert result.kept_visual.size == v - v * p // 100


def test_text_and_response_kept_in_order_at_original_positions(tiny, tokenizer, inputs):
    model, _ = tiny
    result, spy = run(model, tokenizer, inputs, PruneSettings(k=15, p=70))
    lay = result.layout
    lo, hi, pos = spy.positions[1]  # layers [K, L) of step 1
    assert (lo, hi) == (15, 32)
    pos = pos.numpy()
    text = np.concatenate([np.arange(lay.n_prefix), np.arange(lay.visual.stop, lay.total)])
    assert np.all(np.diff(pos) > 0)  # kept tokens keep their order
    assert set(text) <= set(pos)  # no text or response token is dropped
    visual = np.setdiff1d(pos, text)
    assert np.array_equal(visual, lay.n_prefix + result.kept_visual)  # original RoPE positions
    for later in spy.positions[2:]:
        assert later[:2] == (0, 32) and np.array_equal(later[2].numpy(), pos)


def test_compact_positions_are_arange(tiny, tokenizer, inputs):
    model, _ = tiny
    _, spy = run(model, tokenizer, inputs, PruneSettings(k=15, p=50, positions="compact"))
    for lo, hi, pos in spy.positions[1:]:
        assert np.array_equal(pos.numpy(), np.arange(pos.shape[0]))


def test_the_saliency_rule_keeps_the_most_salient(tiny, tokenizer, inputs):
    model, _ = tiny
    result, _ = run(model, tokenizer, inputs, PruneSettings(k=15, p=50, rule="saliency"))
    s = result.saliency
    kept = set(result.kept_visual.tolist())
    dropped = np.setdiff1d(np.arange(s.size), result.kept_visual)
    assert s[list(kept)].min() >= s[dropped].max()
    assert len(set(np.round(s, 12))) > s.size // 2  # scores actually discriminate


def first_step_inputs(model, tokenizer, inputs):
    """Prompt embeddings, layout and an all-masked response, for calling ReferenceForward directly."""
    with torch.inference_mode():
        embeds, layout = prompt_embeddings(model, *inputs, GEN.gen_length)
    return embeds, layout, np.full(GEN.gen_length, tokenizer.ids.mask)


def test_p0_reproduces_the_unpruned_loop_exactly(tiny, tokenizer, inputs):
    model, _ = tiny
    embeds, layout, x = first_step_inputs(model, tokenizer, inputs)
    plain = ReferenceForward(model, embeds, layout, None, 0.0, tokenizer.ids.mask)
    zero = ReferenceForward(model, embeds, layout, PruneSettings(k=15, p=0), 0.0, tokenizer.ids.mask)
    assert np.array_equal(plain(x), zero(x))
    a, _ = run(model, tokenizer, inputs, None)
    b, _ = run(model, tokenizer, inputs, PruneSettings(k=15, p=0))
    assert a.answer_ids == b.answer_ids and np.array_equal(a.denoise.response, b.denoise.response)


def test_pruning_changes_the_computation(tiny, tokenizer, inputs):
    model, _ = tiny
    embeds, layout, x = first_step_inputs(model, tokenizer, inputs)
    plain = ReferenceForward(model, embeds, layout, None, 0.0, tokenizer.ids.mask)(x)
    pruned = ReferenceForward(model, embeds, layout, PruneSettings(k=3, p=70), 0.0, tokenizer.ids.mask)(x)
    assert np.abs(plain - pruned).max() > 1e-4


def test_generation_is_deterministic_under_a_seed(tiny, tokenizer, inputs):
    model, _ = tiny
    gen = replace(GEN, temperature=0.8, seed=3)
    prune = PruneSettings(k=15, p=50, rule="random", seed=5)
    a, _ = run(model, tokenizer, inputs, prune, gen)
    b, _ = run(model, tokenizer, inputs, prune, gen)
    assert a.answer_ids == b.answer_ids and np.array_equal(a.kept_visual, b.kept_visual)
    assert not np.any(a.denoise.response[: a.denoise.stop] == tokenizer.ids.mask)


def test_random_pruning_ablation(tiny, tokenizer, inputs):
    model, _ = tiny
    a, spy = run(model, tokenizer, inputs, PruneSettings(k=15, p=50, rule="random", seed=1))
    b, _ = run(model, tokenizer, inputs, PruneSettings(k=15, p=50, rule="random", seed=2))
    assert a.saliency is None and a.kept_visual.size == b.kept_visual.size == 729 - 364
    assert not np.array_equal(a.kept_visual, b.kept_visual)
    assert spy.forwards()[1] == [a.layout.total - 364] * 32


def test_query_sets(tiny, tokenizer, inputs):
    model, _ = tiny
    lay = SequenceLayout(3, 5, 2, 4)
    masked = np.array([True, False, True, True])
    assert query_rows(lay, "response", masked).tolist() == [10, 12, 13]
    assert query_rows(lay, "prompt", masked).tolist() == [0, 1, 2, 8, 9]
    assert query_rows(lay, "last", masked).tolist() == [9]
    kept = {q: run(model, tokenizer, inputs, PruneSettings(k=15, p=50, query=q))[0].kept_visual for q in
            ("response", "prompt", "last")}
    assert not np.array_equal(kept["response"], kept["last"])


def test_cfg_runs_both_branches_on_the_reduced_sequence(tiny, tokenizer, inputs):
    model, _ = tiny
    gen = replace(GEN, cfg_scale=1.5)
    result, spy = run(model, tokenizer, inputs, PruneSettings(k=15, p=50), gen)
    assert spy.forwards()[1] == [result.layout.total - 364] * 32
    # the guided logits are un + (s + 1) * (cond - un), un having every prompt token masked
    mask = tokenizer.ids.mask
    embeds, layout, x = first_step_inputs(model, tokenizer, inputs)
    with torch.inference_mode():
        masked_prompt = model.embed(torch.full((layout.n_prompt,), mask))
    x[2] = 7  # one response token already decided
    guided = ReferenceForward(model, embeds, layout, None, 1.5, mask)(x)
    cond = ReferenceForward(model, embeds, layout, None, 0.0, mask)(x)
    un = ReferenceForward(model, masked_prompt, layout, None, 0.0, mask)(x)
    assert np.abs(guided - (un + 2.5 * (cond - un))).max() < 1e-4
    assert np.abs(guided - cond).max() > 1e-3


@pytest.mark.parametrize(
    "prune,match",
    [
        (PruneSettings(k=0, p=50), r"K: got 0; expected an integer layer index in 1\.\.31"),
        (PruneSettings(k=32, p=50), r"K: got 32"),
        (PruneSettings(k=15, p=100), r"P: got 100; expected a percentage in \[0, 100\)"),
        (PruneSettings(k=15, p=-5), r"P: got -5"),
        (PruneSettings(k=15, p=50, query="all"), r"query set: got 'all'"),
        (PruneSettings(k=15, p=50, positions="packed"), r"positions: got 'packed'"),
    ],
)
def test_bad_pruning_settings(tiny, tokenizer, inputs, prune, match):
    model, _ = tiny
    with pytest.raises(LladaVError, match=match):
        generate(model, tokenizer.ids, *inputs, GEN, prune)


def test_sequence_longer_than_the_model_allows(tiny, tokenizer, inputs, monkeypatch):
    model, _ = tiny
    short = replace(model.cfg, decoder=replace(model.cfg.decoder, max_positions=500))
    monkeypatch.setattr(model, "cfg", short)
    with pytest.raises(LladaVError, match=r"expected at most max_position_embeddings=500"):
        generate(model, tokenizer.ids, *inputs, GEN, None)
