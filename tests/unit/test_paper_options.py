"""The official recipe's options (issue 15), each reachable by a config key: similarity
alignment, aspect-kept and mirrored templates, the official templates.json layout, negative
heatmaps for hidden keypoints, the bottleneck SegModule, the 2-class head, Adam and its
schedule. Today's behaviour stays the default."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pose2seg.config import PREPROCESS_KEYS, Config, ConfigError, ModelConfig, TrainConfig
from pose2seg.engine import build_lr_schedule, build_optimizer, lr_factor
from pose2seg.model import Pose2Seg, SegModule, count_parameters
from pose2seg.ops import render_skeleton_features as render_torch
from pose2seg.skeleton import FLIP_PAIRS, KEYPOINT_NAMES, NUM_KEYPOINTS, NUM_SKELETON_CHANNELS
from pose2seg.templates import (
    OFFICIAL_TEMPLATE_SCALE,
    assign_templates,
    fit_pose_templates,
    mirror_templates,
    templates_from_json,
)
from preprocessing.features import (
    dequantise,
    render_quantised_skeleton_features,
    render_skeleton_features,
)
from tests.unit.test_templates import STANDING, _person, _random_people

torch.set_num_threads(2)


def _rotation(theta: float) -> np.ndarray:
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def test_similarity_alignment_recovers_a_similarity_and_never_shears():
    template = (STANDING - 50) / 120 + 0.5  # unit frame
    # A person = the template under a known similarity (input frame pixels).
    lin = 150.0 * _rotation(0.4)
    person = _person(template @ lin.T + np.array([80.0, 40.0]))
    exact = assign_templates(
        person[None], template[None], roi_size=64, alignment="pose", transform="similarity"
    )
    # Its inverse (times S) maps the person back onto the template exactly.
    expected = np.linalg.inv(lin) * 64
    np.testing.assert_allclose(exact.affines[0, :, :2], expected, rtol=1e-5, atol=1e-6)
    assert exact.scores[0] == pytest.approx(1.0, abs=1e-5)
    # A sheared person: the affine follows the shear, the similarity keeps equal singular values.
    sheared = _person(template @ np.array([[150.0, 60.0], [0.0, 150.0]]).T)
    for transform, isotropic in (("affine", False), ("similarity", True)):
        a = assign_templates(
            sheared[None], template[None], roi_size=64, alignment="pose", transform=transform
        ).affines[0, :, :2]
        s = np.linalg.svd(a, compute_uv=False)
        assert (abs(s[0] / s[1] - 1) < 1e-5) == isotropic
        assert np.linalg.det(a) > 0  # never a reflection


def test_similarity_alignment_accepts_collinear_keypoints():
    # Three keypoints on a vertical line: an affine is undefined, a similarity is not.
    template = (STANDING - 50) / 120 + 0.5
    xy = STANDING.copy()
    vis = np.zeros(NUM_KEYPOINTS)
    vis[[0, 11, 15]] = 2
    xy[[0, 11, 15], 0] = 50.0
    person = _person(xy, vis)
    affine = assign_templates(person[None], template[None], roi_size=32, alignment="pose")
    similar = assign_templates(
        person[None], template[None], roi_size=32, alignment="pose", transform="similarity"
    )
    assert affine.fallback[0] and not similar.fallback[0]
    with pytest.raises(ValueError, match="transform"):
        assign_templates(person[None], template[None], roi_size=32, alignment="pose", transform="x")


def test_aspect_kept_templates_keep_the_pose_proportions():
    people = _random_people(40, seed=1)
    stretched = fit_pose_templates(people, num_templates=2, seed=0)
    kept = fit_pose_templates(people, num_templates=2, seed=0, shape="aspect_kept")
    for templates, square in ((stretched, True), (kept, False)):
        extent = templates.max(axis=1) - templates.min(axis=1)  # (T, 2)
        assert np.allclose(extent.max(axis=1), 0.7, atol=1e-5)
        # Standing people are tall: stretched fills both axes, aspect-kept stays narrow.
        assert np.allclose(extent[:, 0], extent[:, 1], atol=1e-5) == square
    assert (kept.max(axis=1) - kept.min(axis=1))[:, 0].max() < 0.6
    with pytest.raises(ValueError, match="shape"):
        fit_pose_templates(people, num_templates=2, seed=0, shape="round")


def test_mirrored_templates_swap_left_and_right():
    people = _random_people(40, seed=2)
    templates = fit_pose_templates(people, num_templates=3, seed=0, mirror=True)
    assert templates.shape == (6, NUM_KEYPOINTS, 2)
    for a, b in FLIP_PAIRS:
        np.testing.assert_array_equal(templates[3:, a], templates[:3, b])
    np.testing.assert_array_equal(templates[3:, 0], templates[:3, 0])  # the nose has no twin
    assert np.array_equal(mirror_templates(templates[:3]), templates)
    # A person seen from the back (left/right labels swapped) picks a mirrored template.
    person = _person(STANDING)
    back = person.copy()
    for a, b in FLIP_PAIRS:
        back[[a, b]] = person[[b, a]]
    ids = assign_templates(
        np.stack([person, back]), templates, roi_size=32, alignment="pose", transform="similarity"
    ).template_ids
    assert ids[0] < 3 <= ids[1]


def _official_layout(templates_xyw: np.ndarray, **extra) -> dict:
    """Templates in the official templates.json layout (T flat lists of x, y, w per joint)."""
    return {
        "names": list(KEYPOINT_NAMES),
        "vis_threshold": 0.4,
        "flip_map": {"left_eye": "right_eye"},
        "minpoints": 8,
        "templates": [t.reshape(-1).tolist() for t in templates_xyw],
        **extra,
    }


def test_templates_from_the_official_json_layout(tmp_path):
    rng = np.random.default_rng(0)
    xyw = np.concatenate(
        [rng.uniform(0.2, 0.8, (3, NUM_KEYPOINTS, 2)), np.full((3, NUM_KEYPOINTS, 1), 1.5)], -1
    )
    xyw[2, 13:, 2] = 0.1  # the third template (an upper body) rarely sees knees and ankles
    templates = templates_from_json(json.loads(json.dumps(_official_layout(xyw))))
    assert templates.shape == (3, NUM_KEYPOINTS, 2)
    assert np.isnan(templates[2, 13:]).all() and np.isfinite(templates[:2]).all()
    np.testing.assert_allclose(
        templates[0], (xyw[0, :, :2] - 0.5) * OFFICIAL_TEMPLATE_SCALE + 0.5, rtol=1e-6
    )
    # Joint names in another order are put back into COCO order.
    order = list(reversed(range(NUM_KEYPOINTS)))
    shuffled = _official_layout(xyw[:, order])
    shuffled["names"] = [KEYPOINT_NAMES[i] for i in order]
    np.testing.assert_array_equal(templates_from_json(shuffled), templates)
    for bad, match in (
        ({"nothing": 1}, "templates"),
        (_official_layout(xyw[:, :5]), "51"),
        ({**_official_layout(xyw), "names": ["nose"]}, "names"),
        ({**_official_layout(xyw), "vis_threshold": 9.0}, "fewer than 3"),
    ):
        with pytest.raises(ValueError, match=match):
            templates_from_json(bad, source="t.json")


def test_templates_with_missing_joints_only_serve_people_they_cover():
    full = (STANDING - 50) / 120 + 0.5
    upper = full.copy()
    upper[13:] = np.nan  # no knees or ankles
    templates = np.stack([upper, full]).astype(np.float32)
    whole = _person(STANDING)
    top = whole.copy()
    top[13:, 2] = 0  # legs unlabelled
    result = assign_templates(
        np.stack([whole, top]), templates, roi_size=32, alignment="pose", transform="similarity"
    )
    # The whole body cannot use the upper-body template; the upper body fits both exactly,
    # and the share of joints (13/13 against 13/17) picks the upper-body one.
    assert result.template_ids.tolist() == [1, 0]
    assert result.scores[1] == pytest.approx(1.0, abs=1e-4)
    assert np.isfinite(result.affines).all()


def test_hidden_keypoints_drawn_negative_in_every_renderer():
    kpts = np.zeros((1, NUM_KEYPOINTS, 3), dtype=np.float32)
    kpts[0, :, :2] = np.random.default_rng(0).uniform(4, 28, (NUM_KEYPOINTS, 2))
    kpts[0, :, 2] = 2
    kpts[0, 5, 2] = 1  # a hidden shoulder
    kpts[0, 7, 2] = 0
    heat = slice(NUM_SKELETON_CHANNELS - NUM_KEYPOINTS, None)
    pos = render_skeleton_features(kpts, roi_size=32, sigma_px=3.0, width_px=1.0)
    neg = render_skeleton_features(
        kpts, roi_size=32, sigma_px=3.0, width_px=1.0, hidden_negative=True
    )
    assert pos[0, heat][5].max() > 0.5
    np.testing.assert_array_equal(neg[0, heat][5], -pos[0, heat][5])
    np.testing.assert_array_equal(np.delete(neg, 38 + 5, axis=1), np.delete(pos, 38 + 5, axis=1))
    torch_neg = render_torch(
        torch.from_numpy(kpts), roi_size=32, sigma_px=3.0, width_px=1.0, hidden_negative=True
    ).numpy()
    np.testing.assert_allclose(torch_neg, neg, atol=1e-6)
    quant = render_quantised_skeleton_features(
        kpts, roi_size=32, sigma_px=3.0, width_px=1.0, hidden_negative=True
    )
    np.testing.assert_allclose(dequantise(quant), neg, atol=1.0 / 127 + 1e-6)
    assert dequantise(quant)[0, heat][5].min() < -0.5


def test_bottleneck_segmodule_has_the_official_widths_and_size():
    seg = SegModule(
        in_channels=256 + NUM_SKELETON_CHANNELS,
        channels=256,
        num_residual_units=10,
        block="bottleneck",
        head="two_class",
    )
    assert seg.units[0].conv3.out_channels == 1024 and seg.units[1].conv1.in_channels == 1024
    assert seg.units[5].conv2.in_channels == 256
    assert seg.refine.conv3.out_channels == 512
    # The figure: about 16 M parameters (basic blocks at the COCO config: about 1.8 M).
    assert 15e6 < count_parameters(seg) < 17.5e6
    x = torch.randn(2, 256 + NUM_SKELETON_CHANNELS, 16, 16)
    assert seg(x).shape == (2, 16, 16)


def test_two_class_head_bce_equals_two_class_cross_entropy():
    config = ModelConfig(
        backbone_depth=18,
        fpn_channels=16,
        seg_channels=16,
        num_residual_units=2,
        roi_size=16,
        seg_block="bottleneck",
        mask_head="two_class",
    )
    model = Pose2Seg(config=config)
    seg = model.seg
    x = torch.randn(3, 16 + NUM_SKELETON_CHANNELS, 16, 16)
    seg.eval()
    two = seg.head(
        seg.refine(F.interpolate(seg.units(seg.stem(x)), scale_factor=2.0, mode="bilinear"))
    )
    logits = seg(x)
    targets = (torch.rand(3, 16, 16) > 0.5).float()
    ce = F.cross_entropy(two, targets.long())
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    assert float(ce.detach()) == pytest.approx(float(bce.detach()), rel=1e-5)


def test_adam_and_the_official_schedule():
    model = torch.nn.Linear(4, 2)
    adam = build_optimizer(model, TrainConfig(optimizer="adam", lr=2e-4, weight_decay=0.0))
    assert type(adam) is torch.optim.Adam
    assert all(g["weight_decay"] == 0.0 for g in adam.param_groups)
    official = TrainConfig(
        optimizer="adam",
        lr=2e-4,
        weight_decay=0.0,
        warmup_steps=1000,
        warmup_start_factor=1 / 3,
        schedule="step",
        step_milestones=[0.6, 0.8],
    )
    schedule = build_lr_schedule(build_optimizer(model, official), official, total_steps=10000)
    factors = [schedule.lr_lambdas[0](s) for s in (0, 500, 1000, 5999, 6000, 7999, 8000, 9999)]
    expected = [1 / 3, 1 / 3 + (2 / 3) * 0.5, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert factors == pytest.approx(expected)
    # Today's step schedule (2/3 and 8/9, warm-up from 0.1) is unchanged.
    assert lr_factor(0, warmup_steps=10, total_steps=90, schedule="step") == pytest.approx(0.1)
    assert [
        lr_factor(s, warmup_steps=10, total_steps=90, schedule="step") for s in (59, 60, 80)
    ] == [
        1.0,
        0.1,
        0.01,
    ]


def test_new_keys_validate_and_enter_the_preprocess_key_only_when_set(tmp_path):
    base = Config()
    # Today's variant key is computed from the original keys alone (stored Parquet stays valid).
    flat = base.to_flat()
    import hashlib

    from pose2seg.config import PREPROCESS_FORMAT_VERSION

    old = json.dumps(
        {"format": PREPROCESS_FORMAT_VERSION, **{k: flat[k] for k in PREPROCESS_KEYS}},
        sort_keys=True,
    )
    assert base.preprocess_key() == hashlib.sha256(old.encode()).hexdigest()[:12]
    templates_file = tmp_path / "templates.json"
    templates_file.write_text("{}")
    for key, value in (
        ("model.align_transform", "similarity"),
        ("model.template_shape", "aspect_kept"),
        ("model.mirror_templates", True),
        ("model.templates_file", str(templates_file)),
        ("model.hidden_keypoints", "positive"),
    ):
        assert base.with_overrides({key: value}).preprocess_key() != base.preprocess_key(), key
    # Training-side keys do not change the stored data.
    for key, value in (
        ("model.seg_block", "bottleneck"),
        ("train.optimizer", "adam"),
        ("train.augment_rotation_deg", 30.0),
    ):
        assert base.with_overrides({key: value}).preprocess_key() == base.preprocess_key(), key
    for key, value in (
        ("model.align_transform", "projective"),
        ("model.seg_block", "wide"),
        ("model.templates_file", str(tmp_path / "missing.json")),
        ("train.optimizer", "lamb"),
        ("train.warmup_start_factor", 0.0),
        ("train.step_milestones", [0.8, 0.6]),
        ("train.augment_scale", 1.5),
        ("train.occlusion_box_prob", -0.1),
    ):
        with pytest.raises(ConfigError, match=key):
            base.with_overrides({key: value})


def test_pipeline_reads_official_templates_and_adds_mirrors(tmp_path):
    from preprocessing.pipeline import _build_templates

    xyw = np.concatenate(
        [np.random.default_rng(1).uniform(0.2, 0.8, (3, NUM_KEYPOINTS, 2)), np.ones((3, 17, 1))], -1
    )
    path = tmp_path / "templates.json"
    path.write_text(json.dumps(_official_layout(xyw)))
    config = Config().with_overrides(
        {"model.templates_file": str(path), "model.mirror_templates": True}
    )
    templates = _build_templates(config, np.zeros((0, NUM_KEYPOINTS, 3)))
    assert templates.shape == (6, NUM_KEYPOINTS, 2)
    path.write_text("not json")
    with pytest.raises(ValueError, match="model.templates_file"):
        _build_templates(config, np.zeros((0, NUM_KEYPOINTS, 3)))
    fitted = _build_templates(
        dataclasses.replace(config, model=dataclasses.replace(config.model, templates_file="")),
        _random_people(30, seed=3),
    )
    assert fitted.shape == (6, NUM_KEYPOINTS, 2)


def test_one_factor_at_a_time_ablation_config():
    from pathlib import Path

    from pose2seg.config import load_config
    from workflows.tune import TRIAL_PARAM, preprocessing_variants, trial_overrides

    path = Path(__file__).resolve().parents[2] / "configs" / "ablation_paper_vs_ours.yaml"
    config = load_config(str(path))
    trials = config.tune.trials
    assert trials["ours"] == {} and "paper" in trials
    paper = config.with_overrides(trial_overrides(config, {TRIAL_PARAM: "paper"}))
    for name, overrides in trials.items():
        trial = config.with_overrides(trial_overrides(config, {TRIAL_PARAM: name}))
        changed = {k for k, v in trial.to_flat().items() if config.to_flat()[k] != v}
        assert changed == set(overrides), name
        if name.startswith("paper_"):
            # Each single-axis trial moves towards the whole paper trial, never away from it.
            assert all(paper.to_flat()[k] == v for k, v in overrides.items()), name
    # Equal budget: ASHA's grace period covers every epoch.
    assert config.tune.grace_period >= config.train.epochs
    # Each distinct Parquet variant is preprocessed once, before the trials.
    keys = [v.preprocess_key() for v in preprocessing_variants(config)]
    assert len(keys) == len(set(keys)) == 5
    with pytest.raises(ConfigError, match="tune.trials.bad.model.roi_sise"):
        config.with_overrides({"tune.trials": {"bad": {"model.roi_sise": 3}}})


def test_grid_search_over_a_new_preprocessing_key_preprocesses_each_variant():
    from workflows.tune import preprocessing_variants

    config = Config().with_overrides(
        {"tune.search_space": {"model.align_transform": ["affine", "similarity"]}}
    )
    assert len({v.preprocess_key() for v in preprocessing_variants(config)}) == 2


def test_checkpoint_of_a_templates_file_run_loads_without_the_file(tmp_path):
    from pose2seg.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "templates.json"
    path.write_text("{}")
    config = Config().with_overrides(
        {
            "model.templates_file": str(path),
            "model.backbone_depth": 18,
            "model.fpn_channels": 8,
            "model.seg_channels": 8,
            "model.num_residual_units": 1,
        }
    )
    templates = np.full((2, NUM_KEYPOINTS, 2), 0.5, dtype=np.float32)
    templates[1, 13:] = np.nan  # a template without legs
    model = Pose2Seg(config=config.model)
    save_checkpoint(str(tmp_path / "ckpt"), model=model, config=config, templates=templates)
    path.unlink()  # another machine: the file is not there, the templates are in the checkpoint
    loaded = load_checkpoint(str(tmp_path / "ckpt"))
    assert loaded.config.model.templates_file == ""
    np.testing.assert_array_equal(loaded.templates, templates)
