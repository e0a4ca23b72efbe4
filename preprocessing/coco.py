"""The one reader of COCO-format person-keypoint datasets (COCO, OCHuman, the synthetic set).

Annotations and images can be local or on S3 (``preprocessing.storage``). The reader decodes
every person's visible mask (polygons, compressed or uncompressed RLE) and keypoints, and turns
every bad record into a :class:`Rejection` with a reason from :data:`REJECT_REASONS`; nothing is
dropped silently. A file that is not a COCO annotation file at all raises
:class:`CocoFormatError`.

What is kept and what is rejected:

- people (``iscrowd`` 0, person category) go to ``ImageRecord.people``, including people
  without keypoints (``num_keypoints`` 0, keypoints all zero, also when the ``keypoints`` key is
  absent as in COCO *instances* files): the preprocessing decides what to do with them;
- crowd regions (``iscrowd`` 1) go to ``ImageRecord.crowd`` with all-zero keypoints;
- an image with no annotations gives a record with empty lists;
- an image whose ``file_name`` leaves the images folder (absolute, a URI, ``..``, or a local
  symbolic link leading out) is rejected as ``unsafe_path`` and never opened;
- an image whose file is missing, unreadable, or whose size differs from the JSON gives
  ``(None, [one Rejection])``; that rejection has ``annotation_id`` None and its ``detail`` ends
  with ``people=N`` (N = the image's person annotations, crowd regions excluded, that were lost
  with it), also available as :meth:`CocoPersonDataset.num_people_in`;
- a malformed annotation gives one Rejection for that annotation and the rest of the image is
  read; a person with a labelled keypoint far outside the image (more than
  ``keypoint_margin_fraction`` of its longer side, :mod:`pose2seg.keypoint_checks`) is one
  ``keypoints_outside_image`` Rejection. :meth:`CocoPersonDataset.valid_keypoints` applies the
  same keypoint checks without reading pixels (the template-fitting pass uses it); annotations whose ``image_id`` is not in ``images`` are listed once in
  :attr:`CocoPersonDataset.dataset_rejections` (they belong to no image record);
- an annotation ``id`` that appears more than once in the file: every copy is rejected as
  ``duplicate_annotation_id`` (also in :attr:`CocoPersonDataset.dataset_rejections`, one row
  per copy, naming the id and the images). None is kept because nothing says which copy is
  right, and keeping "the first" would make the training data depend on the file's order;
  pycocotools indexes annotations by id (the last copy wins there), so the evaluation applies
  the same rule (:func:`drop_duplicate_annotations`) instead of scoring the wrong ground truth.

``num_keypoints`` is recomputed from the visibility flags (count of v > 0); ``area`` and
``bbox`` are taken from the file when present (COCOeval uses the file's values), else computed
from the mask.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from pose2seg.keypoint_checks import (
    DEFAULT_KEYPOINT_MARGIN_FRACTION,
    REASON_OUTSIDE_IMAGE,
    describe_outside_keypoints,
    keypoint_number_problem,
)
from pose2seg.skeleton import NUM_KEYPOINTS
from preprocessing import storage

REJECT_REASONS: dict[str, str] = {
    "unsafe_path": "the image's file_name leaves the images folder (absolute, '..', or a link leading out)",
    "image_missing": "the image file named in the JSON does not exist",
    "image_unreadable": "the image file exists but cannot be decoded as an image",
    "size_mismatch": "the image's pixel size differs from the height/width in the JSON",
    "unknown_image": "the annotation's image_id is not in the JSON's images",
    "duplicate_annotation_id": "the annotation's id appears more than once in the file (every copy is rejected)",
    "not_person": "the annotation's category is not the person category",
    "malformed_keypoints": f"keypoints are not {3 * NUM_KEYPOINTS} finite numbers with visibility 0/1/2",
    REASON_OUTSIDE_IMAGE: "a labelled keypoint lies farther outside the image than data.keypoint_margin_fraction allows",
    "malformed_segmentation": "the segmentation is not a valid polygon list or RLE of the image's size",
    "empty_mask": "the segmentation decodes to an empty mask",
}
"""Every reason a record can be rejected for, with what it means; the rejects table's vocabulary."""

IMAGE_LEVEL_REASONS: tuple[str, ...] = (
    "unsafe_path",
    "image_missing",
    "image_unreadable",
    "size_mismatch",
)


class CocoFormatError(ValueError):
    """The annotation file is not a usable COCO JSON; the message names the file and the key."""


@dataclass
class Rejection:
    """One rejected image or annotation (a row of the rejects table)."""

    split: str
    image_id: int
    annotation_id: int | None  # None for a whole image
    file_name: str
    reason: str  # a key of REJECT_REASONS
    detail: str


@dataclass
class PersonAnnotation:
    """One person (or crowd region) of an image, in original image pixels."""

    annotation_id: int
    keypoints: np.ndarray  # (K, 3) float32 x, y, visibility
    mask: np.ndarray  # (H, W) bool visible mask
    area: float
    bbox: np.ndarray  # (4,) float32 x, y, w, h
    iscrowd: bool
    num_keypoints: int  # count of keypoints with v > 0
    max_iou: float | None  # the file's ``max_iou`` when it has one (the synthetic set does)


@dataclass
class ImageRecord:
    """One readable image and its annotations."""

    image_id: int
    file_name: str
    height: int
    width: int
    pixels: np.ndarray  # (H, W, 3) uint8 RGB
    people: list[PersonAnnotation]  # non-crowd person annotations
    crowd: list[PersonAnnotation]  # iscrowd regions, keypoints all zero


def load_coco_json(uri: str) -> dict[str, Any]:
    """Read and check a COCO annotation file: a dict with ``images`` and ``annotations`` lists."""
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"COCO annotation file not found: {uri}") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CocoFormatError(f"{uri}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CocoFormatError(
            f"{uri}: the top level must be an object with 'images' and 'annotations'"
        )
    for key in ("images", "annotations"):
        if key not in data:
            raise CocoFormatError(f"{uri}: missing key {key!r}")
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{uri}: {key!r} must be a list, got {type(data[key]).__name__}")
    return data


class CocoPersonDataset:
    """A COCO person-keypoint split: ``read(image_id)`` gives one image and its people.

    Args:
        annotations_uri: the COCO JSON (local path or ``s3://``).
        images_uri: the folder (or prefix) holding the images named by ``file_name``.
        split: the split name written into rejections (``train``, ``val``, ...).
        data: the already-parsed COCO dict (e.g. a :meth:`subset_json` shipped with a shard
            task); None reads and parses ``annotations_uri``, which then only names the data.
        keypoint_margin_fraction: ``data.keypoint_margin_fraction``: how far outside the image
            (fraction of its longer side) a labelled keypoint may lie before its person is
            rejected.
    """

    def __init__(
        self,
        annotations_uri: str,
        images_uri: str,
        *,
        split: str,
        data: dict[str, Any] | None = None,
        keypoint_margin_fraction: float = DEFAULT_KEYPOINT_MARGIN_FRACTION,
    ) -> None:
        self.annotations_uri = annotations_uri
        self.images_uri = images_uri
        self.split = split
        self.keypoint_margin_fraction = float(keypoint_margin_fraction)
        if data is None:
            data = load_coco_json(annotations_uri)
        self._categories = data.get("categories")
        self.raw_annotations: list[Any] = data["annotations"]
        """Every annotation of the file, as parsed (also those naming no known image)."""
        self._images: dict[int, dict[str, Any]] = {}
        for index, info in enumerate(data["images"]):
            self._images[self._image_id(info, index)] = self._check_image(info, index)
        self.person_category_ids = self._person_categories(data.get("categories"))
        self._anns: dict[int, list[dict[str, Any]]] = {i: [] for i in self._images}
        self.dataset_rejections: list[Rejection] = []
        """Annotations that belong to no image (``unknown_image``) or whose id repeats
        (``duplicate_annotation_id``); report them once."""
        for index, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "id" not in ann or "image_id" not in ann:
                raise CocoFormatError(
                    f"{annotations_uri}: annotations[{index}] lacks 'id' or 'image_id'"
                )
        duplicates = duplicate_annotation_ids(data["annotations"])
        for ann in data["annotations"]:
            image_id = ann["image_id"]
            if _id_key(ann["id"]) in duplicates:
                info = self._images.get(image_id) if isinstance(image_id, int) else None
                self.dataset_rejections.append(
                    Rejection(
                        split,
                        _as_int(image_id),
                        _as_int(ann["id"]),
                        str(info["file_name"]) if info else "",
                        "duplicate_annotation_id",
                        describe_duplicate(
                            ann["id"], duplicates[_id_key(ann["id"])], annotations_uri
                        ),
                    )
                )
            elif image_id in self._anns:
                self._anns[image_id].append(ann)
            else:
                self.dataset_rejections.append(
                    Rejection(
                        split,
                        _as_int(image_id),
                        _as_int(ann["id"]),
                        "",
                        "unknown_image",
                        f"annotation {ann['id']} names image_id {image_id!r}, absent from 'images' of {annotations_uri}",
                    )
                )
        self.image_ids: list[int] = sorted(self._images)

    # ---------------------------------------------------------------------------------------
    def _image_id(self, info: Any, index: int) -> int:
        if not isinstance(info, dict) or "id" not in info:
            raise CocoFormatError(f"{self.annotations_uri}: images[{index}] lacks key 'id'")
        image_id = info["id"]
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise CocoFormatError(
                f"{self.annotations_uri}: images[{index}]['id'] must be an integer, got {image_id!r}"
            )
        if image_id in self._images:
            raise CocoFormatError(
                f"{self.annotations_uri}: image id {image_id} appears twice in 'images'"
            )
        return image_id

    def _check_image(self, info: dict[str, Any], index: int) -> dict[str, Any]:
        for key in ("file_name", "height", "width"):
            if key not in info:
                raise CocoFormatError(
                    f"{self.annotations_uri}: images[{index}] (id {info['id']}) lacks key {key!r}"
                )
        for key in ("height", "width"):
            if not isinstance(info[key], int) or info[key] <= 0:
                raise CocoFormatError(
                    f"{self.annotations_uri}: images[{index}] (id {info['id']}) {key!r} must be a positive integer"
                )
        return info

    def _person_categories(self, categories: Any) -> frozenset[int]:
        if not categories:
            return frozenset({1})  # results-style files without categories: COCO's person id
        if not isinstance(categories, list):
            raise CocoFormatError(f"{self.annotations_uri}: 'categories' must be a list")
        ids = frozenset(
            c["id"]
            for c in categories
            if isinstance(c, dict) and c.get("name") == "person" and "id" in c
        )
        if not ids:
            raise CocoFormatError(
                f"{self.annotations_uri}: 'categories' has no category named 'person'"
            )
        return ids

    def subset_json(self, image_ids: list[int]) -> str:
        """A COCO JSON of just these images and their annotations (same categories): what a
        shard task needs, so that workers do not parse the whole annotation file."""
        return json.dumps(
            {
                "images": [self._images[i] for i in image_ids],
                "annotations": [a for i in image_ids for a in self._anns[i]],
                "categories": self._categories,
            }
        )

    # ---------------------------------------------------------------------------------------
    @property
    def num_people(self) -> int:
        """Person annotations (non-crowd, person category) attached to a known image."""
        return sum(self.num_people_in(i) for i in self.image_ids)

    def num_people_in(self, image_id: int) -> int:
        """Non-crowd person annotations of one image, before any rejection."""
        return sum(
            1
            for a in self._anns[image_id]
            if a.get("category_id") in self.person_category_ids and not a.get("iscrowd", 0)
        )

    def image_info(self, image_id: int) -> dict[str, Any]:
        """The JSON entry of an image; KeyError naming the id and file when absent."""
        try:
            return self._images[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id} is not in {self.annotations_uri}") from None

    def read(self, image_id: int) -> tuple[ImageRecord | None, list[Rejection]]:
        """Read one image and its annotations.

        Returns ``(record, rejections)``; ``record`` is None when the image itself is rejected
        (then ``rejections`` holds exactly one image-level rejection).
        """
        info = self.image_info(image_id)
        file_name = str(info["file_name"])
        height, width = int(info["height"]), int(info["width"])
        try:
            uri = storage.resolve_inside(self.images_uri, file_name)
        except storage.UnsafePathError as exc:
            pixels, problem = None, ("unsafe_path", str(exc))
        else:
            pixels, problem = self._read_pixels(uri, height, width)
        if pixels is None:
            reason, detail = problem
            ann_ids = [
                a["id"]
                for a in self._anns[image_id]
                if a.get("category_id") in self.person_category_ids and not a.get("iscrowd", 0)
            ]
            detail = (
                f"{detail}; its person annotations {ann_ids} are not read; people={len(ann_ids)}"
            )
            return None, [Rejection(self.split, image_id, None, file_name, reason, detail)]
        people: list[PersonAnnotation] = []
        crowd: list[PersonAnnotation] = []
        rejections: list[Rejection] = []
        for ann in self._anns[image_id]:
            person, reason, detail = self._parse_annotation(ann, height, width)
            if person is None:
                rejections.append(
                    Rejection(self.split, image_id, _as_int(ann["id"]), file_name, reason, detail)
                )
            elif person.iscrowd:
                crowd.append(person)
            else:
                people.append(person)
        record = ImageRecord(image_id, file_name, height, width, pixels, people, crowd)
        return record, rejections

    def iter_records(
        self, image_ids: Iterable[int] | None = None
    ) -> Iterator[tuple[ImageRecord | None, list[Rejection]]]:
        """``read`` over ``image_ids`` (default: all, ascending)."""
        for image_id in self.image_ids if image_ids is None else image_ids:
            yield self.read(image_id)

    # ---------------------------------------------------------------------------------------
    def _read_pixels(
        self, uri: str, height: int, width: int
    ) -> tuple[np.ndarray | None, tuple[str, str]]:
        try:
            raw = storage.read_bytes(uri)
        except FileNotFoundError:
            return None, ("image_missing", f"no image file at {uri}")
        try:
            with Image.open(io.BytesIO(raw)) as img:
                img.load()
                rgb = img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            from preprocessing.schema import image_error_text

            return None, ("image_unreadable", f"cannot decode {uri}: {image_error_text(exc, uri)}")
        if (rgb.height, rgb.width) != (height, width):
            return None, (
                "size_mismatch",
                f"{uri} is {rgb.height}x{rgb.width} (HxW), the JSON says {height}x{width}",
            )
        return np.asarray(rgb, dtype=np.uint8), ("", "")

    def _checked_keypoints(
        self, ann: dict[str, Any], iscrowd: bool, height: int, width: int
    ) -> tuple[np.ndarray | None, str, str]:
        """The one keypoint validation of every split and pass: ``(keypoints (K, 3), "", "")``
        or ``(None, reason, detail)`` with reason ``malformed_keypoints`` or
        ``keypoints_outside_image``."""
        keypoints, problem = _parse_keypoints(ann.get("keypoints"), iscrowd)
        if keypoints is None:
            return None, "malformed_keypoints", problem
        outside = describe_outside_keypoints(
            keypoints, height=height, width=width, margin_fraction=self.keypoint_margin_fraction
        )
        if outside:
            return None, REASON_OUTSIDE_IMAGE, outside
        return keypoints, "", ""

    def valid_keypoints(self, image_ids: Iterable[int] | None = None) -> Iterator[np.ndarray]:
        """The (K, 3) keypoints of every non-crowd person that :meth:`read` would keep as far
        as keypoints go (same validation), without reading pixels or decoding masks. Images
        whose ``file_name`` is unsafe are skipped (``read`` rejects them)."""
        for image_id in self.image_ids if image_ids is None else image_ids:
            info = self._images[image_id]
            try:
                storage.resolve_inside(self.images_uri, str(info["file_name"]))
            except storage.UnsafePathError:
                continue
            height, width = int(info["height"]), int(info["width"])
            for ann in self._anns[image_id]:
                if ann.get("category_id") not in self.person_category_ids or ann.get("iscrowd", 0):
                    continue
                keypoints, _, _ = self._checked_keypoints(ann, False, height, width)
                if keypoints is not None:
                    yield keypoints

    def _parse_annotation(
        self, ann: dict[str, Any], height: int, width: int
    ) -> tuple[PersonAnnotation | None, str, str]:
        """One annotation -> (PersonAnnotation, "", "") or (None, reason, detail)."""
        ann_id = ann["id"]
        if ann.get("category_id") not in self.person_category_ids:
            return (
                None,
                "not_person",
                f"annotation {ann_id} has category_id {ann.get('category_id')!r}",
            )
        iscrowd = bool(ann.get("iscrowd", 0))
        keypoints, reason, problem = self._checked_keypoints(ann, iscrowd, height, width)
        if keypoints is None:
            return None, reason, f"annotation {ann_id}: {problem}"
        try:
            mask = decode_segmentation(ann.get("segmentation"), height, width)
        except ValueError as exc:
            return None, "malformed_segmentation", f"annotation {ann_id}: {exc}"
        mask_area = int(mask.sum())
        if mask_area == 0:
            return None, "empty_mask", f"annotation {ann_id}: the segmentation covers no pixel"
        area = ann.get("area")
        area = float(area) if _is_number(area) else float(mask_area)
        bbox = ann.get("bbox")
        if isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox):
            box = np.asarray(bbox, dtype=np.float32)
        else:
            box = _mask_bbox(mask)
        max_iou = ann.get("max_iou")
        return (
            PersonAnnotation(
                annotation_id=_as_int(ann_id),
                keypoints=keypoints,
                mask=mask,
                area=area,
                bbox=box,
                iscrowd=iscrowd,
                num_keypoints=int((keypoints[:, 2] > 0).sum()),
                max_iou=float(max_iou) if _is_number(max_iou) else None,
            ),
            "",
            "",
        )


def _id_key(value: Any) -> Any:
    # 7 and 7.0 are the same id to pycocotools' dict index; unhashable ids are compared by text.
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def duplicate_annotation_ids(annotations: list[Any]) -> dict[Any, list[Any]]:
    """Annotation ids that appear more than once -> the ``image_id`` of each copy, in file
    order (entries that are not dicts with an ``id`` are left to the caller's checks)."""
    seen: dict[Any, list[Any]] = {}
    for ann in annotations:
        if isinstance(ann, dict) and "id" in ann:
            seen.setdefault(_id_key(ann["id"]), []).append(ann.get("image_id"))
    return {key: images for key, images in seen.items() if len(images) > 1}


def describe_duplicate(ann_id: Any, image_ids: list[Any], uri: str) -> str:
    """One line naming a repeated annotation id, how often and in which images it appears."""
    images = ", ".join(str(i) for i in dict.fromkeys(image_ids))
    return (
        f"annotation id {ann_id} appears {len(image_ids)} times in {uri} "
        f"(image ids {images}): every copy is rejected"
    )


def drop_duplicate_annotations(gt: dict[str, Any], uri: str) -> tuple[dict[str, Any], str]:
    """``gt`` without any annotation whose id repeats (the reader's rule), and a one-line
    description of what was dropped ("" when nothing was): ground truth for pycocotools, which
    indexes annotations by id and would otherwise score against the wrong copy."""
    duplicates = duplicate_annotation_ids(gt.get("annotations", []))
    if not duplicates:
        return gt, ""
    kept = [
        a
        for a in gt["annotations"]
        if not (isinstance(a, dict) and "id" in a and _id_key(a["id"]) in duplicates)
    ]
    shown = "; ".join(
        f"id {key} in image ids {', '.join(str(i) for i in dict.fromkeys(images))}"
        for key, images in list(duplicates.items())[:10]
    )
    more = f" (first 10 of {len(duplicates)})" if len(duplicates) > 10 else ""
    dropped = len(gt["annotations"]) - len(kept)
    line = (
        f"{uri}: {len(duplicates)} annotation ids appear more than once{more}: {shown}; "
        f"all {dropped} copies are left out of the ground truth, as preprocessing rejects them"
    )
    return {**gt, "annotations": kept}, line


def _parse_keypoints(value: Any, iscrowd: bool) -> tuple[np.ndarray | None, str]:
    """COCO's flat keypoint list -> (K, 3) float32; absent means "no keypoints" (all zero)."""
    if value is None or iscrowd:
        return np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32), ""
    if not isinstance(value, list) or len(value) != 3 * NUM_KEYPOINTS:
        length = len(value) if isinstance(value, list) else type(value).__name__
        return None, f"expected a list of {3 * NUM_KEYPOINTS} numbers, got {length}"
    if not all(_is_number(v) for v in value):
        return None, "keypoints hold a non-number"
    problem = keypoint_number_problem(value)
    if problem:
        return None, f"keypoints: {problem}"
    kps = np.asarray(value, dtype=np.float32).reshape(NUM_KEYPOINTS, 3)
    if not np.isin(kps[:, 2], (0.0, 1.0, 2.0)).all():
        return None, f"visibility flags must be 0, 1 or 2, got {sorted(set(kps[:, 2].tolist()))}"
    return kps, ""


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, compressed or uncompressed RLE) -> (H, W) bool mask.

    Raises ValueError saying what is wrong (the caller adds the annotation id).
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError("empty polygon list")
        for i, poly in enumerate(segmentation):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                raise ValueError(f"polygon {i} must be a flat list of at least 3 x, y pairs")
            if not all(_is_number(v) and math.isfinite(v) for v in poly):
                raise ValueError(f"polygon {i} holds a non-finite or non-number coordinate")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (
            isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)
        ):
            raise ValueError(f"RLE 'size' must be [height, width], got {size!r}")
        if list(size) != [height, width]:
            raise ValueError(f"RLE size {size} differs from the image's [{height}, {width}]")
        if isinstance(counts, list):
            if (
                not all(isinstance(v, int) and v >= 0 for v in counts)
                or sum(counts) != height * width
            ):
                raise ValueError(
                    f"uncompressed RLE counts must be non-negative integers summing to {height * width}"
                )
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(counts, str | bytes):
            raw = counts.encode("ascii", errors="replace") if isinstance(counts, str) else counts
            runs = _compressed_rle_runs(raw)
            # pycocotools decodes without bounds checks: corrupt counts must not reach it.
            if runs is None or min(runs, default=0) < 0 or sum(runs) != height * width:
                raise ValueError(f"compressed RLE counts do not decode to {height * width} pixels")
            rle = {"size": size, "counts": raw}
        else:
            raise ValueError(
                f"RLE 'counts' must be a string or a list, got {type(counts).__name__}"
            )
    else:
        raise ValueError(
            f"segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}"
        )
    try:
        mask = mask_utils.decode(rle)
    except Exception as exc:  # pycocotools raises bare errors on corrupt counts
        raise ValueError(f"cannot decode RLE: {exc}") from None
    if mask.shape != (height, width):
        raise ValueError(f"decoded mask is {mask.shape}, expected ({height}, {width})")
    return mask.astype(bool)


def _compressed_rle_runs(counts: bytes) -> list[int] | None:
    """The run lengths of COCO's compressed RLE string (pycocotools' rleFrString), or None."""
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None  # the string ends inside a value
            c = counts[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _mask_bbox(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array(
        [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1], dtype=np.float32
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1
