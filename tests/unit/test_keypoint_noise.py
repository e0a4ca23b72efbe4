"""Degraded GT keypoints for robustness evaluation (pose2seg/keypoint_noise.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pose2seg.config import Config, ConfigError
from pose2seg.keypoint_noise import degrade_image_keypoints, degrade_keypoints
from pose2seg.skeleton import COCO_KEYPOINT_SIGMAS, NUM_KEYPOINTS


def _people(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    kpts = np.zeros((n, NUM_KEYPOINTS, 3), dtype=np.float32)
    kpts[..., :2] = rng.uniform(50, 150, (n, NUM_KEYPOINTS, 2))
    kpts[..., 2] = rng.choice([0, 1, 2], size=(n, NUM_KEYPOINTS), p=[0.2, 0.3, 0.5])
    kpts[kpts[..., 2] == 0] = 0
    return kpts, np.full(n, 100.0**2)


def test_off_is_the_identity():
    kpts, areas = _people()
    out = degrade_keypoints(kpts, drop_prob=0.0, jitter=0.0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out, kpts)


def test_drops_hidden_keypoints_twice_as_often_and_only_labelled_ones():
    kpts, areas = _people()
    out = degrade_keypoints(
        kpts, drop_prob=0.2, jitter=0.0, rng=np.random.default_rng(1), areas=areas
    )
    vis, new = kpts[..., 2], out[..., 2]
    dropped_visible = ((vis == 2) & (new == 0)).sum() / (vis == 2).sum()
    dropped_hidden = ((vis == 1) & (new == 0)).sum() / (vis == 1).sum()
    assert dropped_visible == pytest.approx(0.2, abs=0.03)
    assert dropped_hidden == pytest.approx(0.4, abs=0.03)
    assert (out[new == 0] == 0).all()  # COCO: an unlabelled keypoint is (0, 0, 0)
    kept = new > 0
    np.testing.assert_array_equal(out[kept], kpts[kept])  # no jitter asked


def test_jitter_has_the_oks_scale_it_promises():
    kpts, areas = _people(2000)
    jitter = 0.5
    out = degrade_keypoints(
        kpts, drop_prob=0.0, jitter=jitter, rng=np.random.default_rng(2), areas=areas
    )
    labelled = kpts[..., 2] > 0
    d2 = ((out[..., :2] - kpts[..., :2]) ** 2).sum(-1)
    kappa = 2 * np.asarray(COCO_KEYPOINT_SIGMAS)
    oks = np.exp(-d2 / (2 * areas[:, None] * kappa[None] ** 2))
    assert oks[labelled].mean() == pytest.approx(1 / (1 + jitter**2), abs=0.01)
    assert (out[~labelled] == 0).all()


def test_seeded_per_image_and_validated():
    kpts, areas = _people(5)
    a = degrade_image_keypoints(kpts, image_id=7, seed=3, drop_prob=0.3, jitter=0.5)
    b = degrade_image_keypoints(kpts, image_id=7, seed=3, drop_prob=0.3, jitter=0.5)
    c = degrade_image_keypoints(kpts, image_id=8, seed=3, drop_prob=0.3, jitter=0.5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="keypoint_drop_prob"):
        degrade_keypoints(kpts, drop_prob=1.5, jitter=0.0, rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="eval.keypoint_jitter"):
        Config().with_overrides({"eval.keypoint_jitter": -1.0})


def test_split_degradation_scales_jitter_by_the_annotated_area():
    from workflows.eval_io import degrade_split_keypoints, gt_keypoints, keypoint_degradation

    kpts = np.zeros((17, 3), np.float32)
    kpts[:, 0], kpts[:, 1], kpts[:, 2] = np.arange(17) * 2.0 + 10, 50.0, 2

    def gt(area):
        return {
            "images": [{"id": 7}],
            "annotations": [
                {"image_id": 7, "iscrowd": 0, "area": area, "keypoints": kpts.ravel().tolist()}
            ],
        }

    assert keypoint_degradation(Config()) is None
    cfg = Config().with_overrides({"eval.keypoint_jitter": 0.5})
    assert keypoint_degradation(cfg) == "drop 0, jitter 0.5, seed 0"
    small, big = gt(100.0), gt(10000.0)
    moved_small = degrade_split_keypoints(gt_keypoints(small), cfg, gt=small)[7]
    moved_big = degrade_split_keypoints(gt_keypoints(big), cfg, gt=big)[7]
    d_small = np.abs(moved_small[..., :2] - kpts[:, :2]).mean()
    d_big = np.abs(moved_big[..., :2] - kpts[:, :2]).mean()
    # Same seed and image id -> the same draws, scaled by sqrt(area): 10x apart.
    assert d_big == pytest.approx(10 * d_small, rel=1e-4)
    assert d_small > 0
