"""The torchvision Mask R-CNN baseline: its batch layout, training step and COCO predictions.

The baseline is trained by the same Ray Train loop as Pose2Seg (``model.arch = "maskrcnn"``),
on the same Parquet rows, and evaluated by the same pycocotools code; only what differs lives
here. Unlike Pose2Seg it sees no keypoints: it detects people and segments each detection.

Frames (docs/ARCHITECTURE.md): a row's ``image`` is the unpadded input frame (h, w <=
``input_size``, input = orig * scale), its ``mask_rles`` are in the padded input frame. The
model is fed the unpadded image: with ``min_size = max_size = input_size``
(:func:`pose2seg.model.build_model`) torchvision's own resize is then the identity, and
predictions come back in the same input frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import nn

from pose2seg.backbone import ResNetFPN, load_backbone_state_dict
from pose2seg.config import ModelConfig
from pose2seg.engine import optimise
from pose2seg.inference import PERSON_CATEGORY_ID, encode_rle

__all__ = [
    "MAX_DETECTIONS_PER_IMAGE",
    "DetectionBatch",
    "collate_detection",
    "detection_predict_results",
    "detection_train_step",
    "masks_to_boxes_xyxy",
    "resize_to_original",
]

MAX_DETECTIONS_PER_IMAGE: int = 100
"""COCO's limit of results per image (COCOeval's largest maxDets)."""

PERSON_LABEL: int = 1
"""torchvision's class index of a person (0 is background)."""


@dataclass
class DetectionBatch:
    """B images and their torchvision targets. N_b people of image b (may be 0)."""

    images: list[torch.Tensor]
    """B tensors (3,h_b,w_b) float32 in [0, 1], unpadded input frame (torchvision normalises)."""
    targets: list[dict[str, torch.Tensor]]
    """B dicts: ``boxes`` (N_b,4) float32 xyxy input frame, ``labels`` (N_b,) int64 = 1,
    ``masks`` (N_b,h_b,w_b) uint8 visible masks. People with an empty mask are left out."""
    image_ids: torch.Tensor
    """(B,) long COCO image ids."""

    @property
    def num_people(self) -> int:
        """People with a non-empty mask over all images (sum of N_b)."""
        return sum(int(t["boxes"].shape[0]) for t in self.targets)

    @property
    def num_images(self) -> int:
        """B."""
        return len(self.images)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DetectionBatch:
        """The batch with every tensor on ``device``."""
        return DetectionBatch(
            images=[im.to(device, non_blocking=non_blocking) for im in self.images],
            targets=[
                {k: v.to(device, non_blocking=non_blocking) for k, v in t.items()}
                for t in self.targets
            ],
            image_ids=self.image_ids.to(device, non_blocking=non_blocking),
        )


def masks_to_boxes_xyxy(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of masks in continuous pixel coordinates (COCO convention).

    Pixel (i, j) covers ``[j, j+1) x [i, i+1)``, so a one-pixel mask has a 1 x 1 box (never the
    zero-size box that torchvision rejects).

    Args:
        masks: (N,H,W) bool/uint8, every mask non-empty.

    Returns:
        (N,4) float32 x1, y1, x2, y2.
    """
    masks = np.asarray(masks, dtype=bool)
    boxes = np.zeros((masks.shape[0], 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            raise ValueError(f"mask {i} is empty: it has no box")
        boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def _image_tensor(row: dict[str, Any], *, input_size: int) -> torch.Tensor:
    """A decoded row's unpadded input-frame image: (h,w,3) uint8 -> (3,h,w) float32 in [0, 1]."""
    image_id = int(row["image_id"])
    image = np.asarray(row["image"])
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image {image_id}: image must be (h, w, 3) uint8, got {image.shape} {image.dtype}"
        )
    h, w = image.shape[:2]
    if h > input_size or w > input_size:
        raise ValueError(
            f"image {image_id}: image of size {h}x{w} exceeds data.input_size={input_size}"
        )
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255.0  # a writable copy


def _decode_input_masks(row: dict[str, Any], *, input_size: int, hw: tuple[int, int]) -> np.ndarray:
    """The row's visible masks cropped to the unpadded input frame: (N,h,w) uint8."""
    image_id = int(row["image_id"])
    h, w = hw
    rles = list(row["mask_rles"])
    n = len(np.asarray(row["person_ids"]).reshape(-1))
    if len(rles) != n:
        raise ValueError(f"image {image_id}: {len(rles)} mask_rles for {n} people")
    if n == 0:
        return np.zeros((0, h, w), dtype=np.uint8)
    objs = []
    for rle in rles:
        if isinstance(rle, dict):
            size, counts = [int(s) for s in rle["size"]], rle["counts"]
        else:  # bare counts: the padded input frame is implied (preprocessing/schema.py)
            size, counts = [input_size, input_size], rle
        if size[0] < h or size[1] < w:
            raise ValueError(
                f"image {image_id}: mask_rles of size {size} do not cover the {h}x{w} image"
            )
        objs.append(
            {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
        )
    sizes = {tuple(o["size"]) for o in objs}
    if len(sizes) != 1:
        raise ValueError(f"image {image_id}: mask_rles have different sizes {sorted(sizes)}")
    masks = mask_utils.decode(objs)  # (H_pad, W_pad, N) uint8, Fortran order
    return np.ascontiguousarray(masks.transpose(2, 0, 1)[:, :h, :w])


def collate_detection(rows: list[dict], *, input_size: int) -> DetectionBatch:
    """Decoded Parquet rows (``preprocessing.schema.decode_row``) -> a :class:`DetectionBatch`.

    Args:
        rows: one dict per image with ``image_id``, ``image`` (h,w,3) uint8 unpadded input
            frame, ``mask_rles`` (N RLE dicts, or bare counts, in the padded input frame
            ``input_size x input_size``) and ``person_ids`` (N,). N may be 0.
        input_size: side of the padded input frame (``data.input_size``).

    Returns:
        The batch; boxes are the tight boxes of the visible masks (the Parquet ``bboxes`` are
        annotation boxes in the original frame, and include occluded parts). People whose mask
        is empty (fully occluded or cropped) are left out of the targets.
    """
    if not rows:
        raise ValueError("collate_detection needs at least one row")
    images, targets, image_ids = [], [], []
    for row in rows:
        image = _image_tensor(row, input_size=input_size)
        hw = (int(image.shape[1]), int(image.shape[2]))
        masks = _decode_input_masks(row, input_size=input_size, hw=hw)
        masks = masks[masks.any(axis=(1, 2))]
        images.append(image)
        targets.append(
            {
                "boxes": torch.from_numpy(masks_to_boxes_xyxy(masks)).reshape(-1, 4),
                "labels": torch.full((masks.shape[0],), PERSON_LABEL, dtype=torch.int64),
                "masks": torch.from_numpy(masks),
            }
        )
        image_ids.append(int(row["image_id"]))
    return DetectionBatch(
        images=images, targets=targets, image_ids=torch.tensor(image_ids, dtype=torch.long)
    )


def detection_train_step(
    model: nn.Module,
    batch: DetectionBatch,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    grad_clip_norm: float,
    step: int,
) -> dict[str, float | int]:
    """One optimisation step of Mask R-CNN (model in train mode, batch on its device).

    The same contract as :func:`pose2seg.engine.train_step`; the loss is the sum of
    torchvision's loss dict (RPN objectness and box, classifier, box regression, mask BCE).

    Args:
        model: a torchvision MaskRCNN, or a DDP wrapper of one.
        batch: images and targets.
        optimizer: its optimizer; the lr schedule is stepped by the caller.
        scaler: a GradScaler for fp16 autocast; None for fp32 or bf16.
        autocast_dtype: dtype to autocast the forward pass, or None for fp32.
        grad_clip_norm: clip the global gradient norm to this (0 disables).
        step: global step number, named in the error when the loss is not finite.

    Returns:
        ``{"loss", "num_people", "grad_norm", "loss_classifier", "loss_box_reg", "loss_mask",
        "loss_objectness", "loss_rpn_box_reg"}`` (grad_norm NaN when clipping is disabled).

    Raises:
        FloatingPointError: the loss is NaN or infinite (before any parameter is updated).
    """
    if not batch.images:
        raise ValueError(f"detection_train_step: empty batch at step {step}")
    device_type = batch.images[0].device.type
    with torch.autocast(
        device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    ):
        loss_dict = model(batch.images, batch.targets)
    if not isinstance(loss_dict, dict):
        raise TypeError(
            f"detection_train_step: the model returned {type(loss_dict).__name__} at step {step}, "
            "not a loss dict: is it in train mode?"
        )
    loss = sum(v.float() for v in loss_dict.values())
    grad_norm = optimise(
        model, loss, optimizer, scaler=scaler, grad_clip_norm=grad_clip_norm, step=step
    )
    stats: dict[str, float | int] = {
        "loss": float(loss.detach()),
        "num_people": batch.num_people,
        "grad_norm": grad_norm,
    }
    stats.update({k: float(v.detach()) for k, v in loss_dict.items()})
    return stats


def resize_to_original(
    probs: torch.Tensor, *, scale: float, out_hw: tuple[int, int]
) -> torch.Tensor:
    """Input-frame maps -> original-frame maps, exactly inverting ``input = orig * scale``.

    The original pixel (i, j) samples the input frame at its centre ``((j+0.5) s, (i+0.5) s)``
    (bilinear; 0 outside the map). Resizing to the rounded input size would shift masks by up
    to half an input pixel.

    Args:
        probs: (N,h,w) float maps in the (unpadded) input frame.
        scale: the row's ``scale``.
        out_hw: (orig_height, orig_width).

    Returns:
        (N,orig_height,orig_width) float32.
    """
    if probs.ndim != 3:
        raise ValueError(f"probs must have shape (N, h, w), got {tuple(probs.shape)}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    height, width = int(out_hw[0]), int(out_hw[1])
    n, h, w = probs.shape
    if n == 0:
        return probs.new_zeros((0, height, width), dtype=torch.float32)
    device = probs.device
    # grid_sample's normalised coordinates (align_corners=False): u = 2 x / w - 1.
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * scale * (2.0 / w) - 1.0
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * scale * (2.0 / h) - 1.0
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H,W,2) x, y
    out = F.grid_sample(
        probs[:, None].float(),
        grid.expand(n, height, width, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    return out[:, 0]


def detection_predict_results(
    model: nn.Module, rows: Sequence[dict[str, Any]], *, config: Any, device: torch.device | str
) -> list[dict[str, Any]]:
    """COCO results in the original image frame for decoded Parquet rows.

    Runs in eval mode under ``no_grad`` (the model's mode is restored). Each detection's mask
    probabilities are mapped from the input frame to ``(orig_height, orig_width)`` with the
    row's ``scale`` (:func:`resize_to_original`), thresholded at ``model.mask_threshold`` and
    RLE-encoded; detections whose mask is then empty are dropped (they could only be false
    positives). At most :data:`MAX_DETECTIONS_PER_IMAGE` per image, the highest scores.

    Args:
        model: a torchvision MaskRCNN (not DDP-wrapped).
        rows: decoded rows with ``image_id``, ``image``, ``orig_height``, ``orig_width``,
            ``scale`` (targets are not read).
        config: the :class:`pose2seg.config.Config` (``data.input_size``,
            ``model.mask_threshold``).
        device: where the model is.

    Returns:
        ``{"image_id", "category_id": 1, "segmentation": {"size", "counts"}, "score"}`` dicts.
    """
    if not rows:
        return []
    input_size = int(config.data.input_size)
    threshold = float(config.model.mask_threshold)
    images = [_image_tensor(row, input_size=input_size).to(device) for row in rows]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(images)
    finally:
        model.train(was_training)
    results: list[dict[str, Any]] = []
    for row, output in zip(rows, outputs, strict=True):
        image_id = int(row["image_id"])
        scale = float(row["scale"])
        out_hw = (int(row["orig_height"]), int(row["orig_width"]))
        scores = output["scores"].float()
        order = torch.argsort(scores, descending=True)[:MAX_DETECTIONS_PER_IMAGE]
        if order.numel() == 0:
            continue
        probs = output["masks"][order, 0]  # (N,h,w) probabilities in the input frame
        try:
            masks = resize_to_original(probs, scale=scale, out_hw=out_hw) > threshold
        except ValueError as exc:
            raise ValueError(f"image {image_id}: {exc}") from None
        keep = masks.flatten(1).any(dim=1)
        for rle, score in zip(encode_rle(masks[keep]), scores[order][keep].tolist(), strict=True):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": PERSON_CATEGORY_ID,
                    "segmentation": rle,
                    "score": float(score),
                }
            )
    return results


def build_maskrcnn(config: ModelConfig, *, input_size: int | None = None) -> nn.Module:
    """The baseline network: torchvision's Mask R-CNN on a ResNet-FPN of the config's depth and
    FPN width, two classes (background, person); ``input_size`` fixes its internal resize."""
    import torchvision
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    # torchvision's resnet_fpn_backbone, with the FPN width of the config instead of a fixed
    # 256: both archs then share backbone depth and FPN width (model.fpn_channels = 256 gives
    # torchvision's standard Mask R-CNN). From scratch: trainable BatchNorm everywhere
    # (torchvision freezes it only for pretrained weights), all layers trainable, no download.
    norm_layer = torchvision.ops.FrozenBatchNorm2d if config.freeze_backbone_bn else nn.BatchNorm2d
    resnet = getattr(torchvision.models, f"resnet{config.backbone_depth}")(
        weights=None, norm_layer=norm_layer
    )
    stage2 = resnet.inplanes // 8  # 64 (basic blocks) or 256 (bottlenecks)
    channels = config.fpn_channels
    backbone = BackboneWithFPN(
        resnet,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[stage2, stage2 * 2, stage2 * 4, stage2 * 8],
        out_channels=channels,
        extra_blocks=LastLevelMaxPool(),
    )
    if config.pretrained_source:
        load_maskrcnn_backbone(backbone, config.pretrained_source, depth=config.backbone_depth)
    # The mask head is as wide as the FPN, as torchvision's (256 = 256).
    mask_head = MaskRCNNHeads(channels, (channels,) * 4, 1)
    mask_predictor = MaskRCNNPredictor(channels, channels, 2)
    # torchvision's Kaiming init of the 1x1 logit conv (fan_out = 1, so std sqrt(2)) makes
    # from-scratch logits large: at 256 channels the mask BCE started near 7 and diverged in
    # our runs. Detectron2's init of this layer starts it at log 2.
    nn.init.normal_(mask_predictor.mask_fcn_logits.weight, std=0.001)
    nn.init.zeros_(mask_predictor.mask_fcn_logits.bias)
    sizes = {} if input_size is None else {"min_size": input_size, "max_size": input_size}
    # Two classes (background, person); the box predictor is torchvision's default for them.
    return MaskRCNN(
        backbone,
        num_classes=None,
        box_predictor=FastRCNNPredictor(1024, 2),
        mask_head=mask_head,
        mask_predictor=mask_predictor,
        **sizes,
    )


def load_maskrcnn_backbone(backbone: nn.Module, path: str, *, depth: int) -> None:
    # Reuse the checks of the Pose2Seg backbone, then copy the (identically named) ResNet weights.
    resnet = ResNetFPN(depth=depth, fpn_channels=8)
    load_backbone_state_dict(resnet, path)
    names = set(resnet.resnet_parameters_names())
    state = {
        k: v
        for k, v in resnet.state_dict().items()
        if k in names and not k.endswith("num_batches_tracked")
    }
    backbone.body.load_state_dict(state, strict=False)
