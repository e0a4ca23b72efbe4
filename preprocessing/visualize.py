"""Overlay drawings of person instances (masks, keypoints, skeletons) for previews and reports.

Used for the synthetic dataset preview and by evaluation for overlays of predictions.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pose2seg.skeleton import LIMBS

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
)


def instance_colour(index: int) -> tuple[int, int, int]:
    """The overlay colour of instance ``index`` (cycles through ``PALETTE``)."""
    return PALETTE[index % len(PALETTE)]


def draw_instances(
    pixels: np.ndarray,
    masks: np.ndarray | list[np.ndarray],
    keypoints: np.ndarray | list[np.ndarray] | None = None,
    *,
    alpha: float = 0.45,
) -> np.ndarray:
    """Draw N instances over an image.

    Args:
        pixels: (H, W, 3) uint8 image.
        masks: (N, H, W) bool masks, one colour per instance (blended with ``alpha``, with an
            opaque outline).
        keypoints: optional (N, K, 3) COCO keypoints in image pixels; limbs whose two ends are
            labelled (v > 0) are drawn as lines, visible keypoints (v = 2) as filled dots and
            hidden ones (v = 1) as hollow dots.

    Returns:
        (H, W, 3) uint8 overlay; the input is not modified.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be (H, W, 3), got {pixels.shape}")
    height, width = pixels.shape[:2]
    masks_arr = (
        np.asarray(masks, dtype=bool).reshape(-1, height, width)
        if len(masks)
        else np.zeros((0, height, width), bool)
    )
    out = pixels.astype(np.float32)
    for i, mask in enumerate(masks_arr):
        colour = np.array(instance_colour(i), dtype=np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        edge = mask & ~_erode(mask)
        out[edge] = colour
    image = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    if keypoints is not None and len(keypoints):
        draw = ImageDraw.Draw(image)
        radius = max(1.5, min(height, width) / 128)
        for i, kps in enumerate(
            np.asarray(keypoints, dtype=np.float32).reshape(len(keypoints), -1, 3)
        ):
            colour = instance_colour(i)
            for a, b in LIMBS:
                if kps[a, 2] > 0 and kps[b, 2] > 0:
                    draw.line(
                        [tuple(kps[a, :2] - 0.5), tuple(kps[b, :2] - 0.5)],
                        fill=colour,
                        width=max(1, int(radius)),
                    )
            for x, y, v in kps:
                if v <= 0:
                    continue
                box = [x - 0.5 - radius, y - 0.5 - radius, x - 0.5 + radius, y - 0.5 + radius]
                if v >= 2:
                    draw.ellipse(box, fill=colour, outline=(0, 0, 0))
                else:
                    draw.ellipse(box, fill=None, outline=colour, width=1)
    return np.asarray(image)


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion of an (H, W) bool mask (pixels outside count as empty)."""
    p = np.pad(mask, 1)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def image_grid(tiles: list[np.ndarray], *, columns: int, gap_px: int = 4) -> np.ndarray:
    """Tile (H, W, 3) uint8 images of one size into a grid (rows * H + gaps, columns * W + gaps, 3)."""
    if not tiles:
        raise ValueError("image_grid needs at least one tile")
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    grid = np.full(
        (rows * h + (rows - 1) * gap_px, columns * w + (columns - 1) * gap_px, 3), 255, np.uint8
    )
    for i, tile in enumerate(tiles):
        if tile.shape[:2] != (h, w):
            raise ValueError(f"tile {i} has shape {tile.shape}, expected ({h}, {w}, 3)")
        r, c = divmod(i, columns)
        grid[r * (h + gap_px) : r * (h + gap_px) + h, c * (w + gap_px) : c * (w + gap_px) + w] = (
            tile
        )
    return grid
