"""A pose source for images that come without keypoints: torchvision's Keypoint R-CNN.

Pose2Seg segments people given their poses; this stage supplies the poses of a new image.
:func:`build_keypoint_rcnn` builds the network (weights through torchvision's weights API, a
state dict the caller read, or random weights for tests); :class:`KeypointDetector` turns an
image into COCO keypoints ``(N, K, 3)`` in the image's pixels, one row per detected person.

Visibility: a keypoint whose heatmap score is above ``keypoint_score_threshold`` gets v = 2,
any other v = 0 (unlabelled, its x, y kept for inspection). A detected person left with fewer
than 3 usable keypoints is aligned by the same fallback as any such person (the box of the
usable keypoints, ``pose2seg.templates.assign_templates``); one with none gets no mask.

Pure PyTorch + torchvision: reading weights from s3:// is the workflows' business.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pose2seg.skeleton import NUM_KEYPOINTS

__all__ = ["Detections", "KeypointDetector", "build_keypoint_rcnn"]


@dataclass
class Detections:
    """The people found in one image, best score first."""

    keypoints: np.ndarray  # (N, K, 3) float32: x, y in image pixels, v in {0, 2}
    scores: np.ndarray  # (N,) float32 person scores
    boxes: np.ndarray  # (N, 4) float32 xywh in image pixels

    def __len__(self) -> int:
        return len(self.keypoints)


def build_keypoint_rcnn(
    *,
    pretrained: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    max_people: int = 20,
    person_score_threshold: float = 0.5,
) -> nn.Module:
    """torchvision's ``keypointrcnn_resnet50_fpn`` for COCO persons (2 classes, 17 keypoints).

    Args:
        pretrained: load ``KeypointRCNN_ResNet50_FPN_Weights.DEFAULT`` through torchvision's
            weights API (from ``$TORCH_HOME/hub/checkpoints/`` when the file is there, else
            downloaded).
        state_dict: weights to load instead (e.g. the same file read from a local path or S3).
        min_size, max_size: the network's own resize of its input (torchvision's defaults
            800 / 1333).
        max_people: most detections kept per image.
        person_score_threshold: detections scoring below this are dropped.

    With neither ``pretrained`` nor ``state_dict`` the weights are random (tests, benchmarks).
    """
    from torchvision.models.detection import (
        KeypointRCNN_ResNet50_FPN_Weights,
        keypointrcnn_resnet50_fpn,
    )

    if pretrained and state_dict is not None:
        raise ValueError("give either pretrained=True or a state_dict, not both")
    if min_size < 32 or max_size < min_size:
        raise ValueError(f"need 32 <= min_size <= max_size, got {min_size}, {max_size}")
    model = keypointrcnn_resnet50_fpn(
        weights=KeypointRCNN_ResNet50_FPN_Weights.DEFAULT if pretrained else None,
        weights_backbone=None,
        num_classes=2,
        num_keypoints=NUM_KEYPOINTS,
        min_size=min_size,
        max_size=max_size,
        box_detections_per_img=max_people,
        box_score_thresh=person_score_threshold,
    )
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


class KeypointDetector:
    """COCO keypoints of the people in an image.

    Args:
        model: a Keypoint R-CNN (:func:`build_keypoint_rcnn`), in eval mode.
        keypoint_score_threshold: heatmap score above which a keypoint is usable (v = 2).
        device: where the network runs.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        keypoint_score_threshold: float = 0.0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.keypoint_score_threshold = float(keypoint_score_threshold)

    def detect(self, image: np.ndarray) -> Detections:
        """The people of one ``(H, W, 3)`` uint8 RGB image."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """The people of each image (any sizes) in one forward pass."""
        tensors, sizes = [], []
        for i, image in enumerate(images):
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"image {i}: must be (H, W, 3) uint8, got {image.shape} {image.dtype}"
                )
            sizes.append(image.shape[:2])
            tensors.append(
                torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
            )
        if not tensors:
            return []
        with torch.no_grad():
            outputs = self.model([t.to(self.device) for t in tensors])
        return [self._to_detections(out, hw) for out, hw in zip(outputs, sizes, strict=True)]

    def _to_detections(self, out: dict[str, torch.Tensor], hw: tuple[int, int]) -> Detections:
        keep = out["labels"] == 1  # person (the only class of the COCO keypoint model)
        kpts = out["keypoints"][keep].detach().float().cpu().numpy().reshape(-1, NUM_KEYPOINTS, 3)
        kp_scores = out["keypoints_scores"][keep].detach().float().cpu().numpy()
        kp_scores = kp_scores.reshape(-1, NUM_KEYPOINTS)
        kpts = kpts.copy()
        # The heatmaps can place a keypoint a fraction of a pixel outside the image: clip.
        kpts[..., 0] = np.clip(kpts[..., 0], 0.0, float(hw[1]))
        kpts[..., 1] = np.clip(kpts[..., 1], 0.0, float(hw[0]))
        kpts[..., 2] = np.where(kp_scores > self.keypoint_score_threshold, 2.0, 0.0)
        boxes = out["boxes"][keep].detach().float().cpu().numpy().reshape(-1, 4)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        scores = out["scores"][keep].detach().float().cpu().numpy().reshape(-1)
        return Detections(
            keypoints=kpts.astype(np.float32),
            scores=scores.astype(np.float32),
            boxes=xywh.astype(np.float32),
        )
