"""Per-person training augmentation (pose2seg/augment.py): features and targets follow the same
perturbed transform, draws are seeded, and with every option off nothing changes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pose2seg.augment import (
    AugmentSettings,
    augment_batch,
    compose_affines,
    occlude_keypoints,
    random_perturbations,
    step_generator,
    warp_masks_to_aligned,
)
from pose2seg.batch import PersonBatch
from pose2seg.config import Config
from pose2seg.skeleton import NUM_KEYPOINTS, NUM_PAF_CHANNELS
from preprocessing.features import warp_mask

torch.set_num_threads(2)

INPUT, S = 96, 32
ON = AugmentSettings(
    roi_size=S, sigma_px=2.0, width_px=1.5, rotation_deg=30.0, scale=0.2, shift=0.1
)


def _people(num: int = 3, seed: int = 0):
    """People as thick rectangles (visible masks) with keypoints at least 4 px inside them."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((num, INPUT, INPUT), dtype=bool)
    kpts = np.zeros((num, NUM_KEYPOINTS, 3), dtype=np.float32)
    affines = np.zeros((num, 2, 3), dtype=np.float32)
    for i in range(num):
        x0, y0 = rng.uniform(5, 40, size=2)
        w, h = rng.uniform(20, 30), rng.uniform(35, 50)
        masks[i, int(y0) : int(y0 + h), int(x0) : int(x0 + w)] = True
        kpts[i, :, 0] = rng.uniform(x0 + 5, x0 + w - 5, NUM_KEYPOINTS)
        kpts[i, :, 1] = rng.uniform(y0 + 5, y0 + h - 5, NUM_KEYPOINTS)
        kpts[i, :, 2] = 2
        kpts[i, rng.choice(NUM_KEYPOINTS, 3, replace=False), 2] = 0
        side = 1.25 * max(w, h)
        scale = S / side
        affines[i] = [
            [scale, 0, S / 2 - scale * (x0 + w / 2)],
            [0, scale, S / 2 - scale * (y0 + h / 2)],
        ]
    return masks, kpts, affines


def _batch(masks, kpts, affines) -> PersonBatch:
    num = len(kpts)
    targets = np.stack([warp_mask(m, a, (S, S)) for m, a in zip(masks, affines, strict=True)])
    return PersonBatch(
        images=torch.zeros(1, 3, INPUT, INPUT),
        batch_index=torch.zeros(num, dtype=torch.long),
        affines=torch.from_numpy(affines),
        skeleton=torch.zeros(num, 55, S, S),
        targets=torch.from_numpy(targets.astype(np.float32)),
        image_ids=torch.tensor([1]),
        person_ids=torch.arange(num),
        keypoints=torch.from_numpy(kpts),
    )


def _heatmap_peaks(skeleton: torch.Tensor) -> torch.Tensor:
    """(P,K,2) row, col of each keypoint heatmap's maximum."""
    heat = skeleton[:, NUM_PAF_CHANNELS:].flatten(2)
    index = heat.argmax(-1)
    return torch.stack([index // S, index % S], -1)


def test_perturbed_features_and_target_stay_consistent():
    masks, kpts, affines = _people()
    batch = _batch(masks, kpts, affines)
    out = augment_batch(
        batch, torch.from_numpy(masks), settings=ON, generator=step_generator(0, 0, 5)
    )
    assert not torch.allclose(out.affines, batch.affines)
    usable = batch.keypoints[..., 2] > 0
    for label, result in (("before", _batch(masks, kpts, affines)), ("after", out)):
        if label == "before":
            # Render the stored-style features of the unperturbed batch for the same check.
            result = augment_batch(
                result,
                None,
                settings=AugmentSettings(
                    roi_size=S, sigma_px=2.0, width_px=1.5, occlusion_keypoint_prob=1e-12
                ),
                generator=step_generator(0, 0, 0),
            )
        peaks = _heatmap_peaks(result.skeleton)
        aligned = kpts[..., :2] @ result.affines[:, :, :2].numpy().transpose(0, 2, 1)
        aligned = aligned + result.affines[:, None, :, 2].numpy()
        inside = ((aligned >= 1) & (aligned < S - 1)).all(-1) & usable.numpy()
        assert inside.sum() > 10, label
        for p, k in zip(*np.nonzero(inside), strict=True):
            row, col = peaks[p, k].tolist()
            # The peak is where the perturbed transform puts the keypoint ...
            assert (
                abs(col + 0.5 - aligned[p, k, 0]) <= 1.0
                and abs(row + 0.5 - aligned[p, k, 1]) <= 1.0
            )
            # ... and lands inside the warped mask, as it did before the perturbation.
            assert result.targets[p, row, col] == 1.0, (label, p, k)
    # The re-warped target covers the person about as much as before (scale 0.8-1.2 squared).
    ratio = out.targets.sum((1, 2)) / batch.targets.sum((1, 2))
    assert ((ratio > 0.5) & (ratio < 1.7)).all()


def test_warped_masks_match_the_stored_target_warp():
    masks, _, affines = _people(seed=3)
    ours = warp_masks_to_aligned(torch.from_numpy(masks), torch.from_numpy(affines), roi_size=S)
    stored = np.stack([warp_mask(m, a, (S, S)) for m, a in zip(masks, affines, strict=True)])
    inter = (ours.numpy().astype(bool) & stored).sum()
    union = (ours.numpy().astype(bool) | stored).sum()
    assert inter / union > 0.97


def test_perturbations_are_similarities_in_range_about_the_centre():
    m = random_perturbations(
        500, roi_size=S, rotation_deg=30.0, scale=0.2, shift=0.1, generator=step_generator(1, 0, 0)
    ).double()
    lin = m[:, :, :2]
    scale = torch.sqrt(torch.linalg.det(lin))
    assert ((scale > 0.8 - 1e-6) & (scale < 1.2 + 1e-6)).all()
    angle = torch.rad2deg(torch.atan2(lin[:, 1, 0], lin[:, 0, 0]))
    assert angle.abs().max() <= 30.0 + 1e-4 and angle.abs().max() > 25.0
    assert torch.allclose(lin[:, 0, 0], lin[:, 1, 1]) and torch.allclose(
        lin[:, 0, 1], -lin[:, 1, 0]
    )
    centre = torch.tensor([S / 2, S / 2], dtype=torch.float64)
    moved = (lin @ centre) + m[:, :, 2] - centre  # where the centre goes: the shift alone
    assert moved.abs().max() <= 0.1 * S + 1e-4
    # Composition: first the alignment, then the perturbation.
    a = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, -1.0]]])
    b = torch.tensor([[[0.0, -1.0, 4.0], [1.0, 0.0, 2.0]]])
    p = torch.tensor([[5.0, 7.0]])
    direct = b[0, :, :2] @ (a[0, :, :2] @ p[0] + a[0, :, 2]) + b[0, :, 2]
    composed = compose_affines(b, a)
    assert torch.allclose(composed[0, :, :2] @ p[0] + composed[0, :, 2], direct)


def test_augmentation_is_seeded():
    masks, kpts, affines = _people()
    settings = dataclasses.replace(ON, occlusion_keypoint_prob=0.2, occlusion_box_prob=0.5)

    def run(step: int) -> PersonBatch:
        return augment_batch(
            _batch(masks, kpts, affines),
            torch.from_numpy(masks),
            settings=settings,
            generator=step_generator(7, 1, step),
        )

    first, again, other = run(3), run(3), run(4)
    for name in ("affines", "skeleton", "targets"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert not torch.equal(first.affines, other.affines)
    # Workers (ranks) draw differently at the same step.
    assert step_generator(7, 0, 3).initial_seed() != step_generator(7, 1, 3).initial_seed()


def test_everything_off_returns_the_batch_untouched_and_the_loop_skips_it():
    masks, kpts, affines = _people()
    batch = _batch(masks, kpts, affines)
    off = AugmentSettings(roi_size=S, sigma_px=2.0, width_px=1.5)
    assert not off.enabled
    assert augment_batch(batch, None, settings=off, generator=step_generator(0, 0, 0)) is batch
    from workflows.train_input import build_augmenter

    assert build_augmenter(Config(), rank=0) is None
    paper = Config().with_overrides({"train.augment_rotation_deg": 30.0})
    assert build_augmenter(paper, rank=0) is not None
    assert build_augmenter(paper.with_overrides({"model.arch": "maskrcnn"}), rank=0) is None


def test_occlusion_drops_keypoints_from_the_skeleton_only():
    masks, kpts, affines = _people()
    batch = _batch(masks, kpts, affines)
    settings = AugmentSettings(roi_size=S, sigma_px=2.0, width_px=1.5, occlusion_keypoint_prob=1.0)
    out = augment_batch(batch, None, settings=settings, generator=step_generator(0, 0, 0))
    assert float(out.skeleton.abs().sum()) == 0.0  # every keypoint dropped: no heatmap, no limb
    assert out.affines is batch.affines and out.targets is batch.targets
    assert torch.equal(out.keypoints, batch.keypoints)  # the pose itself is not edited
    # Area occlusion: exactly the keypoints inside the box are dropped.
    aligned = torch.rand(200, NUM_KEYPOINTS, 3) * S
    aligned[..., 2] = 2
    dropped = occlude_keypoints(
        aligned, roi_size=S, keypoint_prob=0.0, box_prob=1.0, generator=step_generator(0, 0, 1)
    )
    lost = (dropped[..., 2] == 0).float().mean(1)
    assert 0.0 < float(lost.mean()) < 0.5  # boxes of 0.2-0.5 S cover a part of the RoI
    assert ((dropped[..., 2] == 0) | (dropped[..., 2] == 2)).all()
    none = occlude_keypoints(
        aligned, roi_size=S, keypoint_prob=0.0, box_prob=0.0, generator=step_generator(0, 0, 1)
    )
    assert torch.equal(none, aligned)


def test_geometric_augmentation_needs_the_input_masks():
    masks, kpts, affines = _people()
    with pytest.raises(ValueError, match="input masks"):
        augment_batch(
            _batch(masks, kpts, affines), None, settings=ON, generator=step_generator(0, 0, 0)
        )


def test_input_frame_masks_decode_the_stored_rles():
    from pycocotools import mask as mask_utils

    from preprocessing.schema import input_frame_masks

    masks, _, _ = _people(2)
    rles = []
    for m in masks:
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rles.append({"size": rle["size"], "counts": rle["counts"].decode("ascii")})
    rows = [
        {"image_id": 1, "person_ids": [1, 2], "mask_rles": rles},
        {"image_id": 2, "person_ids": [], "mask_rles": []},
    ]
    np.testing.assert_array_equal(input_frame_masks(rows, input_size=INPUT), masks)
    with pytest.raises(ValueError, match="data.input_size"):
        input_frame_masks(rows, input_size=INPUT * 2)
