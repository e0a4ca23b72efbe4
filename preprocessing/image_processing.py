"""The per-image maths of preprocessing, pure functions testable without Ray: one image
record (pixels and people) -> its Parquet row and its rejections. Resize into the input frame,
template assignment (Affine-Align), skeleton features rendered in the aligned frame, targets
warped into it, masks and ground truth encoded. :mod:`preprocessing.pipeline` runs it in Ray
Data shard tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pose2seg.config import Config
from pose2seg.input_frame import input_frame_keypoints, resize_to_input_frame
from pose2seg.paper_geometry import (
    assign_rois,
    official_input_keypoints,
    orig_to_roi,
    warp_mask_to_roi_official,
    warp_to_official_input_frame,
)
from pose2seg.skeleton import NUM_KEYPOINTS
from pose2seg.templates import apply_affine
from preprocessing import schema
from preprocessing.features import render_quantised_skeleton_features, warp_mask_to_aligned

REASON_BAD_IMAGE_SIZE = "bad_image_size"


@dataclass(frozen=True)
class ShardSettings:
    """What a shard task needs from the config (small and picklable)."""

    split: str
    input_size: int
    roi_size: int
    alignment: str
    heatmap_sigma_px: float
    paf_width_px: float
    image_encoding: str
    keypoint_margin_fraction: float
    fallback: str = "keypoints"
    fallback_min_size: float = 0.25
    align_transform: str = "affine"
    hidden_negative: bool = False
    input_frame: str = "ours"
    template_selection: str = "ours"
    unlabelled_people: str = "drop"
    roi_geometry: str = "ours"
    skeleton_rendering: str = "ours"

    @classmethod
    def from_config(cls, config: Config, split: str) -> ShardSettings:
        return cls(
            split=split,
            input_size=config.data.input_size,
            roi_size=config.model.roi_size,
            alignment=config.model.alignment,
            heatmap_sigma_px=config.model.heatmap_sigma_px,
            paf_width_px=config.model.paf_width_px,
            # Validation predicts from the stored input-frame image (pose2seg.inference): a
            # lossless copy keeps its masks equal to evaluate.py's from the original file.
            image_encoding="png" if split == "val" else config.data.image_encoding,
            fallback=config.model.fallback,
            fallback_min_size=config.model.fallback_min_size,
            keypoint_margin_fraction=config.data.keypoint_margin_fraction,
            align_transform=config.model.align_transform,
            hidden_negative=config.model.hidden_keypoints == "negative",
            input_frame=config.data.input_frame,
            template_selection=config.model.template_selection,
            unlabelled_people=config.model.unlabelled_people,
            roi_geometry=config.model.roi_geometry,
            skeleton_rendering=config.model.skeleton_rendering,
        )


def reject_record(
    split: str, record: Any, annotation_id: int | None, reason: str, detail: str
) -> dict[str, Any]:
    return {
        schema.REJECT_SPLIT: split,
        schema.REJECT_IMAGE_ID: int(record.image_id),
        schema.REJECT_ANNOTATION_ID: annotation_id,
        schema.REJECT_FILE_NAME: str(record.file_name),
        schema.REJECT_REASON: reason,
        schema.REJECT_DETAIL: detail,
    }


def _rle_counts(mask: np.ndarray) -> str:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return rle["counts"].decode("ascii")


def resize_mask(mask: np.ndarray, out_hw: tuple[int, int], padded: int) -> np.ndarray:
    """``(H, W)`` bool -> bilinear (anti-aliased) resize to ``out_hw``, >= 0.5, zero-padded
    bottom/right to ``padded x padded``."""
    from PIL import Image

    h, w = out_hw
    pil = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8) * 255)
    small = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR)) >= 128
    out = np.zeros((padded, padded), dtype=bool)
    out[:h, :w] = small
    return out


def warp_mask_to_input_official(
    mask: np.ndarray, input_matrix: np.ndarray, out_hw: tuple[int, int]
) -> np.ndarray:
    """``(H, W)`` bool -> the official input frame ``out_hw`` by OpenCV (bilinear on 0/1,
    index convention), >= 0.5."""
    import cv2

    warped = cv2.warpAffine(
        np.ascontiguousarray(mask, dtype=np.uint8) * 255,
        np.asarray(input_matrix, np.float32),
        (int(out_hw[1]), int(out_hw[0])),
    )
    return warped >= 128


def _box_max_ious(boxes: np.ndarray) -> np.ndarray:
    """``(N,)`` the largest IoU of each xywh box with any other box (0 for a single box)."""
    n = len(boxes)
    if n < 2:
        return np.zeros(n)
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    iw = np.clip(np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]), 0, None)
    ih = np.clip(np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]), 0, None)
    inter = iw * ih
    area = boxes[:, 2] * boxes[:, 3]
    union = area[:, None] + area[None] - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    np.fill_diagonal(iou, 0.0)
    return iou.max(axis=1)


def process_image(
    record: Any, templates: np.ndarray, settings: ShardSettings
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """One image record -> its encoded Parquet row and its rejections.

    Args:
        record: an ``ImageRecord`` (``image_id, file_name, height, width, pixels (H,W,3) uint8,
            people, crowd``; people carry ``annotation_id, keypoints (K,3), mask (H,W) bool,
            area, bbox (4,) xywh, max_iou | None``).
        templates: ``(T, K, 2)`` unit templates.
        settings: the shard settings.

    Returns:
        ``(row, rejects)``; ``row`` is None when the image itself is rejected. People without a
        usable keypoint are rejected (``no_keypoints``) and added to the ignore regions, unless
        ``model.unlabelled_people = whole_image`` keeps them (whole-image RoI). With
        ``data.input_frame = official`` the stored image is the whole official square frame
        and ``scale`` its ``m1[0, 0]`` (the offset follows from the sizes,
        :func:`pose2seg.paper_geometry.official_input_matrix`).
        ``max_ious`` missing from the annotations are computed from the visible boxes of the
        image's annotated people.
    """
    split = settings.split
    height, width = int(record.height), int(record.width)
    pixels = np.asarray(record.pixels)
    if pixels.ndim != 3 or pixels.shape[:2] != (height, width) or pixels.shape[2] != 3:
        detail = f"pixels {pixels.shape} do not match the annotated size {height}x{width}"
        return None, [reject_record(split, record, None, REASON_BAD_IMAGE_SIZE, detail)]
    # The one resize of the prediction path (pose2seg.input_frame, or the official frame of
    # pose2seg.paper_geometry), so the stored image is the input frame every inference path
    # computes from the original file.
    official_frame = settings.input_frame == "official"
    if official_frame:
        image, input_matrix = warp_to_official_input_frame(pixels, settings.input_size)
        scale = float(input_matrix[0, 0])
    else:
        image, scale = resize_to_input_frame(pixels, settings.input_size)
        input_matrix = np.array([[scale, 0.0, 0.0], [0.0, scale, 0.0]], dtype=np.float32)
    new_hw = (int(image.shape[0]), int(image.shape[1]))

    rejects: list[dict[str, Any]] = []
    ignore = [_rle_counts(np.asarray(c.mask, dtype=bool)) for c in record.crowd]
    all_boxes = np.array([np.asarray(p.bbox, dtype=np.float64) for p in record.people]).reshape(
        -1, 4
    )
    box_ious = _box_max_ious(all_boxes)
    kept, kept_ious = [], []
    for person, box_iou in zip(record.people, box_ious, strict=True):
        kpts = np.asarray(person.keypoints, dtype=np.float32).reshape(NUM_KEYPOINTS, 3)
        if not (kpts[:, 2] > 0).any() and settings.unlabelled_people == "drop":
            rejects.append(
                reject_record(
                    split,
                    record,
                    int(person.annotation_id),
                    schema.REASON_NO_KEYPOINTS,
                    "no usable keypoint (all v = 0): cannot be aligned; kept as an ignore region",
                )
            )
            ignore.append(_rle_counts(np.asarray(person.mask, dtype=bool)))
            continue
        kept.append(person)
        kept_ious.append(box_iou if person.max_iou is None else float(person.max_iou))

    n, size = len(kept), settings.roi_size
    keypoints = np.zeros((n, NUM_KEYPOINTS, 3), dtype=np.float32)
    for i, person in enumerate(kept):
        keypoints[i] = np.asarray(person.keypoints, dtype=np.float32).reshape(NUM_KEYPOINTS, 3)
    if official_frame:
        keypoints = official_input_keypoints(keypoints, input_matrix)
    else:
        keypoints = input_frame_keypoints(keypoints, scale)
    bboxes = np.array([np.asarray(p.bbox, dtype=np.float32) for p in kept]).reshape(n, 4)
    # No ground-truth box: the training targets are warped with the transform inference
    # computes from the keypoints alone (including the fallback of degenerate poses).
    assignment = assign_rois(
        keypoints,
        templates,
        roi_size=size,
        input_size=settings.input_size,
        image_hw=new_hw,
        alignment=settings.alignment,
        selection=settings.template_selection,
        fallback_mode=settings.fallback,
        fallback_min_size=settings.fallback_min_size,
        transform=settings.align_transform,
    )
    official_roi = settings.roi_geometry == "official"
    to_roi = orig_to_roi(assignment.affines, input_matrix) if official_roi else None
    skeleton = render_quantised_skeleton_features(
        apply_affine(keypoints, assignment.affines),
        roi_size=size,
        sigma_px=settings.heatmap_sigma_px,
        width_px=settings.paf_width_px,
        hidden_negative=settings.hidden_negative,
        rendering=settings.skeleton_rendering,
        index_convention=settings.roi_geometry == "official",
    )
    targets = np.zeros((n, size, size), dtype=bool)
    mask_rles, gt_rles = [], []
    for i, person in enumerate(kept):
        mask = np.asarray(person.mask, dtype=bool)
        if to_roi is not None:
            # The official loss's target: the original mask warped by OpenCV (index convention).
            targets[i] = warp_mask_to_roi_official(mask, to_roi[i], size)
        else:
            # Compose original -> input (scale) with input -> aligned: one resampling of the mask.
            from_orig = assignment.affines[i].astype(np.float64)
            from_orig[:, :2] *= scale
            targets[i] = warp_mask_to_aligned(mask, from_orig, size)
        if official_frame:
            mask_rles.append(_rle_counts(warp_mask_to_input_official(mask, input_matrix, new_hw)))
        else:
            mask_rles.append(_rle_counts(resize_mask(mask, new_hw, settings.input_size)))
        gt_rles.append(_rle_counts(mask))
    row = schema.encode_image_row(
        image_id=int(record.image_id),
        file_name=str(record.file_name),
        orig_height=height,
        orig_width=width,
        scale=scale,
        image=image,
        image_encoding=settings.image_encoding,
        person_ids=[int(p.annotation_id) for p in kept],
        keypoints=keypoints,
        affines=assignment.affines,
        template_ids=assignment.template_ids,
        skeleton=skeleton,
        targets=targets,
        mask_rles=mask_rles,
        gt_rles=gt_rles,
        areas=[float(p.area) for p in kept],
        bboxes=bboxes,
        max_ious=kept_ious,
        ignore_rles=ignore,
    )
    return row, rejects


# --------------------------------------------------------------------------------------------
# Shard task (runs in Ray workers)
# --------------------------------------------------------------------------------------------
