"""Pose templates (k-means over normalised poses) and the per-person Affine-Align assignment.

Numpy only: used by the preprocessing pipeline (stored affines) and by the model's Predictor
(affines at inference). Coordinates follow ``docs/ARCHITECTURE.md``: keypoints are
``(..., K, 3)`` = x, y, visibility in input-frame pixels; an affine ``A (2, 3)`` maps input-frame
coordinates to aligned-frame pixel coordinates, ``[u, v]^T = A @ [x, y, 1]^T``; templates live in
*unit* aligned coordinates (``[0, 1]^2``, multiply by S for pixels).

Choices made here (documented because other parts rely on them):

- **Keypoint weights** in the least-squares fit: 1.0 for visible keypoints (v = 2), 0.5 for
  labelled-but-hidden ones (v = 1, annotators guess their position), 0 for unlabelled ones
  (v = 0, whose coordinates are meaningless, typically ``(0, 0)`` for people cut by the image
  border). COCO's OKS sigmas are *not* used: they would let the five tightly clustered face
  keypoints dominate a whole-body alignment.
- **Template frame**: each template's keypoint extent fills :data:`TEMPLATE_EXTENT` of the
  frame along *each* axis, centred; the rest is margin for limb thickness, the top of the head
  above the eyes and the feet below the ankles. Stretching each axis (rather than keeping the
  pose's aspect) gives a tall, thin body many more RoI pixels across: warping the ground-truth
  masks of the synthetic val split to S = 48 and back scores segm AP 0.78 this way against
  0.55 with an aspect-keeping extent of 0.6 (measured with the preprocessing of this repo).
- **Score** of a (person, template) fit: ``exp(-cost / (2 tau^2))`` with ``tau`` =
  :data:`SCORE_TAU` (unit frame) and ``cost = r^2 + ANISOTROPY_WEIGHT * log(s1 / s2)^2``, where
  ``r`` is the weighted RMS residual in unit coordinates and ``s1 >= s2`` the singular values
  of the affine's linear part. The anisotropy term breaks the ties of exact fits (3 keypoints
  fit any template exactly) in favour of the least distorting template.
- **Degenerate people** (fewer than 3 usable keypoints, or usable keypoints whose spread across
  their main axis is below :data:`MIN_SPREAD_RATIO` of the spread along it) get the keypoint-only
  fallback RoI of :mod:`pose2seg.fallback` with ``template_id = -1`` and ``fallback = True``.

Options of the official implementation (liruilong940607/Pose2Seg), each a config key:

- ``transform="similarity"`` (``model.align_transform``): rotation, uniform scale and shift by
  weighted least squares instead of the full affine; collinear keypoints are then no problem
  (only fewer than 3 usable keypoints are degenerate).
- ``shape="aspect_kept"`` (``model.template_shape``): a template's longer keypoint extent fills
  :data:`TEMPLATE_EXTENT` and the pose keeps its aspect ratio, instead of a per-axis stretch.
- Mirrored templates (``model.mirror_templates``, :func:`mirror_templates`): each template is
  followed by a copy with its left and right joint labels swapped (the same shape seen from the
  other side, a reflection no rotation can reach); the training poses are clustered together
  with their mirror images.
- Templates with missing joints (NaN coordinates, e.g. from the official ``templates.json``,
  :func:`templates_from_json`): a template is only a candidate for a person whose usable
  keypoints it all has, and the fit score is multiplied by the share ``shared / union`` of the
  person's and the template's joints (as the official selection does). Full templates have a
  share of 1, so the selection among them is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pose2seg.fallback import DEFAULT_MIN_SIZE, fallback_affines
from pose2seg.skeleton import FLIP_PAIRS, KEYPOINT_NAMES, NUM_KEYPOINTS

TEMPLATE_EXTENT: float = 0.7
"""Fraction of the aligned frame side covered by a template's keypoint extent, per axis."""
VISIBILITY_WEIGHTS: tuple[float, float, float] = (0.0, 0.5, 1.0)
"""Least-squares weight of a keypoint by its COCO visibility 0 / 1 / 2."""
MIN_SPREAD_RATIO: float = 0.05
"""Usable keypoints whose minor/major standard deviation ratio is below this are collinear."""
SCORE_TAU: float = 0.05
"""Residual scale (unit aligned coordinates) of the fit score."""
ANISOTROPY_WEIGHT: float = 1e-3
"""Weight of the squared log-anisotropy of the affine in the fit cost."""
DEFAULT_BOX_MARGIN: float = 0.25
"""Box fallback: the square around the box is ``(1 + margin) * max(w, h)`` wide."""
MIN_KEYPOINTS_FOR_FIT: int = 8
"""Poses with fewer usable keypoints do not take part in template fitting (if enough others do)."""

OFFICIAL_TEMPLATE_SCALE: float = 1.1
"""Default ``model.template_scale``: ``templates.json`` coordinates are scaled by this around the
frame centre (an older official commit's factor; the official code of the conformance fixture
uses 1.0)."""
TEMPLATE_SHAPES: tuple[str, ...] = ("stretched", "aspect_kept")
ALIGN_TRANSFORMS: tuple[str, ...] = ("affine", "similarity")

_EPS = 1e-12


class DegenerateAlignmentError(ValueError):
    """An affine cannot be estimated: fewer than 3 usable points or (near-)collinear points."""


@dataclass
class Assignment:
    """The result of :func:`assign_templates` for N people.

    Attributes:
        affines: ``(N, 2, 3)`` float32, input frame -> aligned frame (pixels).
        template_ids: ``(N,)`` int32, the chosen template, -1 for box alignment / fallback.
        scores: ``(N,)`` float32 in ``[0, 1]``, fit quality of the chosen template (1 = exact);
            1.0 for box alignment and 0.0 for a fallback.
        fallback: ``(N,)`` bool, True where ``alignment="pose"`` was asked but the person's
            keypoints could not define an affine.
    """

    affines: np.ndarray
    template_ids: np.ndarray
    scores: np.ndarray
    fallback: np.ndarray


def _check_keypoints(keypoints: np.ndarray, name: str = "keypoints") -> np.ndarray:
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.ndim != 3 or keypoints.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"{name} must have shape (N, {NUM_KEYPOINTS}, 3), got {keypoints.shape}")
    usable = keypoints[..., 2] > 0
    bad = usable & ~np.isfinite(keypoints[..., :2]).all(axis=-1)
    if bad.any():
        person, joint = np.argwhere(bad)[0]
        raise ValueError(
            f"{name}: person {person} keypoint {joint} is usable (v > 0) but not finite"
        )
    return keypoints


def keypoint_weights(keypoints: np.ndarray) -> np.ndarray:
    """Least-squares weights ``(..., K)`` from visibilities of ``keypoints (..., K, 3)``."""
    vis = np.clip(np.nan_to_num(np.asarray(keypoints)[..., 2]), 0, 2).astype(np.int64)
    return np.asarray(VISIBILITY_WEIGHTS, dtype=np.float64)[vis]


def normalise_poses(keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Translation-, scale- and rotation-normalised poses, for clustering.

    Each pose is centred on the mean of its usable keypoints, scaled to unit RMS distance from
    that centre and, when a shoulder and a hip are usable, rotated so that the torso axis
    (mid-hip -> mid-shoulder) points up (-y, image convention). Without a torso the rotation is
    left as is.

    Args:
        keypoints: ``(N, K, 3)`` x, y, visibility in pixels.

    Returns:
        poses: ``(N, K, 2)`` float64 normalised coordinates, 0 where not usable.
        usable: ``(N, K)`` bool, ``v > 0``.
    """
    keypoints = _check_keypoints(keypoints)
    usable = keypoints[..., 2] > 0
    xy = np.where(usable[..., None], keypoints[..., :2], 0.0)
    count = usable.sum(axis=1)  # (N,)
    centre = xy.sum(axis=1) / np.maximum(count, 1)[:, None]
    rel = np.where(usable[..., None], xy - centre[:, None, :], 0.0)
    rms = np.sqrt((rel**2).sum(axis=(1, 2)) / np.maximum(count, 1))
    rel = rel / np.where(rms > _EPS, rms, 1.0)[:, None, None]

    def _mid(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        ua, ub = usable[:, a], usable[:, b]
        n = ua.astype(float) + ub.astype(float)
        mid = (rel[:, a] * ua[:, None] + rel[:, b] * ub[:, None]) / np.maximum(n, 1)[:, None]
        return mid, n > 0

    shoulder, has_shoulder = _mid(5, 6)
    hip, has_hip = _mid(11, 12)
    axis = shoulder - hip
    length = np.linalg.norm(axis, axis=1)
    rotate = has_shoulder & has_hip & (length > 1e-6)
    u = axis / np.where(rotate, length, 1.0)[:, None]
    # The rotation taking the unit torso axis u onto (0, -1): [[-uy, ux], [-ux, -uy]].
    rot = np.stack([np.stack([-u[:, 1], u[:, 0]], -1), np.stack([-u[:, 0], -u[:, 1]], -1)], 1)
    rot[~rotate] = np.eye(2)
    poses = np.einsum("nij,nkj->nki", rot, rel)
    poses = np.where(usable[..., None], poses, 0.0)
    return poses, usable


def _pose_distances(poses: np.ndarray, usable: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Mean squared distance over usable keypoints: poses (M,K,2), centres (T,K,2) -> (M,T)."""
    diff = poses[:, None] - centres[None]  # (M, T, K, 2)
    sq = (diff**2).sum(-1) * usable[:, None, :]
    return sq.sum(-1) / np.maximum(usable.sum(-1), 1)[:, None]


def _to_unit_frame(centres: np.ndarray, shape: str = "stretched") -> np.ndarray:
    """Place each template (T,K,2) centred in [0,1]^2, its extent = TEMPLATE_EXTENT per axis
    (``stretched``) or along its longer axis, aspect kept (``aspect_kept``)."""
    lo, hi = centres.min(axis=1), centres.max(axis=1)  # (T, 2)
    if shape == "aspect_kept":
        extent = np.repeat((hi - lo).max(axis=1, keepdims=True), 2, axis=1)
    elif shape == "stretched":
        # A template that is nearly flat along one axis would be stretched without bound.
        extent = np.maximum(hi - lo, 0.25 * (hi - lo).max(axis=1, keepdims=True))
    else:
        raise ValueError(f"template shape must be one of {list(TEMPLATE_SHAPES)}, got {shape!r}")
    scale = TEMPLATE_EXTENT / np.maximum(extent, _EPS)  # (T, 2)
    mid = (lo + hi) / 2
    return (centres - mid[:, None, :]) * scale[:, None, :] + 0.5


def fit_pose_templates(
    keypoints: np.ndarray,
    *,
    num_templates: int,
    seed: int,
    max_iterations: int = 100,
    shape: str = "stretched",
    mirror: bool = False,
) -> np.ndarray:
    """Cluster normalised training poses into ``num_templates`` pose templates (k-means).

    Poses with at least :data:`MIN_KEYPOINTS_FOR_FIT` usable keypoints are clustered (all poses
    with >= 3 usable keypoints when fewer than ``num_templates`` qualify). Missing keypoints are
    handled by masking: distances and cluster means use usable keypoints only; a joint no member
    of a cluster has is filled from the mean over all poses. Initialisation is k-means++ from
    ``np.random.default_rng(seed)``, so the result is a deterministic function of the inputs.
    Templates are ordered by cluster size (largest first).

    Args:
        keypoints: ``(N, K, 3)`` training keypoints (any pixel frame; only shapes matter).
        num_templates: T >= 1.
        seed: seed of the k-means++ initialisation.
        max_iterations: Lloyd iterations at most.
        shape: ``stretched`` (each axis fills :data:`TEMPLATE_EXTENT`) or ``aspect_kept``.
        mirror: cluster the poses together with their mirror images and return each template
            followed by :func:`mirror_templates` of it (2T templates, the official layout).

    Returns:
        ``(T, K, 2)`` (``(2T, K, 2)`` with ``mirror``) float32 templates in unit aligned
        coordinates, upright (head at small y), centred, each with its keypoint extent filling
        :data:`TEMPLATE_EXTENT` of the frame.

    Raises:
        ValueError: bad shapes, or fewer usable poses than ``num_templates``.
    """
    if num_templates < 1:
        raise ValueError(f"num_templates must be >= 1, got {num_templates}")
    poses, usable = normalise_poses(keypoints)
    if mirror:
        # Mirror images: x negated and left/right labels swapped (still upright).
        flipped = _swap_left_right(poses * np.array([-1.0, 1.0]))
        poses = np.concatenate([poses, flipped])
        usable = np.concatenate([usable, _swap_left_right(usable)])
    counts = usable.sum(axis=1)
    keep = counts >= MIN_KEYPOINTS_FOR_FIT
    if keep.sum() < num_templates:
        keep = counts >= 3
    if keep.sum() < num_templates:
        raise ValueError(
            f"fit_pose_templates: {int(keep.sum())} poses with >= 3 usable keypoints among "
            f"{len(counts)}, fewer than num_templates={num_templates}"
        )
    poses, usable = poses[keep], usable[keep]
    weights = usable[..., None].astype(np.float64)
    global_mean = (poses * weights).sum(0) / np.maximum(weights.sum(0), 1)  # (K, 2)

    def _filled(pose: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.where(mask[:, None], pose, global_mean)

    rng = np.random.default_rng(seed)
    m = len(poses)
    centres = np.empty((num_templates, NUM_KEYPOINTS, 2))
    first = int(rng.integers(m))
    centres[0] = _filled(poses[first], usable[first])
    for t in range(1, num_templates):
        d = _pose_distances(poses, usable, centres[:t]).min(axis=1)
        total = d.sum()
        pick = int(rng.choice(m, p=d / total)) if total > _EPS else int(rng.integers(m))
        centres[t] = _filled(poses[pick], usable[pick])

    labels = np.full(m, -1)
    for _ in range(max_iterations):
        dist = _pose_distances(poses, usable, centres)  # (M, T)
        new_labels = dist.argmin(axis=1)
        # An empty cluster takes the pose worst served by its current centre.
        for t in range(num_templates):
            if not (new_labels == t).any():
                worst = int(dist[np.arange(m), new_labels].argmax())
                new_labels[worst] = t
                dist[worst] = 0.0
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        onehot = (labels[:, None] == np.arange(num_templates)[None]).astype(np.float64)  # (M, T)
        sums = np.einsum("mt,mkc->tkc", onehot, poses * weights)
        n = np.einsum("mt,mk->tk", onehot, usable.astype(np.float64))[..., None]
        centres = np.where(n > 0, sums / np.maximum(n, 1), global_mean[None])

    sizes = np.bincount(labels, minlength=num_templates)
    order = np.argsort(-sizes, kind="stable")
    templates = _to_unit_frame(centres[order], shape).astype(np.float32)
    return mirror_templates(templates) if mirror else templates


def _swap_left_right(values: np.ndarray) -> np.ndarray:
    """``values (..., K, ...)`` with the joints of every :data:`FLIP_PAIRS` pair exchanged
    (axis -2 for coordinates ``(..., K, 2)``, axis -1 for flags ``(..., K)``)."""
    out = values.copy()
    axis = -2 if values.ndim >= 2 and values.shape[-1] == 2 else -1
    for a, b in FLIP_PAIRS:
        ia = [slice(None)] * values.ndim
        ib = [slice(None)] * values.ndim
        ia[axis], ib[axis] = a, b
        out[tuple(ia)], out[tuple(ib)] = values[tuple(ib)], values[tuple(ia)]
    return out


def mirror_templates(templates: np.ndarray) -> np.ndarray:
    """``(T, K, 2)`` -> ``(2T, K, 2)``: the templates, then copies with left/right labels swapped.

    The coordinates are not reflected: a swapped copy is the same silhouette with the person
    facing the other way, which the (orientation-preserving) alignment cannot reach by itself.
    This is how the official implementation expands its 3 templates to 6.
    """
    templates = np.asarray(templates, dtype=np.float32)
    if templates.ndim != 3 or templates.shape[1:] != (NUM_KEYPOINTS, 2):
        raise ValueError(
            f"templates must have shape (T, {NUM_KEYPOINTS}, 2), got {templates.shape}"
        )
    return np.concatenate([templates, _swap_left_right(templates)]).astype(np.float32)


def templates_from_json(
    data: Any, *, source: str = "templates.json", scale: float = OFFICIAL_TEMPLATE_SCALE
) -> np.ndarray:
    """Pose templates from a ``templates.json`` (already parsed), in one of two layouts.

    - The official layout (liruilong940607/Pose2Seg ``modeling/templates.json``):
      ``templates``, a list of T flat lists of K * 3 numbers ``x, y, w`` per joint in unit
      coordinates (``w`` = the mean COCO visibility of the joint in the cluster);
      ``vis_threshold``, joints with ``w`` below it are dropped from that template; optional
      ``names`` (the joint order, COCO names, reordered to ours) and other keys (``flip_map``,
      ``connections``, ``minpoints``), which are ignored. Mirrors are not added here (see
      :func:`mirror_templates`).
    - The layout of ``configs/official_templates.json`` (the conformance fixture's
      ``templates.json``): ``templates``, a list of objects whose ``keypoints`` is a K x 3 list
      ``x, y, w``, mirrored copies already included in search order; ``vis_threshold`` and
      ``keypoint_names`` as above.

    Coordinates are scaled by ``scale`` around the frame centre (``model.template_scale``:
    1.0 in the official code at the commit of the fixture; our default 1.1).

    Returns:
        ``(T, K, 2)`` float32, NaN for the dropped joints.

    Raises:
        ValueError: naming ``source`` and what is wrong.
    """
    if not isinstance(data, dict) or not isinstance(data.get("templates"), list):
        raise ValueError(f"{source}: expected a JSON object with a 'templates' list")
    raw = data["templates"]
    if raw and all(isinstance(item, dict) for item in raw):
        if not all("keypoints" in item for item in raw):
            raise ValueError(f"{source}: every template object needs a 'keypoints' list")
        raw = [np.asarray(item["keypoints"], dtype=object).ravel().tolist() for item in raw]
    names = data.get("names", data.get("keypoint_names", list(KEYPOINT_NAMES)))
    threshold = data.get("vis_threshold", 0.0)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise ValueError(f"{source}: vis_threshold must be a number, got {threshold!r}")
    if not isinstance(names, list) or sorted(names) != sorted(KEYPOINT_NAMES):
        raise ValueError(
            f"{source}: names must list the {NUM_KEYPOINTS} COCO keypoints, got {names!r}"
        )
    if not (isinstance(scale, (int, float)) and 0.0 < scale <= 4.0):
        raise ValueError(f"{source}: template scale must be in (0, 4], got {scale!r}")
    try:
        values = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: templates must be lists of numbers") from None
    if values.ndim != 2 or values.shape[1] != NUM_KEYPOINTS * 3 or len(values) < 1:
        raise ValueError(
            f"{source}: templates must be T >= 1 lists of {NUM_KEYPOINTS * 3} numbers "
            f"(x, y, w per joint), got shape {values.shape}"
        )
    if not np.isfinite(values).all():
        raise ValueError(f"{source}: templates hold non-finite numbers")
    values = values.reshape(len(values), NUM_KEYPOINTS, 3)
    values = values[:, [names.index(name) for name in KEYPOINT_NAMES]]
    xy = (values[..., :2] - 0.5) * scale + 0.5
    present = values[..., 2] >= threshold
    if (present.sum(axis=1) < 3).any():
        bad = int(np.argmax(present.sum(axis=1) < 3))
        raise ValueError(
            f"{source}: template {bad} keeps fewer than 3 joints at vis_threshold {threshold}"
        )
    return np.where(present[..., None], xy, np.nan).astype(np.float32)


def templates_include_mirrors(data: Any) -> bool:
    """Whether a parsed ``templates.json`` already lists the mirrored copies (the layout of
    ``configs/official_templates.json``), so none must be added."""
    raw = data.get("templates") if isinstance(data, dict) else None
    return bool(raw) and all(isinstance(item, dict) for item in raw)


def _solve_affines(
    src: np.ndarray, weights: np.ndarray, dst: np.ndarray, *, min_spread_ratio: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least-squares affines from every source pose to every destination pose.

    Args:
        src: ``(N, K, 2)`` source points.
        weights: ``(N, K)`` non-negative weights (0 = point unused).
        dst: ``(T, K, 2)`` destination points.

    Returns:
        affines ``(N, T, 2, 3)``, weighted RMS residuals ``(N, T)``, degenerate ``(N,)`` bool
        (identity affines and infinite residuals there).
    """
    w = np.where(np.isfinite(weights) & (weights > 0), weights, 0.0)
    src = np.where(w[..., None] > 0, src, 0.0)
    wsum = w.sum(axis=1)  # (N,)
    enough = (w > 0).sum(axis=1) >= 3
    mu = (src * w[..., None]).sum(axis=1) / np.maximum(wsum, _EPS)[:, None]  # (N, 2)
    xc = np.where(w[..., None] > 0, src - mu[:, None, :], 0.0)  # (N, K, 2)
    scatter = np.einsum("nk,nki,nkj->nij", w, xc, xc)  # (N, 2, 2)
    a, b, d = scatter[:, 0, 0], scatter[:, 0, 1], scatter[:, 1, 1]
    half_tr = (a + d) / 2
    disc = np.sqrt(np.maximum(half_tr**2 - (a * d - b * b), 0.0))
    lam_max, lam_min = half_tr + disc, np.maximum(half_tr - disc, 0.0)
    spread_ok = (lam_max > _EPS) & (lam_min >= (min_spread_ratio**2) * lam_max)
    degenerate = ~(enough & spread_ok)

    det = np.where(degenerate, 1.0, a * d - b * b)
    inv = np.stack([np.stack([d, -b], -1), np.stack([-b, a], -1)], 1) / det[:, None, None]
    inv[degenerate] = np.eye(2)
    # Centred normal equations decouple: L^T = scatter^-1 (X_c^T W D), t = mean_w(D) - L mu.
    cross = np.einsum("nk,nki,tkj->ntij", w, xc, dst)  # (N, T, 2, 2)
    lin = np.einsum("nij,ntjk->ntki", inv, cross)  # L (N, T, 2, 2), rows = output coords
    dst_mean = np.einsum("nk,tkc->ntc", w, dst) / np.maximum(wsum, _EPS)[:, None, None]
    trans = dst_mean - np.einsum("ntij,nj->nti", lin, mu)
    affines = np.concatenate([lin, trans[..., None]], axis=-1)  # (N, T, 2, 3)

    pred = np.einsum("ntij,nkj->ntki", lin, xc) + dst_mean[:, :, None, :]
    sq = ((pred - dst[None]) ** 2).sum(-1)  # (N, T, K)
    residual = np.sqrt(np.einsum("nk,ntk->nt", w, sq) / np.maximum(wsum, _EPS)[:, None])
    affines[degenerate] = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    residual[degenerate] = np.inf
    return affines, residual, degenerate


def _solve_similarities(
    src: np.ndarray, weights: np.ndarray, dst: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least-squares similarities (rotation, uniform scale, shift; no reflection).

    Same arguments and returns as :func:`_solve_affines`. With ``x`` the centred source points
    and ``y`` the centred destination points, the linear part is ``[[p, -q], [q, p]]`` with
    ``p = sum w x.y / sum w |x|^2`` and ``q = sum w (x_0 y_1 - x_1 y_0) / sum w |x|^2``.
    Degenerate: fewer than 3 weighted points, or all of them at one place.
    """
    w = np.where(np.isfinite(weights) & (weights > 0), weights, 0.0)
    src = np.where(w[..., None] > 0, src, 0.0)
    wsum = w.sum(axis=1)  # (N,)
    mu = (src * w[..., None]).sum(axis=1) / np.maximum(wsum, _EPS)[:, None]  # (N, 2)
    xc = np.where(w[..., None] > 0, src - mu[:, None, :], 0.0)  # (N, K, 2)
    sxx = np.einsum("nk,nkc->n", w, xc * xc)  # (N,)
    degenerate = ((w > 0).sum(axis=1) < 3) | (sxx <= _EPS * np.maximum(wsum, 1.0))
    dst_mean = np.einsum("nk,tkc->ntc", w, dst) / np.maximum(wsum, _EPS)[:, None, None]
    yc = dst[None] - dst_mean[:, :, None, :]  # (N, T, K, 2)
    dot = np.einsum("nk,nkc,ntkc->nt", w, xc, yc)
    cross = np.einsum("nk,nk,ntk->nt", w, xc[..., 0], yc[..., 1]) - np.einsum(
        "nk,nk,ntk->nt", w, xc[..., 1], yc[..., 0]
    )
    denom = np.where(degenerate, 1.0, sxx)[:, None]
    p, q = dot / denom, cross / denom  # (N, T)
    lin = np.stack([np.stack([p, -q], -1), np.stack([q, p], -1)], -2)  # (N, T, 2, 2)
    trans = dst_mean - np.einsum("ntij,nj->nti", lin, mu)
    affines = np.concatenate([lin, trans[..., None]], axis=-1)
    pred = np.einsum("ntij,nkj->ntki", lin, xc) + dst_mean[:, :, None, :]
    sq = ((pred - dst[None]) ** 2).sum(-1)  # (N, T, K)
    residual = np.sqrt(np.einsum("nk,ntk->nt", w, sq) / np.maximum(wsum, _EPS)[:, None])
    affines[degenerate] = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    residual[degenerate] = np.inf
    return affines, residual, degenerate


def estimate_affine(
    src: np.ndarray,
    dst: np.ndarray,
    weights: np.ndarray,
    *,
    min_spread_ratio: float = MIN_SPREAD_RATIO,
) -> tuple[np.ndarray, float]:
    """Weighted least-squares affine ``A`` minimising ``sum_k w_k |A [src_k, 1] - dst_k|^2``.

    Args:
        src: ``(K, 2)`` source points.
        dst: ``(K, 2)`` destination points.
        weights: ``(K,)`` non-negative weights; points with weight 0 are ignored (their
            coordinates may be anything, e.g. NaN).
        min_spread_ratio: points whose weighted minor/major standard deviation ratio is below
            this count as collinear.

    Returns:
        ``A (2, 3)`` float64 and the weighted RMS residual ``sqrt(sum w |A x - y|^2 / sum w)``
        in ``dst`` units.

    Raises:
        ValueError: bad shapes or negative weights.
        DegenerateAlignmentError: fewer than 3 points with positive weight, or collinear points.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if (
        src.ndim != 2
        or src.shape[1] != 2
        or dst.shape != src.shape
        or weights.shape != src.shape[:1]
    ):
        raise ValueError(
            f"estimate_affine: expected src (K,2), dst (K,2), weights (K,), got "
            f"{src.shape}, {dst.shape}, {weights.shape}"
        )
    if (weights < 0).any():
        raise ValueError("estimate_affine: weights must be non-negative")
    used = weights > 0
    if not (np.isfinite(src[used]).all() and np.isfinite(dst[used]).all()):
        raise ValueError("estimate_affine: points with positive weight must be finite")
    if used.sum() < 3:
        raise DegenerateAlignmentError(
            f"estimate_affine: {int(used.sum())} points with positive weight, need at least 3"
        )
    affines, residual, degenerate = _solve_affines(
        src[None],
        weights[None],
        np.where(used[:, None], dst, 0.0)[None],
        min_spread_ratio=min_spread_ratio,
    )
    if degenerate[0]:
        raise DegenerateAlignmentError(
            f"estimate_affine: the {int(used.sum())} weighted points are (near-)collinear "
            f"(spread ratio below {min_spread_ratio})"
        )
    return affines[0, 0], float(residual[0, 0])


def box_affine(
    box_xywh: np.ndarray, *, roi_size: int, margin: float, stretch: bool = False
) -> np.ndarray:
    """Transform mapping a box, enlarged by ``margin``, into the S x S frame.

    ``stretch=False`` (the fallback of degenerate poses): the square of side
    ``(1 + margin) * max(w, h)`` centred on the box (aspect kept) maps onto ``[0, S]^2``; a
    zero-size box (e.g. a single keypoint) uses a 1-pixel side. ``stretch=True`` (the paper's
    bounding-box baseline, like RoIAlign): each side of the enlarged box maps onto S, each
    side floored at a quarter of the longer one so a flat box is not stretched without bound.

    Args:
        box_xywh: ``(4,)`` x, y, w, h in input-frame pixels.
        roi_size: S.
        margin: relative enlargement, >= 0.

    Returns:
        ``A (2, 3)`` float64: uniform scale and translation.
    """
    box = np.asarray(box_xywh, dtype=np.float64)
    if box.shape != (4,) or not np.isfinite(box).all():
        raise ValueError(f"box_affine: box must be 4 finite numbers x, y, w, h, got {box!r}")
    if box[2] < 0 or box[3] < 0:
        raise ValueError(f"box_affine: box width and height must be >= 0, got {box!r}")
    if margin < 0:
        raise ValueError(f"box_affine: margin must be >= 0, got {margin}")
    side = max(float(box[2]), float(box[3]), 1.0 / (1.0 + margin)) * (1.0 + margin)
    sx = sy = roi_size / side
    if stretch:
        sx = roi_size / max(float(box[2]) * (1.0 + margin), side / 4)
        sy = roi_size / max(float(box[3]) * (1.0 + margin), side / 4)
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    return np.array([[sx, 0.0, roi_size / 2 - sx * cx], [0.0, sy, roi_size / 2 - sy * cy]])


def _keypoint_boxes(keypoints: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """``(N, 4)`` xywh boxes of the usable keypoints (NaN for people with none)."""
    x = np.where(usable, keypoints[..., 0], np.nan)
    y = np.where(usable, keypoints[..., 1], np.nan)
    any_ = usable.any(axis=1)
    out = np.full((len(keypoints), 4), np.nan)
    if any_.any():
        x0, y0 = np.nanmin(x[any_], axis=1), np.nanmin(y[any_], axis=1)
        out[any_] = np.stack(
            [x0, y0, np.nanmax(x[any_], axis=1) - x0, np.nanmax(y[any_], axis=1) - y0], -1
        )
    return out


def assign_templates(
    keypoints: np.ndarray,
    templates: np.ndarray,
    *,
    roi_size: int,
    alignment: str,
    boxes: np.ndarray | None = None,
    box_margin: float = DEFAULT_BOX_MARGIN,
    image_hw: tuple[int, int] | None = None,
    fallback_mode: str = "keypoints",
    fallback_min_size: float = DEFAULT_MIN_SIZE,
    transform: str = "affine",
) -> Assignment:
    """Affine-Align: choose each person's template and its affine (vectorised over N and T).

    ``alignment="pose"``: for each person and template, the weighted least-squares affine from
    the person's usable keypoints (weights :data:`VISIBILITY_WEIGHTS`) onto the template; the
    lowest-cost template wins (see the module docstring for the score). People with fewer than
    3 usable keypoints or collinear keypoints get :func:`pose2seg.fallback.fallback_affines`
    (from their keypoints and the image size only, never a box), ``template_id = -1``,
    ``fallback = True``, ``score = 0``. ``alignment="box"``: :func:`box_affine` for everyone.

    Args:
        keypoints: ``(N, K, 3)`` input-frame x, y, visibility. Unusable (v = 0) keypoints are
            ignored whatever their coordinates (people cut by the image border).
        templates: ``(T, K, 2)`` unit aligned coordinates (:func:`fit_pose_templates`).
        roi_size: S, aligned-frame side in pixels.
        alignment: ``"pose"`` or ``"box"``.
        boxes: optional ``(N, 4)`` xywh input-frame boxes used by the box alignment.
        box_margin: margin of :func:`box_affine`.
        image_hw: ``(h, w)`` of the input frame, for the fallback's image-relative RoI size.
        fallback_mode: ``model.fallback``, ``keypoints`` or ``image``.
        fallback_min_size: ``model.fallback_min_size``.
        transform: ``affine`` (full affine) or ``similarity`` (rotation, uniform scale, shift;
            the official implementation), ``model.align_transform``.

    Returns:
        :class:`Assignment` with affines mapping input-frame pixels to aligned-frame pixels.

    Raises:
        ValueError: bad shapes/values, or a person with no usable keypoint and no box (such
            people cannot be aligned: callers reject them beforehand).
    """
    keypoints = _check_keypoints(keypoints)
    n = len(keypoints)
    templates = np.asarray(templates, dtype=np.float64)
    if templates.ndim != 3 or templates.shape[1:] != (NUM_KEYPOINTS, 2) or len(templates) < 1:
        raise ValueError(
            f"templates must have shape (T, {NUM_KEYPOINTS}, 2), got {templates.shape}"
        )
    if alignment not in ("pose", "box"):
        raise ValueError(f"alignment must be 'pose' or 'box', got {alignment!r}")
    if transform not in ALIGN_TRANSFORMS:
        raise ValueError(f"transform must be one of {list(ALIGN_TRANSFORMS)}, got {transform!r}")
    if roi_size < 1:
        raise ValueError(f"roi_size must be >= 1, got {roi_size}")
    usable = keypoints[..., 2] > 0
    if boxes is not None:
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.shape != (n, 4):
            raise ValueError(f"boxes must have shape ({n}, 4), got {boxes.shape}")
    else:
        none = ~usable.any(axis=1)
        if none.any():
            raise ValueError(
                f"assign_templates: person {int(np.argmax(none))} has no usable keypoint and no "
                "box was given; such people cannot be aligned and must be rejected by the caller"
            )
        boxes = _keypoint_boxes(keypoints, usable)

    affines = np.zeros((n, 2, 3))
    template_ids = np.full(n, -1, dtype=np.int32)
    scores = np.ones(n, dtype=np.float32)
    fallback = np.zeros(n, dtype=bool)
    use_box = np.ones(n, dtype=bool)
    if alignment == "pose" and n > 0:
        weights = keypoint_weights(keypoints) * usable
        all_affines, cost, share = _fit_all_templates(
            keypoints[..., :2], weights, templates, transform=transform
        )
        # Maximise fit quality times joint share; with full templates (share 1) that is the
        # lowest cost, and exp(-cost / 2 tau^2) underflowing to 0 never hides a better fit.
        objective = np.where(
            np.isfinite(cost), np.log(np.maximum(share, _EPS)) - cost / (2 * SCORE_TAU**2), -np.inf
        )
        best = objective.argmax(axis=1)
        rows = np.arange(n)
        ok = np.isfinite(objective[rows, best])
        affines[ok] = all_affines[rows, best][ok] * roi_size
        template_ids[ok] = best[ok]
        scores[ok] = (share * np.exp(-cost / (2 * SCORE_TAU**2)))[rows, best][ok]
        scores[~ok] = 0.0
        degenerate = ~ok
        fallback = degenerate.copy()
        # Only a caller-given box can place a person without any usable keypoint.
        use_box = degenerate & ~usable.any(axis=1)
        from_keypoints = degenerate & ~use_box
        if from_keypoints.any():
            affines[from_keypoints] = fallback_affines(
                keypoints[from_keypoints],
                templates,
                roi_size=roi_size,
                image_hw=image_hw,
                mode=fallback_mode,
                min_size=fallback_min_size,
            )
    for i in np.flatnonzero(use_box):
        affines[i] = box_affine(
            boxes[i], roi_size=roi_size, margin=box_margin, stretch=alignment == "box"
        )
    return Assignment(
        affines=affines.astype(np.float32),
        template_ids=template_ids,
        scores=scores.astype(np.float32),
        fallback=fallback,
    )


def _fit_all_templates(
    xy: np.ndarray, weights: np.ndarray, templates: np.ndarray, *, transform: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every person against every template.

    Args:
        xy: ``(N, K, 2)`` input-frame keypoints.
        weights: ``(N, K)`` least-squares weights (0 = unusable).
        templates: ``(T, K, 2)`` unit coordinates, NaN for joints a template does not have.
        transform: ``affine`` or ``similarity``.

    Returns:
        affines ``(N, T, 2, 3)`` into unit coordinates, cost ``(N, T)`` (inf where the fit is
        degenerate or the template lacks one of the person's usable joints) and share
        ``(N, T)`` = shared joints / joints of either.
    """
    present = np.isfinite(templates).all(axis=-1)  # (T, K)
    n, t = len(xy), len(templates)

    def solve(w: np.ndarray, dst: np.ndarray):
        if transform == "similarity":
            return _solve_similarities(xy, w, dst)
        return _solve_affines(xy, w, dst, min_spread_ratio=MIN_SPREAD_RATIO)

    if present.all():
        # Today's path, vectorised over templates.
        all_affines, residual, degenerate = solve(weights, templates)
        residual = np.where(degenerate[:, None], np.inf, residual)
        share = np.ones((n, t))
    else:
        all_affines = np.zeros((n, t, 2, 3))
        residual = np.full((n, t), np.inf)
        person = weights > 0
        share = np.zeros((n, t))
        for j in range(t):
            dst = np.where(present[j][:, None], templates[j], 0.0)[None]
            w = weights * present[j]
            affine_j, residual_j, degenerate_j = solve(w, dst)
            all_affines[:, j] = affine_j[:, 0]
            # A template must hold every usable joint of the person (the official rule).
            lacking = (person & ~present[j]).any(axis=1)
            residual[:, j] = np.where(degenerate_j | lacking, np.inf, residual_j[:, 0])
            union = (person | present[j]).sum(axis=1)
            share[:, j] = (person & present[j]).sum(axis=1) / np.maximum(union, 1)
    sv = np.linalg.svd(all_affines[..., :2], compute_uv=False)  # (N, T, 2)
    log_aniso = np.log(np.maximum(sv[..., 0], _EPS) / np.maximum(sv[..., 1], _EPS))
    cost = residual**2 + ANISOTROPY_WEIGHT * log_aniso**2
    return all_affines, cost, share


def apply_affine(points: np.ndarray, affines: np.ndarray) -> np.ndarray:
    """Map ``points (N, K, 2+)`` through ``affines (N, 2, 3)``; extra columns (visibility) kept."""
    points = np.asarray(points)
    xy = np.einsum("nij,nkj->nki", affines[..., :2], points[..., :2]) + affines[:, None, :, 2]
    return np.concatenate([xy, points[..., 2:]], axis=-1).astype(np.result_type(points, np.float32))
