"""Inference: aligned logits back to image masks, COCO RLE results, and a Predictor that goes
from an image and COCO keypoints to COCO results.

People with no usable keypoint (all v = 0) and no box cannot be aligned (docs/ARCHITECTURE.md):
the Predictor returns no result for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import nn

from pose2seg.batch import normalise_images
from pose2seg.config import ModelConfig
from pose2seg.ops import render_skeleton_features, transform_keypoints, warp_aligned_to_image
from pose2seg.skeleton import NUM_KEYPOINTS
from pose2seg.templates import assign_templates

__all__ = ["Predictor", "encode_rle", "input_frame_size", "logits_to_instances"]

PERSON_CATEGORY_ID: int = 1


def input_frame_size(orig_hw: tuple[int, int], input_size: int) -> tuple[float, int, int]:
    """``(scale, h, w)`` of the input frame: longer side = ``input_size``, input = orig * scale."""
    orig_h, orig_w = int(orig_hw[0]), int(orig_hw[1])
    if orig_h < 1 or orig_w < 1:
        raise ValueError(f"image size must be positive, got {orig_h}x{orig_w}")
    scale = input_size / max(orig_h, orig_w)
    h = min(input_size, max(1, round(orig_h * scale)))
    w = min(input_size, max(1, round(orig_w * scale)))
    return scale, h, w


def logits_to_instances(
    logits: torch.Tensor,
    affines_img_to_aligned: torch.Tensor,
    *,
    out_hw: tuple[int, int],
    threshold: float,
    exclusive: bool = False,
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

    Returns:
        masks: (P,H,W) bool; scores: (P,) float32, the mean probability inside the predicted mask
        (0 when the mask is empty).
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape (P, S, S), got {tuple(logits.shape)}")
    # Probabilities, not logits, are warped: the zero padding outside the RoI then means
    # "not this person" instead of a logit 0 (probability 0.5).
    probs = warp_aligned_to_image(
        torch.sigmoid(logits.float()), affines_img_to_aligned.float(), out_hw=out_hw
    )
    masks = probs > threshold
    if exclusive and probs.shape[0] > 1:
        owner = probs.argmax(dim=0)  # (H,W): the most likely person of each pixel
        masks &= owner[None] == torch.arange(probs.shape[0], device=probs.device)[:, None, None]
    area = masks.flatten(1).sum(1)
    total = (probs * masks).flatten(1).sum(1)
    scores = torch.where(area > 0, total / area.clamp_min(1), torch.zeros_like(total))
    return masks, scores.to(torch.float32)


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
        config: the model section the model was trained with (roi_size, alignment, skeleton
            rendering, mask threshold).
        device: where the model runs.
        input_size: ``data.input_size`` of training: images are resized so their longer side is
            this, as in preprocessing.
    """

    def __init__(
        self,
        model: nn.Module,
        templates: np.ndarray,
        config: ModelConfig,
        device: str | torch.device = "cpu",
        *,
        input_size: int,
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
        self.templates = templates
        self.config = config
        self.input_size = int(input_size)

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
            boxes: optional (N,4) xywh original-frame boxes, used by box alignment and by the
                fallback of people whose keypoints cannot define an affine.

        Returns:
            One ``{"image_id", "category_id": 1, "segmentation": {"size": [H, W], "counts"},
            "score"}`` per alignable person, in the order of ``keypoints``.
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
        """COCO results for several images in one forward pass (see :meth:`predict`)."""
        if len(images) != len(keypoints):
            raise ValueError(f"{len(images)} images but {len(keypoints)} keypoint arrays")
        if image_ids is None:
            image_ids = list(range(len(images)))
        if len(image_ids) != len(images) or (boxes is not None and len(boxes) != len(images)):
            raise ValueError("image_ids and boxes must have one entry per image")
        if not images:
            return []
        size = self.config.roi_size
        padded = torch.zeros((len(images), self.input_size, self.input_size, 3), dtype=torch.uint8)
        per_image = []  # (orig_hw, scale, input-frame affines (N,2,3), input keypoints (N,K,3))
        for b, (image, kpts) in enumerate(zip(images, keypoints, strict=True)):
            image_id = int(image_ids[b])
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"image {image_id}: must be (H, W, 3) uint8, got {image.shape} {image.dtype}"
                )
            kpts = np.asarray(kpts, dtype=np.float32).reshape(-1, NUM_KEYPOINTS, 3)
            scale, h, w = input_frame_size(image.shape[:2], self.input_size)
            padded[b, :h, :w] = _resize(image, h, w)
            kpts_in = kpts.copy()
            kpts_in[..., :2] *= scale
            image_boxes = (
                None if boxes is None or boxes[b] is None else np.asarray(boxes[b], np.float32)
            )
            if image_boxes is not None and image_boxes.shape != (len(kpts), 4):
                raise ValueError(
                    f"image {image_id}: boxes must be ({len(kpts)}, 4), got {image_boxes.shape}"
                )
            keep = (kpts[..., 2] > 0).any(axis=1)
            if image_boxes is not None:
                keep |= image_boxes[:, 2:].max(axis=1) > 0
            affines = np.zeros((0, 2, 3), np.float32)
            if keep.any():
                affines = assign_templates(
                    kpts_in[keep],
                    self.templates,
                    roi_size=size,
                    alignment=self.config.alignment,
                    boxes=None if image_boxes is None else image_boxes[keep] * scale,
                    transform=self.config.align_transform,
                ).affines
            per_image.append((image.shape[:2], scale, affines, kpts_in[keep]))

        batch_index = torch.cat(
            [torch.full((len(a),), b, dtype=torch.long) for b, (_, _, a, _) in enumerate(per_image)]
        ).to(self.device)
        affines = torch.from_numpy(np.concatenate([a for _, _, a, _ in per_image])).to(self.device)
        kpts_in = torch.from_numpy(np.concatenate([k for _, _, _, k in per_image])).to(self.device)
        skeleton = None
        if self.config.skeleton_features != "none":
            skeleton = render_skeleton_features(
                transform_keypoints(kpts_in, affines),
                roi_size=size,
                sigma_px=self.config.heatmap_sigma_px,
                width_px=self.config.paf_width_px,
                hidden_negative=self.config.hidden_keypoints == "negative",
            )
        images_t = normalise_images(padded.to(self.device))
        with torch.no_grad():
            logits = self.model(images_t, batch_index, affines, skeleton)

        results: list[dict[str, Any]] = []
        start = 0
        for b, (orig_hw, scale, image_affines, _) in enumerate(per_image):
            n = len(image_affines)
            if n == 0:
                continue
            # Original -> aligned: input = orig * scale, so the linear part takes the scale.
            to_aligned = affines[start : start + n].clone()
            to_aligned[:, :, :2] *= scale
            masks, scores = logits_to_instances(
                logits[start : start + n],
                to_aligned,
                out_hw=orig_hw,
                threshold=self.config.mask_threshold,
                exclusive=self.config.exclusive_masks,
            )
            for rle, score in zip(encode_rle(masks), scores.tolist(), strict=True):
                results.append(
                    {
                        "image_id": int(image_ids[b]),
                        "category_id": PERSON_CATEGORY_ID,
                        "segmentation": rle,
                        "score": float(score),
                    }
                )
            start += n
        return results


def _resize(image: np.ndarray, h: int, w: int) -> torch.Tensor:
    """(H,W,3) uint8 -> (h,w,3) uint8, antialiased bilinear."""
    if image.shape[:2] == (h, w):
        return torch.from_numpy(np.ascontiguousarray(image))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)
