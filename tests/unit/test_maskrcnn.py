"""Unit tests of the Mask R-CNN baseline: batches from Parquet rows, train step, predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pose2seg.arch import build_model
from pose2seg.config import Config, ModelConfig
from pose2seg.maskrcnn import (
    MAX_DETECTIONS_PER_IMAGE,
    collate_detection,
    detection_predict_results,
    detection_train_step,
    resize_to_original,
)
from pose2seg.skeleton import NUM_KEYPOINTS, NUM_SKELETON_CHANNELS
from preprocessing.schema import decode_row, encode_image_row

INPUT = 64  # data.input_size of these tests
S = 8


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _row(image_id: int, masks: np.ndarray, *, seed: int = 0) -> dict:
    """A decoded Parquet row: a 48x64 input image (orig 96x128, scale 0.5), masks (N,64,64)
    in the padded input frame."""
    rng = np.random.default_rng(seed)
    n = masks.shape[0]
    encoded = encode_image_row(
        image_id=image_id,
        file_name=f"{image_id}.png",
        orig_height=96,
        orig_width=128,
        scale=0.5,
        image=rng.integers(0, 255, size=(48, INPUT, 3), dtype=np.uint8),
        image_encoding="png",
        person_ids=[image_id * 10 + i for i in range(n)],
        keypoints=np.zeros((n, NUM_KEYPOINTS, 3), np.float32),
        affines=np.zeros((n, 2, 3), np.float32),
        template_ids=[0] * n,
        skeleton=np.zeros((n, NUM_SKELETON_CHANNELS, S, S), np.int8),
        targets=np.zeros((n, S, S), bool),
        mask_rles=[_rle(m) for m in masks],
        gt_rles=[_rle(np.zeros((96, 128), bool)) for _ in range(n)],
        areas=[1.0] * n,
        bboxes=np.zeros((n, 4), np.float32),
        max_ious=[0.0] * n,
        ignore_rles=[],
    )
    return decode_row(encoded, roi_size=S)


def _people_row(image_id: int = 7) -> dict:
    masks = np.zeros((4, INPUT, INPUT), bool)
    masks[0, 10:30, 5:20] = True  # a 15 x 20 rectangle
    masks[1, 40:48, 50:64] = True  # touches the bottom of the 48-row image
    masks[1, 50:60, 50:64] = True  # ... and spills into the padding, which is cropped away
    # masks[2] is empty: fully occluded, left out of the targets.
    masks[3, 33, 7] = True  # a single pixel: a 1 x 1 box, not a degenerate one
    return _row(image_id, masks)


def _empty_row(image_id: int = 8) -> dict:
    return _row(image_id, np.zeros((0, INPUT, INPUT), bool))


@pytest.fixture(scope="module")
def tiny_maskrcnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        ModelConfig(arch="maskrcnn", backbone_depth=18, fpn_channels=16), input_size=INPUT
    )


def test_collate_builds_boxes_and_masks_from_the_rles():
    batch = collate_detection([_people_row(), _empty_row()], input_size=INPUT)
    assert batch.num_images == 2 and batch.num_people == 3
    assert batch.image_ids.tolist() == [7, 8]
    image = batch.images[0]
    assert image.shape == (3, 48, INPUT) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    target = batch.targets[0]
    assert target["boxes"].tolist() == [[5, 10, 20, 30], [50, 40, 64, 48], [7, 33, 8, 34]]
    assert target["labels"].tolist() == [1, 1, 1]
    assert target["masks"].shape == (3, 48, INPUT) and target["masks"].dtype == torch.uint8
    assert target["masks"].flatten(1).sum(1).tolist() == [15 * 20, 8 * 14, 1]
    empty = batch.targets[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["masks"].shape == (0, 48, INPUT)
    moved = batch.to("cpu")
    assert moved.num_people == 3 and torch.equal(moved.targets[0]["boxes"], target["boxes"])


def test_collate_rejects_bad_rows_naming_the_image():
    row = _people_row(image_id=31)
    row["mask_rles"] = row["mask_rles"][:2]
    with pytest.raises(ValueError, match="image 31: 2 mask_rles for 4 people"):
        collate_detection([row], input_size=INPUT)
    with pytest.raises(ValueError, match="image 7: .*exceeds data.input_size=32"):
        collate_detection([_people_row()], input_size=32)


def test_an_image_with_zero_people_trains(tiny_maskrcnn):
    model = tiny_maskrcnn.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = collate_detection([_empty_row()], input_size=INPUT)
    stats = detection_train_step(model, batch, optimizer, grad_clip_norm=5.0, step=0)
    assert stats["num_people"] == 0
    assert math.isfinite(stats["loss"])
    assert stats["loss_mask"] == 0.0  # no positive RoI: nothing to segment


def test_one_train_step_runs_with_a_finite_loss_and_updates_the_weights(tiny_maskrcnn):
    model = tiny_maskrcnn.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    weight = model.roi_heads.mask_head[0][0].weight
    before = weight.detach().clone()
    batch = collate_detection([_people_row(), _empty_row()], input_size=INPUT)
    stats = detection_train_step(model, batch, optimizer, grad_clip_norm=5.0, step=3)
    assert stats["num_people"] == 3
    parts = [stats[k] for k in ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness")]
    assert math.isfinite(stats["loss"]) and stats["loss"] == pytest.approx(
        sum(parts) + stats["loss_rpn_box_reg"], rel=1e-5
    )
    # The small init of the mask logits: the BCE starts near log 2, not at ~7.
    assert 0.3 < stats["loss_mask"] < 1.5
    assert math.isfinite(stats["grad_norm"])
    assert not torch.equal(weight.detach(), before)


class _NaNLossModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, images, targets):
        return {"loss_mask": self.weight * float("nan"), "loss_classifier": self.weight}


def test_a_nan_loss_raises_naming_the_step_before_updating():
    model = _NaNLossModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = collate_detection([_people_row()], input_size=INPUT)
    with pytest.raises(FloatingPointError, match="at step 12"):
        detection_train_step(model, batch, optimizer, grad_clip_norm=0.0, step=12)
    assert model.weight.item() == 1.0


def test_resize_to_original_inverts_the_input_scale_exactly():
    probs = torch.zeros(1, 48, INPUT)
    probs[0, 10:20, 4:12] = 1.0
    out = resize_to_original(probs, scale=0.5, out_hw=(96, 128))
    assert out.shape == (1, 96, 128)
    mask = (out[0] > 0.5).numpy()
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (20, 40, 8, 24)
    assert mask.sum() == 20 * 16


class _FixedDetector(torch.nn.Module):
    """Eval-mode stand-in for torchvision: ``count`` detections per image, every mask the same
    input-frame rectangle, scores increasing with the index."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.seen_training: list[bool] = []

    def forward(self, images):
        self.seen_training.append(self.training)
        outputs = []
        for image in images:
            h, w = image.shape[1:]
            masks = torch.zeros(self.count, 1, h, w)
            masks[:, 0, 10:20, 4:12] = 0.9
            masks[0] = 0.0  # an empty mask after thresholding: dropped
            outputs.append(
                {
                    "boxes": torch.tensor([[4.0, 10.0, 12.0, 20.0]]).repeat(self.count, 1),
                    "labels": torch.ones(self.count, dtype=torch.int64),
                    "scores": torch.linspace(0.01, 0.99, self.count),
                    "masks": masks,
                }
            )
        return outputs


def test_predict_keeps_the_best_100_in_the_original_frame_and_restores_the_mode():
    config = Config()
    config.data.input_size = INPUT
    model = _FixedDetector(count=150).train()
    results = detection_predict_results(model, [_people_row()], config=config, device="cpu")
    assert model.seen_training == [False] and model.training
    assert len(results) == MAX_DETECTIONS_PER_IMAGE
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0.33
    first = results[0]
    assert first["image_id"] == 7 and first["category_id"] == 1
    assert first["segmentation"]["size"] == [96, 128]
    mask = mask_utils.decode(first["segmentation"])
    assert mask.shape == (96, 128)
    assert mask[20:40, 8:24].all() and mask.sum() == 20 * 16


def test_predict_with_the_real_model_gives_original_size_masks(tiny_maskrcnn):
    config = Config()
    config.data.input_size = INPUT
    config.model.mask_threshold = 0.01  # an untrained model: keep its faint masks
    model = tiny_maskrcnn
    model.roi_heads.score_thresh = 0.0  # ... and its unconfident boxes
    try:
        results = detection_predict_results(
            model, [_people_row(), _empty_row()], config=config, device="cpu"
        )
    finally:
        model.roi_heads.score_thresh = 0.05
    assert model.training
    assert results, "an untrained detector with score_thresh 0 should still detect something"
    assert {r["image_id"] for r in results} <= {7, 8}
    for image_id in (7, 8):
        assert sum(r["image_id"] == image_id for r in results) <= MAX_DETECTIONS_PER_IMAGE
    for r in results:
        assert r["segmentation"]["size"] == [96, 128]
        assert mask_utils.decode(r["segmentation"]).shape == (96, 128)
        assert 0.0 <= r["score"] <= 1.0


def test_the_baseline_is_built_from_the_config_without_downloads():
    config = ModelConfig(arch="maskrcnn", backbone_depth=34, fpn_channels=32)
    model = build_model(config, input_size=96)
    assert model.transform.min_size == (96,) and model.transform.max_size == 96
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    assert len(model.backbone.body.layer3) == 6  # ResNet-34: 3-4-6-3 basic blocks
    assert model.backbone.out_channels == 32
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 2
