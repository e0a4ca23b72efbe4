"""COCO person keypoint layout: the 17 keypoints, the limbs that join them, left/right pairs.

Everything in the project indexes keypoints through these constants; keypoints are always
arrays of shape ``(..., K, 3)`` holding ``x, y, visibility`` in pixels, with the COCO
visibility convention: 0 = not labelled (outside the image), 1 = labelled but hidden,
2 = labelled and visible.
"""

from __future__ import annotations

KEYPOINT_NAMES: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
NUM_KEYPOINTS: int = len(KEYPOINT_NAMES)  # K = 17

# The COCO skeleton as 0-based (a, b) keypoint index pairs (the annotation files list it
# 1-based). L = 19 limbs.
LIMBS: tuple[tuple[int, int], ...] = (
    (15, 13),
    (13, 11),
    (16, 14),
    (14, 12),
    (11, 12),
    (5, 11),
    (6, 12),
    (5, 6),
    (5, 7),
    (6, 8),
    (7, 9),
    (8, 10),
    (1, 2),
    (0, 1),
    (0, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),
)
NUM_LIMBS: int = len(LIMBS)

# Pairs swapped by a horizontal flip.
FLIP_PAIRS: tuple[tuple[int, int], ...] = (
    (1, 2),
    (3, 4),
    (5, 6),
    (7, 8),
    (9, 10),
    (11, 12),
    (13, 14),
    (15, 16),
)

# Skeleton feature channel layout (see DESIGN.md): 2 part-affinity-field channels per limb
# (x then y component, limb order as in LIMBS), then one confidence map per keypoint.
NUM_PAF_CHANNELS: int = 2 * NUM_LIMBS  # 38
NUM_HEATMAP_CHANNELS: int = NUM_KEYPOINTS  # 17
NUM_SKELETON_CHANNELS: int = NUM_PAF_CHANNELS + NUM_HEATMAP_CHANNELS  # 55

# COCO's per-keypoint OKS sigmas, used to weight keypoints when fitting an affine.
COCO_KEYPOINT_SIGMAS: tuple[float, ...] = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
    0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)  # fmt: skip


def skeleton_channels(mode: str) -> tuple[int, ...]:
    """Indices into the 55 stored skeleton channels that a ``model.skeleton_features`` mode uses."""
    if mode == "both":
        return tuple(range(NUM_SKELETON_CHANNELS))
    if mode == "paf":
        return tuple(range(NUM_PAF_CHANNELS))
    if mode == "heatmaps":
        return tuple(range(NUM_PAF_CHANNELS, NUM_SKELETON_CHANNELS))
    if mode == "none":
        return ()
    raise ValueError(f"model.skeleton_features must be one of both/paf/heatmaps/none, got {mode!r}")
