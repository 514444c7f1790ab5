"""The runtime's numpy AnyRes merge against the model's torch merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from export.model import merge_anyres
from runtime.anyres import ANYRES, SINGLE, ImageGeometry, plan_tiles
from runtime.merge import merge_tiles, resize_bilinear

GEOMETRY = ImageGeometry()


@pytest.mark.parametrize("shape,out", [((3, 75, 135), (40, 72)), ((2, 54, 73), (46, 62)), ((1, 5, 7), (5, 7)),
                                       ((1, 4, 4), (9, 3))])
def test_bilinear_matches_torch(shape, out):
    """Against torch in float64 (the exact math) tightly; torch's float32 kernel itself strays
    from its float64 result by up to ~2.4e-5 here, and we may be no farther from it than that."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = resize_bilinear(x, *out)
    exact = F.interpolate(torch.from_numpy(x).double()[None], size=list(out), mode="bilinear")[0].numpy()
    torch32 = F.interpolate(torch.from_numpy(x)[None], size=list(out), mode="bilinear")[0].numpy()
    assert np.abs(got - exact).max() < 1e-6
    assert np.abs(got - torch32).max() <= np.abs(torch32 - exact).max() + 1e-6


@pytest.mark.parametrize("size,mode", [((1920, 1080), ANYRES), ((1024, 768), ANYRES), ((640, 480), ANYRES),
                                       ((300, 900), ANYRES), ((640, 480), SINGLE)])
def test_merge_matches_the_model(size, mode):
    layout = plan_tiles(size, GEOMETRY, mode)
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((layout.num_tiles, 729, 16)).astype(np.float32)
    newline = rng.standard_normal(16).astype(np.float32)
    got = merge_tiles(feats, layout, newline)
    want = merge_anyres(torch.from_numpy(feats).double(), layout, torch.from_numpy(newline).double()).numpy()
    assert got.shape == (layout.num_visual_tokens, 16)
    assert np.abs(got - want).max() < 1e-6
