"""Paper mode's geometry against the official implementation's own outputs (issue 24).

The fixture ``../shared/data/official_reference/`` (its README documents every array) holds the
official Pose2Seg code's numbers on the 4 images and 14 people of the shared COCO sample. Each
stage is fed the fixture's own inputs, so a difference is the stage's own:

- input frame: ``input_matrix`` equal, the 512 x 512 net input bit-exact (OpenCV 4.10);
- keypoints: truncated and mapped to the feature frame exactly;
- template choice: index (mirrored included) exact, ``score`` / ``all_scores`` within 1e-6;
- matrices: ``feat_to_roi`` / ``feat_to_roi_sampling`` / ``orig_to_roi`` within 1e-4 (index
  convention, the official one: no conversion);
- RoI sampling: the fixture's ``p1`` sampled by paper mode's align equals its float32
  ``sample_values`` and a float64 bilinear resampling at the official positions;
- masks: the fixture's ``seg_logits`` through paper mode's inverse warp, IoU >= 0.999 with the
  official masks for all 14 people, differing pixels no more than those whose probability is
  within 1e-3 of the threshold; scores 1.0; the whole Predictor path keeps every person.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT.parent / "shared" / "data" / "official_reference"
SAMPLE = ROOT.parent / "shared" / "data" / "coco_person_sample"

pytestmark = pytest.mark.skipif(
    not (REFERENCE / "reference.json").is_file() or not SAMPLE.is_dir(),
    reason=f"the official reference fixture is absent ({REFERENCE} and {SAMPLE} are needed)",
)

cv2 = pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def fixture():
    return {
        "ref": json.loads((REFERENCE / "reference.json").read_text()),
        "people": dict(np.load(REFERENCE / "people.npz")),
        "images": dict(np.load(REFERENCE / "images.npz")),
        "templates_json": json.loads((REFERENCE / "templates.json").read_text()),
        "coco": json.loads((SAMPLE / "person_keypoints_sample.json").read_text()),
    }


@pytest.fixture(scope="module")
def templates(fixture):
    from pose2seg.templates import templates_from_json

    return templates_from_json(fixture["templates_json"], scale=1.0)


def _rgb(file_name: str) -> np.ndarray:
    bgr = cv2.imread(str(SAMPLE / file_name))
    return np.ascontiguousarray(bgr[..., ::-1])


def test_the_official_templates_file_is_the_fixtures(templates):
    from pose2seg.templates import templates_from_json, templates_include_mirrors

    shipped = json.loads((ROOT / "configs" / "official_templates.json").read_text())
    assert templates_include_mirrors(shipped)
    np.testing.assert_array_equal(
        templates_from_json(shipped, scale=1.0), templates, err_msg="configs/official_templates"
    )
    # Mirrors: left/right rows swapped, x not mirrored.
    from pose2seg.skeleton import FLIP_PAIRS

    mirrored = templates[:3].copy()
    for a, b in FLIP_PAIRS:
        mirrored[:, [a, b]] = mirrored[:, [b, a]]
    np.testing.assert_array_equal(templates[3:], mirrored)


def test_input_frame_is_bit_exact(fixture):
    from pose2seg.inference import official_input_frame

    for k, image in enumerate(fixture["ref"]["images"]):
        bgr = cv2.imread(str(SAMPLE / image["file_name"]))
        assert hashlib.sha256(bgr.tobytes()).hexdigest() == image["decoded_bgr_sha256"]
        frame = official_input_frame(
            np.ascontiguousarray(bgr[..., ::-1]), np.zeros((0, 17, 3)), input_size=512
        )
        np.testing.assert_array_equal(frame.input_matrix, fixture["images"]["input_matrix"][k][:2])
        digest = hashlib.sha256(np.ascontiguousarray(frame.image).tobytes()).hexdigest()
        assert digest == image["net_input_rgb_uint8_sha256"], f"image {image['image_id']}"


def test_keypoints_reach_the_feature_frame_exactly(fixture):
    from pose2seg.paper_geometry import official_input_keypoints, truncate_keypoints

    people, anns = fixture["people"], {a["id"]: a for a in fixture["coco"]["annotations"]}
    images = {im["image_id"]: k for k, im in enumerate(fixture["ref"]["images"])}
    for row, ann_id in enumerate(people["ann_id"]):
        raw = np.asarray(anns[int(ann_id)]["keypoints"], np.float64).reshape(1, 17, 3)
        np.testing.assert_array_equal(truncate_keypoints(raw)[0], people["keypoints_input"][row])
        m1 = fixture["images"]["input_matrix"][images[int(people["image_id"][row])]][:2]
        kin = official_input_keypoints(raw, m1)
        feat = kin.copy()
        feat[..., :2] *= np.float32(0.25)
        np.testing.assert_array_equal(feat[0], people["keypoints_feat"][row])


def test_template_choice_scores_and_matrices(fixture, templates):
    from pose2seg.paper_geometry import official_template_search, sampling_matrices

    people = fixture["people"]
    search = official_template_search(
        people["keypoints_feat"], templates, roi_size=64, feature_hw=(128, 128)
    )
    np.testing.assert_array_equal(search.template_ids, people["template_index"])
    np.testing.assert_array_equal(search.template_ids >= 3, people["mirrored"])
    np.testing.assert_allclose(search.scores, people["score"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(search.all_scores, people["all_scores"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(search.all_scales, people["all_scales"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(search.feat_to_roi, people["feat_to_roi"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(
        sampling_matrices(search.feat_to_roi, (128, 128)),
        people["feat_to_roi_sampling"],
        rtol=0,
        atol=1e-4,
    )
    # Two people have no labelled keypoint: the whole image, diag(0.5, 0.5).
    whole = search.template_ids < 0
    assert whole.sum() == 2
    np.testing.assert_array_equal(search.feat_to_roi[whole], [[[0.5, 0, 0], [0, 0.5, 0]]] * 2)


def test_acceptance_rule_and_hard_rule(templates):
    """The official rule on made-up people: a template is taken only when its scale exceeds the
    whole-image scale 0.5; fewer than 3 labelled keypoints, or one the template lacks, score 0."""
    from pose2seg.paper_geometry import official_template_search

    base = templates[0].astype(np.float64)
    present = np.isfinite(base).all(axis=1)
    small = np.zeros((1, 17, 3), np.float32)
    small[0, present, :2] = base[present] * 40 + 20  # 40 feature px tall: scale 1.6 > 0.5
    small[0, present, 2] = 2
    huge = small.copy()
    huge[0, present, :2] = base[present] * 400 - 100  # larger than the map: scale 0.16
    two = small.copy()
    two[0, np.flatnonzero(present)[2:], 2] = 0
    search = official_template_search(
        np.concatenate([small, huge, two]), templates, roi_size=64, feature_hw=(128, 128)
    )
    assert search.template_ids[0] == 0 and search.scores[0] > 0.99
    assert search.template_ids[1] == -1 and search.all_scores[1, 0] > 0.99
    assert search.template_ids[2] == -1 and (search.all_scores[2] == 0).all()
    # All 17 joints labelled: the templates lacking some (1, 2, 4, 5) cannot be chosen.
    assert present.all()
    lacking = (~np.isfinite(templates).all(axis=2)).any(axis=1)
    assert lacking.tolist() == [False, True, True, False, True, True]
    assert (search.all_scores[0, lacking] == 0).all() and (search.all_scores[0, ~lacking] > 0).all()


def test_assign_rois_gives_the_official_orig_to_roi(fixture, templates):
    """From the input keypoints to ``orig_to_roi`` and to the RoI keypoints the skeleton
    renderer is given (``keypoints_in_roi``, index convention, v = 0 rows zero)."""
    from pose2seg.paper_geometry import assign_rois, official_input_keypoints, orig_to_roi
    from pose2seg.templates import apply_affine

    people = fixture["people"]
    for k, image in enumerate(fixture["ref"]["images"]):
        rows = np.flatnonzero(people["image_id"] == image["image_id"])
        m1 = fixture["images"]["input_matrix"][k][:2]
        kin = official_input_keypoints(people["keypoints_input"][rows], m1)
        assignment = assign_rois(
            kin,
            templates,
            roi_size=64,
            input_size=512,
            image_hw=(512, 512),
            alignment="pose",
            selection="official",
            fallback_mode="image",
            fallback_min_size=0.25,
            transform="similarity",
        )
        np.testing.assert_array_equal(assignment.template_ids, people["template_index"][rows])
        np.testing.assert_allclose(
            orig_to_roi(assignment.affines, m1), people["orig_to_roi"][rows], rtol=0, atol=1e-4
        )
        in_roi = apply_affine(kin, assignment.affines)
        in_roi[in_roi[..., 2] == 0] = 0.0
        np.testing.assert_allclose(in_roi, people["keypoints_in_roi"][rows], rtol=0, atol=1e-4)


def _bilinear_zero(feature: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Float64 bilinear samples ``(C, M)`` of ``feature (C, h, w)`` at index points, 0 outside."""
    _, h, w = feature.shape
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    out = np.zeros((feature.shape[0], len(x)))
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - np.abs(x - xi)) * (1 - np.abs(y - yi))
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            vals = np.zeros_like(out)
            vals[:, inside] = feature[:, yi[inside], xi[inside]]
            out += vals * weight
    return out


def test_roi_sampling_reads_the_official_positions(fixture):
    from pose2seg.paper_geometry import align_features_official

    data = np.load(REFERENCE / "backbone_p1_197388.npz")
    p1 = data["p1"].astype(np.float32)
    pos, values = data["sample_positions"], data["sample_values"]
    # The float16 map is the float32 one within float16 rounding.
    np.testing.assert_allclose(p1[0][pos[:, 0], pos[:, 1], pos[:, 2]], values, atol=4e-3)
    features = torch.from_numpy(p1)
    # feat_to_roi = identity: RoI pixel (j, i) reads feature index (j, i) exactly.
    identity = torch.tensor([[[0.25, 0.0, 0.0], [0.0, 0.25, 0.0]]])
    roi = align_features_official(
        features, torch.zeros(1, dtype=torch.long), identity, roi_size=64, stride=4
    )[0].numpy()
    np.testing.assert_allclose(roi, p1[0, :, :64, :64], rtol=0, atol=1e-5)
    inside = (pos[:, 1] < 64) & (pos[:, 2] < 64)
    assert inside.sum() > 1000
    np.testing.assert_allclose(
        roi[pos[inside, 0], pos[inside, 1], pos[inside, 2]], values[inside], atol=4e-3
    )
    # The five people of this image: the official sampling matrices, float64 reference.
    people = fixture["people"]
    rows = np.flatnonzero(people["image_id"] == 197388)
    affines = people["feat_to_roi"][rows].copy()
    affines[:, :, :2] /= 4.0
    rois = align_features_official(
        features,
        torch.zeros(len(rows), dtype=torch.long),
        torch.from_numpy(affines.astype(np.float32)),
        roi_size=64,
        stride=4,
    ).numpy()
    channels = np.arange(0, 256, 16)
    jj, ii = np.meshgrid(np.arange(64.0), np.arange(64.0))
    for r, roi in zip(rows, rois, strict=True):
        m = np.vstack([people["feat_to_roi_sampling"][r], [0, 0, 1]])
        src = np.linalg.inv(m) @ np.stack([jj.ravel(), ii.ravel(), np.ones(64 * 64)])
        expected = _bilinear_zero(p1[0][channels].astype(np.float64), src[0], src[1])
        np.testing.assert_allclose(
            roi[channels].reshape(len(channels), -1), expected, rtol=0, atol=2e-4
        )


def test_masks_from_the_official_logits(fixture):
    from pycocotools import mask as mask_utils

    from pose2seg.inference import logits_to_instances_official

    people, ref = fixture["people"], fixture["ref"]
    checked = 0
    for image in ref["images"]:
        rows = np.flatnonzero(people["image_id"] == image["image_id"])
        logits = torch.from_numpy(people["seg_logits"][rows].astype(np.float32))
        # The two-class head's output is the logit difference: its sigmoid is the softmax.
        masks, scores = logits_to_instances_official(
            logits[:, 1] - logits[:, 0],
            people["orig_to_roi"][rows],
            out_hw=(image["height"], image["width"]),
            threshold=0.5,
            exclusive=False,
            score="one",
        )
        assert scores.tolist() == [1.0] * len(rows)
        for r, mask in zip(rows, masks.numpy(), strict=True):
            person = ref["people"][r]
            official = mask_utils.decode(person["mask"]["segmentation"]).astype(bool)
            iou = (mask & official).sum() / (mask | official).sum()
            differing = int((mask ^ official).sum())
            assert iou >= 0.999, f"person {person['ann_id']}: IoU {iou:.5f}"
            assert differing <= person["mask_pixels_prob_within_1e-3_of_0.5"], person["ann_id"]
            assert person["mask"]["score"] == 1.0
            checked += 1
    assert checked == 14


def test_predictor_keeps_every_person_with_the_official_rois(fixture, templates):
    """The whole paper-mode Predictor path on a real sample image: every person (those with no
    labelled keypoint too) gets one mask scored 1, from the official RoI of the fixture."""
    from pose2seg.config import Config, load_config
    from pose2seg.inference import Predictor

    config = load_config(
        str(ROOT / "configs" / "paper.yaml"),
        [
            f"model.templates_file={ROOT / 'configs' / 'official_templates.json'}",
            "model.pretrained_backbone=none",
            "model.backbone_depth=18",
            "model.fpn_channels=16",
            "model.seg_channels=8",
            "model.num_residual_units=1",
            "model.seg_block=basic",
            "model.seg_style=ours",  # the official SegModule is bottleneck-only
        ],
    )
    assert isinstance(config, Config)
    from pose2seg.model import Pose2Seg

    torch.manual_seed(0)
    model = Pose2Seg(config=config.model)
    predictor = Predictor(
        model, templates, config.model, input_size=512, input_frame=config.data.input_frame
    )
    anns = [a for a in fixture["coco"]["annotations"] if a["image_id"] == 196141]
    image = next(im for im in fixture["ref"]["images"] if im["image_id"] == 196141)
    kpts = np.asarray(
        [a.get("keypoints") or [0] * 51 for a in anns if not a.get("iscrowd")], np.float32
    ).reshape(-1, 17, 3)
    results = predictor.predict(_rgb(image["file_name"]), kpts, image_id=196141)
    assert [r["person_index"] for r in results] == list(range(len(kpts)))
    assert all(r["score"] == 1.0 for r in results)
    people = fixture["people"]
    rows = np.flatnonzero(people["image_id"] == 196141)
    assert [r["fallback"] for r in results] == (people["template_index"][rows] < 0).tolist()
