"""The official Pose2Seg geometry (liruilong940607/Pose2Seg), number for number.

Everything here is the paper-mode side of a config key (``docs/paper_geometry.md``); our own
recipe lives in :mod:`pose2seg.templates`, :mod:`pose2seg.fallback`, :mod:`pose2seg.input_frame`
and :mod:`pose2seg.ops`. The official conventions, as documented by the conformance fixture
(``../shared/data/official_reference/README.md``) and checked against it by
``tests/unit/test_official_geometry.py``:

- **Index convention** (``model.roi_geometry = official``): pixel (column c, row r) has its
  centre at the integer point (c, r) in every frame (original image, input frame, feature map,
  RoI); keypoint coordinates are used as they come. A person's affine (the ``affines`` of the
  rest of the code) then maps input-frame *index* points to RoI *index* points: it is the
  official ``m3 m2`` (feature -> RoI after input -> feature, ``m2 = diag(1/stride)``).
- **Input frame** (``data.input_frame = official``): the keypoints truncated to integers (the
  official loader's int32 array), the image centred in the ``input_size`` square and resampled
  by ``cv2.warpAffine`` (uint8, bilinear, no antialiasing, black border) with the float32
  matrix ``m1`` of :func:`official_input_matrix`. OpenCV decides the pixels: 4.10 reproduces
  the fixture bit for bit (5.x does not), hence the pin in ``constraints.txt``.
- **RoI choice** (``model.template_selection = official``): :func:`official_template_search`.
- **RoI sampling** (``model.roi_geometry = official``): :func:`align_features_official`, the
  net effect of the official 128-grid ``affine_grid`` / ``grid_sample`` with torch 1.0
  semantics (``align_corners=True``) cropped to S: the feature index sampled by RoI pixel
  ``(j, i)`` is ``inverse(m3')(j, i)`` with ``m3'`` = ``m3`` whose translation is multiplied
  by ``(F - 1) / F`` (F = feature-map side, 127/128 for the 512 input).
- **Inverse warp** (``model.roi_geometry = official``): :func:`warp_probs_to_image_official`,
  ``cv2.warpAffine(prob, orig_to_roi, (W, H), WARP_INVERSE_MAP | INTER_LINEAR)``, border 0.

Numpy, OpenCV and torch only (no Ray, no MLflow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from pose2seg.fallback import image_affine
from pose2seg.ops import align_features
from pose2seg.skeleton import NUM_KEYPOINTS
from pose2seg.templates import Assignment, assign_templates

__all__ = [
    "FEATURE_STRIDE",
    "OfficialSearch",
    "align_features_official",
    "assign_rois",
    "official_input_keypoints",
    "official_input_matrix",
    "official_sampling_affines",
    "official_template_search",
    "orig_to_roi",
    "sampling_matrices",
    "truncate_keypoints",
    "warp_mask_to_roi_official",
    "warp_probs_to_image_official",
    "warp_to_official_input_frame",
    "whole_image_feat_to_roi",
]

FEATURE_STRIDE: int = 4
"""Input pixels per feature pixel of the FPN level the model uses (the official ``m2``)."""
MIN_LABELLED: int = 3
"""The official search scores 0 (no template) below this many shared labelled keypoints."""


# ---------------------------------------------------------------------------------------------
# Input frame
# ---------------------------------------------------------------------------------------------


def official_input_matrix(orig_hw: tuple[int, int], input_size: int) -> np.ndarray:
    """``m1 (2, 3)`` float32: original image -> the centred ``input_size`` square (index
    convention): ``s = min(S / W, S / H)`` in float32, ``x' = s x + S / 2 - s W / 2``."""
    height, width = int(orig_hw[0]), int(orig_hw[1])
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = np.float32(min(float(input_size) / width, float(input_size) / height))
    half = np.float32(input_size / 2.0)
    tx = half - scale * np.float32(width) / np.float32(2.0)
    ty = half - scale * np.float32(height) / np.float32(2.0)
    return np.array([[scale, 0.0, tx], [0.0, scale, ty]], dtype=np.float32)


def warp_to_official_input_frame(
    image: np.ndarray, input_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(H, W, 3)`` uint8 -> the ``(input_size, input_size, 3)`` uint8 official input frame
    and its matrix ``m1`` (:func:`official_input_matrix`). Channels are warped independently,
    so RGB in gives the official BGR warp's pixels in RGB order."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    m1 = official_input_matrix(image.shape[:2], input_size)
    warped = cv2.warpAffine(np.ascontiguousarray(image), m1, (int(input_size), int(input_size)))
    return warped, m1


def truncate_keypoints(keypoints: np.ndarray) -> np.ndarray:
    """``(N, K, 3)`` -> float32 with x, y, v truncated toward zero (the official loader keeps
    COCO keypoints in an int32 array)."""
    kpts = np.asarray(keypoints, dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3)
    return np.trunc(kpts).astype(np.int32).astype(np.float32)


def _warp_points_f32(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``(M, 2)`` points through a ``(2|3, 3)`` matrix in float32 (the official arithmetic)."""
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    ext = np.hstack([pts, np.ones((len(pts), 1), np.float32)])
    return (ext @ np.asarray(matrix, np.float32)[:2].T).astype(np.float32)


def _warp_keypoints_f32(keypoints: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    out = np.array(keypoints, dtype=np.float32).reshape(-1, NUM_KEYPOINTS, 3)
    out[..., :2] = _warp_points_f32(out[..., :2].reshape(-1, 2), matrix).reshape(
        -1, NUM_KEYPOINTS, 2
    )
    out[out[..., 2] == 0] = 0.0
    return out


def official_input_keypoints(keypoints: np.ndarray, m1: np.ndarray) -> np.ndarray:
    """``(N, K, 3)`` original-image keypoints -> float32 input-frame keypoints: truncated to
    integers, mapped by ``m1``; unlabelled (v = 0) rows become (0, 0, 0) as in the official
    code."""
    return _warp_keypoints_f32(truncate_keypoints(keypoints), m1)


def _homogeneous(matrix: np.ndarray) -> np.ndarray:
    out = np.eye(3, dtype=np.float64)
    out[:2] = np.asarray(matrix, dtype=np.float64)[:2]
    return out


def orig_to_roi(affines: np.ndarray, input_matrix: np.ndarray) -> np.ndarray:
    """``(P, 2, 3)`` original image -> RoI: the input -> RoI ``affines`` after ``input_matrix``
    ``(2, 3)`` (original -> input), composed in float64 and returned as float32."""
    affines = np.asarray(affines, dtype=np.float64)
    outer = np.concatenate([affines, np.tile([[[0.0, 0.0, 1.0]]], (len(affines), 1, 1))], 1)
    return (outer @ _homogeneous(input_matrix))[:, :2].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# RoI choice
# ---------------------------------------------------------------------------------------------


def whole_image_feat_to_roi(feature_hw: tuple[int, int], roi_size: int) -> np.ndarray:
    """The official whole-image matrix ``(2, 3)`` float32: the whole feature map (the whole
    input frame, padding included), aspect kept and centred, into the S x S RoI
    (``diag(0.5, 0.5)`` for 128 -> 64)."""
    fh, fw = int(feature_hw[0]), int(feature_hw[1])
    scale = min(float(roi_size) / fw, float(roi_size) / fh)
    return np.array(
        [[scale, 0.0, (roi_size - fw * scale) / 2.0], [0.0, scale, (roi_size - fh * scale) / 2.0]],
        dtype=np.float32,
    )


def _solve_similarity_cv2(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity ``x' = a x + b y + c, y' = -b x + a y + d`` from ``src (M, 2)``
    to ``dst (M, 2)``: the official float32 system solved by OpenCV's SVD, ``(2, 3)`` float32."""
    src = np.asarray(src, np.float32)
    dst = np.asarray(dst, np.float32)
    m = len(src)
    lhs = np.zeros((2 * m, 4), np.float32)
    rhs = np.zeros((2 * m, 1), np.float32)
    lhs[0::2, 0], lhs[0::2, 1], lhs[0::2, 2] = src[:, 0], src[:, 1], 1.0
    lhs[1::2, 0], lhs[1::2, 1], lhs[1::2, 3] = src[:, 1], -src[:, 0], 1.0
    rhs[0::2, 0], rhs[1::2, 0] = dst[:, 0], dst[:, 1]
    _, sol = cv2.solve(lhs, rhs, flags=cv2.DECOMP_SVD)
    a, b, c, d = (float(v) for v in sol[:, 0])
    return np.array([[a, b, c], [-b, a, d]], dtype=np.float32)


@dataclass
class OfficialSearch:
    """The official template search for N people over T templates.

    Attributes:
        feat_to_roi: ``(N, 2, 3)`` float32 feature frame -> RoI (the official ``m3``).
        template_ids: ``(N,)`` int32, -1 = whole image.
        scores: ``(N,)`` float64 score of the chosen template (0 for the whole image).
        all_scores: ``(N, T)`` float64 every template's score (0 where it cannot fit).
        all_scales: ``(N, T)`` float64 scale of every template's feature -> RoI matrix (the
            whole-image scale where the score is 0).
    """

    feat_to_roi: np.ndarray
    template_ids: np.ndarray
    scores: np.ndarray
    all_scores: np.ndarray
    all_scales: np.ndarray


def official_template_search(
    keypoints_feat: np.ndarray,
    templates: np.ndarray,
    *,
    roi_size: int,
    feature_hw: tuple[int, int],
) -> OfficialSearch:
    """The official PoseAlign search, person by person, templates in file order.

    For a template, I = the person's labelled keypoints (v > 0) the template has, U = those
    either has. Score 0 if ``|I| < 3`` or a labelled keypoint is missing from the template (the
    "hard" rule); else the similarity fit of :func:`_solve_similarity_cv2` from the feature
    points onto the unit template points (all labelled points weighted alike, v = 1 as v = 2),
    ``error_k = |M p_k - t_k|^2 / 2`` and ``score = mean_k exp(-error_k) * |I| / |U|``. The
    template's matrix is ``diag(S, S) M``; it is taken when its score beats the best taken so
    far AND its scale exceeds the whole-image matrix's scale; none taken -> the whole image
    (:func:`whole_image_feat_to_roi`), score 0.

    Args:
        keypoints_feat: ``(N, K, 3)`` keypoints in the feature frame (x, y, v).
        templates: ``(T, K, 2)`` unit coordinates, NaN for the joints a template lacks.
        roi_size: S.
        feature_hw: ``(h, w)`` of the feature map (128 x 128 for the 512 input).
    """
    kpts = np.asarray(keypoints_feat, dtype=np.float32).reshape(-1, NUM_KEYPOINTS, 3)
    templates = np.asarray(templates, dtype=np.float64)
    if templates.ndim != 3 or templates.shape[1:] != (NUM_KEYPOINTS, 2) or len(templates) < 1:
        raise ValueError(
            f"templates must have shape (T, {NUM_KEYPOINTS}, 2), got {templates.shape}"
        )
    n, t = len(kpts), len(templates)
    present = np.isfinite(templates).all(axis=-1)  # (T, K)
    basic = whole_image_feat_to_roi(feature_hw, roi_size)
    basic_scale = math.sqrt(float(basic[0, 0]) ** 2 + float(basic[0, 1]) ** 2)
    feat_to_roi = np.repeat(basic[None], n, axis=0)
    template_ids = np.full(n, -1, dtype=np.int32)
    scores = np.zeros(n)
    all_scores = np.zeros((n, t))
    all_scales = np.full((n, t), basic_scale)
    to_roi = np.diag([float(roi_size), float(roi_size), 1.0]).astype(np.float32)
    for i in range(n):
        labelled = kpts[i, :, 2] > 0
        best = 0.0
        for j in range(t):
            shared = labelled & present[j]
            if shared.sum() < MIN_LABELLED or (labelled & ~present[j]).any():
                continue
            src, dst = kpts[i, shared, :2], templates[j, shared]
            unit = _solve_similarity_cv2(src, dst)
            diff = _warp_points_f32(src, unit).astype(np.float64) - dst
            error = (diff**2).sum(axis=1) / 2.0
            score = float(np.mean(np.exp(-error)) * shared.sum() / (labelled | present[j]).sum())
            matrix = (to_roi @ _homogeneous(unit).astype(np.float32))[:2]
            scale = math.sqrt(float(matrix[0, 0]) ** 2 + float(matrix[0, 1]) ** 2)
            all_scores[i, j], all_scales[i, j] = score, scale
            if score > best and scale > basic_scale:
                best = score
                feat_to_roi[i] = matrix
                template_ids[i] = j
                scores[i] = score
    return OfficialSearch(feat_to_roi, template_ids, scores, all_scores, all_scales)


def sampling_matrices(feat_to_roi: np.ndarray, feature_hw: tuple[int, int]) -> np.ndarray:
    """``(N, 2, 3)`` the feature -> RoI matrices the official RoI sampling effectively applies:
    the translation of x multiplied by ``(w - 1) / w`` and of y by ``(h - 1) / h``."""
    out = np.array(feat_to_roi, dtype=np.float64)
    out[:, 0, 2] *= (feature_hw[1] - 1) / feature_hw[1]
    out[:, 1, 2] *= (feature_hw[0] - 1) / feature_hw[0]
    return out


def assign_rois(
    keypoints: np.ndarray,
    templates: np.ndarray,
    *,
    roi_size: int,
    input_size: int,
    image_hw: tuple[int, int],
    alignment: str,
    selection: str,
    fallback_mode: str,
    fallback_min_size: float,
    transform: str,
    feature_stride: int = FEATURE_STRIDE,
) -> Assignment:
    """Every person's RoI by ``model.template_selection``.

    ``ours``: :func:`pose2seg.templates.assign_templates`, except that people with no labelled
    keypoint (kept only under ``model.unlabelled_people = whole_image``) get the whole input
    image (:func:`pose2seg.fallback.image_affine`). ``official``: the search of
    :func:`official_template_search` in the feature frame (input / ``feature_stride``); the
    affines are ``m3 m2`` (input index -> RoI index).

    Args:
        keypoints: ``(N, K, 3)`` input-frame keypoints.
        templates: ``(T, K, 2)`` unit templates (NaN = joint absent).
        roi_size: S.
        input_size: side of the (square, padded) input frame the network sees.
        image_hw: ``(h, w)`` of the input-frame image (unpadded).
        alignment, fallback_mode, fallback_min_size, transform: the ``model.*`` keys of
            :func:`pose2seg.templates.assign_templates` (``ours`` only).
        feature_stride: input pixels per feature pixel.
    """
    kpts = np.asarray(keypoints, dtype=np.float32).reshape(-1, NUM_KEYPOINTS, 3)
    n = len(kpts)
    if selection == "official":
        feature_hw = (input_size // feature_stride, input_size // feature_stride)
        kpts_feat = _warp_keypoints_f32(
            kpts, np.array([[1.0 / feature_stride, 0, 0], [0, 1.0 / feature_stride, 0]])
        )
        search = official_template_search(
            kpts_feat, templates, roi_size=roi_size, feature_hw=feature_hw
        )
        affines = search.feat_to_roi.astype(np.float64)
        affines[:, :, :2] /= feature_stride
        return Assignment(
            affines=affines.astype(np.float32),
            template_ids=search.template_ids,
            scores=search.scores.astype(np.float32),
            fallback=search.template_ids < 0,
        )
    if selection != "ours":
        raise ValueError(f"template selection must be 'ours' or 'official', got {selection!r}")
    labelled = (kpts[..., 2] > 0).any(axis=1)
    affines = np.repeat(image_affine(image_hw, roi_size=roi_size)[None], n, 0).astype(np.float32)
    out = Assignment(
        affines=affines,
        template_ids=np.full(n, -1, dtype=np.int32),
        scores=np.zeros(n, dtype=np.float32),
        fallback=np.ones(n, dtype=bool),
    )
    if labelled.any():
        some = assign_templates(
            kpts[labelled],
            templates,
            roi_size=roi_size,
            alignment=alignment,
            image_hw=image_hw,
            fallback_mode=fallback_mode,
            fallback_min_size=fallback_min_size,
            transform=transform,
        )
        if labelled.all():
            return some
        out.affines[labelled] = some.affines
        out.template_ids[labelled] = some.template_ids
        out.scores[labelled] = some.scores
        out.fallback[labelled] = some.fallback
    return out


# ---------------------------------------------------------------------------------------------
# RoI sampling and the inverse warp
# ---------------------------------------------------------------------------------------------


def official_sampling_affines(
    affines: torch.Tensor, *, stride: float, feature_hw: tuple[int, int]
) -> torch.Tensor:
    """The affines (+0.5 convention, :func:`pose2seg.ops.align_features`) that sample exactly
    where the official RoI sampling does.

    The official sampling reads feature index ``S^-1 (j, i)`` for RoI pixel ``(j, i)``, with
    ``S = [L | t']`` the sampling matrix (:func:`sampling_matrices` of ``m3 = [L | t]``, ``m3 =
    affine diag(stride)``). :func:`pose2seg.ops.align_features` reads feature index
    ``A^-1 (j + 1/2, i + 1/2) / stride - 1/2``; equal for ``A = [L / stride | t' - L (1/2, 1/2)
    + 1/2]``. Bilinear weights and the zero padding are the same for both, so only the
    position had to be matched.

    Args:
        affines: (P,2,3) input frame -> RoI, index convention (the official ``m3 m2``).
        stride: input pixels per feature pixel.
        feature_hw: (h, w) of the sampled feature map.

    Returns:
        (P,2,3) float64.
    """
    h, w = feature_hw
    a64 = affines.double()
    lin = a64[:, :, :2]
    trans = a64[:, :, 2].clone()
    trans[:, 0] *= (w - 1) / w
    trans[:, 1] *= (h - 1) / h
    trans = trans - 0.5 * lin.sum(dim=2) * stride + 0.5
    return torch.cat([lin, trans[:, :, None]], dim=2)


def align_features_official(
    features: torch.Tensor,
    batch_index: torch.Tensor,
    affines: torch.Tensor,
    *,
    roi_size: int,
    stride: float,
) -> torch.Tensor:
    """The official RoI sampling: ``(P, C, S, S)`` from ``features (B, C, h, w)``.

    RoI pixel ``(j, i)`` (index) is the bilinear sample, zero outside, of the person's feature
    map at feature index ``inverse(m3')(j, i)``, where ``m3 = affine diag(stride, stride)`` is
    the feature -> RoI matrix and ``m3'`` its translation scaled by ``(w - 1) / w`` (x) and
    ``(h - 1) / h`` (y) (:func:`sampling_matrices`): the net effect of the official 128-grid
    ``affine_grid`` / ``grid_sample`` with ``align_corners=True`` cropped to S. Computed by
    :func:`pose2seg.ops.align_features` with :func:`official_sampling_affines`.

    Args:
        features: (B,C,h,w).
        batch_index: (P,) long, the image of each person.
        affines: (P,2,3) input frame -> RoI, index convention.
        roi_size: S.
        stride: input pixels per feature pixel.
    """
    if features.ndim != 4:
        raise ValueError(f"features must have shape (B, C, h, w), got {tuple(features.shape)}")
    if affines.ndim != 3 or affines.shape[1:] != (2, 3):
        raise ValueError(f"affines must have shape (P, 2, 3), got {tuple(affines.shape)}")
    sampling = official_sampling_affines(
        affines, stride=stride, feature_hw=(features.shape[2], features.shape[3])
    )
    return align_features(
        features, batch_index, sampling.to(affines.dtype), roi_size=roi_size, stride=stride
    )


def warp_probs_to_image_official(
    probs: np.ndarray, orig_to_roi_matrices: np.ndarray, out_hw: tuple[int, int]
) -> np.ndarray:
    """The official inverse warp of foreground probabilities: ``(P, S, S)`` -> ``(P, H, W)``
    float32. The two-channel softmax map ``(1 - p, p)`` is warped with
    ``cv2.warpAffine(..., orig_to_roi, (W, H), WARP_INVERSE_MAP | INTER_LINEAR)``, border 0,
    and its foreground channel returned (threshold it at 0.5 for the official mask)."""
    probs = np.asarray(probs, dtype=np.float32)
    mats = np.asarray(orig_to_roi_matrices, dtype=np.float32)
    if probs.ndim != 3 or mats.shape != (len(probs), 2, 3):
        raise ValueError(
            f"probs must be (P, S, S) and matrices (P, 2, 3), got {probs.shape}, {mats.shape}"
        )
    height, width = int(out_hw[0]), int(out_hw[1])
    out = np.zeros((len(probs), height, width), dtype=np.float32)
    for k, (prob, mat) in enumerate(zip(probs, mats, strict=True)):
        two = np.ascontiguousarray(np.stack([1.0 - prob, prob], axis=-1), dtype=np.float32)
        warped = cv2.warpAffine(
            two,
            mat,
            (width, height),
            flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        out[k] = warped[..., 1]
    return out


def warp_mask_to_roi_official(
    mask: np.ndarray, orig_to_roi_matrix: np.ndarray, size: int
) -> np.ndarray:
    """A ``(H, W)`` original-image mask -> its ``(S, S)`` bool training target, as the official
    training loss builds it: ``cv2.warpAffine`` of the 0/1 uint8 mask (bilinear, rounded)."""
    mask = np.ascontiguousarray(np.asarray(mask, dtype=bool), dtype=np.uint8)
    warped = cv2.warpAffine(mask, np.asarray(orig_to_roi_matrix, np.float32), (size, size))
    return warped > 0
