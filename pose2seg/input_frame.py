"""The input frame: the one resize and keypoint scaling shared by preprocessing and inference.

Numpy only, so the preprocessing tasks (which store the input-frame image) and every inference
path (:mod:`pose2seg.inference`) compute the same pixels from the same original image: the
image is resized so its longer side is ``data.input_size`` (antialiased bilinear, a separable
triangle filter whose support widens with the downscale factor, like PIL's ``BILINEAR``), and
keypoints are multiplied by the same ``scale`` (input = orig * scale).
"""

from __future__ import annotations

import numpy as np

from pose2seg.skeleton import NUM_KEYPOINTS

__all__ = ["input_frame_keypoints", "input_frame_size", "resize_to_input_frame", "resize_image"]


def input_frame_size(orig_hw: tuple[int, int], input_size: int) -> tuple[float, int, int]:
    """``(scale, h, w)`` of the input frame: longer side = ``input_size``, input = orig * scale."""
    orig_h, orig_w = int(orig_hw[0]), int(orig_hw[1])
    if orig_h < 1 or orig_w < 1:
        raise ValueError(f"image size must be positive, got {orig_h}x{orig_w}")
    scale = input_size / max(orig_h, orig_w)
    h = min(input_size, max(1, round(orig_h * scale)))
    w = min(input_size, max(1, round(orig_w * scale)))
    return scale, h, w


def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float64 rows of the antialiased linear (triangle) filter, summing to 1."""
    inv = n_in / n_out
    support = max(inv, 1.0)
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * inv
    dist = (np.arange(n_in, dtype=np.float64) + 0.5)[None, :] - centres[:, None]
    weights = np.clip(1.0 - np.abs(dist) / support, 0.0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def resize_image(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """``(H, W, C)`` uint8 -> ``(h, w, C)`` uint8, antialiased bilinear, rounded."""
    image = np.asarray(image)
    h, w = int(out_hw[0]), int(out_hw[1])
    if image.shape[:2] == (h, w):
        return np.ascontiguousarray(image, dtype=np.uint8)
    big_h, big_w, channels = image.shape
    rows = _resize_weights(big_h, h) @ image.reshape(big_h, -1).astype(np.float64)  # (h, W*C)
    rows = rows.reshape(h, big_w, channels).transpose(0, 2, 1)  # (h, C, W)
    out = (rows @ _resize_weights(big_w, w).T).transpose(0, 2, 1)  # (h, w, C)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_to_input_frame(image: np.ndarray, input_size: int) -> tuple[np.ndarray, float]:
    """The input frame of an original image: ``(h, w, 3)`` uint8 with the longer side
    ``input_size``, and ``scale`` (input = orig * scale). Preprocessing stores this image."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    scale, h, w = input_frame_size(image.shape[:2], input_size)
    return resize_image(image, (h, w)), scale


def input_frame_keypoints(keypoints: np.ndarray, scale: float) -> np.ndarray:
    """``(N, K, 3)`` original-frame keypoints -> float32 input-frame keypoints (x, y times
    ``scale``, visibility kept)."""
    out = np.array(keypoints, dtype=np.float32).reshape(-1, NUM_KEYPOINTS, 3)
    out[..., :2] *= np.float32(scale)
    return out
