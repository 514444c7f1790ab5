"""The masked-diffusion loop (docs/generation.md) with scripted logits."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import LladaVError
from runtime.schedule import GenerationSettings, denoise, most_confident, transfer_counts
from runtime.tokens import TokenIds

IDS = TokenIds(bos=90, eos=91, mask=92, start_header=93, end_header=94, eot=95)
VOCAB = 100


class Scripted:
    """logits = a fixed random table; records the response it was called with."""

    def __init__(self, g, seed=0, boost=None):
        rng = np.random.default_rng(seed)
        self.table = rng.normal(size=(g, VOCAB)).astype(np.float32) * 3
        for (pos, tok), value in (boost or {}).items():
            self.table[pos, tok] = value
        self.calls = []

    def __call__(self, x):
        self.calls.append(x.copy())
        return self.table.copy()


def test_transfer_counts():
    assert transfer_counts(10, 4) == [3, 3, 2, 2]
    assert transfer_counts(8, 8) == [1] * 8
    assert transfer_counts(3, 5) == [1, 1, 1, 0, 0]
    assert sum(transfer_counts(127, 13)) == 127


@pytest.mark.parametrize("g,bl,steps", [(10, 10, 4), (12, 4, 6), (16, 8, 16), (8, 2, 4)])
def test_every_mask_filled_with_the_scheduled_counts(g, bl, steps):
    settings = GenerationSettings(steps=steps, gen_length=g, block_length=bl, stop_at_eot=False)
    fwd = Scripted(g)
    res = denoise(fwd, settings, IDS)
    assert not np.any(res.response == IDS.mask)
    per_block = transfer_counts(bl, steps // (g // bl))
    assert res.transfers == per_block * (g // bl)
    assert len(fwd.calls) == steps


def test_blocks_fill_left_to_right():
    g, bl = 12, 4
    fwd = Scripted(g)
    denoise(fwd, GenerationSettings(steps=6, gen_length=g, block_length=bl, stop_at_eot=False), IDS)
    for x in fwd.calls:
        masked = x == IDS.mask
        for b in range(1, g // bl):
            if not masked[b * bl : (b + 1) * bl].all():  # block b has started...
                assert not masked[: b * bl].any()  # ...only once every earlier block is full


def test_most_confident_unmasked_first_and_ties_to_lower_index():
    conf = np.array([0.1, 0.9, 0.5, 0.9, 0.7])
    assert most_confident(conf, np.ones(5, bool), 3).tolist() == [1, 3, 4]
    assert most_confident(conf, np.array([1, 0, 1, 1, 1], bool), 2).tolist() == [3, 4]
    assert most_confident(np.zeros(4), np.ones(4, bool), 2).tolist() == [0, 1]


def test_special_tokens_are_never_generated():
    g = 8
    boost = {(i, t): 50.0 for i in range(g) for t in (IDS.bos, IDS.eos, IDS.start_header, IDS.end_header)}
    res = denoise(Scripted(g, boost=boost), GenerationSettings(steps=4, gen_length=g, block_length=g, stop_at_eot=False), IDS)
    assert not set(res.response.tolist()) & {IDS.bos, IDS.eos, IDS.start_header, IDS.end_header}


def test_stop_at_eot():
    g = 16
    fwd = Scripted(g, boost={(5, IDS.eot): 100.0})  # the most confident token of all: unmasked first
    res = denoise(fwd, GenerationSettings(steps=16, gen_length=g, block_length=8), IDS)
    assert res.stop == 5 and res.response[5] == IDS.eot
    assert res.answer.tolist() == res.response[:5].tolist()
    assert not np.any(res.response[:5] == IDS.mask)  # everything before the stop is filled
    assert np.all(res.response[6:] == IDS.mask)  # nothing after it is generated
    assert len(fwd.calls) == 6  # eot first, then the 5 masks before it, one per step; then stop


def test_seeded_sampling_is_deterministic():
    g = 8
    settings = GenerationSettings(steps=4, gen_length=g, block_length=g, temperature=1.0, remasking="random", seed=7)
    a = denoise(Scripted(g), settings, IDS).response
    b = denoise(Scripted(g), settings, IDS).response
    assert np.array_equal(a, b)
    others = [denoise(Scripted(g), GenerationSettings(**{**settings.__dict__, "seed": s}), IDS).response for s in range(5)]
    assert any(not np.array_equal(a, o) for o in others)


def test_temperature_zero_is_argmax():
    g = 6
    fwd = Scripted(g)
    res = denoise(fwd, GenerationSettings(steps=6, gen_length=g, block_length=g, stop_at_eot=False), IDS)
    table = fwd.table.copy()
    table[:, list(IDS.never_generated)] = -np.inf
    assert res.response.tolist() == np.argmax(table, axis=-1).tolist()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"gen_length": 10, "block_length": 4}, "block_length"),
        ({"gen_length": 8, "block_length": 2, "steps": 6}, "multiple of the number of blocks"),
        ({"gen_length": 8, "block_length": 8, "steps": 9}, "steps"),
        ({"steps": 0}, "steps"),
        ({"temperature": -1.0}, "temperature"),
        ({"remasking": "topk"}, "remasking"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(LladaVError, match=match):
        GenerationSettings(**kwargs).validate()


def test_probability_of_the_candidate_is_the_float64_softmax():
    from runtime.schedule import probability_of

    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((6, 5000)) * 8).astype(np.float32)
    logits[:, [3, 17]] = -np.inf  # suppressed tokens
    x0 = np.array([0, 1, 2, 4, 4999, int(np.argmax(logits[5]))])
    x = logits.astype(np.float64)
    want = np.exp(x[np.arange(6), x0] - x.max(1)) / np.exp(x - x.max(1, keepdims=True)).sum(1)
    got = probability_of(logits, x0)
    assert np.allclose(got, want, rtol=1e-6, atol=0)


def test_only_unmaskable_rows_are_proposed():
    """Rows outside the current block get no proposal: a huge logit there changes nothing."""
    g = 8
    quiet = denoise(Scripted(g), GenerationSettings(steps=4, gen_length=g, block_length=4, stop_at_eot=False), IDS)
    loud = Scripted(g, boost={(6, 11): 1e6})  # block 2: invisible while block 1 is decoded
    res = denoise(loud, GenerationSettings(steps=4, gen_length=g, block_length=4, stop_at_eot=False), IDS)
    assert np.array_equal(res.response[:4], quiet.response[:4]) and res.response[6] == 11
