"""Shared fixtures: the embedded tiny checkpoint, written once per test session."""

from __future__ import annotations

import pytest
from PIL import Image

from export.checkpoint import load_model
from export.tiny import write_tiny
from runtime.tokens import TextTokenizer


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


def gradient_image(width: int, height: int) -> Image.Image:
    """A deterministic image with structure (so tiles and tokens differ)."""
    img = Image.new("RGB", (width, height))
    img.putdata([((x * 7) % 256, (y * 5) % 256, ((x + y) * 3) % 256) for y in range(height) for x in range(width)])
    return img
