"""Unit tests of preprocessing.features against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from pose2seg.skeleton import LIMBS, NUM_KEYPOINTS, NUM_PAF_CHANNELS
from preprocessing.features import (
    dequantise,
    pack_targets,
    quantise,
    render_quantised_skeleton_features,
    render_skeleton_features,
    unpack_targets,
    warp_mask,
    warp_mask_to_aligned,
)

S = 64


def _keypoints(points: dict[int, tuple[float, float]]) -> np.ndarray:
    kpts = np.zeros((1, NUM_KEYPOINTS, 3), dtype=np.float32)
    for k, (x, y) in points.items():
        kpts[0, k] = (x, y, 2)
    return kpts


def test_paf_pixel_on_and_off_a_horizontal_limb():
    limb = LIMBS.index((5, 6))  # left shoulder -> right shoulder
    # From (10.5, 20.5) to (30.5, 20.5): d = (1, 0); width w = 1.5 px at S = 64.
    feats = render_skeleton_features(
        _keypoints({5: (10.5, 20.5), 6: (30.5, 20.5)}), roi_size=S, sigma_px=2.0, width_px=1.5
    )
    assert feats.shape == (1, 55, S, S) and feats.dtype == np.float32
    px, py = feats[0, 2 * limb], feats[0, 2 * limb + 1]
    assert px[20, 15] == 1.0 and py[20, 15] == 0.0  # centre (15.5, 20.5): on the limb
    assert px[21, 15] == 1.0  # 1 px across <= 1.5
    assert px[22, 15] == 0.0  # 2 px across > 1.5
    assert px[20, 10] == 1.0 and px[20, 30] == 1.0  # both ends included (0 and |pb - pa|)
    assert px[20, 9] == 0.0 and px[20, 31] == 0.0  # beyond the ends
    assert int((px != 0).sum()) == 21 * 3  # 21 columns x rows 19, 20, 21
    # Every other limb has an unusable end: all PAF channels but this limb's are zero.
    others = np.delete(feats[0, :NUM_PAF_CHANNELS], [2 * limb, 2 * limb + 1], axis=0)
    assert not others.any()


def test_paf_diagonal_limb_holds_the_unit_vector():
    limb = LIMBS.index((7, 9))  # left elbow -> left wrist
    feats = render_skeleton_features(
        _keypoints({7: (10.5, 10.5), 9: (40.5, 50.5)}), roi_size=S, sigma_px=2.0, width_px=1.5
    )
    # d = (30, 40) / 50 = (0.6, 0.8); pixel (25.5, 30.5) is exactly on the segment.
    assert feats[0, 2 * limb, 30, 25] == pytest.approx(0.6)
    assert feats[0, 2 * limb + 1, 30, 25] == pytest.approx(0.8)
    # Pixel (35.5, 30.5): (p - pa) = (25, 20), cross = 25*0.8 - 20*0.6 = 8 > 1.5 -> off.
    assert feats[0, 2 * limb, 30, 35] == 0.0


def test_heatmap_peak_is_one_at_the_keypoint_and_follows_the_gaussian():
    feats = render_skeleton_features(
        _keypoints({0: (20.5, 30.5)}), roi_size=S, sigma_px=2.0, width_px=1.5
    )
    heat = feats[0, NUM_PAF_CHANNELS + 0]
    assert heat[30, 20] == pytest.approx(1.0)
    assert heat.max() == heat[30, 20]
    # 3 px to the right, sigma = 2: exp(-9 / 8).
    assert heat[30, 23] == pytest.approx(np.exp(-9 / 8), rel=1e-6)
    # Unusable keypoints give all-zero maps.
    assert not feats[0, NUM_PAF_CHANNELS + 1 :].any()


def test_sigma_and_width_scale_with_roi_size():
    # At S = 32 sigma = 2 * 32 / 64 = 1: one pixel away gives exp(-1/2).
    feats = render_skeleton_features(
        _keypoints({3: (10.5, 10.5)}), roi_size=32, sigma_px=2.0, width_px=1.5
    )
    assert feats.shape == (1, 55, 32, 32)
    assert feats[0, NUM_PAF_CHANNELS + 3, 11, 10] == pytest.approx(np.exp(-0.5), rel=1e-6)


def test_render_rejects_bad_shapes_and_handles_no_people():
    with pytest.raises(ValueError, match="shape"):
        render_skeleton_features(np.zeros((2, 5, 3)), roi_size=S, sigma_px=2.0, width_px=1.5)
    assert render_skeleton_features(
        np.zeros((0, NUM_KEYPOINTS, 3)), roi_size=8, sigma_px=2, width_px=1
    ).shape == (
        0,
        55,
        8,
        8,
    )


def test_quantise_round_trip():
    x = np.array([-1.0, -0.5, 0.0, 0.003, 0.5, 0.999, 1.0, 1.2], dtype=np.float32)
    q = quantise(x)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, [-127, -64, 0, 0, 64, 127, 127, 127])
    back = dequantise(q)
    assert back.dtype == np.float32
    assert np.abs(back[:-1] - x[:-1]).max() <= 0.5 / 127 + 1e-7


def test_warp_mask_with_a_known_affine():
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:20, 30:50] = True  # x in [30, 50), y in [10, 20)
    # Translate by (-30, -10) and scale by 2: the rectangle becomes [0, 40) x [0, 20).
    affine = np.array([[2.0, 0.0, -60.0], [0.0, 2.0, -20.0]])
    out = warp_mask_to_aligned(mask, affine, 64)
    expected = np.zeros((64, 64), dtype=bool)
    expected[0:20, 0:40] = True
    np.testing.assert_array_equal(out, expected)
    # Shrinking by 2 (supersampled): the rectangle becomes [15, 25) x [5, 10).
    half = np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])
    small = warp_mask(mask, half, (20, 30))
    expected = np.zeros((20, 30), dtype=bool)
    expected[5:10, 15:25] = True
    np.testing.assert_array_equal(small, expected)
    with pytest.raises(ValueError, match="singular"):
        warp_mask(mask, np.zeros((2, 3)), (4, 4))


def test_pack_targets_round_trip():
    rng = np.random.default_rng(0)
    targets = rng.random((3, 16, 16)) > 0.5
    data = pack_targets(targets)
    assert len(data) == 3 * 16 * 16 // 8
    np.testing.assert_array_equal(unpack_targets(data, num_people=3, roi_size=16), targets)
    assert unpack_targets(
        pack_targets(np.zeros((0, 16, 16), bool)), num_people=0, roi_size=16
    ).shape == (0, 16, 16)
    with pytest.raises(ValueError, match="expected"):
        unpack_targets(data, num_people=2, roi_size=16)


@pytest.mark.parametrize(
    ("size", "sigma_px", "width_px"), [(64, 2.0, 1.5), (32, 2.0, 1.5), (64, 3.5, 3.0)]
)
def test_sparse_quantised_rendering_equals_quantised_dense_rendering(size, sigma_px, width_px):
    rng = np.random.default_rng(size)
    kpts = np.concatenate(
        [
            rng.uniform(-8, size + 8, (40, NUM_KEYPOINTS, 2)),
            rng.integers(0, 3, (40, NUM_KEYPOINTS, 1)),
        ],
        -1,
    ).astype(np.float32)
    kpts[0, :, :2] = kpts[0, :1, :2]  # zero-length limbs
    dense = quantise(
        render_skeleton_features(kpts, roi_size=size, sigma_px=sigma_px, width_px=width_px)
    )
    sparse = render_quantised_skeleton_features(
        kpts, roi_size=size, sigma_px=sigma_px, width_px=width_px
    )
    assert sparse.dtype == np.int8 and sparse.shape == dense.shape
    assert np.abs(sparse.astype(np.int16) - dense).max() <= 1  # 1 only at exact rounding ties
    assert (sparse == dense).mean() > 0.9999
    empty = np.zeros((0, NUM_KEYPOINTS, 3))
    assert render_quantised_skeleton_features(empty, roi_size=8, sigma_px=2, width_px=1).shape == (
        0,
        55,
        8,
        8,
    )
