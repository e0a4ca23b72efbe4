"""The synthetic occluded-people dataset: the project's default data, a pure function of a seed.

Each image holds 1..``max_people`` articulated 2D people in the COCO 17-keypoint layout, drawn
as filled body parts (torso polygon, head ellipse, limbs as tapered capsules, hands and feet)
in random colours and textures on a textured, cluttered background, back to front. The output
is a COCO person-keypoints dataset that pycocotools loads::

    root/images/{train,val}/<image_id:012d>.png
    root/annotations/person_keypoints_{train,val}.json
    root/synthetic_meta.json          # the generator parameters; written last

Conventions (COCO's):

- ``segmentation`` is the person's *visible* pixels (painter's order: a person in front owns
  the pixels it covers), as polygons traced exactly along pixel edges, or compressed RLE;
  ``area`` and ``bbox`` are those of the visible mask.
- keypoint visibility: 2 when the keypoint's pixel belongs to the person's visible mask, 1 when
  it is covered by someone in front, 0 (with x = y = 0) when it falls outside the image.
- people whose visible area is tiny (less than ``MIN_VISIBLE_FRACTION`` of their full body or
  fewer than ``MIN_VISIBLE_PX`` pixels) or who have no labelled keypoint are not written (their
  pixels stay in the image, like unannotated people in COCO) and are counted in the summary.

Extra annotation fields: ``max_iou`` is OCHuman's occlusion measure, the largest IoU of the
person's *full-body* (amodal, un-occluded) bounding box with the full-body box of any other
person drawn in the image (dropped people included, they are still in the picture);
``max_mask_iou`` is the same with full-body masks instead of boxes.

The val split is made harder on purpose: every image has at least two people (when
``max_people >= 2``) and it uses its own overlap ``val_overlap`` (by default ``0.7 + 0.3 *
overlap``), so that a large share of its people is heavily occluded (``max_iou >= 0.5``), as in
OCHuman (mean MaxIoU 0.67).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from pose2seg.skeleton import KEYPOINT_NAMES, LIMBS, NUM_KEYPOINTS
from preprocessing import storage

if TYPE_CHECKING:
    from pose2seg.config import Config

GENERATOR_VERSION = 2
"""Bumped whenever the generator's output changes; part of ``synthetic_meta.json``."""
SPLITS: tuple[str, ...] = ("train", "val")
SEGMENTATION_FORMATS: tuple[str, ...] = ("polygon", "rle", "mixed")
MIN_VISIBLE_PX = 32
MIN_VISIBLE_FRACTION = 0.05
IMAGE_ID_STRIDE = 10_000_000
"""Image ids are ``split_index * IMAGE_ID_STRIDE + i + 1`` (train 1.., val 10000001..)."""
META_FILE = "synthetic_meta.json"

# Body-part codes of a person's part map; colour groups pick the garment each part wears.
_TORSO, _NECK, _HEAD, _HAIR = 1, 2, 3, 4
_UPPER_ARM, _FOREARM, _HAND = 5, 6, 7
_THIGH, _SHIN, _FOOT = 8, 9, 10
_NUM_PART_CODES = 11

_KP = {name: i for i, name in enumerate(KEYPOINT_NAMES)}


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------


def _unit(angle: float) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)])


def _capsule(a: np.ndarray, b: np.ndarray, ra: float, rb: float, n: int = 7) -> np.ndarray:
    """Polygon (M, 2) of a tapered capsule from ``a`` (radius ``ra``) to ``b`` (radius ``rb``)."""
    d = b - a
    length = float(np.hypot(*d))
    if length < 1e-6:
        return _ellipse(a, max(ra, rb), max(ra, rb), 0.0, n=2 * n)
    u = d / length
    p = np.array([-u[1], u[0]])
    ta = np.linspace(math.pi / 2, 3 * math.pi / 2, n)
    tb = np.linspace(-math.pi / 2, math.pi / 2, n)
    arc_a = a + ra * (np.cos(ta)[:, None] * u + np.sin(ta)[:, None] * p)
    arc_b = b + rb * (np.cos(tb)[:, None] * u + np.sin(tb)[:, None] * p)
    return np.concatenate([arc_a, arc_b])


def _ellipse(c: np.ndarray, rx: float, ry: float, angle: float, n: int = 20) -> np.ndarray:
    """Polygon (n, 2) of an ellipse centred at ``c``, radii along the rotated x/y axes."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    ux, uy = _unit(angle), _unit(angle + math.pi / 2)
    return c + rx * np.cos(t)[:, None] * ux + ry * np.sin(t)[:, None] * uy


@dataclass
class _Body:
    """One sampled person: keypoints (K, 2) in image coordinates and its coloured parts."""

    keypoints: np.ndarray
    parts: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (part code, polygon)
    height_px: float = 0.0


def sample_body(rng: np.random.Generator, *, height_px: float, hip_xy: np.ndarray) -> _Body:
    """Sample one articulated person of standing height ``height_px`` with hips at ``hip_xy``.

    Proportions follow adult anthropometry in units of body height h (torso 0.30 h, upper arm
    0.16 h, forearm 0.145 h, thigh and shin 0.245 h); joint angles come from a mixture of
    standing, arms out/raised, stride and crouch poses. The person faces the camera or turns
    away (which mirrors left and right in the image), with a random yaw that narrows the
    shoulders and hips. Returns keypoints (K, 2) and the part polygons in drawing order.
    """
    h = height_px
    facing = 1.0 if rng.random() < 0.6 else -1.0  # +1: the person's left is on image right
    yaw = rng.uniform(0.55, 1.0)
    build = rng.uniform(0.85, 1.2)
    lengths = rng.uniform(0.94, 1.06, size=6)
    lean = float(np.clip(rng.normal(0, 0.12), -0.35, 0.35))
    up = np.array([math.sin(lean), -math.cos(lean)])
    right = np.array([math.cos(lean), math.sin(lean)])
    world_down, world_right = np.array([0.0, 1.0]), np.array([1.0, 0.0])

    kp = np.zeros((NUM_KEYPOINTS, 2))
    hip_c = np.asarray(hip_xy, dtype=float)
    neck = hip_c + 0.30 * h * lengths[0] * up
    sh_half = 0.115 * h * yaw * rng.uniform(0.9, 1.1)
    hip_half = 0.075 * h * yaw
    kp[_KP["left_shoulder"]] = neck + facing * sh_half * right
    kp[_KP["right_shoulder"]] = neck - facing * sh_half * right
    kp[_KP["left_hip"]] = hip_c + facing * hip_half * right
    kp[_KP["right_hip"]] = hip_c - facing * hip_half * right

    # Head: an ellipse along the (tilted) neck axis; face keypoints inside it.
    tilt = lean + float(np.clip(rng.normal(0, 0.15), -0.4, 0.4))
    head_up = np.array([math.sin(tilt), -math.cos(tilt)])
    head_right = np.array([math.cos(tilt), math.sin(tilt)])
    head_c = neck + 0.135 * h * head_up
    turn = (1.0 - yaw) * (1.0 if rng.random() < 0.5 else -1.0)
    side = facing * yaw * head_right
    kp[_KP["nose"]] = head_c - 0.005 * h * head_up + turn * 0.03 * h * head_right
    kp[_KP["left_eye"]] = (
        head_c + 0.018 * h * head_up + 0.022 * h * side + turn * 0.03 * h * head_right
    )
    kp[_KP["right_eye"]] = (
        head_c + 0.018 * h * head_up - 0.022 * h * side + turn * 0.03 * h * head_right
    )
    kp[_KP["left_ear"]] = (
        head_c + 0.005 * h * head_up + 0.048 * h * side + turn * 0.012 * h * head_right
    )
    kp[_KP["right_ear"]] = (
        head_c + 0.005 * h * head_up - 0.048 * h * side + turn * 0.012 * h * head_right
    )

    # Arms: abduction angle from the torso's down axis, then an elbow bend.
    arm_polys: list[tuple[int, np.ndarray]] = []
    r_ua, r_fa = 0.036 * h * build, 0.028 * h * build
    for name, sign in (("left", 1.0), ("right", -1.0)):
        out = sign * facing * right
        mode = rng.random()
        if mode < 0.45:
            abduct = rng.uniform(0.05, 0.5)
        elif mode < 0.7:
            abduct = rng.uniform(0.6, 1.7)
        elif mode < 0.9:
            abduct = rng.uniform(1.8, 2.9)
        else:
            abduct = rng.uniform(-0.5, 0.0)
        bend = rng.uniform(0.0, 2.0) if rng.random() < 0.5 else rng.uniform(0.0, 0.4)
        fore = abduct - bend if rng.random() < 0.7 else abduct + bend
        foreshorten = rng.uniform(0.75, 1.0) if rng.random() < 0.25 else 1.0
        shoulder = kp[_KP[f"{name}_shoulder"]]
        elbow = shoulder + 0.16 * h * lengths[1] * foreshorten * (
            math.cos(abduct) * -up + math.sin(abduct) * out
        )
        fdir = math.cos(fore) * -up + math.sin(fore) * out
        wrist = elbow + 0.145 * h * lengths[2] * fdir
        kp[_KP[f"{name}_elbow"]], kp[_KP[f"{name}_wrist"]] = elbow, wrist
        arm_polys.append((_UPPER_ARM, _capsule(shoulder, elbow, r_ua, r_ua * 0.85)))
        arm_polys.append((_FOREARM, _capsule(elbow, wrist, r_fa, r_fa * 0.8)))
        arm_polys.append((_HAND, _capsule(wrist, wrist + 0.035 * h * fdir, 0.024 * h, 0.02 * h)))

    # Legs: thigh angle from world-down, knee bend back towards down.
    leg_polys: list[tuple[int, np.ndarray]] = []
    crouch = rng.random() < 0.1
    stride_leg = rng.integers(0, 2) if rng.random() < 0.3 else -1
    r_th, r_sh = 0.058 * h * build, 0.043 * h * build
    for i, (name, sign) in enumerate((("left", 1.0), ("right", -1.0))):
        out = sign * facing * world_right
        if crouch:
            thigh_angle = rng.uniform(0.9, 1.5)
            knee_bend = thigh_angle + rng.uniform(-0.2, 0.2)
        elif i == stride_leg:
            thigh_angle = rng.uniform(0.3, 0.8) * (1.0 if rng.random() < 0.5 else -0.6)
            knee_bend = rng.uniform(0.0, 0.6) * np.sign(thigh_angle)
        else:
            thigh_angle = rng.uniform(-0.1, 0.35)
            knee_bend = rng.uniform(-0.1, 0.3)
        hip = kp[_KP[f"{name}_hip"]]
        knee = hip + 0.245 * h * lengths[3] * (
            math.cos(thigh_angle) * world_down + math.sin(thigh_angle) * out
        )
        shin_angle = thigh_angle - knee_bend
        ankle = knee + 0.245 * h * lengths[4] * (
            math.cos(shin_angle) * world_down + math.sin(shin_angle) * out
        )
        kp[_KP[f"{name}_knee"]], kp[_KP[f"{name}_ankle"]] = knee, ankle
        toe = ankle + 0.05 * h * (0.4 * world_down + out * 0.9 * (0.3 + turn))
        leg_polys.append((_THIGH, _capsule(hip, knee, r_th, r_th * 0.8)))
        leg_polys.append((_SHIN, _capsule(knee, ankle, r_sh, r_sh * 0.75)))
        leg_polys.append((_FOOT, _capsule(ankle, toe, 0.025 * h, 0.02 * h)))

    # Torso: shoulders to hips, slightly waisted, down to a crotch point between the thighs.
    ls, rs = kp[_KP["left_shoulder"]], kp[_KP["right_shoulder"]]
    lh, rh = kp[_KP["left_hip"]], kp[_KP["right_hip"]]
    lout, rout = facing * right, -facing * right
    waist = 0.5 * (neck + hip_c)
    waist_half = 0.5 * (sh_half + hip_half) * 0.95 + 0.02 * h
    torso = np.array(
        [
            ls + 0.02 * h * up + 0.01 * h * lout,
            ls + 0.02 * h * lout - 0.03 * h * up,
            waist + waist_half * lout,
            lh + 0.045 * h * lout,
            hip_c - 0.06 * h * up,
            rh + 0.045 * h * rout,
            waist + waist_half * rout,
            rs + 0.02 * h * rout - 0.03 * h * up,
            rs + 0.02 * h * up + 0.01 * h * rout,
        ]
    )
    head = _ellipse(head_c, 0.058 * h, 0.072 * h, tilt)
    hair_c = head_c + (0.03 if facing > 0 else 0.0) * h * head_up
    hair = _ellipse(hair_c, 0.06 * h, 0.05 * h if facing > 0 else 0.072 * h, tilt)
    # Far side first: with the person turned away the arms go behind the torso.
    parts: list[tuple[int, np.ndarray]] = list(leg_polys)
    if facing < 0:
        parts += arm_polys
    parts += [(_TORSO, torso), (_NECK, _capsule(neck, head_c, 0.03 * h, 0.03 * h))]
    if facing > 0:
        parts += [(_HAIR, hair), (_HEAD, head)]
    else:
        parts += [(_HEAD, head), (_HAIR, hair)]
    if facing > 0:
        parts += arm_polys
    return _Body(keypoints=kp, parts=parts, height_px=h)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_SKIN_TONES = np.array(
    [
        [255, 219, 172],
        [241, 194, 125],
        [224, 172, 105],
        [198, 134, 66],
        [141, 85, 36],
        [92, 58, 32],
    ],
    dtype=np.float32,
)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(15, 245, size=3).astype(np.float32)


def _texture(rng: np.random.Generator, shape: tuple[int, int], x0: int, y0: int) -> np.ndarray:
    """A bool pattern (h, w) in image coordinates: stripes, checks or blotches."""
    h, w = shape
    ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
    kind = rng.integers(0, 3)
    period = rng.uniform(4, 14)
    if kind == 0:
        theta = rng.uniform(0, math.pi)
        return np.sin((xs * math.cos(theta) + ys * math.sin(theta)) * (2 * math.pi / period)) > 0
    if kind == 1:
        return ((xs // period + ys // period) % 2).astype(bool)
    grid = rng.random((max(2, h // 6 + 1), max(2, w // 6 + 1))).astype(np.float32)
    big = np.asarray(Image.fromarray((grid * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR))
    return big > 127


def _person_palette(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """Per part code: base colour (P, 3), alternate colour (P, 3), and the patterned codes."""
    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.9, 1.1)
    top, bottom, hair, shoes = (_random_colour(rng) for _ in range(4))
    hair = hair * 0.4
    base = np.zeros((_NUM_PART_CODES, 3), dtype=np.float32)
    base[_TORSO] = base[_UPPER_ARM] = top
    long_sleeves = rng.random() < 0.5
    base[_FOREARM] = top if long_sleeves else skin
    if rng.random() < 0.3:
        long_sleeves = False
        base[_UPPER_ARM] = skin
        base[_FOREARM] = skin
    base[_NECK] = base[_HEAD] = base[_HAND] = skin
    base[_HAIR] = hair
    base[_THIGH] = bottom
    base[_SHIN] = bottom if rng.random() < 0.75 else skin
    base[_FOOT] = shoes
    alt = base * rng.uniform(0.45, 0.8)
    patterned: set[int] = set()
    if rng.random() < 0.5:
        alt[[_TORSO, _UPPER_ARM]] = _random_colour(rng)
        patterned |= {_TORSO} | ({_UPPER_ARM, _FOREARM} if long_sleeves else set())
    if rng.random() < 0.3:
        alt[[_THIGH, _SHIN]] = _random_colour(rng)
        patterned |= {_THIGH}
    return np.clip(base, 0, 255), np.clip(alt, 0, 255), patterned


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured, cluttered background (size, size, 3) float32 in [0, 255]."""
    grid = int(rng.integers(2, 7))
    small = rng.uniform(20, 235, size=(grid, grid, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR), dtype=np.float32)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    theta, period = rng.uniform(0, math.pi), rng.uniform(6, 40)
    grating = np.sin((xs * math.cos(theta) + ys * math.sin(theta)) * (2 * math.pi / period))
    img = img + grating[..., None] * rng.uniform(0, 25, size=3).astype(np.float32)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 8))):
        x, y = rng.uniform(-0.1, 1.0, size=2) * size
        w, h = rng.uniform(0.05, 0.4, size=2) * size
        colour = tuple(int(c) for c in _random_colour(rng))
        if rng.random() < 0.5:
            draw.rectangle([x, y, x + w, y + h], fill=colour)
        else:
            draw.ellipse([x, y, x + w, y + h], fill=colour)
    return np.asarray(canvas, dtype=np.float32)


def _render_body(
    rng: np.random.Generator, body: _Body, size: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]] | None:
    """Rasterise a body: (part map (h, w) uint8, colours (h, w, 3) float32, (x0, y0)) or None.

    The crop is the body's bounding box clipped to the image; None when nothing is inside.
    Polygon vertices are COCO coordinates (pixel j covers [j, j+1)); PIL puts pixel centres on
    integers, hence the half-pixel shift.
    """
    pts = np.concatenate([p for _, p in body.parts])
    x0, y0 = (int(max(0, math.floor(v))) for v in pts.min(axis=0))
    x1, y1 = (int(min(size, math.ceil(v) + 1)) for v in pts.max(axis=0))
    if x1 <= x0 or y1 <= y0:
        return None
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    offset = np.array([x0 + 0.5, y0 + 0.5])
    for code, poly in body.parts:
        draw.polygon([tuple(p) for p in (poly - offset)], fill=code)
    part_map = np.asarray(canvas)
    base, alt, patterned = _person_palette(rng)
    colours = base[part_map]
    if patterned:
        pattern = _texture(rng, part_map.shape, x0, y0) & np.isin(part_map, list(patterned))
        colours[pattern] = alt[part_map[pattern]]
    # Soft shading across the body so that overlapping limbs of one colour stay distinguishable.
    shade = 1.0 + 0.12 * np.sin(
        np.arange(x1 - x0, dtype=np.float32) * rng.uniform(0.05, 0.2) + rng.uniform(0, 6)
    )
    colours *= shade[None, :, None]
    return part_map, colours, (x0, y0)


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two xyxy boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _approx_box(body: _Body) -> np.ndarray:
    pts = np.concatenate([p for _, p in body.parts])
    return np.concatenate([pts.min(axis=0), pts.max(axis=0)])


@dataclass
class SyntheticPerson:
    """One written person: keypoints (K, 3) COCO, visible mask (H, W) bool, occlusion stats."""

    keypoints: np.ndarray
    mask: np.ndarray
    max_iou: float
    max_mask_iou: float


@dataclass
class SyntheticImage:
    """One generated image (H, W, 3) uint8, its kept people and the people it dropped."""

    pixels: np.ndarray
    people: list[SyntheticPerson]
    dropped_occluded: int
    dropped_no_keypoints: int


def generate_image(
    rng: np.random.Generator,
    *,
    image_size: int,
    max_people: int,
    overlap: float,
    min_people: int = 1,
) -> SyntheticImage:
    """Generate one image with ``min_people..max_people`` people, painted back to front.

    ``overlap`` in [0, 1]: the probability that a person is placed next to one already placed
    (else at the least overlapping of several random spots), and how close: at 1 people stand
    almost on top of each other.
    """
    size = image_size
    n = int(rng.integers(min(min_people, max_people), max_people + 1))
    group_height = rng.uniform(0.45, 0.85) * size
    bodies: list[_Body] = []
    boxes: list[np.ndarray] = []
    for k in range(n):
        h = group_height * rng.uniform(0.85, 1.15)
        candidates = []
        if k > 0 and rng.random() < overlap:
            anchor = bodies[int(rng.integers(len(bodies)))]
            hip_anchor = 0.5 * (
                anchor.keypoints[_KP["left_hip"]] + anchor.keypoints[_KP["right_hip"]]
            )
            spread = 0.3 * anchor.height_px * (2.2 * (1.0 - overlap) + 0.35)
            dx = rng.uniform(-1.0, 1.0) * spread
            dy = rng.normal(0.0, 0.06) * h
            candidates.append(hip_anchor + np.array([dx, dy]))
        else:
            tries = 1 if k == 0 else 8
            for _ in range(tries):
                x = rng.uniform(0.15, 0.85) * size
                lo, hi = 0.5 * h, size - 0.4 * h
                y = rng.uniform(lo, hi) if hi > lo else 0.5 * size
                candidates.append(np.array([x, y]))
        best, best_iou = _Body(np.zeros((NUM_KEYPOINTS, 2))), math.inf
        for hip_xy in candidates:
            body = sample_body(rng, height_px=h, hip_xy=hip_xy)
            box = _approx_box(body)
            iou = max((_box_iou(box, b) for b in boxes), default=0.0)
            if iou < best_iou:
                best, best_iou = body, iou
        bodies.append(best)
        boxes.append(_approx_box(best))

    pixels = _background(rng, size)
    label = np.zeros((size, size), dtype=np.int16)  # 0 background, i + 1 person i
    full_masks: list[np.ndarray] = []
    order = rng.permutation(n)  # painting order, back to front
    bodies = [bodies[i] for i in order]
    for i, body in enumerate(bodies):
        full = np.zeros((size, size), dtype=bool)
        rendered = _render_body(rng, body, size)
        if rendered is not None:
            part_map, colours, (x0, y0) = rendered
            inside = part_map > 0
            h_, w_ = part_map.shape
            full[y0 : y0 + h_, x0 : x0 + w_] = inside
            region = pixels[y0 : y0 + h_, x0 : x0 + w_]
            region[inside] = colours[inside]
            label[y0 : y0 + h_, x0 : x0 + w_][inside] = i + 1
        full_masks.append(full)

    full_boxes = [_mask_box_xyxy(m) for m in full_masks]
    areas = np.array([m.sum() for m in full_masks], dtype=np.float64)
    people: list[SyntheticPerson] = []
    dropped_occluded = dropped_no_kp = 0
    for i, body in enumerate(bodies):
        visible = label == i + 1
        vis_area = int(visible.sum())
        if vis_area < MIN_VISIBLE_PX or vis_area < MIN_VISIBLE_FRACTION * areas[i]:
            dropped_occluded += 1
            continue
        keypoints = _visibility(body.keypoints, label, i + 1, size)
        if not (keypoints[:, 2] > 0).any():
            dropped_no_kp += 1
            continue
        max_iou = max_mask_iou = 0.0
        for j in range(n):
            if j == i or areas[j] == 0:
                continue
            max_iou = max(max_iou, _box_iou(full_boxes[i], full_boxes[j]))
            inter = float(np.logical_and(full_masks[i], full_masks[j]).sum())
            max_mask_iou = max(max_mask_iou, inter / (areas[i] + areas[j] - inter))
        people.append(SyntheticPerson(keypoints, visible, max_iou, max_mask_iou))
    return SyntheticImage(
        pixels=np.clip(pixels, 0, 255).astype(np.uint8),
        people=people,
        dropped_occluded=dropped_occluded,
        dropped_no_keypoints=dropped_no_kp,
    )


def _mask_box_xyxy(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros(4)
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def _visibility(xy: np.ndarray, label: np.ndarray, person: int, size: int) -> np.ndarray:
    """COCO keypoints (K, 3): v = 2 on the person's visible pixels, 1 covered, 0 outside (x=y=0)."""
    out = np.zeros((xy.shape[0], 3), dtype=np.float64)
    for k, (x, y) in enumerate(xy):
        if not (0.0 <= x < size and 0.0 <= y < size):
            continue
        owner = label[int(y), int(x)]
        # Every keypoint lies inside its own drawn body, so owner 0 (background) does not occur.
        out[k] = (x, y, 2.0 if owner == person or owner == 0 else 1.0)
    return out


# --------------------------------------------------------------------------------------------
# Mask encodings
# --------------------------------------------------------------------------------------------


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Exact COCO polygons (flat ``[x0, y0, x1, y1, ...]``) of a bool mask (H, W).

    Traces the pixel-edge ("crack") boundary: vertices sit on pixel corners, so pycocotools
    rasterises the polygons back to the very same mask. One polygon per 4-connected component;
    the component's holes are spliced into its polygon through a zero-width bridge, which
    pycocotools' even-odd fill cancels out.
    """
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return []
    r0, c0 = int(rows[0]), int(cols[0])
    crop = mask[r0 : rows[-1] + 1, c0 : cols[-1] + 1]
    loops = _trace_loops(crop)
    outers, holes = [], []
    for loop in loops:
        loop = loop + np.array([c0, r0])
        (outers if _signed_area(loop) > 0 else holes).append(loop)
    outer_areas = [_signed_area(o) for o in outers]
    groups: list[list[np.ndarray]] = [[o] for o in outers]
    for hole in holes:
        top = hole[np.lexsort((hole[:, 0], hole[:, 1]))[0]]
        probe = (top[0] + 0.5, top[1] - 0.5)  # a mask pixel just above the hole
        owners = [i for i, o in enumerate(outers) if _point_in_polygon(probe, o)]
        if not owners:
            raise RuntimeError("mask_to_polygons: a hole outside every outer boundary")  # a bug
        groups[min(owners, key=lambda i: outer_areas[i])].append(hole)
    polygons = []
    for group in groups:
        poly = group[0]
        for hole in group[1:]:
            poly = np.concatenate([poly[:1], hole, hole[:1], poly])
        polygons.append([float(v) for v in poly.reshape(-1)])
    return polygons


def _trace_loops(mask: np.ndarray) -> list[np.ndarray]:
    """Closed crack-edge loops (M, 2) int of a mask, clockwise on screen around foreground.

    Edges run with the foreground on their right (y pointing down); at a corner where two
    foreground pixels touch only diagonally the walk turns right, so foreground is 4-connected.
    Only the corners where the direction changes are kept.
    """
    h, w = mask.shape
    p = np.pad(mask, 1)
    inner = p[1:-1, 1:-1]
    stride = w + 1
    starts, dirs = [], []
    # direction codes: 0 east, 1 south, 2 west, 3 north; a vertex (x, y) has id y * stride + x
    for code, neighbour, (dx, dy) in (
        (0, p[:-2, 1:-1], (0, 0)),  # top edge: (c, r) -> (c+1, r)
        (1, p[1:-1, 2:], (1, 0)),  # right edge: (c+1, r) -> (c+1, r+1)
        (2, p[2:, 1:-1], (1, 1)),  # bottom edge: (c+1, r+1) -> (c, r+1)
        (3, p[1:-1, :-2], (0, 1)),  # left edge: (c, r+1) -> (c, r)
    ):
        r, c = np.nonzero(inner & ~neighbour)
        starts.append((r + dy) * stride + (c + dx))
        dirs.append(np.full(r.size, code))
    start = np.concatenate(starts)
    direction = np.concatenate(dirs)
    step = np.array([1, stride, -1, -stride])
    end = start + step[direction]
    out_edges: dict[int, list[int]] = {}
    for e, s in enumerate(start.tolist()):
        out_edges.setdefault(s, []).append(e)
    dir_list, end_list = direction.tolist(), end.tolist()
    used = [False] * len(dir_list)
    loops = []
    for first in range(len(dir_list)):
        if used[first]:
            continue
        vertices = []
        e = first
        while True:
            used[e] = True
            nxt = [c for c in out_edges[end_list[e]] if not used[c]]
            if not nxt:
                break
            if len(nxt) > 1:
                right = (dir_list[e] + 1) % 4
                nxt = [c for c in nxt if dir_list[c] == right] or nxt
            if dir_list[nxt[0]] != dir_list[e]:
                vertices.append(end_list[e])
            e = nxt[0]
        if dir_list[first] != dir_list[e]:
            vertices.append(end_list[e])
        ids = np.array(vertices)
        loops.append(np.stack([ids % stride, ids // stride], axis=1))
    return loops


def _signed_area(poly: np.ndarray) -> float:
    """Shoelace area; positive for loops clockwise on screen (y down)."""
    x, y = poly[:, 0].astype(np.float64), poly[:, 1].astype(np.float64)
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _point_in_polygon(pt: tuple[float, float], poly: np.ndarray) -> bool:
    x, y = pt
    xs, ys = poly[:, 0].astype(np.float64), poly[:, 1].astype(np.float64)
    xn, yn = np.roll(xs, -1), np.roll(ys, -1)
    crosses = (ys > y) != (yn > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = xs + (y - ys) * (xn - xs) / (yn - ys)
    return bool(np.count_nonzero(crosses & (x < x_at)) % 2)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE ``{"size": [H, W], "counts": str}`` of a bool mask (H, W)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "counts": rle["counts"].decode("ascii"),
    }


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def coco_categories() -> list[dict[str, Any]]:
    """The COCO person category with keypoint names and the 1-based skeleton."""
    return [
        {
            "supercategory": "person",
            "id": 1,
            "name": "person",
            "keypoints": list(KEYPOINT_NAMES),
            "skeleton": [[a + 1, b + 1] for a, b in LIMBS],
        }
    ]


def split_overlap(split: str, overlap: float, val_overlap: float | None = None) -> float:
    """The overlap a split is generated with: ``overlap`` for train; ``val_overlap`` for val,
    by default pushed towards heavy occlusion (``0.7 + 0.3 * overlap``)."""
    if split == "train":
        return overlap
    return 0.7 + 0.3 * overlap if val_overlap is None else val_overlap


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one image: independent of the split sizes and of other images."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


PARALLEL_MIN_IMAGES = 256
"""Splits with fewer images are generated in this process (a worker process costs ~1 s to start)."""


def generation_workers(num_images: int) -> int:
    """Processes that generate a split of ``num_images``: the usable CPUs (at most 8), or 1 for a
    small split. Every image is a pure function of its own seeded generator, so the output does
    not depend on this number."""
    if num_images < PARALLEL_MIN_IMAGES:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _image_annotations(
    root: str,
    split: str,
    index: int,
    image_size: int,
    max_people: int,
    overlap: float,
    seed: int,
    segmentation: str,
) -> tuple[dict[str, Any], list[dict[str, Any]], int, int]:
    """Generate image ``index`` of ``split``, write its PNG under ``root``; return its COCO image
    entry, its people's annotations (without ids: they are numbered in image order by the
    caller) and its dropped-people counts."""
    rng = image_rng(seed, split, index)
    sample = generate_image(
        rng,
        image_size=image_size,
        max_people=max_people,
        overlap=overlap,
        min_people=2 if split == "val" else 1,
    )
    image_id = SPLITS.index(split) * IMAGE_ID_STRIDE + index + 1
    file_name = f"{image_id:012d}.png"
    Image.fromarray(sample.pixels).save(
        os.path.join(root, "images", split, file_name), compress_level=3
    )
    entry = {
        "id": image_id,
        "file_name": file_name,
        "height": image_size,
        "width": image_size,
        "license": 1,
    }
    annotations = []
    for person in sample.people:
        if segmentation == "mixed":
            fmt = "polygon" if rng.random() < 0.5 else "rle"
        else:
            fmt = segmentation
        seg = mask_to_polygons(person.mask) if fmt == "polygon" else mask_to_rle(person.mask)
        x0, y0, x1, y1 = _mask_box_xyxy(person.mask)
        kps = person.keypoints
        annotations.append(
            {
                "image_id": image_id,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": seg,
                "area": float(person.mask.sum()),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "keypoints": [round(float(v), 2) for v in kps.reshape(-1)],
                "num_keypoints": int((kps[:, 2] > 0).sum()),
                "max_iou": round(person.max_iou, 4),
                "max_mask_iou": round(person.max_mask_iou, 4),
            }
        )
    return entry, annotations, sample.dropped_occluded, sample.dropped_no_keypoints


def _image_chunk(args: tuple) -> list[tuple]:
    """:func:`_image_annotations` for a range of indices (one task of the process pool)."""
    root, split, indices, kwargs = args
    return [_image_annotations(root, split, i, **kwargs) for i in indices]


def generate_split(
    root: str,
    split: str,
    *,
    num_images: int,
    image_size: int,
    max_people: int,
    overlap: float,
    seed: int,
    segmentation: str,
    val_overlap: float | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write one split's images and annotation JSON under local ``root``; returns its stats.

    ``workers``: processes that generate the images (None: :func:`generation_workers`); the
    output is the same for any number."""
    os.makedirs(os.path.join(root, "images", split), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    kwargs = {
        "image_size": image_size,
        "max_people": max_people,
        "overlap": split_overlap(split, overlap, val_overlap),
        "seed": seed,
        "segmentation": segmentation,
    }
    workers = generation_workers(num_images) if workers is None else max(1, workers)
    if workers == 1:
        results = _image_chunk((root, split, range(num_images), kwargs))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # Contiguous chunks, several per process (balance), results in image order. "spawn":
        # the caller may hold Ray's threads, which a forked child must not inherit.
        step = max(1, math.ceil(num_images / (workers * 4)))
        chunks = [
            (root, split, range(i, min(i + step, num_images)), kwargs)
            for i in range(0, num_images, step)
        ]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            results = [r for chunk in pool.map(_image_chunk, chunks) for r in chunk]
    images, annotations = [], []
    dropped_occluded = dropped_no_kp = 0
    id_base = SPLITS.index(split) * IMAGE_ID_STRIDE
    for entry, people, occluded, no_kp in results:
        images.append(entry)
        dropped_occluded += occluded
        dropped_no_kp += no_kp
        for person in people:
            annotations.append({"id": len(annotations) + 1 + id_base, **person})
    coco = {
        "info": {
            "description": f"Pose2Seg synthetic occluded people, {split} split",
            "version": str(GENERATOR_VERSION),
            "year": 2024,
            "contributor": "preprocessing.synthetic",
        },
        "licenses": [{"id": 1, "name": "Generated data, no restrictions", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    with open(os.path.join(root, "annotations", f"person_keypoints_{split}.json"), "w") as fh:
        fh.write(json.dumps(coco, separators=(",", ":")))  # dumps uses the C encoder, dump does not
    ious = np.array([a["max_iou"] for a in annotations], dtype=np.float64)
    return {
        "images": num_images,
        "people": len(annotations),
        "dropped_occluded": dropped_occluded,
        "dropped_no_keypoints": dropped_no_kp,
        "mean_max_iou": float(ious.mean()) if ious.size else 0.0,
        "fraction_max_iou_ge_0.5": float((ious >= 0.5).mean()) if ious.size else 0.0,
        "mean_max_iou_occluded": float(ious[ious >= 0.3].mean()) if (ious >= 0.3).any() else 0.0,
    }


def generate_synthetic_dataset(
    root: str,
    *,
    num_train: int,
    num_val: int,
    image_size: int = 256,
    max_people: int = 4,
    overlap: float = 0.6,
    seed: int = 0,
    segmentation: str = "polygon",
    val_overlap: float | None = None,
) -> dict[str, Any]:
    """Generate the synthetic dataset under ``root`` (local path or ``s3://`` URI).

    ``overlap`` is the train split's; ``val_overlap`` the val split's (None: ``0.7 + 0.3 *
    overlap``).

    Returns a summary: ``{"root", "params", "seconds", "images_per_second", "splits": {split:
    {"images", "people", "dropped_occluded", "dropped_no_keypoints", "mean_max_iou",
    "fraction_max_iou_ge_0.5", "mean_max_iou_occluded"}}}`` (occluded: ``max_iou >= 0.3``).
    The output is a pure function of the arguments (and ``GENERATOR_VERSION``).
    """
    if segmentation not in SEGMENTATION_FORMATS:
        raise ValueError(
            f"segmentation must be one of {list(SEGMENTATION_FORMATS)}, got {segmentation!r}"
        )
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train/num_val must be >= 0, got {num_train}/{num_val}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64, got {image_size}")
    if max_people < 1:
        raise ValueError(f"max_people must be >= 1, got {max_people}")
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    val_overlap = split_overlap("val", overlap, val_overlap)
    if not 0.0 <= val_overlap <= 1.0:
        raise ValueError(f"val_overlap must be in [0, 1], got {val_overlap}")
    params = {
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "max_people": max_people,
        "overlap": overlap,
        "val_overlap": val_overlap,
        "seed": seed,
        "segmentation": segmentation,
        "generator_version": GENERATOR_VERSION,
    }
    t0 = time.perf_counter()
    if storage.is_remote(root):
        with tempfile.TemporaryDirectory(prefix="synthetic-") as tmp:
            splits = _generate_local(tmp, params)
            storage.upload_dir(tmp, root)
    else:
        splits = _generate_local(root, params)
    seconds = time.perf_counter() - t0
    total = num_train + num_val
    return {
        "root": root,
        "params": params,
        "seconds": seconds,
        "images_per_second": total / seconds if seconds > 0 else float("inf"),
        "splits": splits,
    }


def _generate_local(root: str, params: dict[str, Any]) -> dict[str, Any]:
    meta_path = os.path.join(root, META_FILE)
    if os.path.exists(meta_path):
        # Stale output of another parameter set: remove what this generator wrote before.
        os.remove(meta_path)
        for split in SPLITS:
            shutil.rmtree(os.path.join(root, "images", split), ignore_errors=True)
    splits = {}
    for split, count in (("train", params["num_train"]), ("val", params["num_val"])):
        splits[split] = generate_split(
            root,
            split,
            num_images=count,
            image_size=params["image_size"],
            max_people=params["max_people"],
            overlap=params["overlap"],
            val_overlap=params["val_overlap"],
            seed=params["seed"],
            segmentation=params["segmentation"],
        )
    with open(meta_path, "w") as fh:
        json.dump({"params": params, "splits": splits}, fh, indent=2, sort_keys=True)
    return splits


def synthetic_params(config: Config) -> dict[str, Any]:
    """The generator arguments that ``config``'s ``data.synthetic_*`` keys ask for."""
    d = config.data
    return {
        "num_train": d.synthetic_num_train,
        "num_val": d.synthetic_num_val,
        "image_size": d.synthetic_image_size,
        "max_people": d.synthetic_max_people,
        "overlap": d.synthetic_overlap,
        "val_overlap": d.synthetic_val_overlap,
        "seed": d.synthetic_seed,
        "segmentation": "polygon",
        "generator_version": GENERATOR_VERSION,
    }


def read_synthetic_meta(root: str) -> dict[str, Any] | None:
    """The stored ``synthetic_meta.json`` of ``root``, or None when absent or unreadable."""
    uri = storage.join(root, META_FILE)
    try:
        return json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, ValueError):
        return None


def ensure_synthetic_dataset(config: Config) -> str:
    """Generate the synthetic dataset at ``config.data.root`` unless an identical one is there.

    "Identical" means ``synthetic_meta.json`` holds the same parameters (the config's
    ``data.synthetic_*`` keys and the generator version). Returns the root.
    """
    root = config.data.root
    wanted = synthetic_params(config)
    meta = read_synthetic_meta(root)
    if meta is not None and meta.get("params") == wanted:
        return root
    kwargs = {k: v for k, v in wanted.items() if k != "generator_version"}
    generate_synthetic_dataset(root, **kwargs)
    return root
