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

# The official Pose2Seg code's skeleton features (``model.skeleton_rendering = official``, and
# the layout of the official weights' SegModule input): 17 heatmaps, then 2 channels (x, y) per
# limb in this order. Same limbs as LIMBS; the 4 leg limbs run the other way.
OFFICIAL_LIMBS: tuple[tuple[int, int], ...] = (
    (0, 1),
    (0, 2),
    (1, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),
    (5, 6),
    (5, 7),
    (5, 11),
    (6, 8),
    (6, 12),
    (7, 9),
    (8, 10),
    (11, 12),
    (11, 13),
    (12, 14),
    (13, 15),
    (14, 16),
)

SKELETON_RENDERINGS: tuple[str, ...] = ("ours", "official")
"""Values of ``model.skeleton_rendering``."""
OFFICIAL_HEATMAP_CUTOFF: float = 4.6025
"""The official heatmaps are zero where ``d = |p - p_k|^2 / (2 sigma^2)`` reaches this."""

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


def official_limb_orientation() -> tuple[tuple[int, int, float], ...]:
    """For each limb of ``LIMBS`` (our order): ``(a, b, sign)``, the official code's direction
    of that limb and ``sign`` = +1 when it is ours, -1 when it runs the other way (the field of
    our limb is ``sign`` times the official one)."""
    out = []
    for a, b in LIMBS:
        if (a, b) in OFFICIAL_LIMBS:
            out.append((a, b, 1.0))
        elif (b, a) in OFFICIAL_LIMBS:
            out.append((b, a, -1.0))
        else:  # pragma: no cover - both tables list the COCO skeleton
            raise AssertionError(f"limb {(a, b)} is not an official limb")
    return tuple(out)


def official_skeleton_channel_map() -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Official skeleton channel order <-> ours: ``(index, sign)`` of length 55 such that
    ``official[c] == sign[c] * ours[index[c]]`` for every official channel c (official order:
    17 heatmaps, then x, y per limb of ``OFFICIAL_LIMBS``; ours: x, y per limb of ``LIMBS``,
    then 17 heatmaps). ``sign`` is -1 on the x and y channels of the 4 leg limbs whose
    direction differs, +1 elsewhere. Conversely ``ours[index[c]] == sign[c] * official[c]``.
    """
    index: list[int] = [NUM_PAF_CHANNELS + k for k in range(NUM_KEYPOINTS)]
    sign: list[float] = [1.0] * NUM_KEYPOINTS
    for a, b in OFFICIAL_LIMBS:
        if (a, b) in LIMBS:
            ours, flip = LIMBS.index((a, b)), 1.0
        else:
            ours, flip = LIMBS.index((b, a)), -1.0
        index += [2 * ours, 2 * ours + 1]
        sign += [flip, flip]
    return tuple(index), tuple(sign)
