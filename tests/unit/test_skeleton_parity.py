"""Storage (numpy) and inference (torch) skeleton features are the same function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pose2seg.ops import render_skeleton_features as render_torch
from preprocessing.features import quantise, render_quantised_skeleton_features
from preprocessing.features import render_skeleton_features as render_numpy


@pytest.mark.parametrize("roi_size", [32, 48])
def test_numpy_and_torch_renderers_agree(roi_size):
    rng = np.random.default_rng(0)
    kpts = np.zeros((12, 17, 3), np.float32)
    kpts[..., :2] = rng.uniform(-4, roi_size + 4, size=(12, 17, 2))
    kpts[..., 2] = rng.choice([0, 1, 2], size=(12, 17), p=[0.2, 0.3, 0.5])
    ours = render_numpy(kpts, roi_size=roi_size, sigma_px=2.0, width_px=1.5)
    theirs = render_torch(
        torch.from_numpy(kpts), roi_size=roi_size, sigma_px=2.0, width_px=1.5
    ).numpy()
    assert ours.shape == theirs.shape == (12, 55, roi_size, roi_size)
    assert ours.any()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # What training reads (the stored int8) is what inference would compute, quantised.
    stored = render_quantised_skeleton_features(kpts, roi_size=roi_size, sigma_px=2.0, width_px=1.5)
    assert np.abs(stored.astype(int) - quantise(theirs).astype(int)).max() <= 1
