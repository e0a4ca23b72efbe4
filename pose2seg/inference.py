"""Inference: the one prediction path from an image and its people's keypoints to COCO results.

:class:`Predictor` is the only code that turns (image, keypoints) into masks and scores:
training-time validation, ``evaluate.py``, ``predict.py``, the Ray Data batch inference and the
MLflow pyfunc all call it (docs/ARCHITECTURE.md, "One prediction path"). It uses nothing of the
ground truth but the keypoints: the affines are estimated from the keypoints here (never the
stored ones of preprocessing), the skeleton features are rendered here in float, and people whose
keypoints cannot define the affine get the keypoint-only fallback (:mod:`pose2seg.fallback`).

The path has two steps, so a cache can enter between them without changing a pixel:
:func:`to_input_frame` (resize the image to the input frame and scale the keypoints, with
:mod:`pose2seg.input_frame`) and :meth:`Predictor.predict_frames` (the network and the warp back).
Preprocessing stores exactly what :func:`resize_to_input_frame` returns (the same function), so validation can
start from the stored input-frame image (lossless PNG) instead of the original file.

People with no usable keypoint (all v = 0) cannot be aligned: the Predictor returns no result
for them, unless ``model.unlabelled_people = whole_image`` (the official code), which gives them
the network's output over the whole-image RoI. The official geometry (``data.input_frame``,
``model.template_selection``, ``model.roi_geometry`` set to ``official``) is
:mod:`pose2seg.paper_geometry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import nn

from pose2seg.batch import normalise_images
from pose2seg.config import Config, ModelConfig
from pose2seg.input_frame import (
    input_frame_keypoints,
    input_frame_size,
    resize_to_input_frame,
)
from pose2seg.ops import render_skeleton_features, transform_keypoints, warp_aligned_to_image
from pose2seg.paper_geometry import (
    assign_rois,
    official_input_keypoints,
    orig_to_roi,
    warp_probs_to_image_official,
    warp_to_official_input_frame,
)
from pose2seg.precision import resolve_precision
from pose2seg.skeleton import NUM_KEYPOINTS
from pose2seg.templates import assign_templates

__all__ = [
    "InputFrame",
    "Predictor",
    "encode_rle",
    "input_frame_keypoints",
    "input_frame_size",
    "logits_to_instances",
    "logits_to_instances_official",
    "official_input_frame",
    "resize_to_input_frame",
    "to_input_frame",
]

PERSON_CATEGORY_ID: int = 1


@dataclass
class InputFrame:
    """One image ready for :meth:`Predictor.predict_frames`."""

    image_id: int
    image: np.ndarray
    """(h,w,3) uint8 input-frame image, unpadded (:func:`resize_to_input_frame`)."""
    keypoints: np.ndarray
    """(N,K,3) float32 input-frame keypoints (:func:`input_frame_keypoints`); people without a
    usable keypoint are allowed and get no result."""
    orig_hw: tuple[int, int]
    """(H, W) of the original image: the masks come out in this frame."""
    scale: float
    """input = orig * scale."""
    input_matrix: np.ndarray | None = None
    """(2,3) float32 original -> input frame in the index convention when the frame is the
    official one (``data.input_frame = official``, :func:`official_input_frame`); None for ours."""


def _checked_image(image: np.ndarray, image_id: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image {image_id}: must be (H, W, 3) uint8, got {image.shape} {image.dtype}"
        )
    return image


def official_input_frame(
    image: np.ndarray, keypoints: np.ndarray, *, input_size: int, image_id: int = 0
) -> InputFrame:
    """The official input frame (:mod:`pose2seg.paper_geometry`): the image centred in the
    ``input_size`` square by OpenCV, the keypoints truncated to integers and mapped alike."""
    image = _checked_image(image, image_id)
    warped, m1 = warp_to_official_input_frame(image, input_size)
    return InputFrame(
        image_id=int(image_id),
        image=warped,
        keypoints=official_input_keypoints(keypoints, m1),
        orig_hw=(int(image.shape[0]), int(image.shape[1])),
        scale=float(m1[0, 0]),
        input_matrix=m1,
    )


def to_input_frame(
    image: np.ndarray,
    keypoints: np.ndarray,
    *,
    input_size: int,
    image_id: int = 0,
    frame: str = "ours",
) -> InputFrame:
    """An original image and its ``(N, K, 3)`` original-frame keypoints -> an :class:`InputFrame`
    (``frame``: ``data.input_frame``, ``ours`` or ``official``)."""
    if frame == "official":
        return official_input_frame(image, keypoints, input_size=input_size, image_id=image_id)
    if frame != "ours":
        raise ValueError(f"input frame must be 'ours' or 'official', got {frame!r}")
    image = _checked_image(image, image_id)
    resized, scale = resize_to_input_frame(image, input_size)
    return InputFrame(
        image_id=int(image_id),
        image=resized,
        keypoints=input_frame_keypoints(keypoints, scale),
        orig_hw=(int(image.shape[0]), int(image.shape[1])),
        scale=float(scale),
    )


def _check_logits(logits: torch.Tensor, score: str) -> None:
    if score not in ("mean_prob", "one"):
        raise ValueError(f"score must be 'mean_prob' or 'one', got {score!r}")
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape (P, S, S), got {tuple(logits.shape)}")


def _threshold_and_score(
    probs: torch.Tensor, *, threshold: float, exclusive: bool, score: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P,H,W) image-frame probabilities -> masks and scores (see :func:`logits_to_instances`)."""
    masks = probs > threshold
    if exclusive and probs.shape[0] > 1:
        owner = probs.argmax(dim=0)  # (H,W): the most likely person of each pixel
        masks &= owner[None] == torch.arange(probs.shape[0], device=probs.device)[:, None, None]
    area = masks.flatten(1).sum(1)
    total = (probs * masks).flatten(1).sum(1)
    scores = torch.where(area > 0, total / area.clamp_min(1), torch.zeros_like(total))
    if score == "one":
        scores = torch.ones_like(scores)
    return masks, scores.to(torch.float32)


def logits_to_instances(
    logits: torch.Tensor,
    affines_img_to_aligned: torch.Tensor,
    *,
    out_hw: tuple[int, int],
    threshold: float,
    exclusive: bool = False,
    score: str = "mean_prob",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp aligned mask logits back to an image frame, threshold them and score them.

    Args:
        logits: (P,S,S) mask logits in the aligned frame.
        affines_img_to_aligned: (P,2,3) output frame -> aligned frame (for the original image:
            input->aligned composed with the original->input scale).
        out_hw: (H, W) of the output frame.
        threshold: probability above which a pixel belongs to the person.
        exclusive: the P people are those of one image and their visible masks must not
            overlap: a pixel above the threshold for several people goes only to the one with
            the highest probability (ties to the first).
        score: ``mean_prob`` (the mean probability inside the predicted mask, 0 when it is
            empty) or ``one`` (every mask scores 1, as the official Pose2Seg code does).

    Returns:
        masks: (P,H,W) bool; scores: (P,) float32.
    """
    _check_logits(logits, score)
    # Probabilities, not logits, are warped: the zero padding outside the RoI then means
    # "not this person" instead of a logit 0 (probability 0.5).
    probs = warp_aligned_to_image(
        torch.sigmoid(logits.float()), affines_img_to_aligned.float(), out_hw=out_hw
    )
    return _threshold_and_score(probs, threshold=threshold, exclusive=exclusive, score=score)


def logits_to_instances_official(
    logits: torch.Tensor,
    orig_to_roi_matrices: np.ndarray,
    *,
    out_hw: tuple[int, int],
    threshold: float,
    exclusive: bool = False,
    score: str = "one",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`logits_to_instances` with the official inverse warp
    (:func:`pose2seg.paper_geometry.warp_probs_to_image_official`, OpenCV, index convention).

    Args:
        logits: (P,S,S) mask logits (the foreground-minus-background difference of a
            two-class head: its sigmoid is the softmax foreground probability).
        orig_to_roi_matrices: (P,2,3) original image -> RoI, index convention.
        out_hw, threshold, exclusive, score: as :func:`logits_to_instances`.
    """
    _check_logits(logits, score)
    probs_roi = torch.sigmoid(logits.detach().float()).cpu().numpy()
    probs = torch.from_numpy(warp_probs_to_image_official(probs_roi, orig_to_roi_matrices, out_hw))
    return _threshold_and_score(probs, threshold=threshold, exclusive=exclusive, score=score)


def encode_rle(masks: np.ndarray | torch.Tensor) -> list[dict[str, Any]]:
    """COCO compressed RLE of each mask, JSON-ready.

    Args:
        masks: (P,H,W) bool.

    Returns:
        P dicts ``{"size": [H, W], "counts": str}``.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (P, H, W), got {masks.shape}")
    if masks.shape[0] == 0:
        return []
    encoded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [
        {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
        for rle in encoded
    ]


class Predictor:
    """COCO instance masks from an image and the COCO keypoints of the people in it.

    Args:
        model: a trained :class:`pose2seg.model.Pose2Seg`.
        templates: (T,K,2) pose templates in unit aligned coordinates (the model artifact's).
        config: the model section the model was trained with (roi_size, alignment, fallback,
            skeleton rendering, mask threshold / exclusivity / score).
        device: where the model runs.
        input_size: ``data.input_size`` of training: images are resized so their longer side is
            this, as in preprocessing.
        precision: the forward pass's precision, one of :data:`pose2seg.config.PRECISIONS`
            (``eval.mixed_precision`` / ``serve.mixed_precision``; resolved for ``device`` by
            :func:`pose2seg.precision.resolve_precision`). Masks are made from fp32 logits.
        input_frame: ``data.input_frame`` of training (``ours`` or ``official``).
    """

    def __init__(
        self,
        model: nn.Module,
        templates: np.ndarray,
        config: ModelConfig,
        device: str | torch.device = "cpu",
        *,
        input_size: int,
        precision: str = "fp32",
        input_frame: str = "ours",
    ) -> None:
        templates = np.asarray(templates, dtype=np.float32)
        if templates.ndim != 3 or templates.shape[1:] != (NUM_KEYPOINTS, 2):
            raise ValueError(
                f"templates must have shape (T, {NUM_KEYPOINTS}, 2), got {templates.shape}"
            )
        if input_size < 32:
            raise ValueError(f"input_size (data.input_size) must be >= 32, got {input_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.precision = resolve_precision(precision, self.device.type)
        self.templates = templates
        self.config = config
        self.input_size = int(input_size)
        if input_frame not in ("ours", "official"):
            raise ValueError(
                f"input_frame (data.input_frame) must be 'ours' or 'official', got {input_frame!r}"
            )
        self.input_frame = input_frame
        # The whole config the model was trained with, when loaded from a checkpoint.
        self.training_config: Config | None = None

    def predict(
        self,
        image: np.ndarray,
        keypoints: np.ndarray,
        *,
        image_id: int = 0,
        boxes: np.ndarray | None = None,
    ) -> list[dict[str, Any]]:
        """COCO results for one image.

        Args:
            image: (H,W,3) uint8 RGB, original size.
            keypoints: (N,K,3) COCO keypoints in original-image pixels.
            image_id: COCO image id written into the results.
            boxes: optional (N,4) xywh original-frame boxes for ``alignment="box"`` (and for
                people without any usable keypoint). The evaluation paths never pass boxes:
                inference uses no ground truth but the keypoints.

        Returns:
            One ``{"image_id", "category_id": 1, "segmentation": {"size": [H, W], "counts"},
            "score", "person_index", "fallback"}`` per alignable person, in the order of
            ``keypoints``: ``person_index`` is the person's position in ``keypoints``,
            ``fallback`` whether their RoI came from :mod:`pose2seg.fallback`.
        """
        return self.predict_batch(
            [image], [keypoints], image_ids=[image_id], boxes=None if boxes is None else [boxes]
        )

    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        keypoints: Sequence[np.ndarray],
        *,
        image_ids: Sequence[int] | None = None,
        boxes: Sequence[np.ndarray | None] | None = None,
    ) -> list[dict[str, Any]]:
        """COCO results for several original images in one forward pass (see :meth:`predict`)."""
        if len(images) != len(keypoints):
            raise ValueError(f"{len(images)} images but {len(keypoints)} keypoint arrays")
        if image_ids is None:
            image_ids = list(range(len(images)))
        if len(image_ids) != len(images) or (boxes is not None and len(boxes) != len(images)):
            raise ValueError("image_ids and boxes must have one entry per image")
        frames = [
            to_input_frame(
                image,
                kpts,
                input_size=self.input_size,
                image_id=int(image_id),
                frame=self.input_frame,
            )
            for image, kpts, image_id in zip(images, keypoints, image_ids, strict=True)
        ]
        frame_boxes = None
        if boxes is not None:
            frame_boxes = []
            for frame, image_boxes in zip(frames, boxes, strict=True):
                if image_boxes is None:
                    frame_boxes.append(None)
                    continue
                image_boxes = np.asarray(image_boxes, np.float32)
                if image_boxes.shape != (len(frame.keypoints), 4):
                    raise ValueError(
                        f"image {frame.image_id}: boxes must be ({len(frame.keypoints)}, 4), "
                        f"got {image_boxes.shape}"
                    )
                frame_boxes.append(image_boxes * frame.scale)
        return self.predict_frames(frames, boxes=frame_boxes)

    def predict_frames(
        self,
        frames: Sequence[InputFrame],
        *,
        boxes: Sequence[np.ndarray | None] | None = None,
    ) -> list[dict[str, Any]]:
        """COCO results (original frames) for images already in the input frame.

        Args:
            frames: from :func:`to_input_frame`, or from a cache holding exactly what it
                returns (the stored input-frame image of preprocessing).
            boxes: optional per-frame (N,4) input-frame boxes (see :meth:`predict`).
        """
        if boxes is not None and len(boxes) != len(frames):
            raise ValueError("boxes must have one entry per frame")
        if not frames:
            return []
        size = self.config.roi_size
        padded = torch.zeros((len(frames), self.input_size, self.input_size, 3), dtype=torch.uint8)
        per_image = []  # (frame, kept person indices, affines (n,2,3), fallback (n,), kpts_in)
        for b, frame in enumerate(frames):
            image = np.asarray(frame.image)
            h, w = image.shape[:2]
            if (
                image.ndim != 3
                or image.shape[2] != 3
                or image.dtype != np.uint8
                or h > self.input_size
                or w > self.input_size
            ):
                raise ValueError(
                    f"image {frame.image_id}: input-frame image must be (h, w, 3) uint8 with "
                    f"h, w <= {self.input_size}, got {image.shape} {image.dtype}"
                )
            padded[b, :h, :w] = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
            kpts_in = np.asarray(frame.keypoints, dtype=np.float32).reshape(-1, NUM_KEYPOINTS, 3)
            image_boxes = None if boxes is None or boxes[b] is None else np.asarray(boxes[b])
            keep = (kpts_in[..., 2] > 0).any(axis=1)
            if self.config.unlabelled_people == "whole_image":
                keep[:] = True
            if image_boxes is not None:
                keep |= image_boxes[:, 2:].max(axis=1) > 0
            index = np.flatnonzero(keep)
            affines = np.zeros((0, 2, 3), np.float32)
            fallback = np.zeros(0, dtype=bool)
            if len(index):
                if image_boxes is None:
                    assignment = assign_rois(
                        kpts_in[index],
                        self.templates,
                        roi_size=size,
                        input_size=self.input_size,
                        image_hw=(h, w),
                        alignment=self.config.alignment,
                        selection=self.config.template_selection,
                        fallback_mode=self.config.fallback,
                        fallback_min_size=self.config.fallback_min_size,
                        transform=self.config.align_transform,
                    )
                else:
                    assignment = assign_templates(
                        kpts_in[index],
                        self.templates,
                        roi_size=size,
                        alignment=self.config.alignment,
                        boxes=image_boxes[index],
                        image_hw=(h, w),
                        fallback_mode=self.config.fallback,
                        fallback_min_size=self.config.fallback_min_size,
                        transform=self.config.align_transform,
                    )
                affines, fallback = assignment.affines, assignment.fallback
            per_image.append((frame, index, affines, fallback, kpts_in[index]))

        batch_index = torch.cat(
            [torch.full((len(p[1]),), b, dtype=torch.long) for b, p in enumerate(per_image)]
        ).to(self.device)
        affines = torch.from_numpy(np.concatenate([p[2] for p in per_image])).to(self.device)
        kpts_in = torch.from_numpy(np.concatenate([p[4] for p in per_image])).to(self.device)
        skeleton = None
        if self.config.skeleton_features != "none":
            skeleton = render_skeleton_features(
                transform_keypoints(kpts_in, affines),
                roi_size=size,
                sigma_px=self.config.heatmap_sigma_px,
                width_px=self.config.paf_width_px,
                hidden_negative=self.config.hidden_keypoints == "negative",
                rendering=self.config.skeleton_rendering,
                index_convention=self.config.roi_geometry == "official",
            )
        images_t = normalise_images(padded.to(self.device))
        dtype = self.precision.dtype
        with (
            torch.no_grad(),
            torch.autocast(
                self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ),
        ):
            logits = self.model(images_t, batch_index, affines, skeleton)
        logits = logits.float()

        results: list[dict[str, Any]] = []
        start = 0
        for frame, index, image_affines, fallback, _ in per_image:
            n = len(image_affines)
            if n == 0:
                continue
            if self.config.roi_geometry == "official":
                input_matrix = frame.input_matrix
                if input_matrix is None:
                    input_matrix = np.array([[frame.scale, 0, 0], [0, frame.scale, 0]])
                masks, scores = logits_to_instances_official(
                    logits[start : start + n],
                    orig_to_roi(image_affines, input_matrix),
                    out_hw=frame.orig_hw,
                    threshold=self.config.mask_threshold,
                    exclusive=self.config.exclusive_masks,
                    score=self.config.mask_score,
                )
            else:
                # Original -> aligned: input = orig * scale, so the linear part takes the scale.
                to_aligned = affines[start : start + n].clone()
                to_aligned[:, :, :2] *= frame.scale
                masks, scores = logits_to_instances(
                    logits[start : start + n],
                    to_aligned,
                    out_hw=frame.orig_hw,
                    threshold=self.config.mask_threshold,
                    exclusive=self.config.exclusive_masks,
                    score=self.config.mask_score,
                )
            for rle, score, person, fell_back in zip(
                encode_rle(masks), scores.tolist(), index.tolist(), fallback.tolist(), strict=True
            ):
                results.append(
                    {
                        "image_id": int(frame.image_id),
                        "category_id": PERSON_CATEGORY_ID,
                        "segmentation": rle,
                        "score": float(score),
                        "person_index": int(person),
                        "fallback": bool(fell_back),
                    }
                )
            start += n
        return results
