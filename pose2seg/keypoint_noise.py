"""Degraded ground-truth keypoints, the way a pose estimator errs (robustness evaluation).

Numpy only, seeded. Two error modes, each a config key (``eval.keypoint_drop_prob``,
``eval.keypoint_jitter``, seed ``eval.keypoint_noise_seed``):

- **Misses**: each labelled keypoint is dropped (set to ``(0, 0, 0)``, the COCO convention for
  an unlabelled one) with probability ``drop_prob`` if visible (v = 2) and ``2 * drop_prob``
  (at most 1) if hidden (v = 1): estimators miss occluded joints more often.
- **Localisation error**: every kept keypoint moves by a Gaussian offset with standard deviation
  ``jitter * s * kappa_k`` per axis, where ``s = sqrt(area)`` of the person and ``kappa_k = 2
  sigma_k`` COCO's per-keypoint OKS constant. This is the error OKS measures: a keypoint's
  expected OKS is then ``1 / (1 + jitter^2)`` (0.8 at ``jitter = 0.5``).

Draws depend only on ``(seed, image_id)``, so the same image gets the same degraded poses
whatever the order or sharding of an evaluation.
"""

from __future__ import annotations

import numpy as np

from pose2seg.skeleton import COCO_KEYPOINT_SIGMAS, NUM_KEYPOINTS

__all__ = ["degrade_image_keypoints", "degrade_keypoints"]

_KAPPA = 2.0 * np.asarray(COCO_KEYPOINT_SIGMAS, dtype=np.float64)


def degrade_keypoints(
    keypoints: np.ndarray,
    *,
    drop_prob: float,
    jitter: float,
    rng: np.random.Generator,
    areas: np.ndarray | None = None,
) -> np.ndarray:
    """Drop and jitter keypoints (see the module docstring).

    Args:
        keypoints: ``(N, K, 3)`` x, y, visibility in pixels.
        drop_prob: probability of dropping a visible keypoint, in [0, 1].
        jitter: localisation error in OKS units (0 = exact positions), >= 0.
        rng: the generator every draw comes from.
        areas: optional ``(N,)`` person areas in pixels^2 (the COCO ``area``, which OKS uses);
            without them the area of the box of the person's labelled keypoints is used.

    Returns:
        ``(N, K, 3)`` float32, a new array; unlabelled keypoints stay ``(0, 0, 0)``.
    """
    kpts = np.asarray(keypoints, dtype=np.float64)
    if kpts.ndim != 3 or kpts.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"keypoints must have shape (N, {NUM_KEYPOINTS}, 3), got {kpts.shape}")
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"eval.keypoint_drop_prob must be in [0, 1], got {drop_prob}")
    if jitter < 0:
        raise ValueError(f"eval.keypoint_jitter must be >= 0, got {jitter}")
    n = len(kpts)
    vis = kpts[..., 2]
    labelled = vis > 0
    if areas is None:
        any_ = labelled.any(axis=1)

        def extent(column: np.ndarray) -> np.ndarray:
            hi = np.where(labelled, column, -np.inf).max(axis=1)
            lo = np.where(labelled, column, np.inf).min(axis=1)
            return np.where(any_, hi - lo, 0.0)

        areas = extent(kpts[..., 0]) * extent(kpts[..., 1])
    areas = np.asarray(areas, dtype=np.float64).reshape(-1)
    if areas.shape != (n,):
        raise ValueError(f"areas must have shape ({n},), got {areas.shape}")
    # Draw everything, used or not, so the stream does not depend on the visibilities.
    drop_draw = rng.random((n, NUM_KEYPOINTS))
    offsets = rng.standard_normal((n, NUM_KEYPOINTS, 2))
    miss = np.where(vis == 1, min(1.0, 2.0 * drop_prob), drop_prob)
    dropped = labelled & (drop_draw < miss)
    scale = np.sqrt(np.maximum(areas, 1.0))[:, None, None] * _KAPPA[None, :, None]
    out = kpts.copy()
    out[..., :2] += np.where(labelled[..., None], offsets * jitter * scale, 0.0)
    out[dropped] = 0.0
    return out.astype(np.float32)


def degrade_image_keypoints(
    keypoints: np.ndarray,
    *,
    image_id: int,
    seed: int,
    drop_prob: float,
    jitter: float,
    areas: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`degrade_keypoints` of one image's people, seeded by ``(seed, image_id)``."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(image_id) & 0xFFFFFFFFFFFF])
    return degrade_keypoints(keypoints, drop_prob=drop_prob, jitter=jitter, rng=rng, areas=areas)
