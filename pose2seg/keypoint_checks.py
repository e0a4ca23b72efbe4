"""Checks on COCO keypoints that preprocessing and inference share (pure numpy, no I/O).

A labelled keypoint (v > 0) far outside its image is an annotation or pose-estimator error
(``(5000, -300)`` in a 640 x 480 image): it would pull the person's affine onto the wrong
template and warp features from nowhere. A person with such a keypoint is **rejected** with
reason :data:`REASON_OUTSIDE_IMAGE`, in preprocessing (a row of the rejects table, counted
against ``data.max_reject_fraction``) and in batch inference (an entry of ``rejects.json``,
no mask for that person) and in the Ray Serve app (an entry of the answer's ``rejected``, no
mask for that person), all three through :func:`outside_image_rejects`; the MLflow pyfunc
answers such a request with a 400 naming the person. "Far" means more than ``margin_fraction`` of the image's longer side beyond an image
border: keypoints just outside the frame (a limb leaving the picture, a pose estimator
extrapolating a little) are kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pose2seg.skeleton import NUM_KEYPOINTS

__all__ = [
    "DEFAULT_KEYPOINT_MARGIN_FRACTION",
    "MAX_KEYPOINT_ABS",
    "REASON_OUTSIDE_IMAGE",
    "describe_outside_keypoints",
    "keypoint_number_problem",
    "keypoints_outside_image",
    "outside_image_rejects",
    "people_keypoints",
]

DEFAULT_KEYPOINT_MARGIN_FRACTION: float = 0.25
"""Default allowed distance outside the image, as a fraction of the image's longer side."""

REASON_OUTSIDE_IMAGE: str = "keypoints_outside_image"
"""The reject reason of a person with a labelled keypoint beyond the margin."""

MAX_KEYPOINT_ABS: float = 1e9
"""Largest magnitude a request's number may have: beyond it a value is out of range (no image
is a billion pixels wide, and float32 arithmetic on such values overflows)."""


def _outside_mask(
    keypoints: np.ndarray, height: int, width: int, margin_fraction: float
) -> np.ndarray:
    """``(N, K)`` bool: labelled keypoints more than the margin outside the image."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if margin_fraction < 0:
        raise ValueError(f"margin_fraction must be >= 0, got {margin_fraction}")
    kpts = np.asarray(keypoints, dtype=np.float64)
    if kpts.ndim != 3 or kpts.shape[-1] != 3:
        raise ValueError(f"keypoints must have shape (N, K, 3), got {kpts.shape}")
    margin = margin_fraction * max(height, width)
    x, y, v = kpts[..., 0], kpts[..., 1], kpts[..., 2]
    beyond = (x < -margin) | (x > width + margin) | (y < -margin) | (y > height + margin)
    return beyond & (v > 0)


def keypoints_outside_image(
    keypoints: np.ndarray, *, height: int, width: int, margin_fraction: float
) -> np.ndarray:
    """Which people have a labelled keypoint too far outside the image.

    Args:
        keypoints: (N, K, 3) x, y, visibility in the image's pixels (unlabelled v = 0
            keypoints are ignored, whatever their coordinates).
        height, width: the image size H, W in pixels.
        margin_fraction: allowed distance beyond a border, as a fraction of ``max(H, W)``.

    Returns:
        (N,) bool, true for a person to reject.
    """
    return _outside_mask(keypoints, height, width, margin_fraction).any(axis=-1)


def describe_outside_keypoints(
    keypoints: np.ndarray, *, height: int, width: int, margin_fraction: float
) -> str:
    """A one-line reason for one person's rejection (``keypoints`` (K, 3)); "" when none."""
    kpts = np.asarray(keypoints, dtype=np.float64).reshape(1, -1, 3)
    bad = np.flatnonzero(_outside_mask(kpts, height, width, margin_fraction)[0])
    if len(bad) == 0:
        return ""
    k = int(bad[0])
    x, y = kpts[0, k, 0], kpts[0, k, 1]
    return (
        f"{len(bad)} labelled keypoint(s) more than {margin_fraction:g} x {max(height, width)} px "
        f"outside the {width}x{height} (WxH) image, e.g. keypoint {k} at ({x:g}, {y:g})"
    )


def keypoint_number_problem(values: Any) -> str:
    """Why keypoint numbers cannot be used ("" when they can): NaN or infinity is "not
    finite"; a finite number beyond :data:`MAX_KEYPOINT_ABS` (``1e308``, which float32 would
    turn into infinity) is "out of range". ``values``: any shape of numbers, read as float64."""
    arr = np.asarray(values, dtype=np.float64)
    if not np.isfinite(arr).all():
        return "every number must be finite (no NaN or infinity)"
    too_big = np.abs(arr) > MAX_KEYPOINT_ABS
    if too_big.any():
        index = tuple(int(i) for i in np.argwhere(too_big)[0])
        where = ""
        if arr.ndim == 3:
            where = f"person {index[0]}, keypoint {index[1]}: "
        elif arr.ndim >= 1:
            where = f"number {index[-1]}: " if arr.ndim == 1 else ""
        return (
            f"{where}{arr[index]:g} is out of range (every number must be within "
            f"+-{MAX_KEYPOINT_ABS:g})"
        )
    return ""


def outside_image_rejects(
    keypoints: np.ndarray, *, height: int, width: int, margin_fraction: float
) -> list[tuple[int, str]]:
    """The people to reject for a labelled keypoint beyond the margin: ``(person index,
    one-line reason)`` each, in order. The one rule of batch inference and the Serve app.

    Args:
        keypoints: (N, K, 3) x, y, visibility in the image's pixels.
        height, width: the image size H, W in pixels.
        margin_fraction: allowed distance beyond a border, as a fraction of ``max(H, W)``.
    """
    kpts = np.asarray(keypoints, dtype=np.float64)
    rejects = []
    for index in np.flatnonzero(
        keypoints_outside_image(kpts, height=height, width=width, margin_fraction=margin_fraction)
    ):
        why = describe_outside_keypoints(
            kpts[index], height=height, width=width, margin_fraction=margin_fraction
        )
        rejects.append((int(index), why))
    return rejects


def people_keypoints(people: Any) -> np.ndarray:
    """A request's people (a list, each ``3K`` numbers or ``K x [x, y, v]``, COCO order) as
    ``(N, K, 3)`` float32: what every online entry point (the pyfunc, the Serve app) accepts.

    Raises:
        ValueError: the reason in one line (the caller says where: image id, field).
    """
    values = NUM_KEYPOINTS * 3
    if not isinstance(people, list | tuple | np.ndarray):
        raise ValueError(
            f"expected a list of people ({values} numbers or {NUM_KEYPOINTS} x 3 each), "
            f"got {type(people).__name__}"
        )
    if len(people) == 0:
        return np.zeros((0, NUM_KEYPOINTS, 3), np.float32)
    try:
        # float64 first: 1e308 is a finite number that float32 would turn into inf.
        arr = np.asarray(people, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"every person must be {values} numbers or {NUM_KEYPOINTS} x [x, y, v] numbers"
        ) from None
    if arr.ndim == 2 and arr.shape[1] == values:
        arr = arr.reshape(-1, NUM_KEYPOINTS, 3)
    if arr.ndim != 3 or arr.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(
            f"expected N x {values} or N x {NUM_KEYPOINTS} x 3 numbers (COCO order), "
            f"got shape {list(arr.shape)}"
        )
    problem = keypoint_number_problem(arr)
    if problem:
        raise ValueError(problem)
    if (arr[..., 2] < 0).any():
        raise ValueError("visibility (every third number) must be >= 0 (0 = unlabelled)")
    return arr.astype(np.float32)
