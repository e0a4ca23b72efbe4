"""The one prediction path (issue 14): a cached input frame gives the Predictor's masks, the
mask score and fallback options, the evaluation protocol and named splits."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pose2seg.config import Config, ConfigError, ModelConfig
from pose2seg.inference import InputFrame, Predictor, logits_to_instances, to_input_frame
from pose2seg.input_frame import input_frame_keypoints, input_frame_size, resize_to_input_frame
from pose2seg.model import Pose2Seg

torch.set_num_threads(2)

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


def person(x0: float, y0: float, height: float) -> np.ndarray:
    xy = STANDING * height + np.array([x0, y0], np.float32)
    return np.concatenate([xy, np.full((len(xy), 1), 2.0, np.float32)], axis=1)


def _predictor(**model) -> Predictor:
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, **model)
    templates = np.stack([STANDING, STANDING * np.float32([1.0, 0.9]) + np.float32([0.0, 0.05])])
    return Predictor(Pose2Seg(config=config), templates, config, "cpu", input_size=64)


def test_a_stored_png_input_frame_gives_the_same_masks_as_the_original_image():
    predictor = _predictor()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    two_keypoints = np.zeros((17, 3), np.float32)
    two_keypoints[[5, 6]] = person(60, 20, 60)[[5, 6]]
    kpts = np.stack([person(10, 5, 70), person(60, 20, 60), two_keypoints])
    direct = predictor.predict(image, kpts, image_id=3)
    # What preprocessing stores: the input-frame image (PNG, lossless) and the scaled keypoints.
    stored, scale = resize_to_input_frame(image, 64)
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="PNG")
    cached = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    frame = InputFrame(
        image_id=3,
        image=cached,
        keypoints=input_frame_keypoints(kpts, input_frame_size((90, 120), 64)[0]),
        orig_hw=(90, 120),
        scale=scale,
    )
    via_cache = predictor.predict_frames([frame])
    assert [r["segmentation"] for r in via_cache] == [r["segmentation"] for r in direct]
    assert [r["score"] for r in via_cache] == [r["score"] for r in direct]
    assert [r["fallback"] for r in direct] == [False, False, True]
    assert [r["person_index"] for r in direct] == [0, 1, 2]
    assert to_input_frame(image, kpts, input_size=64).image.shape == (48, 64, 3)


def test_person_index_skips_people_without_keypoints():
    predictor = _predictor()
    image = np.zeros((64, 64, 3), np.uint8)
    kpts = np.stack([np.zeros((17, 3), np.float32), person(10, 5, 50)])
    results = predictor.predict(image, kpts)
    assert [r["person_index"] for r in results] == [1]


def test_mask_score_one_gives_every_mask_score_one():
    logits = torch.full((2, 8, 8), -10.0)
    logits[0, 2:6, 2:6] = 1.0
    affines = torch.tensor([[[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]]).repeat(2, 1, 1)
    _, mean = logits_to_instances(logits, affines, out_hw=(20, 20), threshold=0.5)
    masks, one = logits_to_instances(logits, affines, out_hw=(20, 20), threshold=0.5, score="one")
    assert 0.5 < float(mean[0]) < 1.0 and float(mean[1]) == 0.0
    assert one.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="score"):
        logits_to_instances(logits, affines, out_hw=(20, 20), threshold=0.5, score="max")
    image = np.zeros((64, 64, 3), np.uint8)
    results = _predictor(mask_score="one").predict(image, person(10, 5, 50)[None])
    assert [r["score"] for r in results] == [1.0]


def test_image_fallback_mode_reaches_the_predictor():
    image = np.zeros((64, 128, 3), np.uint8)
    one = np.zeros((1, 17, 3), np.float32)
    one[0, 0] = [100, 20, 2]
    keypoint_roi = _predictor(fallback="keypoints").predict(image, one)
    whole_image = _predictor(fallback="image").predict(image, one)
    assert keypoint_roi[0]["fallback"] and whole_image[0]["fallback"]
    assert keypoint_roi[0]["segmentation"] != whole_image[0]["segmentation"]


def test_new_config_keys_are_validated():
    cfg = Config().with_overrides(
        {
            "model.mask_score": "one",
            "model.fallback": "image",
            "eval.protocol": "miss",
            "eval.splits": {"test": {"annotations": "t.json", "images": "img"}},
            "eval.default_splits": ["val", "test"],
        }
    )
    assert cfg.eval.splits["test"]["images"] == "img"
    for key, value, match in [
        ("model.mask_score", "max", "model.mask_score"),
        ("model.fallback", "box", "model.fallback"),
        ("model.fallback_min_size", 0.0, "model.fallback_min_size"),
        ("eval.protocol", "strict", "eval.protocol"),
        ("eval.splits", {"test": {"annotations": "t.json"}}, "eval.splits.test"),
        ("eval.default_splits", ["test"], "eval.default_splits"),
    ]:
        with pytest.raises(ConfigError, match=match):
            Config().with_overrides({key: value})
    base = Config()
    assert (
        base.with_overrides({"model.fallback": "image"}).preprocess_key() != base.preprocess_key()
    )
    assert (
        base.with_overrides({"model.mask_score": "one"}).preprocess_key() == base.preprocess_key()
    )


def test_named_splits_resolve_and_unknown_names_fail():
    from workflows.eval_io import split_names, split_paths

    cfg = Config().with_overrides(
        {
            "data.root": "/data/ochuman",
            "eval.splits": {"test": {"annotations": "test.json", "images": "images"}},
        }
    )
    assert split_paths(cfg, "test") == ("/data/ochuman/test.json", "/data/ochuman/images")
    assert split_paths(cfg, "val")[0].endswith("annotations/person_keypoints_val.json")
    assert split_names(cfg) == ["train", "val", "test"]
    with pytest.raises(ValueError, match="unknown split 'tset'.*test"):
        split_paths(cfg, "tset")


def _gt():
    kp = [10, 10, 2] * 17
    return {
        "images": [{"id": 1, "height": 50, "width": 50}],
        "annotations": [
            {"id": 1, "image_id": 1, "iscrowd": 0, "keypoints": kp, "num_keypoints": 17},
            {"id": 2, "image_id": 1, "iscrowd": 0, "keypoints": [0] * 51, "num_keypoints": 0},
            {"id": 3, "image_id": 1, "iscrowd": 0},
            {"id": 4, "image_id": 1, "iscrowd": 1},
        ],
    }


def test_protocol_ignore_turns_people_without_keypoints_into_ignore_regions():
    from workflows.eval_io import gt_keypoints, protocol_gt

    gt = _gt()
    ignore = protocol_gt(gt, "ignore")
    assert [a["iscrowd"] for a in ignore["annotations"]] == [0, 1, 1, 1]
    strict = protocol_gt(gt, "miss")
    assert [a["iscrowd"] for a in strict["annotations"]] == [0, 0, 0, 1]
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 0, 0, 1]  # unchanged
    assert gt_keypoints(gt)[1].shape == (1, 17, 3)
    with pytest.raises(ValueError, match="eval.protocol"):
        protocol_gt(gt, "strict")


def test_evaluate_rejects_an_unknown_split_before_any_cluster_work(capsys):
    from workflows.cli import run_main
    from workflows.evaluate import main

    code = run_main(main, ["--split", "val", "tset", "--set", "data.root=/nonexistent"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown split 'tset'" in err and "val" in err
