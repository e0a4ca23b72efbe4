"""Inference: warping back, RLE, and the Predictor from image + keypoints to COCO results."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch import nn

from pose2seg.config import ModelConfig
from pose2seg.inference import Predictor, encode_rle, input_frame_size, logits_to_instances
from pose2seg.model import Pose2Seg

torch.set_num_threads(2)

# A standing person in unit coordinates (x right, y down), COCO keypoint order.
STANDING = np.array(
    [
        [0.50, 0.20], [0.52, 0.18], [0.48, 0.18], [0.54, 0.20], [0.46, 0.20],
        [0.60, 0.30], [0.40, 0.30], [0.65, 0.45], [0.35, 0.45], [0.67, 0.58],
        [0.33, 0.58], [0.56, 0.58], [0.44, 0.58], [0.57, 0.72], [0.43, 0.72],
        [0.57, 0.86], [0.43, 0.86],
    ],
    dtype=np.float32,
)  # fmt: skip
TINY = ModelConfig(fpn_channels=16, seg_channels=16, num_residual_units=1, roi_size=32)


def person(x0: float, y0: float, height: float, *, visibility: float = 2.0) -> np.ndarray:
    """(K,3) keypoints of the standing pose scaled to ``height`` px with its unit square at (x0, y0)."""
    xy = STANDING * height + np.array([x0, y0], np.float32)
    return np.concatenate([xy, np.full((len(xy), 1), visibility, np.float32)], axis=1)


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 21, 34)) > 0.6
    rles = encode_rle(masks)
    assert len(rles) == 3
    for rle, mask in zip(rles, masks, strict=True):
        assert rle["size"] == [21, 34] and isinstance(rle["counts"], str)
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), mask)
    assert encode_rle(np.zeros((0, 5, 5), bool)) == []
    assert encode_rle(torch.from_numpy(masks))[1] == rles[1]


def test_logits_to_instances_places_and_scores_masks():
    logits = torch.full((2, 8, 8), -10.0)
    logits[0, 2:6, 2:6] = 3.0  # a 4x4 square in the aligned frame
    affines = torch.tensor([[[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]]).repeat(
        2, 1, 1
    )  # image = 2x aligned
    masks, scores = logits_to_instances(logits, affines, out_hw=(20, 20), threshold=0.5)
    assert masks.shape == (2, 20, 20) and masks.dtype == torch.bool
    ys, xs = torch.nonzero(masks[0], as_tuple=True)
    # The aligned square [2, 6)^2 is the image square [4, 12)^2 (bilinear edges may shift a pixel).
    assert 3 <= int(xs.min()) <= 5 and 10 <= int(xs.max()) <= 12
    assert 3 <= int(ys.min()) <= 5 and 10 <= int(ys.max()) <= 12
    assert 0.5 < float(scores[0]) <= float(torch.sigmoid(torch.tensor(3.0))) + 1e-6
    assert not masks[1].any() and float(scores[1]) == 0.0


def test_exclusive_masks_give_each_pixel_to_one_person():
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]).repeat(3, 1, 1)
    logits = torch.full((3, 8, 8), -10.0)
    logits[0, :, :5] = 2.0  # person 0: columns 0-4
    logits[1, :, 3:] = 4.0  # person 1: columns 3-7, more confident on the shared columns 3-4
    logits[2, 0, 0] = 1.0  # person 2: one pixel that person 0 holds with more confidence
    shared, _ = logits_to_instances(logits, identity, out_hw=(8, 8), threshold=0.5)
    assert shared[0, :, 3:5].all() and shared[1, :, 3:5].all() and shared[2, 0, 0]
    masks, scores = logits_to_instances(
        logits, identity, out_hw=(8, 8), threshold=0.5, exclusive=True
    )
    assert int((masks.sum(0) > 1).sum()) == 0  # no pixel has two owners
    assert masks[0, 1:7, 1:3].all() and not masks[0, :, 3:].any()
    assert masks[1, 1:7, 3:7].all()
    assert not masks[2].any() and float(scores[2]) == 0.0
    # One person: nothing to share, the same as the independent masks.
    alone, _ = logits_to_instances(
        logits[:1], identity[:1], out_hw=(8, 8), threshold=0.5, exclusive=True
    )
    assert torch.equal(alone[0], shared[0])


def test_input_frame_size():
    assert input_frame_size((480, 640), 256) == (0.4, 192, 256)
    assert input_frame_size((100, 50), 64) == (0.64, 64, 32)


class ConstantLogits(nn.Module):
    """Says "person" over the whole aligned RoI: the warped mask is then the RoI's footprint."""

    def forward(self, images, batch_index, affines, skeleton):
        return torch.full((affines.shape[0], 32, 32), 10.0)


def test_predictor_maps_the_roi_back_to_the_original_frame():
    # At probability 0.5 the warped-back RoI edge is the geometric one (bilinear edges).
    config = dataclasses.replace(TINY, alignment="box", mask_threshold=0.5)
    predictor = Predictor(ConstantLogits(), STANDING[None], config, input_size=64)
    image = np.zeros((90, 120, 3), np.uint8)
    boxes = np.array([[20.0, 10.0, 40.0, 60.0]])
    results = predictor.predict(image, person(20, 10, 60)[None], image_id=7, boxes=boxes)
    assert len(results) == 1
    mask = mask_utils.decode({"size": [90, 120], "counts": results[0]["segmentation"]["counts"]})
    # The box baseline stretches like RoIAlign: the box enlarged by 1.25 (50 x 75) fills the
    # RoI, centred on the box centre (40, 40).
    ys, xs = np.nonzero(mask)
    assert abs(int(mask.sum()) - 50 * 75) < 0.05 * 50 * 75
    assert abs(xs.mean() - 40) < 1.0 and abs(ys.mean() - 40) < 1.0
    assert results[0]["score"] > 0.98  # mean probability; only the edge pixels are below 1


def test_predictor_end_to_end_with_a_tiny_model():
    torch.manual_seed(0)
    model = Pose2Seg(config=TINY)
    templates = np.stack([STANDING, STANDING * np.float32([1.0, 0.9]) + np.float32([0.0, 0.05])])
    predictor = Predictor(model, templates, TINY, "cpu", input_size=64)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    kpts = np.stack([person(10, 5, 70), person(60, 20, 60), np.zeros((17, 3), np.float32)])
    results = predictor.predict(image, kpts, image_id=3)
    assert len(results) == 2, "the person without usable keypoints cannot be aligned"
    for result in results:
        assert result["image_id"] == 3 and result["category_id"] == 1
        assert result["segmentation"]["size"] == [90, 120]
        assert isinstance(result["segmentation"]["counts"], str)
        assert 0.0 <= result["score"] <= 1.0
    # With a box the keypoint-less person falls back to box alignment.
    boxes = np.array([[10, 5, 50, 70], [60, 20, 40, 60], [0, 0, 30, 40]], np.float32)
    assert len(predictor.predict(image, kpts, image_id=3, boxes=boxes)) == 3

    # Batched over images, each result keeps its image id and original size.
    small = rng.integers(0, 256, size=(50, 40, 3), dtype=np.uint8)
    batch = predictor.predict_batch(
        [image, small, small],
        [kpts, person(5, 5, 40)[None], np.zeros((0, 17, 3))],
        image_ids=[3, 4, 5],
    )
    assert [r["image_id"] for r in batch] == [3, 3, 4]
    assert batch[2]["segmentation"]["size"] == [50, 40]
    assert [r["segmentation"] for r in batch[:2]] == [r["segmentation"] for r in results]


def test_predictor_rejects_bad_inputs():
    with pytest.raises(ValueError, match="templates must have shape"):
        Predictor(ConstantLogits(), np.zeros((2, 5, 2)), TINY, input_size=64)
    predictor = Predictor(ConstantLogits(), STANDING[None], TINY, input_size=64)
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict(np.zeros((10, 10, 3), np.float32), person(0, 0, 10)[None])
