"""Shared fixtures: the embedded tiny checkpoint, written once per test session."""

from __future__ import annotations

import pytest
from PIL import Image

from export.build import BuildRequest, build_bundle
from export.checkpoint import load_model
from export.profiles import ProfileSettings
from export.tiny import write_tiny
from runtime.tokens import TextTokenizer

# One 384x384 tile, short prompts and responses: the runtime tests' bundles (fp32, K=3 and K=15).
RUNTIME_PROFILE = ProfileSettings(layout="single", max_text_tokens=160, opt_text_tokens=100, max_response=16,
                                  opt_response=8)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model in float32, checkpoint) of the embedded tiny default."""
    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return TextTokenizer(tiny_dir)


@pytest.fixture(scope="session")
def runtime_bundles(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    return {k: build_bundle(BuildRequest(tiny_dir, root / f"k{k}", k, 50, "fp32", RUNTIME_PROFILE),
                            log=lambda m: None).out for k in (3, 15)}


def gradient_image(width: int, height: int) -> Image.Image:
    """A deterministic image with structure (so tiles and tokens differ)."""
    img = Image.new("RGB", (width, height))
    img.putdata([((x * 7) % 256, (y * 5) % 256, ((x + y) * 3) % 256) for y in range(height) for x in range(width)])
    return img
