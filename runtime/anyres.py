"""AnyRes tiling geometry (LLaVA-OneVision / LLaDA-V `anyres_max_N` + `spatial_unpad`), pure Python.

One image becomes a squashed global tile followed by a grid of tiles of the best-fitting
resolution. After the vision tower, the grid's features are un-padded, bilinearly shrunk when
they exceed N tiles' worth of tokens, and get an `image_newline` after every row. Everything
here is arithmetic on sizes, so the runtime can know every shape before running an engine.

Follows ML-GSAI/LLaDA-V `train/llava/mm_utils.py` (select_best_resolution) and
`train/llava/model/llava_arch.py` (unpad_image and the anyres_max branch), float operations in
the same order so the integer results agree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from runtime.errors import LladaVError

SINGLE = "single"  # one 384x384 tile, 729 tokens: fixed shapes for deployment
ANYRES = "anyres"  # anyres_max_N with spatial_unpad, as LLaDA-V was trained
LAYOUTS = (SINGLE, ANYRES)  # a bundle's layout for one-image requests
# several images in one request (cameras): LLaDA-V's convention (image_aspect_ratio "pad"): each image is
# padded to a square with the mean colour and becomes one view, 729 features + the image_newline (730)
PAD = "pad"


@dataclass(frozen=True)
class ImageGeometry:
    """The vision tower's input geometry and the AnyRes settings from the checkpoint config."""

    image_size: int = 384
    patch_size: int = 14
    grid_pinpoints: tuple[tuple[int, int], ...] = tuple(
        (384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7)
    )
    max_tiles: int = 4  # the N of anyres_max_N
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def side(self) -> int:
        """Patches per tile side: 384 // 14 = 27 (the conv ignores the last 6 pixels)."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return self.side * self.side

    @property
    def max_grid_tiles(self) -> int:
        return max((w // self.image_size) * (h // self.image_size) for w, h in self.grid_pinpoints)


@dataclass(frozen=True)
class TileLayout:
    """How one image of a given size is tiled and how many visual tokens it yields."""

    mode: str
    image_size: tuple[int, int]  # original (width, height)
    grid: tuple[int, int]  # tiles (across, down); (0, 0) in single mode
    unpadded: tuple[int, int]  # grid features (rows, cols) after un-padding
    merged: tuple[int, int]  # (rows, cols) after the optional bilinear shrink
    tokens_per_tile: int
    fill: tuple[int, ...] = ()  # pad: the view's tokens that show only the fill (pad_fill_tokens)

    @property
    def num_tiles(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    @property
    def num_grid_tokens(self) -> int:
        """Tokens after the global tile's: the grid's with an image_newline per row (anyres), the one
        image_newline after the view (pad), none (single)."""
        rows, cols = self.merged
        return rows * (cols + 1) if self.mode == ANYRES else 1 if self.mode == PAD else 0

    @property
    def num_visual_tokens(self) -> int:
        return self.tokens_per_tile + self.num_grid_tokens


def parse_grid_pinpoints(spec, image_size: int) -> tuple[tuple[int, int], ...]:
    """'(1x1),...,(6x6)' (a range in tiles) or [[w, h], ...] in pixels -> ((w, h), ...) pixels."""
    if isinstance(spec, str) and "x" in spec:
        found = re.findall(r"\((\d+)x(\d+)\)", spec)
        if not found:
            raise LladaVError(f"image_grid_pinpoints: cannot parse {spec!r}; expected '(1x1),...,(6x6)'")
        (a0, b0), (a1, b1) = map(int, found[0]), map(int, found[-1])
        return tuple(
            (i * image_size, j * image_size) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)
        )
    try:
        pairs = tuple((int(w), int(h)) for w, h in spec)
    except (TypeError, ValueError):
        raise LladaVError(
            f"image_grid_pinpoints: got {spec!r}; expected '(1x1),...,(6x6)' or [[w, h], ...]"
        ) from None
    if not pairs:
        raise LladaVError("image_grid_pinpoints: empty list; expected at least one resolution")
    return pairs


def parse_max_tiles(image_aspect_ratio: str) -> int:
    """'anyres_max_4' -> 4."""
    m = re.fullmatch(r"anyres_max_(\d+)", image_aspect_ratio or "")
    if not m:
        raise LladaVError(
            f"image_aspect_ratio: got {image_aspect_ratio!r}; expected 'anyres_max_N' (LLaDA-V uses anyres_max_4)"
        )
    return int(m.group(1))


def select_best_resolution(size: tuple[int, int], resolutions) -> tuple[int, int]:
    """The resolution that keeps the most of the image, then wastes the least (LLaVA rule)."""
    ow, oh = size
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in resolutions:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    return best


def unpadded_rows_cols(size: tuple[int, int], rows: int, cols: int) -> tuple[int, int]:
    """Rows and columns of grid features left after removing the letterbox padding."""
    ow, oh = size
    if ow / oh > cols / rows:  # padding was added above and below
        new_rows = int(oh * (cols / ow))
        pad = (rows - new_rows) // 2
        return rows - 2 * pad, cols
    new_cols = int(ow * (rows / oh))  # padding was added left and right
    pad = (cols - new_cols) // 2
    return rows, cols - 2 * pad


def shrunk_rows_cols(rows: int, cols: int, max_tiles: int, side: int) -> tuple[int, int]:
    """anyres_max_N: shrink by t = sqrt(rows*cols / (N*side^2)) when t > 1.1."""
    times = math.sqrt(rows * cols / (max_tiles * side**2))
    if times > 1.1:
        return int(rows // times), int(cols // times)
    return rows, cols


def plan_tiles(size: tuple[int, int], geometry: ImageGeometry, mode: str) -> TileLayout:
    """The tiling of an image of `size` = (width, height) pixels in layout `mode`."""
    if mode not in LAYOUTS + (PAD,):
        raise LladaVError(f"image layout: got {mode!r}; expected one of {LAYOUTS + (PAD,)}")
    w, h = size
    if w <= 0 or h <= 0:
        raise LladaVError(f"image size: got {w}x{h}; expected a non-empty image")
    if mode in (SINGLE, PAD):
        fill = pad_fill_tokens(size, geometry) if mode == PAD else ()
        return TileLayout(mode, size, (0, 0), (0, 0), (0, 0), geometry.tokens_per_tile, fill)
    bw, bh = select_best_resolution(size, geometry.grid_pinpoints)
    across, down = bw // geometry.image_size, bh // geometry.image_size
    rows, cols = unpadded_rows_cols(size, down * geometry.side, across * geometry.side)
    merged = shrunk_rows_cols(rows, cols, geometry.max_tiles, geometry.side)
    return TileLayout(ANYRES, size, (across, down), (rows, cols), merged, geometry.tokens_per_tile)


def pad_fill_tokens(size: tuple[int, int], geometry: ImageGeometry) -> tuple[int, ...]:
    """A padded view's tokens (row-major patch indices) whose patch holds nothing of the frame: clear of
    it by the resize's reach (bicubic: 2 pixels of the view, 2 of the frame when it is enlarged), so they
    show the mean-colour fill alone (runtime.preprocess.pad_to_square, then the resize to image_size)."""
    w, h = size
    square = max(w, h)
    scale = geometry.image_size / square  # view pixels per frame pixel
    reach = 2 * max(1.0, scale)

    def clear(offset: int, length: int) -> set[int]:  # patch indices along one axis clear of the frame
        lo, hi = offset * scale - reach, (offset + length) * scale + reach
        ps = geometry.patch_size
        return {i for i in range(geometry.side) if (i + 1) * ps <= lo or i * ps >= hi}

    rows, cols = clear((square - h) // 2, h), clear((square - w) // 2, w)
    side = geometry.side
    return tuple(r * side + c for r in range(side) for c in range(side) if r in rows or c in cols)


def max_visual_tokens(geometry: ImageGeometry, mode: str) -> int:
    """An upper bound on the visual tokens of any image in `mode` (for engine profiles)."""
    if mode == SINGLE:
        return geometry.tokens_per_tile
    # The shrink caps rows*cols near N*side^2*1.1^2; un-padding only removes tokens. Bound it by
    # the larger of "no shrink at the threshold" and the biggest grid's worst aspect ratio.
    cap = 0
    for w, h in geometry.grid_pinpoints:
        rows, cols = (h // geometry.image_size) * geometry.side, (w // geometry.image_size) * geometry.side
        for r, c in ((rows, cols), *_aspect_extremes(rows, cols)):
            r2, c2 = shrunk_rows_cols(r, c, geometry.max_tiles, geometry.side)
            cap = max(cap, r2 * (c2 + 1))
    return geometry.tokens_per_tile + cap


def _aspect_extremes(rows: int, cols: int):
    """Un-padded shapes worth checking for the bound: every row or column count down to 1."""
    for r in range(1, rows + 1):
        yield r, cols
    for c in range(1, cols + 1):
        yield rows, c
