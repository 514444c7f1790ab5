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


def road_sketch(width: int, height: int) -> Image.Image:
    """The runtime's first demo scene (sky, road, lane marks, a red car): the random tiny model's
    saliencies on it are well apart from the cut, which the fp16 kept-set test relies on."""
    from PIL import ImageDraw

    img = Image.new("RGB", (width, height), (135, 180, 235))
    draw = ImageDraw.Draw(img)
    horizon = height * 9 // 20
    draw.rectangle([0, horizon, width, height], fill=(90, 140, 70))
    draw.polygon([(width * 0.42, horizon), (width * 0.58, horizon), (width, height), (0, height)], fill=(70, 70, 75))
    for i in range(6):
        y0 = horizon + (height - horizon) * i / 6
        y1 = y0 + (height - horizon) / 14
        draw.rectangle([width / 2 - 2 - i, y0, width / 2 + 2 + i, y1], fill=(240, 240, 240))
    draw.rectangle([width * 0.55, height * 0.62, width * 0.72, height * 0.78], fill=(200, 30, 30))
    draw.rectangle([width * 0.57, height * 0.58, width * 0.70, height * 0.64], fill=(160, 20, 20))
    return img


def gradient_image(width: int, height: int) -> Image.Image:
    """A deterministic image with structure (so tiles and tokens differ)."""
    img = Image.new("RGB", (width, height))
    img.putdata([((x * 7) % 256, (y * 5) % 256, ((x + y) * 3) % 256) for y in range(height) for x in range(width)])
    return img
