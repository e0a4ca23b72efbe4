"""The RoI of people whose keypoints cannot define the Affine-Align transform.

A person with fewer than 3 usable keypoints (v > 0), or with usable keypoints that are
(near-)collinear, has no least-squares affine onto a template (:mod:`pose2seg.templates`).
Such a person still gets a mask: :func:`fallback_affines` gives them an RoI computed from the
keypoints alone (never a ground-truth box), so that preprocessing (training targets) and every
inference path compute the same transform from the same inputs. Two modes
(``model.fallback``):

- ``keypoints`` (default): an upright similarity (uniform scale + shift, no rotation) that puts
  the usable keypoints where the template puts the same joints. The scale is the person's own:
  the RMS spread of their usable keypoints against the spread of the same joints in the
  template (a limb length against the template's, for two keypoints), over the template that
  fits best. One keypoint carries no scale: the RoI side is then the image-relative minimum.
  The RoI side (in image pixels) is clamped to ``[min_size * longer image side,
  MAX_SIDE_FRACTION * longer image side]``, so two nearly coincident keypoints (both eyes in
  profile) do not zoom onto a few pixels and two far-apart ones do not shrink the whole image
  into a corner.
- ``image``: the official Pose2Seg code's behaviour: the whole image, aspect kept, letterboxed
  (centred) into the S x S RoI.

Coordinates follow :mod:`pose2seg.templates`: keypoints ``(N, K, 3)`` in input-frame pixels,
affines ``(2, 3)`` input frame -> aligned-frame pixels, templates in unit aligned coordinates.
"""

from __future__ import annotations

import numpy as np

from pose2seg.skeleton import NUM_KEYPOINTS

__all__ = [
    "DEFAULT_MIN_SIZE",
    "FALLBACK_MODES",
    "MAX_SIDE_FRACTION",
    "fallback_affines",
    "image_affine",
]

FALLBACK_MODES: tuple[str, ...] = ("keypoints", "image")
"""Values of ``model.fallback``."""
DEFAULT_MIN_SIZE: float = 0.25
"""Default ``model.fallback_min_size``: the smallest RoI side, as a fraction of the image's
longer side."""
MAX_SIDE_FRACTION: float = 2.0
"""The largest RoI side, as a multiple of the image's longer side."""

_EPS = 1e-9


def image_affine(image_hw: tuple[int, int], *, roi_size: int) -> np.ndarray:
    """``A (2, 3)``: the whole ``(h, w)`` image, aspect kept, centred in the S x S RoI."""
    h, w = float(image_hw[0]), float(image_hw[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"image_hw must be positive, got {image_hw}")
    s = roi_size / max(h, w)
    return np.array([[s, 0.0, roi_size / 2 - s * w / 2], [0.0, s, roi_size / 2 - s * h / 2]])


def fallback_affines(
    keypoints: np.ndarray,
    templates: np.ndarray,
    *,
    roi_size: int,
    image_hw: tuple[int, int] | None,
    mode: str = "keypoints",
    min_size: float = DEFAULT_MIN_SIZE,
) -> np.ndarray:
    """Fallback transforms of people whose keypoints cannot define an affine.

    Args:
        keypoints: ``(N, K, 3)`` input-frame x, y, visibility; every person needs at least one
            usable keypoint (v > 0) in ``keypoints`` mode.
        templates: ``(T, K, 2)`` templates in unit aligned coordinates.
        roi_size: S.
        image_hw: ``(h, w)`` of the input frame the keypoints live in (unpadded). Without it
            (``keypoints`` mode only) the smallest RoI side is S pixels (no zoom beyond 1:1)
            and there is no largest.
        mode: ``keypoints`` or ``image`` (see the module docstring).
        min_size: smallest RoI side as a fraction of the image's longer side, in ``(0, 2]``.

    Returns:
        ``(N, 2, 3)`` float64 affines, input frame -> aligned-frame pixels.

    Raises:
        ValueError: bad shapes or values; a person without any usable keypoint in
            ``keypoints`` mode; ``image`` mode without ``image_hw``.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.ndim != 3 or keypoints.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(
            f"keypoints must have shape (N, {NUM_KEYPOINTS}, 3), got {keypoints.shape}"
        )
    templates = np.asarray(templates, dtype=np.float64)
    if templates.ndim != 3 or templates.shape[1:] != (NUM_KEYPOINTS, 2) or len(templates) < 1:
        raise ValueError(
            f"templates must have shape (T, {NUM_KEYPOINTS}, 2), got {templates.shape}"
        )
    if mode not in FALLBACK_MODES:
        raise ValueError(f"fallback mode must be one of {list(FALLBACK_MODES)}, got {mode!r}")
    if not 0.0 < min_size <= MAX_SIDE_FRACTION:
        raise ValueError(f"fallback min_size must be in (0, {MAX_SIDE_FRACTION}], got {min_size}")
    n = len(keypoints)
    if mode == "image":
        if image_hw is None:
            raise ValueError("fallback mode 'image' needs the image size (image_hw)")
        return np.repeat(image_affine(image_hw, roi_size=roi_size)[None], n, axis=0)

    if image_hw is not None:
        longer = float(max(image_hw))
        if longer <= 0:
            raise ValueError(f"image_hw must be positive, got {image_hw}")
        side_min, side_max = min_size * longer, MAX_SIDE_FRACTION * longer
    else:
        side_min, side_max = float(roi_size), np.inf

    out = np.zeros((n, 2, 3))
    for i in range(n):
        usable = keypoints[i, :, 2] > 0
        if not usable.any():
            raise ValueError(
                f"fallback_affines: person {i} has no usable keypoint; such people cannot be "
                "aligned and must be rejected by the caller"
            )
        pts = keypoints[i, usable, :2]  # (M, 2) image pixels
        if not np.isfinite(pts).all():
            raise ValueError(f"fallback_affines: person {i} has non-finite usable keypoints")
        mu_pts = pts.mean(axis=0)
        spread_pts = np.sqrt(((pts - mu_pts) ** 2).sum(-1).mean())
        # Without a template that has all of the person's joints (templates from a file may
        # lack some), the keypoints' centre goes to the frame's centre at the smallest side.
        best_cost, best_side, best_mu_tpl = np.inf, side_min, np.full(2, roi_size / 2.0)
        for tpl_unit in templates:
            tpl = tpl_unit[usable] * roi_size  # (M, 2) aligned pixels
            if not np.isfinite(tpl).all():
                continue
            mu_tpl = tpl.mean(axis=0)
            spread_tpl = np.sqrt(((tpl - mu_tpl) ** 2).sum(-1).mean())
            if len(pts) < 2 or spread_pts < _EPS or spread_tpl < _EPS:
                side = side_min  # one keypoint (or coincident ones): no scale of its own
            else:
                side = roi_size * spread_pts / spread_tpl
            side = float(np.clip(side, side_min, side_max))
            s = roi_size / side
            cost = float((((pts - mu_pts) * s + mu_tpl - tpl) ** 2).sum(-1).mean())
            if cost < best_cost - 1e-12:
                best_cost, best_side, best_mu_tpl = cost, side, mu_tpl
        s = roi_size / best_side
        tx, ty = best_mu_tpl - s * mu_pts
        out[i] = [[s, 0.0, tx], [0.0, s, ty]]
    return out
