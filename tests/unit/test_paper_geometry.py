"""The paper-mode geometry keys (issue 24) without the reference fixture: defaults unchanged,
paper.yaml selects the official values, each key reaches preprocessing and the Predictor."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pose2seg.config import Config, ConfigError, load_config
from pose2seg.skeleton import NUM_KEYPOINTS

ROOT = Path(__file__).resolve().parents[2]
KEYS = {
    "data.input_frame": ("ours", "official"),
    "model.template_scale": (1.1, 1.0),
    "model.template_selection": ("ours", "official"),
    "model.unlabelled_people": ("drop", "whole_image"),
    "model.roi_geometry": ("ours", "official"),
    "model.mask_score": ("mean_prob", "one"),
}


def _official_templates() -> np.ndarray:
    from pose2seg.templates import templates_from_json

    data = json.loads((ROOT / "configs" / "official_templates.json").read_text())
    return templates_from_json(data, scale=1.0)


def test_defaults_are_ours_and_paper_yaml_is_official():
    flat = Config().to_flat()
    paper = load_config(str(ROOT / "configs" / "paper.yaml")).to_flat()
    default_yaml = load_config(str(ROOT / "configs" / "default.yaml")).to_flat()
    for key, (ours, official) in KEYS.items():
        assert flat[key] == ours, key
        assert default_yaml[key] == ours, key
        assert paper[key] == official, key
    assert paper["model.templates_file"] == "configs/official_templates.json"


def test_each_preprocessing_key_names_its_own_variant():
    base = Config()
    for key, (_, official) in KEYS.items():
        if key == "model.mask_score":
            continue
        overrides = {key: official}
        if key in ("data.input_frame", "model.roi_geometry"):
            overrides.update({"model.roi_geometry": "official"})
        if key != "model.template_selection" and "official" in str(overrides.values()):
            overrides["model.template_selection"] = "official"
        changed = base.with_overrides(overrides)
        assert changed.preprocess_key() != base.preprocess_key(), key


def test_official_conventions_are_checked_together():
    with pytest.raises(ConfigError, match="data.input_frame"):
        Config().with_overrides({"data.input_frame": "official"})
    with pytest.raises(ConfigError, match="model.roi_geometry"):
        Config().with_overrides({"model.roi_geometry": "official"})
    with pytest.raises(ConfigError, match="data.input_size"):
        Config().with_overrides({"model.template_selection": "official", "data.input_size": 90})
    for key, value in (
        ("model.template_selection", "best"),
        ("model.unlabelled_people", "keep"),
        ("model.template_scale", 0.0),
    ):
        with pytest.raises(ConfigError, match=key):
            Config().with_overrides({key: value})


def test_template_scale_and_a_file_that_lists_its_mirrors():
    from pose2seg.templates import templates_from_json
    from preprocessing.pipeline import _build_templates

    data = json.loads((ROOT / "configs" / "official_templates.json").read_text())
    at_one = templates_from_json(data, scale=1.0)
    at_ours = templates_from_json(data)
    np.testing.assert_allclose(at_ours, (at_one - 0.5) * 1.1 + 0.5, atol=1e-6)
    config = load_config(
        str(ROOT / "configs" / "paper.yaml"),
        [f"model.templates_file={ROOT / 'configs' / 'official_templates.json'}"],
    )
    built = _build_templates(config, np.zeros((0, NUM_KEYPOINTS, 3)))
    # mirror_templates is on in paper.yaml, but the file already holds the 6 in search order.
    np.testing.assert_array_equal(built, at_one)


def _tiny_paper_config(**overrides) -> Config:
    sets = {
        "model.templates_file": str(ROOT / "configs" / "official_templates.json"),
        "model.pretrained_backbone": "none",
        "model.backbone_depth": 18,
        "model.fpn_channels": 16,
        "model.seg_channels": 8,
        "model.num_residual_units": 1,
        "model.seg_block": "basic",
        "model.seg_style": "ours",  # the official SegModule is bottleneck-only
        "model.roi_size": 16,
        "data.input_size": 64,
        **overrides,
    }
    return load_config(str(ROOT / "configs" / "paper.yaml"), [f"{k}={v}" for k, v in sets.items()])


def _person(rng: np.random.Generator, templates: np.ndarray, *, offset: float) -> np.ndarray:
    kpts = np.zeros((NUM_KEYPOINTS, 3), np.float32)
    kpts[:, :2] = templates[0] * 60 + offset + rng.uniform(-1, 1, (NUM_KEYPOINTS, 2))
    kpts[:, 2] = 2
    return kpts


def test_unlabelled_people_get_the_whole_image_or_are_dropped():
    from pose2seg.inference import Predictor
    from pose2seg.model import Pose2Seg

    templates = _official_templates()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    kpts = np.stack([_person(rng, templates, offset=10.0), np.zeros((NUM_KEYPOINTS, 3))])
    for overrides, kept in (
        ({}, [0, 1]),
        (
            {
                "data.input_frame": "ours",
                "model.roi_geometry": "ours",
                "model.template_selection": "ours",
                "model.unlabelled_people": "drop",
            },
            [0],
        ),
        ({"data.input_frame": "ours", "model.roi_geometry": "ours"}, [0, 1]),
    ):
        config = _tiny_paper_config(**overrides)
        torch.manual_seed(0)
        predictor = Predictor(
            Pose2Seg(config=config.model),
            templates,
            config.model,
            input_size=config.data.input_size,
            input_frame=config.data.input_frame,
        )
        results = predictor.predict(image, kpts)
        assert [r["person_index"] for r in results] == kept, overrides
        assert results[-1]["fallback"] == (len(kept) == 2)
        assert results[0]["segmentation"]["size"] == [90, 120]


def test_preprocessing_builds_the_official_frame_targets_and_keeps_unlabelled_people():
    import cv2

    from pose2seg.paper_geometry import official_input_matrix, orig_to_roi
    from preprocessing import schema
    from preprocessing.image_processing import ShardSettings, process_image

    templates = _official_templates()
    rng = np.random.default_rng(1)
    height, width = 90, 120
    labelled = _person(rng, templates, offset=12.3)
    mask = np.zeros((height, width), bool)
    mask[15:75, 30:70] = True

    def person(ann_id, kpts):
        return SimpleNamespace(
            annotation_id=ann_id,
            keypoints=kpts,
            mask=mask,
            area=float(mask.sum()),
            bbox=np.array([30, 15, 40, 60], np.float32),
            max_iou=None,
        )

    record = SimpleNamespace(
        image_id=7,
        file_name="x.png",
        height=height,
        width=width,
        pixels=rng.integers(0, 255, (height, width, 3), dtype=np.uint8),
        people=[person(1, labelled), person(2, np.zeros((NUM_KEYPOINTS, 3), np.float32))],
        crowd=[],
    )
    config = _tiny_paper_config()
    row, rejects = process_image(record, templates, ShardSettings.from_config(config, "train"))
    assert rejects == []
    decoded = schema.decode_row(row, roi_size=16)
    assert decoded[schema.IMAGE].shape == (64, 64, 3)  # the whole centred square
    m1 = official_input_matrix((height, width), 64)
    expected_kpts = np.trunc(labelled).astype(np.float32)
    expected_kpts[:, :2] = expected_kpts[:, :2] @ m1[:, :2].T + m1[:, 2]
    np.testing.assert_allclose(decoded[schema.KEYPOINTS][0], expected_kpts, atol=1e-4)
    assert decoded[schema.TEMPLATE_IDS].tolist()[1] == -1
    affines = decoded[schema.AFFINES]
    # The unlabelled person: the whole input frame, (64 / 4) -> 16 at scale 1, index convention.
    np.testing.assert_allclose(affines[1], [[0.25, 0, 0], [0, 0.25, 0]], atol=1e-7)
    to_roi = orig_to_roi(affines, m1)
    for i in range(2):
        warped = cv2.warpAffine(mask.astype(np.uint8), to_roi[i], (16, 16)) > 0
        np.testing.assert_array_equal(decoded[schema.TARGETS][i], warped)
    ours, _ = process_image(
        record, templates, ShardSettings.from_config(Config().with_overrides({}), "train")
    )
    assert schema.decode_row(ours)[schema.IMAGE].shape[:2] != (64, 64)


def test_evaluation_feeds_unlabelled_people_only_when_asked():
    from workflows.eval_io import gt_keypoints

    labelled = [0.0] * 48 + [10.0, 20.0, 2.0]
    gt = {
        "images": [{"id": 1}],
        "annotations": [
            {"id": 5, "image_id": 1, "keypoints": labelled, "iscrowd": 0},
            {"id": 6, "image_id": 1, "iscrowd": 0},  # no keypoints at all
            {"id": 7, "image_id": 1, "keypoints": [0.0] * 51, "iscrowd": 1},
        ],
    }
    assert gt_keypoints(gt)[1].shape == (1, NUM_KEYPOINTS, 3)
    every = gt_keypoints(gt, include_unlabelled=True)[1]
    assert every.shape == (2, NUM_KEYPOINTS, 3)
    assert every[1].sum() == 0 and every[0, 16].tolist() == [10.0, 20.0, 2.0]
