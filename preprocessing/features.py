"""Per-person inputs rendered for storage: skeleton features, quantisation, warped mask targets.

Numpy only (no Ray). ``render_skeleton_features`` is the storage twin of
``pose2seg.ops.render_skeleton_features`` (torch): the same formula of ``docs/ARCHITECTURE.md``
with the same float32 operation order, so both agree up to float rounding.

Mask warping (:func:`warp_mask`) samples the source mask *bilinearly* at each output pixel
centre mapped back through the inverse affine, averaging an ``n x n`` grid of sub-pixel samples
when the warp shrinks the mask by a factor ``f > 1`` (``n = min(ceil(f), 4)``, an area estimate
that avoids dropping thin parts), and thresholds the result at 0.5. Outside the source mask
counts as background.
"""

from __future__ import annotations

import math

import numpy as np

from pose2seg.skeleton import (
    LIMBS,
    NUM_KEYPOINTS,
    NUM_SKELETON_CHANNELS,
    OFFICIAL_HEATMAP_CUTOFF,
    SKELETON_RENDERINGS,
    official_limb_orientation,
)

QUANT_SCALE: float = 127.0
"""Stored skeleton value = round(x * QUANT_SCALE) as int8; decoded as value / QUANT_SCALE."""
MAX_SUPERSAMPLING: int = 4

_LIMB_A = np.array([a for a, _ in LIMBS])
_LIMB_B = np.array([b for _, b in LIMBS])


def render_skeleton_features(
    kpts_aligned: np.ndarray,
    *,
    roi_size: int,
    sigma_px: float,
    width_px: float,
    hidden_negative: bool = False,
    rendering: str = "ours",
    index_convention: bool = False,
) -> np.ndarray:
    """Part affinity fields and keypoint confidence maps in the aligned frame.

    ``rendering="official"`` (``model.skeleton_rendering``): the official code's rule instead,
    :func:`render_official_skeleton_features` (which alone reads ``index_convention``).

    At pixel centres ``p = (j + 0.5, i + 0.5)``:

    - heatmap k: ``exp(-|p - p_k|^2 / (2 sigma^2))``, ``sigma = sigma_px * S / 64``; zero when
      keypoint k is not usable (v = 0); negated for a hidden keypoint (v = 1) when
      ``hidden_negative`` (the official convention, ``model.hidden_keypoints = negative``);
    - limb (a, b) of ``LIMBS`` with both ends usable and ``|p_b - p_a| > 1e-6``: the unit vector
      ``d = (p_b - p_a) / |p_b - p_a|`` where ``0 <= (p - p_a).d <= |p_b - p_a|`` and
      ``|(p - p_a) x d| <= w``, ``w = width_px * S / 64``; zero elsewhere.

    Args:
        kpts_aligned: ``(N, K, 3)`` keypoints mapped into the aligned frame (pixels), visibility.
        roi_size: S.
        sigma_px: ``model.heatmap_sigma_px``, the Gaussian std in pixels at S = 64.
        width_px: ``model.paf_width_px``, the limb half-width in pixels at S = 64.
        hidden_negative: draw the Gaussians of hidden (v = 1) keypoints negative.

    Returns:
        ``(N, 55, S, S)`` float32: 2 PAF channels per limb (x then y, ``LIMBS`` order), then
        one confidence map per keypoint.
    """
    kpts = np.asarray(kpts_aligned, dtype=np.float32)
    if kpts.ndim != 3 or kpts.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"kpts_aligned must have shape (N, {NUM_KEYPOINTS}, 3), got {kpts.shape}")
    if roi_size < 1 or sigma_px <= 0 or width_px <= 0:
        raise ValueError(
            f"render_skeleton_features: need roi_size >= 1, sigma_px > 0, width_px > 0; got "
            f"{roi_size}, {sigma_px}, {width_px}"
        )
    _check_rendering(rendering)
    if rendering == "official":
        return render_official_skeleton_features(
            kpts,
            roi_size=roi_size,
            sigma_px=sigma_px,
            width_px=width_px,
            hidden_negative=hidden_negative,
            index_convention=index_convention,
        )
    n, size = len(kpts), int(roi_size)
    sigma = float(sigma_px) * size / 64.0
    half_width = float(width_px) * size / 64.0
    out = np.zeros((n, NUM_SKELETON_CHANNELS, size, size), dtype=np.float32)
    if n == 0:
        return out
    centres = np.arange(size, dtype=np.float32) + np.float32(0.5)
    px = centres.reshape(1, 1, 1, size)  # column -> x
    py = centres.reshape(1, 1, size, 1)  # row -> y
    xy = kpts[..., :2]
    usable = kpts[..., 2] > 0

    dx = px - xy[..., 0, None, None]  # (N, K, 1, S)
    dy = py - xy[..., 1, None, None]  # (N, K, S, 1)
    heat = out[:, 2 * len(LIMBS) :]
    np.add(dx * dx, dy * dy, out=heat)
    heat /= np.float32(-2.0 * sigma * sigma)
    np.exp(heat, out=heat)
    heat *= _heatmap_sign(kpts[..., 2], hidden_negative)[..., None, None]

    pa, pb = xy[:, _LIMB_A], xy[:, _LIMB_B]  # (N, L, 2)
    vec = pb - pa
    length = np.sqrt(vec[..., 0] * vec[..., 0] + vec[..., 1] * vec[..., 1])  # (N, L)
    valid = usable[:, _LIMB_A] & usable[:, _LIMB_B] & (length > 1e-6)
    unit = vec / np.maximum(length, np.float32(1e-6))[..., None]
    ux, uy = unit[..., 0, None, None], unit[..., 1, None, None]  # (N, L, 1, 1)
    rx = px - pa[..., 0, None, None]  # (N, L, 1, S)
    ry = py - pa[..., 1, None, None]  # (N, L, S, 1)
    along = rx * ux + ry * uy  # (N, L, S, S)
    across = np.abs(rx * uy - ry * ux)
    on_limb = (along >= 0) & (along <= length[..., None, None]) & (across <= half_width)
    on_limb &= valid[..., None, None]
    paf = out[:, : 2 * len(LIMBS)].reshape(n, len(LIMBS), 2, size, size)
    np.multiply(on_limb, ux, out=paf[:, :, 0])
    np.multiply(on_limb, uy, out=paf[:, :, 1])
    return out


def _check_rendering(rendering: str) -> None:
    if rendering not in SKELETON_RENDERINGS:
        raise ValueError(
            f"model.skeleton_rendering must be one of {list(SKELETON_RENDERINGS)}, got {rendering!r}"
        )


_OFFICIAL_ORIENTATION = official_limb_orientation()
_OFFICIAL_A = np.array([a for a, _, _ in _OFFICIAL_ORIENTATION])
_OFFICIAL_B = np.array([b for _, b, _ in _OFFICIAL_ORIENTATION])
_OFFICIAL_FLIP = np.array([f for _, _, f in _OFFICIAL_ORIENTATION])


def render_official_skeleton_features(
    kpts_aligned: np.ndarray,
    *,
    roi_size: int,
    sigma_px: float,
    width_px: float,
    hidden_negative: bool = True,
    index_convention: bool = False,
) -> np.ndarray:
    """The official Pose2Seg code's skeleton features, in our channel order: the numpy twin of
    ``pose2seg.ops.render_official_skeleton_features`` (same rule, same float64 operations).

    The rule works in index coordinates ``q``: the keypoints themselves when
    ``index_convention`` (``model.roi_geometry = official``), else ``q = p - 0.5`` for our
    continuous convention: heatmap ``exp(-d)``, ``d = |(j, i) - q_k|^2 / 2 / sigma^2``,
    where ``d < 4.6025`` (negated for v = 1 when ``hidden_negative``); limb field: the unit
    vector of the official limb direction (negated for our reversed leg limbs) on the pixels
    of the endpoints' box ``[max(round(min - w), 0), min(round(max + w), S))`` whose distance to
    the line through both endpoints is ``< w``.

    Returns:
        ``(N, 55, S, S)`` float32.
    """
    kpts = np.asarray(kpts_aligned, dtype=np.float64)
    if kpts.ndim != 3 or kpts.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"kpts_aligned must have shape (N, {NUM_KEYPOINTS}, 3), got {kpts.shape}")
    n, size = len(kpts), int(roi_size)
    sigma = float(sigma_px) * size / 64.0
    width = float(width_px) * size / 64.0
    out = np.zeros((n, NUM_SKELETON_CHANNELS, size, size), dtype=np.float32)
    if n == 0:
        return out
    q = kpts[..., :2] - (0.0 if index_convention else 0.5)
    vis = kpts[..., 2]
    usable = vis > 0
    grid = np.arange(size, dtype=np.float64)
    gx = grid.reshape(1, 1, 1, size)
    gy = grid.reshape(1, 1, size, 1)

    dx = gx - q[..., 0, None, None]
    dy = gy - q[..., 1, None, None]
    d = (dx * dx + dy * dy) / 2.0 / (sigma * sigma)
    heat = np.where(d < OFFICIAL_HEATMAP_CUTOFF, np.exp(-d), 0.0)
    sign = usable.astype(np.float64)
    if hidden_negative:
        sign = np.where(vis == 1, -sign, sign)
    out[:, 2 * len(LIMBS) :] = heat * sign[..., None, None]

    pa, pb = q[:, _OFFICIAL_A], q[:, _OFFICIAL_B]  # (N, L, 2)
    vec = pb - pa
    length = np.sqrt(vec[..., 0] * vec[..., 0] + vec[..., 1] * vec[..., 1])
    valid = usable[:, _OFFICIAL_A] & usable[:, _OFFICIAL_B] & (length > 0)
    unit = vec / np.where(length > 0, length, 1.0)[..., None]
    lo = np.maximum(np.rint(np.minimum(pa, pb) - width), 0)  # np.rint: half to even
    hi = np.minimum(np.rint(np.maximum(pa, pb) + width), size)
    in_x = (gx >= lo[..., 0, None, None]) & (gx < hi[..., 0, None, None])
    in_y = (gy >= lo[..., 1, None, None]) & (gy < hi[..., 1, None, None])
    ux, uy = unit[..., 0, None, None], unit[..., 1, None, None]
    dist = np.abs((gx - pa[..., 0, None, None]) * uy - (gy - pa[..., 1, None, None]) * ux)
    on_limb = in_x & in_y & (dist < width) & valid[..., None, None]
    paf = out[:, : 2 * len(LIMBS)].reshape(n, len(LIMBS), 2, size, size)
    flip = _OFFICIAL_FLIP[None, :, None, None]
    paf[:, :, 0] = on_limb * (ux * flip)
    paf[:, :, 1] = on_limb * (uy * flip)
    return out


def _window_pixels(
    x_lo: np.ndarray, x_hi: np.ndarray, y_lo: np.ndarray, y_hi: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pixel whose centre lies in the boxes ``[x_lo, x_hi] x [y_lo, y_hi]`` (M boxes).

    Returns ``(owner, rows, cols)``: flat int arrays, ``owner`` the box index of each pixel.
    """
    c0 = np.clip(np.floor(x_lo - 0.5), 0, size).astype(np.int64)
    c1 = np.clip(np.ceil(x_hi - 0.5) + 1, 0, size).astype(np.int64)
    r0 = np.clip(np.floor(y_lo - 0.5), 0, size).astype(np.int64)
    r1 = np.clip(np.ceil(y_hi - 0.5) + 1, 0, size).astype(np.int64)
    width = np.maximum(c1 - c0, 0)
    count = width * np.maximum(r1 - r0, 0)
    owner = np.repeat(np.arange(len(count)), count)
    offset = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    w = np.maximum(width[owner], 1)
    return owner, r0[owner] + offset // w, c0[owner] + offset % w


# Beyond this many sigmas a Gaussian is below 0.5 / 127 and quantises to 0 (sqrt(2 ln 254)
# = 3.33), plus a pixel of margin.
_HEATMAP_SUPPORT_SIGMAS = 3.4


def _heatmap_sign(visibility: np.ndarray, hidden_negative: bool) -> np.ndarray:
    """``(..., K)`` float32: 0 for unusable keypoints, 1 for usable ones, -1 for hidden (v = 1)
    ones when ``hidden_negative``."""
    sign = (visibility > 0).astype(np.float32)
    if hidden_negative:
        sign[visibility == 1] = -1.0
    return sign


def render_quantised_skeleton_features(
    kpts_aligned: np.ndarray,
    *,
    roi_size: int,
    sigma_px: float,
    width_px: float,
    hidden_negative: bool = False,
    rendering: str = "ours",
    index_convention: bool = False,
) -> np.ndarray:
    """``quantise(render_skeleton_features(...))``, computed only near the limbs and keypoints.

    ``rendering="official"``: ``quantise`` of the dense
    :func:`render_official_skeleton_features` (no windowing).

    Each limb is evaluated on the pixels of its bounding box grown by the half-width plus one
    pixel (outside it no pixel centre is within ``w`` of the segment), each Gaussian on a
    square of radius ``3.4 sigma + 1`` (outside it the value quantises to 0). Inside, the
    float32 arithmetic is the same as :func:`render_skeleton_features`, so the result is the
    same int8 array (up to 1 at exact rounding ties of the exponential). About 20x less work
    at S = 64: this is what the pipeline stores.

    Returns:
        ``(N, 55, S, S)`` int8.
    """
    kpts = np.asarray(kpts_aligned, dtype=np.float32)
    if kpts.ndim != 3 or kpts.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"kpts_aligned must have shape (N, {NUM_KEYPOINTS}, 3), got {kpts.shape}")
    if roi_size < 1 or sigma_px <= 0 or width_px <= 0:
        raise ValueError(
            f"render_quantised_skeleton_features: need roi_size >= 1, sigma_px > 0, width_px > 0; "
            f"got {roi_size}, {sigma_px}, {width_px}"
        )
    _check_rendering(rendering)
    if rendering == "official":
        return quantise(
            render_official_skeleton_features(
                kpts,
                roi_size=roi_size,
                sigma_px=sigma_px,
                width_px=width_px,
                hidden_negative=hidden_negative,
                index_convention=index_convention,
            )
        )
    n, size = len(kpts), int(roi_size)
    sigma = float(sigma_px) * size / 64.0
    half_width = float(width_px) * size / 64.0
    out = np.zeros((n, NUM_SKELETON_CHANNELS, size, size), dtype=np.int8)
    if n == 0:
        return out
    xy = kpts[..., :2]
    usable = kpts[..., 2] > 0
    half = np.float32(0.5)

    # Part affinity fields: one box per (person, limb) with both ends usable.
    pa, pb = xy[:, _LIMB_A], xy[:, _LIMB_B]  # (N, L, 2)
    vec = pb - pa
    length = np.sqrt(vec[..., 0] * vec[..., 0] + vec[..., 1] * vec[..., 1])
    valid = usable[:, _LIMB_A] & usable[:, _LIMB_B] & (length > 1e-6)
    unit = vec / np.maximum(length, np.float32(1e-6))[..., None]
    person, limb = np.nonzero(valid)
    if len(person):
        a, b = pa[person, limb], pb[person, limb]
        grow = half_width + 1.0
        lo, hi = np.minimum(a, b) - grow, np.maximum(a, b) + grow
        owner, rows, cols = _window_pixels(lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1], size)
        u = unit[person, limb]
        ux, uy = u[owner, 0], u[owner, 1]
        rx = (cols.astype(np.float32) + half) - a[owner, 0]
        ry = (rows.astype(np.float32) + half) - a[owner, 1]
        along = rx * ux + ry * uy
        across = np.abs(rx * uy - ry * ux)
        on = (along >= 0) & (along <= length[person, limb][owner]) & (across <= half_width)
        owner, rows, cols = owner[on], rows[on], cols[on]
        q = quantise(u)  # (M, 2): quantise(on * u) is on * quantise(u)
        channel = 2 * limb[owner]
        out[person[owner], channel, rows, cols] = q[owner, 0]
        out[person[owner], channel + 1, rows, cols] = q[owner, 1]

    # Confidence maps: one square per usable keypoint.
    person, joint = np.nonzero(usable)
    if len(person):
        p = xy[person, joint]
        radius = _HEATMAP_SUPPORT_SIGMAS * sigma + 1.0
        owner, rows, cols = _window_pixels(
            p[:, 0] - radius, p[:, 0] + radius, p[:, 1] - radius, p[:, 1] + radius, size
        )
        dx = (cols.astype(np.float32) + half) - p[owner, 0]
        dy = (rows.astype(np.float32) + half) - p[owner, 1]
        value = dx * dx + dy * dy
        value /= np.float32(-2.0 * sigma * sigma)
        np.exp(value, out=value)
        channel = 2 * len(LIMBS) + joint[owner]
        q = quantise(value)
        if hidden_negative:
            # quantise is odd-symmetric, so quantise(-x) = -quantise(x).
            hidden = kpts[person, joint, 2][owner] == 1
            q[hidden] = -q[hidden]
        out[person[owner], channel, rows, cols] = q
    return out


def quantise(features: np.ndarray) -> np.ndarray:
    """``round(x * 127)`` clipped to ``[-127, 127]`` as int8 (features lie in ``[-1, 1]``)."""
    scaled = np.rint(np.asarray(features, dtype=np.float32) * QUANT_SCALE)
    return np.clip(scaled, -QUANT_SCALE, QUANT_SCALE).astype(np.int8)


def dequantise(values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantise`: ``value / 127`` as float32."""
    return np.asarray(values, dtype=np.float32) / np.float32(QUANT_SCALE)


def _invert_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (2, 3) or not np.isfinite(affine).all():
        raise ValueError(f"affine must be a finite (2, 3) matrix, got {affine!r}")
    lin = affine[:, :2]
    det = float(np.linalg.det(lin))
    if abs(det) < 1e-12:
        raise ValueError(f"affine is singular (det {det:.3g}): {affine!r}")
    inv = np.linalg.inv(lin)
    return np.concatenate([inv, -inv @ affine[:, 2:]], axis=1)


def warp_mask(mask: np.ndarray, affine: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Warp a binary mask with ``affine`` (source -> destination pixels) into ``out_hw``.

    Bilinear sampling at destination pixel centres mapped back through ``affine^-1``
    (supersampled when the warp shrinks, see the module docstring), thresholded at 0.5.

    Args:
        mask: ``(H, W)`` bool source mask.
        affine: ``(2, 3)`` source pixel coordinates -> destination pixel coordinates.
        out_hw: destination ``(h, w)``.

    Returns:
        ``(h, w)`` bool.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    inv = _invert_affine(affine)
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    # Source pixels per destination pixel along the longer axis of the inverse map.
    shrink = float(np.linalg.svd(inv[:, :2], compute_uv=False)[0])
    sub = int(min(max(math.ceil(shrink - 1e-9), 1), MAX_SUPERSAMPLING))
    offsets = (np.arange(sub, dtype=np.float64) + 0.5) / sub
    us = (np.arange(out_w)[:, None] + offsets[None]).reshape(-1)  # (w * sub,)
    vs = (np.arange(out_h)[:, None] + offsets[None]).reshape(-1)  # (h * sub,)
    # Index-space source coordinates (pixel centres at integers): x - 0.5.
    x = inv[0, 0] * us[None, :] + inv[0, 1] * vs[:, None] + inv[0, 2] - 0.5
    y = inv[1, 0] * us[None, :] + inv[1, 1] * vs[:, None] + inv[1, 2] - 0.5
    src = np.pad(mask.astype(np.float32), 1)  # a zero border: outside counts as background
    height, width = src.shape
    x = np.clip(x + 1.0, 0.0, width - 1.0)
    y = np.clip(y + 1.0, 0.0, height - 1.0)
    x0 = np.minimum(np.floor(x).astype(np.int64), width - 2)
    y0 = np.minimum(np.floor(y).astype(np.int64), height - 2)
    fx, fy = (x - x0).astype(np.float32), (y - y0).astype(np.float32)
    top = src[y0, x0] * (1 - fx) + src[y0, x0 + 1] * fx
    bottom = src[y0 + 1, x0] * (1 - fx) + src[y0 + 1, x0 + 1] * fx
    value = top * (1 - fy) + bottom * fy  # (h * sub, w * sub)
    if sub > 1:
        value = value.reshape(out_h, sub, out_w, sub).mean(axis=(1, 3))
    return value >= 0.5


def warp_mask_to_aligned(mask: np.ndarray, affine: np.ndarray, roi_size: int) -> np.ndarray:
    """A person's visible mask warped into their S x S aligned frame.

    Args:
        mask: ``(H, W)`` bool, in the frame ``affine`` maps from.
        affine: ``(2, 3)`` that frame -> aligned-frame pixels.
        roi_size: S.

    Returns:
        ``(S, S)`` bool.
    """
    return warp_mask(mask, affine, (roi_size, roi_size))


def pack_targets(targets: np.ndarray) -> bytes:
    """``np.packbits`` of bool targets ``(N, S, S)`` (row-major, big-endian bit order)."""
    targets = np.asarray(targets)
    if targets.ndim != 3 or targets.shape[1] != targets.shape[2]:
        raise ValueError(f"targets must have shape (N, S, S), got {targets.shape}")
    return np.packbits(targets.astype(bool).reshape(-1)).tobytes()


def unpack_targets(data: bytes, *, num_people: int, roi_size: int) -> np.ndarray:
    """Inverse of :func:`pack_targets`: ``(N, S, S)`` bool."""
    count = num_people * roi_size * roi_size
    packed = np.frombuffer(data, dtype=np.uint8)
    if len(packed) != (count + 7) // 8:
        raise ValueError(
            f"packed targets hold {len(packed)} bytes, expected {(count + 7) // 8} for "
            f"{num_people} people at S={roi_size}"
        )
    return np.unpackbits(packed, count=count).astype(bool).reshape(num_people, roi_size, roi_size)
