"""AnyRes feature merge in numpy: the runtime's twin of export.model.merge_anyres.

The global tile's features first, then the grid's, un-padded, bilinearly shrunk when too large
(torch's bilinear with align_corners=False), and an image_newline after every row. An image of a
several-image request (pad) is one view's features and one image_newline.
"""

from __future__ import annotations

import numpy as np

from runtime.anyres import ANYRES, PAD, TileLayout


def resize_bilinear(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(C, H, W) -> (C, rows, cols), half-pixel centres, edge-clamped (torch, align_corners=False)."""
    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float32)

    r0, r1, rw = axis(x.shape[1], rows)
    c0, c1, cw = axis(x.shape[2], cols)
    top = x[:, r0][:, :, c0] * (1 - cw) + x[:, r0][:, :, c1] * cw
    bottom = x[:, r1][:, :, c0] * (1 - cw) + x[:, r1][:, :, c1] * cw
    return top * (1 - rw)[:, None] + bottom * rw[:, None]


def merge_tiles(feats: np.ndarray, layout: TileLayout, newline: np.ndarray) -> np.ndarray:
    """Projected tile features (T, S*S, D) -> visual tokens (V, D)."""
    base = feats[0]
    if layout.mode == PAD:  # one view of several images: its features, then the image_newline
        return np.concatenate([base, newline.astype(feats.dtype)[None]], axis=0)
    if layout.mode != ANYRES:
        return base
    across, down = layout.grid
    side = int(round(np.sqrt(feats.shape[1])))
    d = feats.shape[-1]
    grid = feats[1:].reshape(down, across, side, side, d).transpose(4, 0, 2, 1, 3)
    grid = grid.reshape(d, down * side, across * side)
    rows, cols = layout.unpadded
    r0, c0 = (grid.shape[1] - rows) // 2, (grid.shape[2] - cols) // 2
    grid = grid[:, r0 : r0 + rows, c0 : c0 + cols]
    if layout.merged != layout.unpadded:
        grid = resize_bilinear(grid.astype(np.float32), *layout.merged).astype(feats.dtype)
    nl = np.broadcast_to(newline.astype(feats.dtype)[:, None, None], (d, grid.shape[1], 1))
    grid = np.concatenate([grid, nl], axis=-1)
    return np.concatenate([base, grid.reshape(d, -1).T], axis=0)
