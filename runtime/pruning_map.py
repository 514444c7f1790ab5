"""A picture of what pruning kept: the input image with dropped visual tokens darkened.

Left panel: the global tile's 27x27 tokens over the whole image. Right panel (AnyRes): the grid
tokens over the whole image (the un-padded grid covers exactly the original image). Several
cameras: one panel per camera, its 27x27 tokens over its padded square view. PIL only.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from runtime.anyres import ANYRES, PAD, TileLayout

PANEL = 512


def token_boxes(layout: TileLayout, side: int):
    """(visual index, (row, col), (rows, cols), panel) for every token with an image area."""
    for i in range(side * side):
        yield i, divmod(i, side), (side, side), 0
    if layout.mode == ANYRES:
        rows, cols = layout.merged
        for r in range(rows):
            for c in range(cols):  # column `cols` of each row is the image_newline token
                yield side * side + r * (cols + 1) + c, (r, c), (rows, cols), 1


def tokens_covering(layout: TileLayout, side: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Visual indices (ascending) of the tokens whose image cell holds the centre of at least one
    pixel of box (x0, y0, x1, y1) (original image pixels, x1/y1 exclusive): the box's tokens in the
    global tile and, for AnyRes, in the grid (both panels cover the whole image, as token_boxes). A
    view of several images (pad) covers the image centred on its padded square."""
    w, h = layout.image_size
    x0, y0, x1, y1 = box
    if layout.mode == PAD:  # the box moves with the image onto the square (runtime.preprocess.pad_to_square)
        side_px = max(w, h)
        dx, dy = (side_px - w) // 2, (side_px - h) // 2
        x0, y0, x1, y1, w, h = x0 + dx, y0 + dy, x1 + dx, y1 + dy, side_px, side_px

    def cells(lo: int, hi: int, n: int, size: int) -> set[int]:
        return set(np.floor((np.arange(lo, hi) + 0.5) * n / size).astype(int).tolist())

    covered: dict[tuple[int, int], tuple[set[int], set[int]]] = {}  # per grid shape: (rows, cols) held
    out = []
    for i, (r, c), (rows, cols), _panel in token_boxes(layout, side):
        if (rows, cols) not in covered:
            covered[rows, cols] = cells(y0, y1, rows, h), cells(x0, x1, cols, w)
        held_rows, held_cols = covered[rows, cols]
        if r in held_rows and c in held_cols:
            out.append(i)
    return np.array(out, dtype=np.int64)


def object_recall(covering: np.ndarray, kept: np.ndarray) -> float:
    """Share of an object's tokens that pruning kept (1.0 for an object with no tokens)."""
    return float(np.isin(covering, kept).mean()) if covering.size else 1.0


def pruning_map(image: Image.Image, layout: TileLayout, kept: np.ndarray, side: int, title: str = "",
                labels: list[str] | None = None) -> Image.Image:
    image = image.convert("RGB")
    scale = PANEL / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    base = image.resize((w, h), Image.Resampling.BILINEAR)
    panels = 2 if layout.mode == ANYRES else 1
    keep = np.zeros(layout.num_visual_tokens, bool)
    keep[kept] = True
    dim = np.zeros((panels, h, w), bool)
    for i, (r, c), (rows, cols), panel in token_boxes(layout, side):
        if not keep[i]:
            y0, y1 = r * h // rows, (r + 1) * h // rows
            x0, x1 = c * w // cols, (c + 1) * w // cols
            dim[panel, y0:y1, x0:x1] = True
    canvas = Image.new("RGB", (panels * (w + 8) + 8, h + 40), (255, 255, 255))
    pixels = np.asarray(base, dtype=np.float32)
    for p in range(panels):
        shaded = np.where(dim[p][..., None], pixels * 0.25 + np.array([0, 0, 60]), pixels)
        canvas.paste(Image.fromarray(shaded.clip(0, 255).astype(np.uint8)), (8 + p * (w + 8), 32))
    draw = ImageDraw.Draw(canvas)
    labels = labels or ["global tile", "AnyRes grid"][:panels]
    for p, label in enumerate(labels):
        draw.text((8 + p * (w + 8), 18), label, fill=(0, 0, 0))
    draw.text((8, 2), title, fill=(0, 0, 0))
    return canvas


def camera_pruning_map(views: list[tuple[str, Image.Image]], layouts: list[TileLayout], kept: np.ndarray,
                       geometry, title: str = "") -> Image.Image:
    """One panel per camera (its padded square view, as the vision tower saw it), side by side; kept:
    indices into all cameras' visual tokens, camera after camera."""
    from runtime.preprocess import pad_to_square

    panels, start = [], 0
    for (name, image), layout in zip(views, layouts):
        n = layout.num_visual_tokens
        own = kept[(kept >= start) & (kept < start + n)] - start
        share = f"{name}: kept {own.size} of {n}"
        panels.append(pruning_map(pad_to_square(image.convert("RGB"), geometry), layout, own, geometry.side,
                                  labels=[share]))
        start += n
    canvas = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), (255, 255, 255))
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width
    ImageDraw.Draw(canvas).text((8, 2), title, fill=(0, 0, 0))
    return canvas
