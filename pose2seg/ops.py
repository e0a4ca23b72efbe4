"""Torch maths of Affine-Align and of the skeleton features (pure functions, any device).

Coordinate conventions are those of ``docs/ARCHITECTURE.md``: pixel ``(row i, col j)`` covers
``[j, j+1) x [i, i+1)`` and its centre is ``(j + 0.5, i + 0.5)``; a person's affine ``A``
``(2, 3)`` maps input-frame points to aligned-frame points, ``[u, v] = A @ [x, y, 1]``.

``F.affine_grid`` / ``F.grid_sample`` are always used with ``align_corners=False``: a
normalised coordinate ``n`` in ``[-1, 1]`` then names the continuous pixel position
``(n + 1) * size / 2`` of the same convention, so every warp below is a composition of
exact 3x3 maps and no half-pixel fudge is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pose2seg.skeleton import (
    LIMBS,
    NUM_KEYPOINTS,
    OFFICIAL_HEATMAP_CUTOFF,
    SKELETON_RENDERINGS,
    official_limb_orientation,
)

__all__ = [
    "affine_to_sampling_theta",
    "align_features",
    "invert_affines",
    "render_official_skeleton_features",
    "render_skeleton_features",
    "transform_keypoints",
    "warp_aligned_to_image",
    "warp_image_theta",
]

# Below this |det| an affine squashes the RoI to (almost) a line: sampling with it is meaningless.
_MIN_ABS_DET = 1e-10


def _check_affines(affines: torch.Tensor, name: str = "affines") -> None:
    if affines.ndim != 3 or affines.shape[1:] != (2, 3):
        raise ValueError(f"{name} must have shape (P, 2, 3), got {tuple(affines.shape)}")


def _homogeneous(affines: torch.Tensor) -> torch.Tensor:
    """(P,2,3) -> (P,3,3) with the row [0, 0, 1] appended."""
    bottom = affines.new_zeros((affines.shape[0], 1, 3))
    bottom[:, 0, 2] = 1.0
    return torch.cat([affines, bottom], dim=1)


def _pixels_from_normalised(height: float, width: float, *, like: torch.Tensor) -> torch.Tensor:
    """(3,3) map from ``align_corners=False`` normalised coords to pixel coords of an h x w grid."""
    return torch.tensor(
        [[width / 2.0, 0.0, width / 2.0], [0.0, height / 2.0, height / 2.0], [0.0, 0.0, 1.0]],
        dtype=like.dtype,
        device=like.device,
    )


def _normalised_from_pixels(height: float, width: float, *, like: torch.Tensor) -> torch.Tensor:
    """(3,3) inverse of :func:`_pixels_from_normalised`."""
    return torch.tensor(
        [[2.0 / width, 0.0, -1.0], [0.0, 2.0 / height, -1.0], [0.0, 0.0, 1.0]],
        dtype=like.dtype,
        device=like.device,
    )


def invert_affines(affines: torch.Tensor) -> torch.Tensor:
    """Inverse of each affine map.

    Args:
        affines: (P,2,3) maps ``p -> M p + t``.

    Returns:
        (P,2,3) the inverse maps, same dtype. Raises ``ValueError`` naming the first person whose
        matrix is singular.
    """
    _check_affines(affines)
    a64 = affines.double()
    m = a64[:, :, :2]
    det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
    bad = det.abs() < _MIN_ABS_DET
    if bool(bad.any()):
        index = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"affines[{index}] is singular (det={float(det[index]):.3g}); cannot invert it"
        )
    inv_m = (
        torch.stack(
            [
                torch.stack([m[:, 1, 1], -m[:, 0, 1]], dim=-1),
                torch.stack([-m[:, 1, 0], m[:, 0, 0]], dim=-1),
            ],
            dim=1,
        )
        / det[:, None, None]
    )
    inv_t = -(inv_m @ a64[:, :, 2:])
    return torch.cat([inv_m, inv_t], dim=2).to(affines.dtype)


def affine_to_sampling_theta(
    affines: torch.Tensor,
    *,
    roi_size: int,
    feature_stride: float,
    feature_hw: tuple[int, int],
) -> torch.Tensor:
    """``F.affine_grid`` matrices that pull an S x S aligned RoI out of a feature map.

    Output pixel centre ``(j + 0.5, i + 0.5)`` of the RoI samples the feature map at the
    input-frame point ``A^-1 (j + 0.5, i + 0.5)``, where feature pixel ``(y, x)`` has its centre
    at input point ``((x + 0.5) * stride, (y + 0.5) * stride)``.

    Args:
        affines: (P,2,3) input frame -> aligned frame.
        roi_size: S.
        feature_stride: input pixels per feature pixel (4 for the FPN output; 1 for an image).
        feature_hw: (h, w) of the sampled feature map.

    Returns:
        theta: (P,2,3) for ``F.affine_grid(theta, (P, C, S, S), align_corners=False)``.
    """
    _check_affines(affines)
    h, w = feature_hw
    a64 = affines.double()
    # RoI normalised -> aligned pixels -> input pixels -> feature normalised (in input pixel units,
    # the feature map spans [0, w * stride) x [0, h * stride)).
    out_to_aligned = _pixels_from_normalised(roi_size, roi_size, like=a64)
    input_to_feature = _normalised_from_pixels(h * feature_stride, w * feature_stride, like=a64)
    theta = input_to_feature @ _homogeneous(invert_affines(a64)) @ out_to_aligned
    return theta[:, :2, :].to(affines.dtype)


def warp_image_theta(
    affines: torch.Tensor, *, roi_size: int, out_hw: tuple[int, int]
) -> torch.Tensor:
    """``F.affine_grid`` matrices that push S x S aligned maps back to an H x W image frame.

    Output pixel centre ``(x + 0.5, y + 0.5)`` samples the aligned map at ``A (x + 0.5, y + 0.5)``.

    Args:
        affines: (P,2,3) image frame -> aligned frame.
        roi_size: S.
        out_hw: (H, W) of the output frame.

    Returns:
        theta: (P,2,3) for ``F.affine_grid(theta, (P, 1, H, W), align_corners=False)``.
    """
    _check_affines(affines)
    height, width = out_hw
    a64 = affines.double()
    image_from_out = _pixels_from_normalised(height, width, like=a64)
    aligned_to_norm = _normalised_from_pixels(roi_size, roi_size, like=a64)
    theta = aligned_to_norm @ _homogeneous(a64) @ image_from_out
    return theta[:, :2, :].to(affines.dtype)


def align_features(
    features: torch.Tensor,
    batch_index: torch.Tensor,
    affines: torch.Tensor,
    *,
    roi_size: int,
    stride: float,
) -> torch.Tensor:
    """Affine-Align: one S x S RoI per person, all people of all images in one ``grid_sample``.

    Args:
        features: (B,C,h,w) feature maps (or images with ``stride=1``).
        batch_index: (P,) long, the image of each person in ``[0, B)``.
        affines: (P,2,3) input frame -> aligned frame.
        roi_size: S.
        stride: input pixels per feature pixel.

    Returns:
        (P,C,S,S) bilinear samples; points outside the feature map read zeros. With P = 0 the
        (0,C,S,S) result is still connected to ``features`` so that every parameter upstream gets
        a (zero) gradient, which DDP requires.
    """
    if features.ndim != 4:
        raise ValueError(f"features must have shape (B, C, h, w), got {tuple(features.shape)}")
    _check_affines(affines)
    if batch_index.ndim != 1 or batch_index.shape[0] != affines.shape[0]:
        raise ValueError(
            f"batch_index must have shape (P,) with P = {affines.shape[0]} (from affines), "
            f"got {tuple(batch_index.shape)}"
        )
    num_images, channels, h, w = features.shape
    num_people = affines.shape[0]
    size = roi_size
    if num_people == 0:
        return features.new_zeros((0, channels, size, size)) + features.sum() * 0.0
    batch_index = batch_index.long()
    if int(batch_index.min()) < 0 or int(batch_index.max()) >= num_images:
        raise ValueError(
            f"batch_index values must lie in [0, {num_images}), got {batch_index.tolist()}"
        )

    theta = affine_to_sampling_theta(
        affines.to(torch.float32), roi_size=size, feature_stride=stride, feature_hw=(h, w)
    )
    grid = F.affine_grid(theta, [num_people, 1, size, size], align_corners=False)  # (P,S,S,2)

    # grid_sample pairs input n with grid n, so people are laid out in per-image slots
    # (B, max_people * S, S, 2) rather than repeating the feature map once per person, which would
    # copy (P,C,h,w) - far more memory than the RoIs themselves.
    order = torch.argsort(batch_index, stable=True)
    counts = torch.bincount(batch_index, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(batch_index)
    slot[order] = torch.arange(num_people, device=batch_index.device) - starts[batch_index[order]]
    max_people = int(counts.max())
    # Empty slots point far outside the map (normalised -3) so they read zeros and cost nothing.
    slots = grid.new_full((num_images, max_people, size, size, 2), -3.0)
    slots[batch_index, slot] = grid
    sampled = F.grid_sample(
        features,
        slots.view(num_images, max_people * size, size, 2).to(features.dtype),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # (B,C,max_people*S,S)
    sampled = sampled.view(num_images, channels, max_people, size, size).permute(0, 2, 1, 3, 4)
    return sampled[batch_index, slot]


def warp_aligned_to_image(
    maps: torch.Tensor,
    affines: torch.Tensor,
    *,
    out_hw: tuple[int, int],
) -> torch.Tensor:
    """The inverse warp: S x S aligned maps back to an H x W image frame.

    Outside the RoI the result is 0, so warp probabilities (or masks), not logits: a logit 0
    would read as probability 0.5 everywhere outside the person's box.

    Args:
        maps: (P,S,S) probabilities or masks in the aligned frame.
        affines: (P,2,3) image frame -> aligned frame. To produce masks directly at the original
            image size pass the input->aligned affine composed with the original->input scale.
        out_hw: (H, W) of the output frame.

    Returns:
        (P,H,W) float, bilinear.
    """
    if maps.ndim != 3 or maps.shape[1] != maps.shape[2]:
        raise ValueError(f"maps must have shape (P, S, S), got {tuple(maps.shape)}")
    _check_affines(affines)
    if maps.shape[0] != affines.shape[0]:
        raise ValueError(f"maps has {maps.shape[0]} people but affines has {affines.shape[0]}")
    height, width = int(out_hw[0]), int(out_hw[1])
    num_people, size = maps.shape[0], maps.shape[1]
    if num_people == 0:
        return maps.new_zeros((0, height, width))
    theta = warp_image_theta(affines.to(torch.float32), roi_size=size, out_hw=(height, width))
    grid = F.affine_grid(theta, [num_people, 1, height, width], align_corners=False)
    warped = F.grid_sample(
        maps[:, None].float(),
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    return warped[:, 0]


def transform_keypoints(keypoints: torch.Tensor, affines: torch.Tensor) -> torch.Tensor:
    """Map keypoints through each person's affine, keeping the visibility column.

    Args:
        keypoints: (P,K,3) x, y, visibility.
        affines: (P,2,3).

    Returns:
        (P,K,3) mapped x, y and the unchanged visibility.
    """
    if keypoints.ndim != 3 or keypoints.shape[2] != 3:
        raise ValueError(f"keypoints must have shape (P, K, 3), got {tuple(keypoints.shape)}")
    _check_affines(affines)
    if keypoints.shape[0] != affines.shape[0]:
        raise ValueError(
            f"keypoints has {keypoints.shape[0]} people but affines has {affines.shape[0]}"
        )
    xy = keypoints[..., :2] @ affines[:, :, :2].transpose(1, 2) + affines[:, None, :, 2]
    return torch.cat([xy, keypoints[..., 2:]], dim=-1)


def render_skeleton_features(
    kpts_aligned: torch.Tensor,
    *,
    roi_size: int,
    sigma_px: float,
    width_px: float,
    hidden_negative: bool = False,
    rendering: str = "ours",
    index_convention: bool = False,
) -> torch.Tensor:
    """Part affinity fields and keypoint confidence maps in the aligned frame (the reference).

    ``rendering="official"`` (``model.skeleton_rendering``) draws the official code's rule
    instead (see :func:`render_official_skeleton_features`, which alone reads
    ``index_convention``), in the same channel order.

    The formula of ``docs/ARCHITECTURE.md``, at pixel centres ``p = (j + 0.5, i + 0.5)``:

    - heatmap k: ``exp(-|p - p_k|^2 / (2 sigma^2))`` with ``sigma = sigma_px * S / 64``, zero when
      keypoint k is not usable (v = 0); negated for a hidden keypoint (v = 1) when
      ``hidden_negative`` (the official convention, ``model.hidden_keypoints = negative``);
    - limb (a, b) of ``LIMBS`` with both ends usable and ``|p_b - p_a| > 1e-6``: the unit vector
      ``d = (p_b - p_a) / |p_b - p_a|`` where ``0 <= (p - p_a).d <= |p_b - p_a|`` and
      ``|(p - p_a) x d| <= w``, ``w = width_px * S / 64``; zero elsewhere.

    Args:
        kpts_aligned: (P,K,3) keypoints already mapped into the aligned frame (pixels).
        roi_size: S.
        sigma_px: ``model.heatmap_sigma_px``, the Gaussian std in pixels at S = 64.
        width_px: ``model.paf_width_px``, the limb half-width in pixels at S = 64.
        hidden_negative: draw the Gaussians of hidden (v = 1) keypoints negative.
        rendering: ``ours`` or ``official``.

    Returns:
        (P,55,S,S) float32 on the keypoints' device: 2 PAF channels per limb (x then y, limb
        order of ``LIMBS``), then one confidence map per keypoint.
    """
    if kpts_aligned.ndim != 3 or kpts_aligned.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(
            f"kpts_aligned must have shape (P, {NUM_KEYPOINTS}, 3), got {tuple(kpts_aligned.shape)}"
        )
    if rendering not in SKELETON_RENDERINGS:
        raise ValueError(
            f"model.skeleton_rendering must be one of {list(SKELETON_RENDERINGS)}, got {rendering!r}"
        )
    if rendering == "official":
        return render_official_skeleton_features(
            kpts_aligned,
            roi_size=roi_size,
            sigma_px=sigma_px,
            width_px=width_px,
            hidden_negative=hidden_negative,
            index_convention=index_convention,
        )
    size = int(roi_size)
    sigma = float(sigma_px) * size / 64.0
    half_width = float(width_px) * size / 64.0
    kpts = kpts_aligned.to(torch.float32)
    device = kpts.device
    centres = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    px = centres.view(1, 1, 1, size)  # column -> x
    py = centres.view(1, 1, size, 1)  # row -> y
    xy = kpts[..., :2]
    usable = kpts[..., 2] > 0  # (P,K)

    dx = px - xy[..., 0, None, None]  # (P,K,1,S)
    dy = py - xy[..., 1, None, None]  # (P,K,S,1)
    heatmaps = torch.exp(-(dx * dx + dy * dy) / (2.0 * sigma * sigma))
    sign = usable.to(torch.float32)
    if hidden_negative:
        sign = torch.where(kpts[..., 2] == 1, -sign, sign)
    heatmaps = heatmaps * sign[..., None, None]

    a_idx = torch.tensor([a for a, _ in LIMBS], device=device)
    b_idx = torch.tensor([b for _, b in LIMBS], device=device)
    pa, pb = xy[:, a_idx], xy[:, b_idx]  # (P,L,2)
    vec = pb - pa
    length = torch.linalg.vector_norm(vec, dim=-1)  # (P,L)
    valid = usable[:, a_idx] & usable[:, b_idx] & (length > 1e-6)
    unit = vec / length.clamp_min(1e-6)[..., None]
    ux, uy = unit[..., 0, None, None], unit[..., 1, None, None]  # (P,L,1,1)
    rx = px - pa[..., 0, None, None]  # (P,L,1,S)
    ry = py - pa[..., 1, None, None]  # (P,L,S,1)
    along = rx * ux + ry * uy  # (P,L,S,S)
    across = (rx * uy - ry * ux).abs()
    on_limb = (along >= 0) & (along <= length[..., None, None]) & (across <= half_width)
    on_limb = on_limb & valid[..., None, None]
    paf = torch.stack([on_limb * ux, on_limb * uy], dim=2)  # (P,L,2,S,S)
    paf = paf.reshape(kpts.shape[0], 2 * len(LIMBS), size, size)
    return torch.cat([paf, heatmaps], dim=1).to(torch.float32)


def render_official_skeleton_features(
    kpts_aligned: torch.Tensor,
    *,
    roi_size: int,
    sigma_px: float,
    width_px: float,
    hidden_negative: bool = True,
    index_convention: bool = False,
) -> torch.Tensor:
    """The official Pose2Seg code's skeleton features, in our channel order.

    The official rule works in index coordinates ``q`` (pixel ``(j, i)`` centred on the
    integer point): the keypoints themselves when ``index_convention`` (the RoI frame of
    ``model.roi_geometry = official``), else ``q = p - 0.5`` for keypoints in our continuous
    convention (pixel centres at ``j + 0.5``). In float64:

    - heatmap k of a usable keypoint ``q_k``: ``exp(-d)`` with
      ``d = |(j, i) - q_k|^2 / 2 / sigma^2`` where ``d < 4.6025``, else 0;
      ``sigma = sigma_px * S / 64``; negated for v = 1 when ``hidden_negative``;
    - limb (a, b) in the official direction (``OFFICIAL_LIMBS``), both usable, ``q_a != q_b``:
      ``u = (q_b - q_a) / |q_b - q_a|`` on the pixels of the box
      ``[max(round(min(x) - w), 0), min(round(max(x) + w), S))`` (half-open, round half to
      even; same in y), ``w = width_px * S / 64``, whose distance to the infinite line through
      ``q_a`` and ``q_b`` is ``< w``; v plays no other role. Our limbs that run the other way
      get ``-u``.

    Args:
        kpts_aligned: (P,K,3) keypoints in the aligned frame (pixels), visibility.

    Returns:
        (P,55,S,S) float32: as :func:`render_skeleton_features`.
    """
    if kpts_aligned.ndim != 3 or kpts_aligned.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(
            f"kpts_aligned must have shape (P, {NUM_KEYPOINTS}, 3), got {tuple(kpts_aligned.shape)}"
        )
    size = int(roi_size)
    sigma = float(sigma_px) * size / 64.0
    width = float(width_px) * size / 64.0
    device = kpts_aligned.device
    kpts = kpts_aligned.to(torch.float64)
    n = kpts.shape[0]
    q = kpts[..., :2] - (0.0 if index_convention else 0.5)  # (P,K,2) index coordinates
    vis = kpts[..., 2]
    usable = vis > 0
    grid = torch.arange(size, device=device, dtype=torch.float64)
    gx = grid.view(1, 1, 1, size)
    gy = grid.view(1, 1, size, 1)

    dx = gx - q[..., 0, None, None]
    dy = gy - q[..., 1, None, None]
    d = (dx * dx + dy * dy) / 2.0 / (sigma * sigma)  # (P,K,S,S)
    heat = torch.where(d < OFFICIAL_HEATMAP_CUTOFF, torch.exp(-d), torch.zeros_like(d))
    sign = usable.to(torch.float64)
    if hidden_negative:
        sign = torch.where(vis == 1, -sign, sign)
    heat = heat * sign[..., None, None]

    orient = official_limb_orientation()
    a_idx = torch.tensor([a for a, _, _ in orient], device=device)
    b_idx = torch.tensor([b for _, b, _ in orient], device=device)
    flip = torch.tensor([f for _, _, f in orient], device=device, dtype=torch.float64)
    pa, pb = q[:, a_idx], q[:, b_idx]  # (P,L,2)
    vec = pb - pa
    length = torch.linalg.vector_norm(vec, dim=-1)  # (P,L)
    valid = usable[:, a_idx] & usable[:, b_idx] & (length > 0)
    unit = vec / torch.where(length > 0, length, torch.ones_like(length))[..., None]
    lo = torch.minimum(pa, pb) - width
    hi = torch.maximum(pa, pb) + width
    lo = torch.round(lo).clamp_min(0)  # (P,L,2), torch.round: half to even
    hi = torch.round(hi).clamp_max(size)
    in_x = (gx >= lo[..., 0, None, None]) & (gx < hi[..., 0, None, None])  # (P,L,1,S)
    in_y = (gy >= lo[..., 1, None, None]) & (gy < hi[..., 1, None, None])  # (P,L,S,1)
    ux, uy = unit[..., 0, None, None], unit[..., 1, None, None]
    rx = gx - pa[..., 0, None, None]
    ry = gy - pa[..., 1, None, None]
    dist = (rx * uy - ry * ux).abs()  # (P,L,S,S)
    on_limb = in_x & in_y & (dist < width) & valid[..., None, None]
    ux, uy = ux * flip[:, None, None], uy * flip[:, None, None]
    paf = torch.stack([on_limb * ux, on_limb * uy], dim=2)  # (P,L,2,S,S)
    paf = paf.reshape(n, 2 * len(LIMBS), size, size)
    return torch.cat([paf, heat], dim=1).to(torch.float32)
