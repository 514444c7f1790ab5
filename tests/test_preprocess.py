"""AnyRes geometry, pixel preprocessing, the chat template and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.anyres import ANYRES, SINGLE, ImageGeometry, max_visual_tokens, plan_tiles
from runtime.errors import LladaVError
from runtime.preprocess import prepare_image
from runtime.tokens import IMAGE_PLACEHOLDER, chat_prompt
from tests.conftest import gradient_image

REAL = ImageGeometry()  # 384/14, (1x1)..(6x6), anyres_max_4: LLaDA-V's geometry

# docs/architecture.md (emulated from LLaDA-V's code)
TOKEN_COUNTS = {(384, 384): 1485, (640, 480): 2929, (1024, 768): 3627, (1920, 1080): 3649}


@pytest.mark.parametrize("size,count", sorted(TOKEN_COUNTS.items()))
def test_anyres_token_counts(size, count):
    assert plan_tiles(size, REAL, ANYRES).num_visual_tokens == count


def test_single_tile_is_729_tokens():
    for size in TOKEN_COUNTS:
        layout = plan_tiles(size, REAL, SINGLE)
        assert layout.num_tiles == 1 and layout.num_visual_tokens == 729


def test_bound_covers_every_size():
    bound = max_visual_tokens(REAL, ANYRES)
    sizes = [(w, h) for w in range(100, 4000, 97) for h in range(100, 4000, 89)]
    assert max(plan_tiles(s, REAL, ANYRES).num_visual_tokens for s in sizes) <= bound <= 4400


@pytest.mark.parametrize("size", [(640, 480), (1920, 1080), (300, 900)])
def test_model_merge_yields_the_planned_token_count(tiny, size):
    model, ckpt = tiny
    image = prepare_image(gradient_image(*size), ckpt.config.geometry, ANYRES)
    assert image.pixel_values.shape == (image.layout.num_tiles, 3, 384, 384)
    with torch.inference_mode():
        tokens = model.visual_tokens(torch.from_numpy(image.pixel_values), image.layout)
    assert tokens.shape == (image.layout.num_visual_tokens, 64)
    # the image_newline vector closes every row of the grid
    rows, cols = image.layout.merged
    grid = tokens[729:].view(rows, cols + 1, 64)
    assert torch.equal(grid[:, -1], model.model.image_newline.expand(rows, 64))


def test_pixels_are_normalised_to_minus_one_one():
    white = prepare_image(Image.new("RGB", (50, 80), (255, 255, 255)), REAL, SINGLE).pixel_values
    black = prepare_image(Image.new("RGB", (50, 80), (0, 0, 0)), REAL, SINGLE).pixel_values
    assert white.dtype == np.float32 and white.shape == (1, 3, 384, 384)
    assert np.allclose(white, 1.0) and np.allclose(black, -1.0)


def test_grid_tiles_are_the_letterboxed_image_in_row_order():
    # 768x384 fits (768, 384) exactly: two tiles, left half red, right half blue, no padding
    img = Image.new("RGB", (768, 384), (255, 0, 0))
    img.paste((0, 0, 255), (384, 0, 768, 384))
    px = prepare_image(img, REAL, ANYRES).pixel_values
    assert px.shape[0] == 3
    assert np.allclose(px[1, 0], 1.0) and np.allclose(px[1, 2], -1.0)  # first grid tile: red
    assert np.allclose(px[2, 0], -1.0) and np.allclose(px[2, 2], 1.0)  # second: blue


def test_image_errors(tmp_path):
    with pytest.raises(LladaVError, match="no such file"):
        prepare_image(tmp_path / "missing.png", REAL, SINGLE)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(LladaVError, match="unreadable"):
        prepare_image(bad, REAL, SINGLE)
    with pytest.raises(LladaVError, match="0x10 pixels"):
        prepare_image(Image.new("RGB", (0, 10)), REAL, SINGLE)
    with pytest.raises(LladaVError, match="image layout"):
        prepare_image(Image.new("RGB", (10, 10)), REAL, "tiles")


def test_image_from_path(tmp_path):
    path = tmp_path / "img.jpg"
    gradient_image(200, 100).save(path)
    assert prepare_image(path, REAL, ANYRES).layout.image_size == (200, 100)


def test_chat_template_is_llada_v():
    want = (
        "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
        "assistant. You are able to understand the visual content that the user provides, and assist the user "
        "with a variety of tasks using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "<image>\nWhat is ahead?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert chat_prompt("What is ahead?") == want


def test_prompt_ids_split_at_the_image(tokenizer):
    ids = tokenizer.ids
    prompt = tokenizer.encode_prompt("What is ahead?")
    assert prompt.prefix[0] == ids.bos and prompt.prefix[1] == ids.start_header
    assert prompt.prefix[-1] != ids.end_header  # "\n\n" follows the header, before the image
    assert prompt.suffix.count(ids.eot) == 1 and prompt.suffix[-1] != ids.eot
    text = tokenizer.decode(prompt.prefix, skip_special_tokens=False) + IMAGE_PLACEHOLDER + tokenizer.decode(
        prompt.suffix, skip_special_tokens=False
    )
    assert text == chat_prompt("What is ahead?")
    with pytest.raises(LladaVError, match="contains '<image>'"):
        tokenizer.encode_prompt("look <image> here")
    with pytest.raises(LladaVError, match="empty"):
        tokenizer.encode_prompt("  ")
