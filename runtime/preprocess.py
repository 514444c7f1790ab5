"""Image preprocessing: load, tile (single or AnyRes), resize bicubic, normalise. numpy + PIL only.

SigLIP preprocessing: bicubic resize to 384x384, /255, (x - mean) / std with mean = std = 0.5.
AnyRes tiles come from the image letterboxed (black) into the best-fit resolution and cut into
384-px tiles row by row, after a global tile of the whole image squashed to 384x384
(ML-GSAI/LLaDA-V `process_anyres_image`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from runtime.anyres import ANYRES, PAD, ImageGeometry, TileLayout, plan_tiles, select_best_resolution
from runtime.errors import LladaVError

# the largest frame accepted: above an 8K camera frame (33.2 MP), below PIL's decompression-bomb
# warning (89.5 MP); AnyRes tiles every frame down to a few 384-pixel tiles regardless
MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class ImageInput:
    """Pixels ready for the vision tower and the layout that says how to merge their features."""

    pixel_values: np.ndarray  # (tiles, 3, S, S) float32
    layout: TileLayout


def load_image(source) -> Image.Image:
    """A path or a PIL image -> an RGB PIL image; unreadable or empty input is a LladaVError."""
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source)
        if path.is_dir():
            raise LladaVError(f"image {str(path)!r}: is a directory; expected an image file")
        if not path.exists():
            raise LladaVError(f"image {str(path)!r}: no such file")
        if not path.is_file():  # a device (/dev/zero) or a FIFO would be read forever
            raise LladaVError(f"image {str(path)!r}: not a regular file; expected an image file")
        try:
            image = open_image(path, f"image {str(path)!r}")
        except IMAGE_DATA_ERRORS as exc:
            raise LladaVError(f"image {str(path)!r}: unreadable ({exc}); expected a PNG/JPEG/... file") from None
    if image.width == 0 or image.height == 0:
        raise LladaVError(f"image: got {image.width}x{image.height} pixels; expected a non-empty image")
    check_frame_size(image.size, "image")
    return to_rgb8(image)


# what PIL raises for data it cannot decode (SyntaxError: a PNG's broken chunks; EOFError: truncated data)
IMAGE_DATA_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError)


def open_image(fp, what: str) -> Image.Image:
    """An image file's pixels (a path or a file object) as PIL decodes them, its size checked from the
    header before decoding (check_frame_size, `what` naming it; PIL's decompression-bomb limit gives
    way to ours). Undecodable data raises one of IMAGE_DATA_ERRORS."""
    bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own, lower limit below
    try:
        with Image.open(fp) as opened:  # reads the header only
            check_frame_size(opened.size, what)
            opened.load()
            return opened.copy()
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit


def check_frame_size(size: tuple[int, int], what: str) -> None:
    """Refuse frames over MAX_PIXELS by name, from the header, before decoding them."""
    w, h = size
    if w * h > MAX_PIXELS:
        raise LladaVError(f"{what}: {w}x{h} = {w * h:,} pixels; expected at most {MAX_PIXELS:,} (an 8K frame is "
                          "33,177,600; AnyRes shrinks any frame to at most a few tiles anyway: downscale it first)")


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB. PIL's convert("RGB") clips deeper single-channel frames (a 16-bit
    frame turns almost all white, a float one black), so those are scaled first, by the range their
    type defines, never by their content: 16-bit integers (I;16*, and I holding 0..65535) by 255/65535;
    floating point (F) by 255, as values in [0, 1]. Other integer or float ranges are refused by name."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        x = np.asarray(image)
        if image.mode == "F":
            lo, hi = (float(np.min(x)), float(np.max(x))) if np.all(np.isfinite(x)) else (float("nan"),) * 2
            if not (0.0 <= lo and hi <= 1.0):
                raise LladaVError(f"image: a floating-point frame with values in [{lo:.4g}, {hi:.4g}]; expected values "
                                  "in [0, 1] (convert it to 8 or 16 bits with its own exposure first)")
            gray = np.rint(x.astype(np.float64) * 255.0)
        else:
            lo, hi = int(np.min(x)), int(np.max(x))
            if lo < 0 or hi > 65535:
                raise LladaVError(f"image: a {image.mode} frame with values in [{lo}, {hi}]; expected 16-bit values "
                                  "in [0, 65535]")
            gray = np.rint(x.astype(np.float64) * (255.0 / 65535.0))
        image = Image.fromarray(gray.astype(np.uint8), mode="L")
    return image.convert("RGB")


def normalize(image: Image.Image, geometry: ImageGeometry) -> np.ndarray:
    """RGB image -> (3, S, S) float32: bicubic resize to S x S, /255, (x - mean) / std."""
    size = geometry.image_size
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(geometry.mean, np.float32)) / np.asarray(geometry.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def letterbox(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Resize keeping the aspect ratio to fit `target` = (w, h), pad with black, centred."""
    tw, th = target
    sw, sh = tw / image.width, th / image.height
    if sw < sh:
        nw, nh = tw, min(math.ceil(image.height * sw), th)
    else:
        nw, nh = min(math.ceil(image.width * sh), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), Image.Resampling.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def grid_tiles(image: Image.Image, geometry: ImageGeometry) -> list[Image.Image]:
    """The AnyRes grid tiles, row by row, from the letterboxed best-fit resolution."""
    s = geometry.image_size
    best = select_best_resolution(image.size, geometry.grid_pinpoints)
    padded = letterbox(image, best)
    return [
        padded.crop((x, y, x + s, y + s))
        for y in range(0, padded.height, s)
        for x in range(0, padded.width, s)
    ]


def pad_to_square(image: Image.Image, geometry: ImageGeometry) -> Image.Image:
    """The image centred on a square of its longer side, filled with the mean colour (LLaVA's
    expand2square, what LLaDA-V does to each image of a several-image request)."""
    w, h = image.size
    if w == h:
        return image
    fill = tuple(int(m * 255) for m in geometry.mean)
    canvas = Image.new("RGB", (max(w, h), max(w, h)), fill)
    canvas.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return canvas


def prepare_image(source, geometry: ImageGeometry, mode: str) -> ImageInput:
    """Load and tile an image: the global tile first, then (AnyRes) the grid tiles; pad: one view of
    the image padded to a square (an image of a several-image request)."""
    image = load_image(source)
    layout = plan_tiles(image.size, geometry, mode)
    if mode == PAD:
        image = pad_to_square(image, geometry)
    tiles = [image] + (grid_tiles(image, geometry) if mode == ANYRES else [])
    assert len(tiles) == layout.num_tiles, (len(tiles), layout)
    pixels = np.stack([normalize(t, geometry) for t in tiles])
    return ImageInput(pixels, layout)
