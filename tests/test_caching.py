"""Block KV caching (runtime.caching, docs/caching.md) in the model math and the reference generator,
and Fast-dLLM's threshold rule in the denoising loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.reference import ReferenceForward, generate, prompt_embeddings
from runtime.caching import CacheSettings, RefreshClock, cache_window
from runtime.errors import LladaVError
from runtime.pruning import PruneSettings
from runtime.schedule import GenerationSettings, denoise
from tests.conftest import gradient_image
from tests.test_generate import inputs  # noqa: F401  (the fixture)
from tests.test_runtime import reference
from tests.test_schedule import IDS, Scripted

GEN = GenerationSettings(steps=8, gen_length=16, block_length=8)


def test_cached_rows_attending_to_the_others_cached_keys_equal_the_full_pass(tiny):
    """Layers 0..L-1 in fp32 over 40 rows; then rows 30..37 alone with the other rows' keys and values
    from that pass (in shuffled order): the same hidden states and keys as the full pass gave them."""
    model, _ = tiny
    model = model.float()
    torch.manual_seed(0)
    n, d = 40, model.cfg.decoder.d_model
    h = torch.randn(1, n, d)
    pos = torch.arange(n)[None]
    with torch.inference_mode():
        full, _, kv = model.run_layers_kv(h, pos, 0, model.cfg.n_layers)
        compute = torch.arange(30, 38)
        past_rows = torch.cat([torch.arange(0, 30), torch.arange(38, 40)])[torch.randperm(32)]
        past = [(k[:, :, past_rows], v[:, :, past_rows]) for k, v in kv]
        part, _, fresh = model.run_layers_kv(h[:, compute], pos[:, compute], 0, model.cfg.n_layers, past=past)
    scale = float(full.abs().max())
    assert float((part - full[:, compute]).abs().max()) <= 1e-5 * scale
    for (k, v), (fk, fv) in zip(kv, fresh):
        assert torch.allclose(fk, k[:, :, compute], atol=1e-5) and torch.allclose(fv, v[:, :, compute], atol=1e-5)


def test_cache_windows_and_refresh_clock():
    """A 100-row sequence ending in a 16-token response, block (8, 16): prefix recomputes rows 92..99 and
    reuses 0..91; dual recomputes 92..99 minus nothing after (the block is last) ... and block (0, 8)."""
    w = cache_window("prefix", 100, 16, (0, 8))
    assert np.array_equal(w.compute, np.arange(84, 100)) and np.array_equal(w.past, np.arange(84))
    w = cache_window("dual", 100, 16, (0, 8))
    assert np.array_equal(w.compute, np.arange(84, 92)) and np.array_equal(w.past, np.r_[0:84, 92:100])
    w = cache_window("dual", 100, 16, (8, 16))
    assert np.array_equal(w.compute, np.arange(92, 100)) and np.array_equal(w.past, np.arange(92))
    clock = RefreshClock(CacheSettings("dual"))
    seen = []
    for block in ((0, 8), (8, 16)):
        clock.start_block(*block)
        seen += [clock.next_step_refreshes() for _ in range(3)]
    assert seen == [True, False, False, True, False, False]
    clock = RefreshClock(CacheSettings("dual", refresh_every=2))
    clock.start_block(0, 8)
    assert [clock.next_step_refreshes() for _ in range(5)] == [True, False, True, False, True]
    with pytest.raises(LladaVError, match="cache: got 'both'; expected one of"):
        CacheSettings("both").validate()
    with pytest.raises(LladaVError, match="refresh_every: got -1"):
        CacheSettings("dual", refresh_every=-1).validate()


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("p", [0, 50])
def test_refreshing_every_step_gives_the_uncached_tokens(tiny, tokenizer, inputs, mode, p):
    """The exactness check: a refresh at every step is the uncached computation, token for token."""
    model, _ = tiny
    prune = PruneSettings(k=15, p=p)
    plain = generate(model, tokenizer.ids, *inputs, GEN, prune)
    cached = generate(model, tokenizer.ids, *inputs, GEN, prune, CacheSettings(mode, refresh_every=1))
    assert np.array_equal(plain.denoise.response, cached.denoise.response)
    assert cached.computed_rows == plain.seq_lens == cached.seq_lens


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_steps_recompute_only_their_window(tiny, tokenizer, inputs, mode):
    """K=15 P=50, 16 tokens in blocks of 8 over 8 steps: the first step of each block is a refresh
    over the reduced sequence; the other steps recompute the block (dual) or the block and what
    follows it (prefix)."""
    model, _ = tiny
    result = generate(model, tokenizer.ids, *inputs, GEN, PruneSettings(k=15, p=50), CacheSettings(mode))
    n = result.seq_lens[1]
    assert len(result.computed_rows) == len(result.denoise.transfers) == 8
    block_rows = {"dual": [8, 8], "prefix": [16, 8]}[mode]
    assert result.computed_rows == [n, block_rows[0], block_rows[0], block_rows[0], n] + [block_rows[1]] * 3


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_a_cached_step_on_unchanged_tokens_equals_its_refresh(tiny, tokenizer, inputs, mode):
    """After a refresh over the reduced sequence (K=15 P=50), a cached step on the same tokens gives the
    refresh's logits for the block's rows (fp32, relative 1e-5): the cached keys are the ones it needs."""
    model, _ = tiny
    model = model.float()
    prompt, image = inputs
    with torch.inference_mode():
        embeds, layout = prompt_embeddings(model, prompt, image, 16)
    fwd = ReferenceForward(model, embeds, layout, PruneSettings(k=15, p=50), 0.0, tokenizer.ids.mask, CacheSettings(mode))
    x = np.full(16, tokenizer.ids.mask, dtype=np.int64)
    x[:3] = [10, 11, 12]
    fwd.start_block(0, 8)
    fwd(x)  # step 1: prunes
    fwd.start_block(0, 8)
    refreshed = fwd(x)  # a refresh over the reduced sequence
    cached = fwd(x)  # a cached step, same tokens
    assert fwd.computed_rows[-1] < fwd.computed_rows[-2]
    assert np.abs(cached[:8] - refreshed[:8]).max() <= 1e-5 * np.abs(refreshed[:8]).max()


def test_threshold_unmasks_every_confident_position_and_at_least_one():
    """Fast-dLLM's rule: a position whose candidate's probability exceeds T is unmasked at once; a step
    with none unmasks the single most confident; blocks still fill left to right."""
    g = 8
    boost = {(1, 3): 40.0, (4, 5): 40.0, (6, 7): 40.0}  # three positions certain from the start
    fwd = Scripted(g, boost=boost)
    res = denoise(fwd, GenerationSettings(steps=8, gen_length=g, block_length=g, stop_at_eot=False, threshold=0.9), IDS)
    assert res.transfers[0] == 3 and set(np.flatnonzero(fwd.calls[1] != IDS.mask)) == {1, 4, 6}
    assert all(t == 1 for t in res.transfers[1:])  # the scripted table has no other confident position
    assert sum(res.transfers) == g and len(res.transfers) == 1 + (g - 3)
    blocks = denoise(Scripted(16, boost={(1, 3): 40.0, (12, 5): 40.0}),
                     GenerationSettings(steps=16, gen_length=16, block_length=8, stop_at_eot=False, threshold=0.9), IDS)
    assert blocks.transfers[0] == 1  # position 12 is confident but outside the first block
    with pytest.raises(LladaVError, match="threshold: got 1.0; expected a probability in"):
        GenerationSettings(threshold=1.0).validate()
    with pytest.raises(LladaVError, match="needs remasking 'low_confidence'"):
        GenerationSettings(threshold=0.9, remasking="random").validate()


# ---------------------------------------------------------------- the runtime (ONNX Runtime) against the reference

CACHE_GEN = GenerationSettings(steps=8, gen_length=16, block_length=8)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("p", [0, 50])
def test_runtime_refreshing_every_step_gives_its_uncached_tokens(runtime_bundles, mode, p):
    """The issue's exactness check over ONNX Runtime: with a refresh at every step the cached path
    computes what the uncached one does, token for token, at P=0 and P=50."""
    from runtime.pipeline import Pipeline

    prune = PruneSettings(k=15, p=p)
    with Pipeline(runtime_bundles[15]) as pipe:
        plain = pipe.generate(gradient_image(320, 200), "What is ahead of the car?", CACHE_GEN, prune)
        cached = pipe.generate(gradient_image(320, 200), "What is ahead of the car?", CACHE_GEN, prune,
                               cache=CacheSettings(mode, refresh_every=1))
    assert plain.answer_ids == cached.answer_ids and np.array_equal(plain.denoise.response, cached.denoise.response)
    assert [s.rows for s in cached.steps] == [s.seq_len for s in cached.steps]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("threshold", [0.0, 0.2])
def test_runtime_cached_path_generates_the_reference_tokens(runtime_bundles, tiny, tokenizer, mode, threshold):
    """Cached steps between refreshes (K=15 P=50, two blocks), with and without the threshold rule: the
    runtime's tokens, kept tokens and rows computed per step are the reference generator's."""
    from runtime.pipeline import Pipeline

    prune, cache = PruneSettings(k=15, p=50), CacheSettings(mode)
    gen = GenerationSettings(steps=8, gen_length=16, block_length=8, threshold=threshold)
    with Pipeline(runtime_bundles[15]) as pipe:
        got = pipe.generate(gradient_image(320, 200), "Is the traffic light red?", gen, prune, cache=cache)
    want = reference(tiny, tokenizer, gradient_image(320, 200), "Is the traffic light red?", gen, prune, cache)
    assert np.array_equal(got.denoise.response, want.denoise.response)
    assert np.array_equal(got.kept_visual, want.kept_visual)
    assert [s.rows for s in got.steps] == want.computed_rows
    assert min(want.computed_rows) < max(want.computed_rows)  # cached steps happened


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_compact_positions_refresh_after_step_one(runtime_bundles, tiny, tokenizer, positions):
    """Pruning that re-numbers positions (compact) leaves step 1's keys of layers < K rotated at the full
    sequence's positions: the step after step 1 refreshes over the reduced sequence, in the reference
    and the runtime alike (same tokens, same rows); with original positions it is a cached step."""
    from runtime.pipeline import Pipeline

    prune, cache = PruneSettings(k=15, p=50, positions=positions), CacheSettings("dual")
    with Pipeline(runtime_bundles[15]) as pipe:
        got = pipe.generate(gradient_image(320, 200), "Is the traffic light red?", CACHE_GEN, prune, cache=cache)
    want = reference(tiny, tokenizer, gradient_image(320, 200), "Is the traffic light red?", CACHE_GEN, prune, cache)
    n = got.steps[1].seq_len
    assert [s.rows for s in got.steps] == want.computed_rows
    assert want.computed_rows[:3] == ([n, n, 8] if positions == "compact" else [n, 8, 8])
    assert np.array_equal(got.denoise.response, want.denoise.response)
