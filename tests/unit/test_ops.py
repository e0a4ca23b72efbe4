"""Affine-Align maths, the inverse warp and the torch skeleton features, checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pose2seg.ops import (
    affine_to_sampling_theta,
    align_features,
    invert_affines,
    render_skeleton_features,
    transform_keypoints,
    warp_aligned_to_image,
)
from pose2seg.skeleton import LIMBS, NUM_KEYPOINTS, NUM_PAF_CHANNELS, NUM_SKELETON_CHANNELS

torch.set_num_threads(2)


def coordinate_features(h: int, w: int) -> torch.Tensor:
    """(1,2,h,w): channel 0 holds the column index x, channel 1 the row index y."""
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    return torch.stack([xs, ys])[None]


def test_translation_affine_samples_exact_feature_pixels():
    stride, size = 4, 4
    features = coordinate_features(16, 16)
    offset_x, offset_y = 3, 5
    # u = x / stride - offset: aligned pixel (i, j) lands on feature pixel (i + oy, j + ox).
    affine = torch.tensor([[[1 / stride, 0.0, -offset_x], [0.0, 1 / stride, -offset_y]]])
    roi = align_features(features, torch.tensor([0]), affine, roi_size=size, stride=stride)
    cols = torch.arange(size, dtype=torch.float32)
    assert torch.allclose(roi[0, 0], (cols + offset_x).expand(size, size), atol=1e-5)
    assert torch.allclose(roi[0, 1], (cols + offset_y)[:, None].expand(size, size), atol=1e-5)


def test_general_affine_samples_at_inverse_mapped_pixel_centres():
    # Bilinear sampling reproduces a linear function exactly, so the sampled coordinate channels
    # must equal A^-1 of each RoI pixel centre, expressed in feature pixels (X / stride - 0.5).
    stride, size, h, w = 4, 8, 32, 32
    angle = 0.7
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    m = 0.15 * rot @ torch.tensor([[1.0, 0.3], [0.0, 1.2]])
    t = torch.tensor([4.0, 4.0]) - m @ torch.tensor([64.0, 64.0])  # input (64, 64) -> RoI centre
    affine = torch.cat([m, t[:, None]], dim=1)[None]
    roi = align_features(
        coordinate_features(h, w), torch.tensor([0]), affine, roi_size=size, stride=stride
    )
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    uu, vv = torch.meshgrid(centres, centres, indexing="xy")
    inv = invert_affines(affine)[0]
    xs = inv[0, 0] * uu + inv[0, 1] * vv + inv[0, 2]
    ys = inv[1, 0] * uu + inv[1, 1] * vv + inv[1, 2]
    assert torch.allclose(roi[0, 0], xs / stride - 0.5, atol=1e-4)
    assert torch.allclose(roi[0, 1], ys / stride - 0.5, atol=1e-4)


def test_theta_matches_hand_derivation_for_a_scale():
    # Identity-scale affine (stride 1, RoI = whole map): theta must be the identity.
    affine = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    theta = affine_to_sampling_theta(affine, roi_size=16, feature_stride=1, feature_hw=(16, 16))
    assert torch.allclose(theta, affine, atol=1e-6)
    # Half resolution map at stride 2 covering the same 16 px: also the identity.
    theta = affine_to_sampling_theta(affine, roi_size=16, feature_stride=2, feature_hw=(8, 8))
    assert torch.allclose(theta, affine, atol=1e-6)


def test_people_of_several_images_read_their_own_image():
    features = torch.stack([torch.full((1, 8, 8), float(b)) for b in range(3)])  # image b holds b
    affine = torch.tensor([[1 / 4, 0.0, 0.0], [0.0, 1 / 4, 0.0]]).repeat(5, 1, 1)
    batch_index = torch.tensor([2, 0, 2, 1, 2])
    roi = align_features(features, batch_index, affine, roi_size=8, stride=4)
    assert roi.shape == (5, 1, 8, 8)
    for p, b in enumerate(batch_index.tolist()):
        assert torch.allclose(roi[p], torch.full((1, 8, 8), float(b)))


def test_align_with_no_people_is_empty_but_differentiable():
    features = torch.randn(2, 3, 8, 8, requires_grad=True)
    roi = align_features(
        features, torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, 3), roi_size=4, stride=4
    )
    assert roi.shape == (0, 3, 4, 4)
    roi.sum().backward()
    assert features.grad is not None and float(features.grad.abs().sum()) == 0.0


def test_singular_affine_raises_naming_the_person():
    affines = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[1.0, 2.0, 0.0], [0.5, 1.0, 0.0]]])
    with pytest.raises(ValueError, match=r"affines\[1\] is singular"):
        invert_affines(affines)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(P, 2, 3\)"):
        align_features(
            torch.zeros(1, 1, 4, 4),
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1, 3, 3),
            roi_size=4,
            stride=1,
        )
    with pytest.raises(ValueError, match="batch_index values"):
        align_features(
            torch.zeros(1, 1, 4, 4), torch.tensor([1]), torch.eye(2, 3)[None], roi_size=4, stride=1
        )


def disk_mask(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0).float()


def test_warp_then_inverse_warp_returns_the_mask():
    h, w, size = 120, 100, 64
    mask = disk_mask(h, w, 50, 60, 18, 35) + disk_mask(h, w, 62, 30, 8, 8)
    mask = (mask > 0).float()
    # Rotate by 20 degrees and scale the 40x80 body into the 64 px RoI.
    angle = math.radians(20)
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    m = 0.7 * rot
    t = torch.tensor([32.0, 32.0]) - m @ torch.tensor([50.0, 50.0])
    affine = torch.cat([m, t[:, None]], dim=1)[None]
    aligned = align_features(mask[None, None], torch.tensor([0]), affine, roi_size=size, stride=1)[
        :, 0
    ]
    back = warp_aligned_to_image(aligned, affine, out_hw=(h, w))
    assert back.shape == (1, h, w)
    restored = back[0] > 0.5
    truth = mask > 0.5
    iou = (restored & truth).sum() / (restored | truth).sum()
    assert float(iou) > 0.95


def test_inverse_warp_reads_aligned_pixel_at_mapped_point():
    # The aligned map holds its own column coordinate u - 0.5; the warped-back value at image
    # pixel centre p must be (A p).u - 0.5 wherever A p falls inside the RoI.
    size = 16
    aligned = (torch.arange(size, dtype=torch.float32)).expand(size, size)[None]
    affine = torch.tensor([[[0.5, 0.0, 2.0], [0.0, 0.5, 1.0]]])
    back = warp_aligned_to_image(aligned, affine, out_hw=(20, 20))
    xs = torch.arange(20, dtype=torch.float32) + 0.5
    expected_u = 0.5 * xs + 2.0 - 0.5
    inside = (expected_u >= 0.5) & (expected_u <= size - 1.5)
    assert torch.allclose(back[0, 5, inside], expected_u[inside], atol=1e-5)


def test_transform_keypoints_keeps_visibility():
    kpts = torch.tensor([[[1.0, 2.0, 2.0], [3.0, 4.0, 0.0]]])
    affine = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, -1.0]]])
    out = transform_keypoints(kpts, affine)
    assert torch.allclose(out, torch.tensor([[[3.0, 5.0, 2.0], [7.0, 11.0, 0.0]]]))


def one_limb_pose(a_xy, b_xy, a_index: int, b_index: int) -> torch.Tensor:
    kpts = torch.zeros(1, NUM_KEYPOINTS, 3)
    kpts[0, a_index] = torch.tensor([*a_xy, 2.0])
    kpts[0, b_index] = torch.tensor([*b_xy, 1.0])
    return kpts


def test_paf_on_and_off_a_limb():
    a, b = LIMBS[0]
    kpts = one_limb_pose((10.5, 20.5), (30.5, 20.5), a, b)
    feats = render_skeleton_features(kpts, roi_size=64, sigma_px=2.0, width_px=1.5)
    assert feats.shape == (1, NUM_SKELETON_CHANNELS, 64, 64)
    paf_x, paf_y = feats[0, 0], feats[0, 1]
    assert paf_x[20, 15] == 1.0 and paf_y[20, 15] == 0.0  # on the limb
    assert paf_x[21, 15] == 1.0  # 1 px across <= 1.5
    assert paf_x[22, 15] == 0.0  # 2 px across > 1.5
    assert paf_x[20, 35] == 0.0  # past the end
    assert paf_x[20, 9] == 0.0  # before the start
    assert (
        float(feats[0, 2:NUM_PAF_CHANNELS].abs().sum()) == 0.0
    )  # other limbs have an unusable end


def test_paf_diagonal_limb_unit_vector():
    a, b = LIMBS[5]
    kpts = one_limb_pose((10.5, 10.5), (40.5, 50.5), a, b)
    feats = render_skeleton_features(kpts, roi_size=64, sigma_px=2.0, width_px=1.5)
    # (25.5, 30.5) lies on the segment: its pixel is (row 30, col 25).
    assert feats[0, 10, 30, 25] == pytest.approx(0.6)
    assert feats[0, 11, 30, 25] == pytest.approx(0.8)
    assert feats[0, 10, 30, 35] == 0.0


def test_heatmap_peak_and_falloff_scale_with_roi():
    a, b = LIMBS[0]
    kpts = one_limb_pose((10.5, 20.5), (30.5, 20.5), a, b)
    feats = render_skeleton_features(kpts, roi_size=64, sigma_px=2.0, width_px=1.5)
    heat = feats[0, NUM_PAF_CHANNELS + a]
    assert heat[20, 10] == pytest.approx(1.0)
    assert heat[20, 12] == pytest.approx(math.exp(-4 / (2 * 2.0**2)))
    assert int(heat.argmax()) == 20 * 64 + 10
    unusable = [k for k in range(NUM_KEYPOINTS) if k not in (a, b)]
    assert float(feats[0, NUM_PAF_CHANNELS + torch.tensor(unusable)].abs().sum()) == 0.0
    # At S = 32 sigma is halved: one pixel away the value is exp(-1 / 2).
    small = render_skeleton_features(
        kpts / torch.tensor([2.0, 2.0, 1.0]), roi_size=32, sigma_px=2.0, width_px=1.5
    )
    kx, ky = 10.5 / 2, 20.5 / 2  # 5.25, 10.25: nearest centre (5.5, 10.5)
    expected = math.exp(-((5.5 - kx) ** 2 + (10.5 - ky) ** 2) / (2 * 1.0**2))
    assert small[0, NUM_PAF_CHANNELS + a, 10, 5] == pytest.approx(expected, rel=1e-5)


def test_render_batches_people_and_empty():
    rng = np.random.default_rng(0)
    kpts = torch.from_numpy(rng.uniform(0, 32, size=(3, NUM_KEYPOINTS, 3)).astype(np.float32))
    kpts[..., 2] = 2.0
    both = render_skeleton_features(kpts, roi_size=32, sigma_px=2.0, width_px=1.5)
    one = render_skeleton_features(kpts[1:2], roi_size=32, sigma_px=2.0, width_px=1.5)
    assert torch.equal(both[1:2], one)
    empty = render_skeleton_features(
        torch.zeros(0, NUM_KEYPOINTS, 3), roi_size=32, sigma_px=2.0, width_px=1.5
    )
    assert empty.shape == (0, NUM_SKELETON_CHANNELS, 32, 32)
