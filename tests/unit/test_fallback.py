"""Unit tests of pose2seg.fallback: the keypoint-only RoI of people that cannot be aligned."""

from __future__ import annotations

import numpy as np
import pytest

from pose2seg.fallback import MAX_SIDE_FRACTION, fallback_affines, image_affine
from pose2seg.skeleton import NUM_KEYPOINTS
from pose2seg.templates import apply_affine, assign_templates, fit_pose_templates

# A standing person facing the camera (x, y), about 85 px tall; head at small y.
STANDING = np.array(
    [
        [50, 20], [53, 17], [47, 17], [56, 19], [44, 19],
        [60, 32], [40, 32], [64, 48], [36, 48], [66, 62], [34, 62],
        [57, 62], [43, 62], [58, 82], [42, 82], [58, 100], [42, 100],
    ],
    dtype=np.float64,
)  # fmt: skip
S = 64
IMAGE_HW = (400, 300)


def _templates(scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    people = []
    rng = np.random.default_rng(0)
    for _ in range(12):
        xy = STANDING * scale * rng.uniform(0.9, 1.1) + offset + rng.normal(0, 0.5, (17, 2))
        people.append(np.concatenate([xy, np.full((17, 1), 2.0)], -1))
    return fit_pose_templates(np.stack(people), num_templates=2, seed=0)


def _only(joints: list[int], xy: np.ndarray = STANDING) -> np.ndarray:
    out = np.zeros((NUM_KEYPOINTS, 3))
    out[joints, :2] = xy[joints]
    out[joints, 2] = 2
    return out


def _side(affine: np.ndarray) -> float:
    """Image pixels covered by the RoI side."""
    return S / affine[0, 0]


def _mapped(person: np.ndarray, affine: np.ndarray) -> np.ndarray:
    used = person[:, 2] > 0
    return apply_affine(person[None], affine[None])[0, used, :2]


def test_two_far_apart_keypoints_size_the_roi_from_the_person():
    templates = _templates()
    # Shoulder and ankle of a person 4x larger than the one of the templates' poses.
    big = STANDING * 4
    person = _only([5, 15], big)
    (a,) = fallback_affines(person[None], templates, roi_size=S, image_hw=(800, 600))
    # The full pose of the same person fits in about 1/TEMPLATE_EXTENT of its extent.
    height = big[:, 1].max() - big[:, 1].min()
    assert height * 1.1 < _side(a) < height * 1.9
    assert a[0, 1] == 0 and a[1, 0] == 0 and a[0, 0] == a[1, 1]  # upright similarity
    inside = _mapped(person, a)
    assert ((inside >= 0) & (inside <= S)).all()


def test_two_nearby_keypoints_do_not_zoom_onto_a_few_pixels():
    templates = _templates()
    person = _only([1, 2])  # the two eyes, 6 px apart
    (a,) = fallback_affines(person[None], templates, roi_size=S, image_hw=IMAGE_HW)
    # Eye distance vs the template's: about the person's own size (85 px), above the minimum.
    assert _side(a) >= 0.25 * max(IMAGE_HW) - 1e-6
    coincident = _only([1, 2])
    coincident[2, :2] = coincident[1, :2]  # profile view: both eyes at one point
    (b,) = fallback_affines(coincident[None], templates, roi_size=S, image_hw=IMAGE_HW)
    assert _side(b) == pytest.approx(0.25 * max(IMAGE_HW))
    assert np.isfinite(b).all()


def test_one_keypoint_gets_the_minimum_size_placed_like_the_template():
    templates = _templates()
    person = _only([0])  # the nose
    (a,) = fallback_affines(person[None], templates, roi_size=S, image_hw=IMAGE_HW, min_size=0.3)
    assert _side(a) == pytest.approx(0.3 * max(IMAGE_HW))
    # The nose lands where the template's nose is: near the top of the RoI, body below it.
    nose = _mapped(person, a)[0]
    np.testing.assert_allclose(nose, templates[0, 0] * S, atol=1e-6)
    assert nose[1] < S / 3


@pytest.mark.parametrize("joints", [[0], [15, 16], [9, 15]])
def test_keypoints_at_the_image_border(joints):
    templates = _templates()
    border = STANDING.copy()
    border[:, 0] -= border[:, 0].min()  # the left-most joint at x = 0
    border[:, 1] += IMAGE_HW[0] - border[:, 1].max() - 1  # the feet on the bottom row
    person = _only(joints, border)
    (a,) = fallback_affines(person[None], templates, roi_size=S, image_hw=IMAGE_HW)
    assert np.isfinite(a).all()
    assert 0.25 * max(IMAGE_HW) - 1e-6 <= _side(a) <= MAX_SIDE_FRACTION * max(IMAGE_HW)
    inside = _mapped(person, a)
    assert ((inside >= 0) & (inside <= S)).all()


def test_image_mode_letterboxes_the_whole_image():
    templates = _templates()
    person = _only([0])
    (a,) = fallback_affines(person[None], templates, roi_size=S, image_hw=IMAGE_HW, mode="image")
    np.testing.assert_allclose(a, image_affine(IMAGE_HW, roi_size=S))
    corners = np.array([[0, 0, 2], [300, 400, 2]], dtype=np.float64)
    pts = (a[:, :2] @ corners[:, :2].T).T + a[:, 2]
    np.testing.assert_allclose(pts, [[S / 2 - 0.75 * S / 2, 0], [S / 2 + 0.75 * S / 2, S]])


def test_errors_name_the_problem():
    templates = _templates()
    with pytest.raises(ValueError, match="no usable keypoint"):
        fallback_affines(np.zeros((1, 17, 3)), templates, roi_size=S, image_hw=IMAGE_HW)
    with pytest.raises(ValueError, match="image_hw"):
        fallback_affines(_only([0])[None], templates, roi_size=S, image_hw=None, mode="image")
    nan = _only([0])
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fallback_affines(nan[None], templates, roi_size=S, image_hw=IMAGE_HW)
    with pytest.raises(ValueError, match="fallback mode"):
        fallback_affines(_only([0])[None], templates, roi_size=S, image_hw=IMAGE_HW, mode="box")


def test_assign_templates_routes_degenerate_people_to_the_fallback_and_counts_them():
    templates = _templates()
    full = _only(list(range(17)))
    people = np.stack([_only([0]), full, _only([5, 6]), _only([15, 16])])
    result = assign_templates(
        people, templates, roi_size=S, alignment="pose", image_hw=IMAGE_HW,
        fallback_mode="keypoints", fallback_min_size=0.25,
    )  # fmt: skip
    np.testing.assert_array_equal(result.fallback, [True, False, True, True])
    assert int(result.fallback.sum()) == 3
    expected = fallback_affines(people[[0, 2, 3]], templates, roi_size=S, image_hw=IMAGE_HW)
    np.testing.assert_allclose(result.affines[[0, 2, 3]], expected.astype(np.float32), rtol=1e-6)
    image = assign_templates(
        people, templates, roi_size=S, alignment="pose", image_hw=IMAGE_HW, fallback_mode="image"
    )
    np.testing.assert_allclose(image.affines[0], image_affine(IMAGE_HW, roi_size=S), rtol=1e-6)
    np.testing.assert_allclose(image.affines[1], result.affines[1])  # alignable: unchanged
