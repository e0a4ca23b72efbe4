"""Per-person training augmentation, computed on the training workers from what Parquet stores.

Pure torch (any device, seeded by an explicit ``torch.Generator``): no I/O, no Ray.

- **Geometric** (the official recipe: rotation +-30 deg, scale 0.8-1.2, shift +-10 % of the RoI):
  a random similarity ``M`` of the aligned frame about the RoI centre is composed with each
  person's stored alignment, ``A' = M A``. The skeleton features are re-rendered from the
  input-frame keypoints through ``A'`` and the target is re-warped from the person's
  input-frame visible mask (Parquet ``mask_rles``) through ``A'``, so features, target and the
  aligned backbone features all follow the same perturbed transform.
- **Occlusion of the skeleton input** (from the pose-estimation literature): point-wise, each
  usable keypoint dropped (v = 0) with a probability; area, with a probability per person every
  keypoint inside a random virtual occluder box of the RoI dropped. Only the skeleton features
  see the dropped keypoints: the alignment and the target are those of the full pose, so the
  model learns to segment a whole person from an incomplete pose.

Re-rendered features are quantised like the stored ones (``round(127 x) / 127``) so an
augmented batch has the distribution of a stored one. With every option off nothing is
computed and the batch is returned as is (the training loop does not even call this).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pose2seg.batch import PersonBatch
from pose2seg.ops import align_features, render_skeleton_features, transform_keypoints

__all__ = [
    "AugmentSettings",
    "augment_batch",
    "compose_affines",
    "occlude_keypoints",
    "random_perturbations",
    "step_generator",
    "warp_masks_to_aligned",
]

OCCLUDER_SIDE: tuple[float, float] = (0.2, 0.5)
"""Side of an area-occlusion box, as a fraction of the RoI side (uniform in this range)."""
MAX_SUPERSAMPLING: int = 4
_QUANT = 127.0


@dataclass(frozen=True)
class AugmentSettings:
    """The ``train.augment_*`` / ``train.occlusion_*`` keys and the rendering they need."""

    roi_size: int
    sigma_px: float
    width_px: float
    hidden_negative: bool = False
    rendering: str = "ours"
    rotation_deg: float = 0.0
    scale: float = 0.0
    shift: float = 0.0
    occlusion_keypoint_prob: float = 0.0
    occlusion_box_prob: float = 0.0
    index_convention: bool = False
    """``model.roi_geometry = official``: the affines map pixel indices (centres on integers)."""

    @classmethod
    def from_config(cls, config) -> AugmentSettings:
        """From a :class:`pose2seg.config.Config`."""
        model, train = config.model, config.train
        return cls(
            roi_size=model.roi_size,
            sigma_px=model.heatmap_sigma_px,
            width_px=model.paf_width_px,
            hidden_negative=model.hidden_keypoints == "negative",
            rendering=model.skeleton_rendering,
            rotation_deg=train.augment_rotation_deg,
            scale=train.augment_scale,
            shift=train.augment_shift,
            occlusion_keypoint_prob=train.occlusion_keypoint_prob,
            occlusion_box_prob=train.occlusion_box_prob,
            index_convention=model.roi_geometry == "official",
        )

    @property
    def geometric(self) -> bool:
        """True when the alignment is perturbed (targets must be re-warped)."""
        return self.rotation_deg > 0 or self.scale > 0 or self.shift > 0

    @property
    def occlusion(self) -> bool:
        return self.occlusion_keypoint_prob > 0 or self.occlusion_box_prob > 0

    @property
    def enabled(self) -> bool:
        return self.geometric or self.occlusion


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, worker rank, global step): a resumed
    run draws the same augmentation for the same step."""
    mixed = (seed * 1_000_003 + rank) * 1_000_033 + step
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


def random_perturbations(
    num_people: int,
    *,
    roi_size: int,
    rotation_deg: float,
    scale: float,
    shift: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Random similarities of the aligned frame about the RoI centre.

    ``p' = s R(theta) (p - c) + c + t`` with ``theta ~ U(-rotation_deg, rotation_deg)``,
    ``s ~ U(1 - scale, 1 + scale)``, ``t ~ U(-shift, shift) * S`` per axis, ``c = (S/2, S/2)``.

    Returns:
        (P,2,3) float32 on the CPU (aligned pixels -> perturbed aligned pixels).
    """
    u = torch.rand((num_people, 4), generator=generator, dtype=torch.float64) * 2.0 - 1.0
    theta = u[:, 0] * math.radians(rotation_deg)
    s = 1.0 + u[:, 1] * scale
    t = u[:, 2:] * shift * roi_size
    cos, sin = torch.cos(theta) * s, torch.sin(theta) * s
    lin = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    centre = torch.full((num_people, 2), roi_size / 2.0, dtype=torch.float64)
    trans = centre + t - (lin @ centre[..., None])[..., 0]
    return torch.cat([lin, trans[..., None]], dim=-1).to(torch.float32)


def compose_affines(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """``outer o inner`` for (P,2,3) affines: first ``inner``, then ``outer``."""
    lin = outer[:, :, :2] @ inner[:, :, :2]
    trans = outer[:, :, :2] @ inner[:, :, 2:] + outer[:, :, 2:]
    return torch.cat([lin, trans], dim=-1)


def warp_masks_to_aligned(
    masks: torch.Tensor, affines: torch.Tensor, *, roi_size: int
) -> torch.Tensor:
    """Each person's input-frame mask warped into their S x S aligned frame.

    Bilinear sampling at the aligned pixel centres, averaged over an ``n x n`` sub-pixel grid
    when the warp shrinks the mask by a factor ``f`` (``n = min(ceil(f), 4)``, the area estimate
    of the stored targets), thresholded at 0.5.

    Args:
        masks: (P,H,W) bool or float input-frame visible masks.
        affines: (P,2,3) input frame -> aligned frame.
        roi_size: S.

    Returns:
        (P,S,S) float32 in {0, 1}.
    """
    if masks.ndim != 3 or masks.shape[0] != affines.shape[0]:
        raise ValueError(
            f"masks must have shape (P, H, W) with P = {affines.shape[0]}, got {tuple(masks.shape)}"
        )
    num_people = masks.shape[0]
    if num_people == 0:
        return masks.new_zeros((0, roi_size, roi_size), dtype=torch.float32)
    # Input pixels per aligned pixel along the most shrunk axis: 1 / smallest singular value.
    smallest = torch.linalg.svdvals(affines[:, :, :2].double())[:, -1].min()
    sub = int(min(max(math.ceil(1.0 / max(float(smallest), 1e-9) - 1e-9), 1), MAX_SUPERSAMPLING))
    fine = affines.to(torch.float32) * sub
    sampled = align_features(
        masks[:, None].to(torch.float32),
        torch.arange(num_people, device=masks.device),
        fine,
        roi_size=roi_size * sub,
        stride=1,
    )
    if sub > 1:
        sampled = F.avg_pool2d(sampled, sub)
    return (sampled[:, 0] >= 0.5).to(torch.float32)


def occlude_keypoints(
    kpts_aligned: torch.Tensor,
    *,
    roi_size: int,
    keypoint_prob: float,
    box_prob: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Drop keypoints (v = 0) point-wise and inside random occluder boxes.

    Args:
        kpts_aligned: (P,K,3) keypoints in the aligned frame (pixels), visibility.
        roi_size: S.
        keypoint_prob: probability that each usable keypoint is dropped.
        box_prob: probability that a person gets an occluder box; its side is uniform in
            :data:`OCCLUDER_SIDE` x S and its centre uniform in the RoI.
        generator: the CPU generator every draw comes from.

    Returns:
        (P,K,3) a copy with the dropped keypoints' visibility set to 0.
    """
    num_people, num_keypoints = kpts_aligned.shape[:2]
    point = torch.rand((num_people, num_keypoints), generator=generator) < keypoint_prob
    has_box = torch.rand((num_people,), generator=generator) < box_prob
    lo, hi = OCCLUDER_SIDE
    side = (lo + (hi - lo) * torch.rand((num_people, 1), generator=generator)) * roi_size
    centre = torch.rand((num_people, 2), generator=generator) * roi_size
    xy = kpts_aligned[..., :2].detach().cpu()
    inside = ((xy - centre[:, None, :]).abs() <= side[:, :, None] / 2).all(-1)
    dropped = (point | (inside & has_box[:, None])).to(kpts_aligned.device)
    out = kpts_aligned.clone()
    out[..., 2] = torch.where(dropped, torch.zeros_like(out[..., 2]), out[..., 2])
    return out


def augment_batch(
    batch: PersonBatch,
    input_masks: torch.Tensor | None,
    *,
    settings: AugmentSettings,
    generator: torch.Generator,
) -> PersonBatch:
    """The batch with every person's alignment perturbed and/or skeleton input occluded.

    Args:
        batch: a training batch carrying ``keypoints`` (P,K,3) input-frame keypoints.
        input_masks: (P,H,W) input-frame visible masks, the people in batch order; needed only
            when ``settings.geometric``.
        settings: what to do; with nothing enabled the batch is returned unchanged.
        generator: CPU generator of every random draw (see :func:`step_generator`).

    Returns:
        A new batch: ``affines``, ``skeleton`` and ``targets`` follow the perturbed transform;
        images, ids and keypoints are shared with the input.
    """
    if not settings.enabled or batch.num_people == 0:
        return batch
    if batch.keypoints is None:
        raise ValueError("augment_batch: the batch carries no keypoints (rows without keypoints)")
    affines = batch.affines
    targets = batch.targets
    if settings.geometric:
        if input_masks is None or input_masks.shape[0] != batch.num_people:
            raise ValueError(
                f"augment_batch: geometric augmentation needs (P, H, W) input masks with "
                f"P = {batch.num_people}, got "
                f"{None if input_masks is None else tuple(input_masks.shape)}"
            )
        perturb = random_perturbations(
            batch.num_people,
            roi_size=settings.roi_size,
            rotation_deg=settings.rotation_deg,
            scale=settings.scale,
            shift=settings.shift,
            generator=generator,
        ).to(affines.device)
        affines = compose_affines(perturb, affines.to(torch.float32))
        warp = affines
        if settings.index_convention:
            # The same map between pixel centres in the +0.5 convention of the warp below:
            # T(+0.5) A T(-0.5).
            warp = affines.clone()
            warp[:, :, 2] += 0.5 - 0.5 * affines[:, :, :2].sum(dim=2)
        targets = warp_masks_to_aligned(
            input_masks.to(affines.device), warp, roi_size=settings.roi_size
        )
    kpts = transform_keypoints(batch.keypoints.to(affines.device, torch.float32), affines)
    if settings.occlusion:
        kpts = occlude_keypoints(
            kpts,
            roi_size=settings.roi_size,
            keypoint_prob=settings.occlusion_keypoint_prob,
            box_prob=settings.occlusion_box_prob,
            generator=generator,
        )
    skeleton = render_skeleton_features(
        kpts,
        roi_size=settings.roi_size,
        sigma_px=settings.sigma_px,
        width_px=settings.width_px,
        hidden_negative=settings.hidden_negative,
        rendering=settings.rendering,
        index_convention=settings.index_convention,
    )
    skeleton = torch.round(skeleton * _QUANT) / _QUANT
    return dataclasses.replace(batch, affines=affines, skeleton=skeleton, targets=targets)
