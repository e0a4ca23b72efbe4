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


@pytest.mark.parametrize("roi_size", [32, 64])
def test_official_rule_numpy_and_torch_renderers_agree(roi_size):
    """``model.skeleton_rendering = official``: storage and inference draw the same features,
    and the stored int8 is their quantisation."""
    rng = np.random.default_rng(1)
    kpts = np.zeros((12, 17, 3), np.float32)
    kpts[..., :2] = rng.uniform(-4, roi_size + 4, size=(12, 17, 2))
    kpts[..., 2] = rng.choice([0, 1, 2], size=(12, 17), p=[0.2, 0.3, 0.5])
    args = dict(roi_size=roi_size, sigma_px=3.0, width_px=1.0, hidden_negative=True)
    ours = render_numpy(kpts, rendering="official", **args)
    theirs = render_torch(torch.from_numpy(kpts), rendering="official", **args).numpy()
    assert ours.shape == theirs.shape == (12, 55, roi_size, roi_size)
    assert (ours < 0).any() and (ours[:, :38] != 0).any()
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert not np.allclose(ours, render_numpy(kpts, **args), atol=1e-2)
    stored = render_quantised_skeleton_features(kpts, rendering="official", **args)
    assert np.array_equal(stored, quantise(theirs))


def test_unknown_skeleton_rendering_is_rejected():
    kpts = np.zeros((1, 17, 3), np.float32)
    with pytest.raises(ValueError, match="model.skeleton_rendering"):
        render_numpy(kpts, roi_size=16, sigma_px=3.0, width_px=1.0, rendering="paper")
    with pytest.raises(ValueError, match="model.skeleton_rendering"):
        render_torch(torch.from_numpy(kpts), roi_size=16, sigma_px=3.0, width_px=1.0, rendering="x")
