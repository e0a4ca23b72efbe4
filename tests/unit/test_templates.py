"""Unit tests of pose2seg.templates: affine estimation, degenerate cases, template fitting."""

from __future__ import annotations

import numpy as np
import pytest

from pose2seg.fallback import fallback_affines
from pose2seg.skeleton import NUM_KEYPOINTS
from pose2seg.templates import (
    TEMPLATE_EXTENT,
    DegenerateAlignmentError,
    apply_affine,
    assign_templates,
    box_affine,
    estimate_affine,
    fit_pose_templates,
    normalise_poses,
)

# A standing person facing the camera, input-frame pixels (x, y); head at small y.
STANDING = np.array(
    [
        [50, 20], [53, 17], [47, 17], [56, 19], [44, 19],  # face
        [60, 32], [40, 32], [64, 48], [36, 48], [66, 62], [34, 62],  # arms
        [57, 62], [43, 62], [58, 82], [42, 82], [58, 100], [42, 100],  # legs
    ],
    dtype=np.float64,
)  # fmt: skip


def _person(xy: np.ndarray, vis: int | np.ndarray = 2) -> np.ndarray:
    out = np.zeros((NUM_KEYPOINTS, 3))
    out[:, :2] = xy
    out[:, 2] = vis
    return out


def _random_people(n: int, seed: int) -> np.ndarray:
    """Standing people under random similarity transforms, some arms raised, some joints missing."""
    rng = np.random.default_rng(seed)
    people = []
    for i in range(n):
        xy = STANDING.copy()
        if i % 2:
            xy[[9, 10], 1] = 5.0  # wrists above the head
        theta = rng.uniform(-0.3, 0.3)
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        xy = (xy - 50) @ rot.T * rng.uniform(0.5, 2.0) + rng.uniform(50, 200, size=2)
        xy += rng.normal(0, 1.0, size=xy.shape)
        vis = np.full(NUM_KEYPOINTS, 2)
        vis[rng.choice(NUM_KEYPOINTS, size=rng.integers(0, 4), replace=False)] = 0
        people.append(_person(xy, vis))
    return np.stack(people)


def test_estimate_affine_recovers_a_known_affine_exactly():
    true = np.array([[0.8, -0.3, 5.0], [0.2, 1.1, -7.0]])
    src = STANDING
    dst = src @ true[:, :2].T + true[:, 2]
    weights = np.ones(NUM_KEYPOINTS)
    weights[[0, 3]] = 0.0
    dst[[0, 3]] = 1e6  # ignored points may hold anything
    a, residual = estimate_affine(src, dst, weights)
    np.testing.assert_allclose(a, true, atol=1e-9)
    assert residual == pytest.approx(0.0, abs=1e-9)


def test_estimate_affine_weights_pull_towards_heavy_points():
    src = STANDING
    dst = src.copy()
    dst[5] += [10.0, 0.0]  # one outlier
    light = np.ones(NUM_KEYPOINTS)
    heavy = light.copy()
    heavy[5] = 100.0
    _, r_light = estimate_affine(src, dst, light)
    a_heavy, _ = estimate_affine(src, dst, heavy)
    assert r_light > 0
    moved = a_heavy[:, :2] @ src[5] + a_heavy[:, 2]
    assert np.linalg.norm(moved - dst[5]) < 1.0  # the heavy point is nearly fitted


def test_estimate_affine_degenerate_cases():
    w = np.zeros(NUM_KEYPOINTS)
    w[:2] = 1.0
    with pytest.raises(DegenerateAlignmentError, match="at least 3"):
        estimate_affine(STANDING, STANDING, w)
    line = np.stack([np.arange(NUM_KEYPOINTS) * 3.0, np.arange(NUM_KEYPOINTS) * 2.0 + 1], -1)
    with pytest.raises(DegenerateAlignmentError, match="collinear"):
        estimate_affine(line, STANDING, np.ones(NUM_KEYPOINTS))
    assert issubclass(DegenerateAlignmentError, ValueError)
    with pytest.raises(ValueError, match="shape|expected"):
        estimate_affine(STANDING[:5], STANDING, np.ones(NUM_KEYPOINTS))


def test_box_affine_maps_the_box_into_the_frame_keeping_aspect():
    a = box_affine(np.array([10.0, 20.0, 40.0, 80.0]), roi_size=64, margin=0.25)
    assert a[0, 0] == pytest.approx(a[1, 1])  # uniform scale
    assert a[0, 1] == 0 and a[1, 0] == 0
    corners = np.array([[10, 20, 1], [50, 100, 1]], dtype=float) @ a.T
    # Height 80 * 1.25 = 100 -> 64 px: the box spans 80 * 0.64 = 51.2 px, centred at 32.
    np.testing.assert_allclose(corners[:, 1], [32 - 25.6, 32 + 25.6])
    np.testing.assert_allclose(corners[:, 0], [32 - 12.8, 32 + 12.8])
    with pytest.raises(ValueError, match="box"):
        box_affine(np.array([0, 0, -1, 5.0]), roi_size=64, margin=0.1)
    # The bounding-box baseline stretches each axis like RoIAlign: both sides span 51.2 px.
    s = box_affine(np.array([10.0, 20.0, 40.0, 80.0]), roi_size=64, margin=0.25, stretch=True)
    corners = np.array([[10, 20, 1], [50, 100, 1]], dtype=float) @ s.T
    np.testing.assert_allclose(corners, [[32 - 25.6, 32 - 25.6], [32 + 25.6, 32 + 25.6]])
    # A flat box is not stretched without bound: its short side is floored at 1/4 of the long.
    flat = box_affine(np.array([0.0, 0.0, 80.0, 0.0]), roi_size=64, margin=0.25, stretch=True)
    assert flat[1, 1] == pytest.approx(64 / 25.0)


def test_normalise_poses_is_invariant_to_similarity_transforms():
    theta = 0.7
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    moved = (STANDING @ rot.T) * 3.0 + [100.0, -40.0]
    poses, usable = normalise_poses(np.stack([_person(STANDING), _person(moved)]))
    assert usable.all()
    np.testing.assert_allclose(poses[0], poses[1], atol=1e-9)
    # Upright: shoulders above hips.
    assert poses[0, 5, 1] < poses[0, 11, 1]


def test_fit_pose_templates_shapes_determinism_and_frame():
    people = _random_people(60, seed=1)
    t1 = fit_pose_templates(people, num_templates=3, seed=7)
    t2 = fit_pose_templates(people, num_templates=3, seed=7)
    assert t1.shape == (3, NUM_KEYPOINTS, 2) and t1.dtype == np.float32
    np.testing.assert_array_equal(t1, t2)
    extent = t1.max(axis=1) - t1.min(axis=1)  # (T, 2): each axis fills the extent
    np.testing.assert_allclose(extent, TEMPLATE_EXTENT, rtol=1e-5)
    assert (t1 > 0).all() and (t1 < 1).all()
    # Both poses (arms down / arms up) are found: some template has wrists above the nose.
    assert (t1[:, 9, 1] < t1[:, 0, 1]).any() and (t1[:, 9, 1] > t1[:, 0, 1]).any()


def test_fit_pose_templates_rejects_too_few_poses():
    with pytest.raises(ValueError, match="num_templates"):
        fit_pose_templates(_random_people(2, seed=0), num_templates=3, seed=0)


def test_pose_aligned_onto_its_template_lands_inside_the_frame():
    people = _random_people(40, seed=3)
    templates = fit_pose_templates(people, num_templates=2, seed=0)
    result = assign_templates(people, templates, roi_size=64, alignment="pose")
    assert result.affines.shape == (40, 2, 3) and result.affines.dtype == np.float32
    assert (result.template_ids >= 0).all() and not result.fallback.any()
    assert ((result.scores > 0) & (result.scores <= 1)).all()
    aligned = apply_affine(people, result.affines)
    usable = people[..., 2] > 0
    margin = 64 * 0.1
    assert (aligned[..., :2][usable] > margin).all() and (
        aligned[..., :2][usable] < 64 - margin
    ).all()


def test_assign_picks_the_matching_template_and_exact_affine():
    people = _random_people(40, seed=4)
    templates = fit_pose_templates(people, num_templates=2, seed=0)
    # A person who *is* template 1 under a known affine gets template 1 and that affine's inverse.
    a = np.array([[2.0, 0.3, 10.0], [-0.1, 1.5, 30.0]])
    tmpl_px = templates[1].astype(np.float64) * 64
    person = _person(tmpl_px @ a[:, :2].T + a[:, 2])
    result = assign_templates(person[None], templates, roi_size=64, alignment="pose")
    assert result.template_ids[0] == 1
    mapped = apply_affine(person[None], result.affines)[0, :, :2]
    np.testing.assert_allclose(mapped, tmpl_px, atol=1e-3)
    assert result.scores[0] > 0.95  # exact fit; only the mild anisotropy penalty remains


def test_assign_gives_degenerate_people_the_keypoint_fallback():
    templates = fit_pose_templates(_random_people(20, seed=5), num_templates=2, seed=0)
    two = _person(STANDING, 0)
    two[[5, 6], 2] = 2  # only the shoulders
    collinear = _person(
        np.stack([np.full(NUM_KEYPOINTS, 30.0), np.arange(NUM_KEYPOINTS) * 5.0], -1)
    )
    # At the image border: unlabelled keypoints sit at (0, 0) with v = 0 and must be ignored.
    border = _person(STANDING)
    border[11:, :] = 0.0
    people = np.stack([two, collinear, border])
    boxes = np.array([[30.0, 10.0, 40.0, 90.0], [25.0, 0.0, 10.0, 80.0], [30.0, 10.0, 40.0, 60.0]])
    result = assign_templates(
        people, templates, roi_size=64, alignment="pose", boxes=boxes, image_hw=(120, 100)
    )
    np.testing.assert_array_equal(result.fallback, [True, True, False])
    np.testing.assert_array_equal(result.template_ids[:2], [-1, -1])
    assert result.template_ids[2] >= 0
    # Issue 14: the fallback comes from the keypoints alone; a given (ground-truth) box is
    # not used, so inference (which has no box) computes the same transform.
    expected = fallback_affines(people[:2], templates, roi_size=64, image_hw=(120, 100))
    np.testing.assert_allclose(result.affines[:2], expected, rtol=1e-6)
    assert result.scores[0] == 0.0
    no_box = assign_templates(people, templates, roi_size=64, alignment="pose", image_hw=(120, 100))
    np.testing.assert_allclose(no_box.affines, result.affines, rtol=1e-6)


def test_assign_box_alignment_and_unalignable_people():
    templates = fit_pose_templates(_random_people(20, seed=6), num_templates=1, seed=0)
    people = _person(STANDING)[None]
    result = assign_templates(people, templates, roi_size=32, alignment="box")
    assert result.template_ids[0] == -1 and not result.fallback[0]
    kp_box = np.array([34.0, 17.0, 32.0, 83.0])
    np.testing.assert_allclose(
        result.affines[0], box_affine(kp_box, roi_size=32, margin=0.25, stretch=True), rtol=1e-6
    )
    nobody = _person(STANDING, 0)[None]
    with pytest.raises(ValueError, match="no usable keypoint"):
        assign_templates(nobody, templates, roi_size=64, alignment="pose")
    with pytest.raises(ValueError, match="alignment"):
        assign_templates(people, templates, roi_size=64, alignment="similarity")
    empty = assign_templates(
        np.zeros((0, NUM_KEYPOINTS, 3)), templates, roi_size=64, alignment="pose"
    )
    assert empty.affines.shape == (0, 2, 3)
