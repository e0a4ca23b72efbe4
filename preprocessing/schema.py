"""The preprocessed Parquet layout, defined once: column names, Arrow types, encode/decode.

One row per image (``docs/ARCHITECTURE.md``). Array columns are raw little-endian bytes of a
fixed dtype whose shape follows from ``num_people`` (and S for the skeleton/targets); RLE
columns hold compressed COCO RLE ``counts`` strings whose size is implied: the original frame
``(orig_height, orig_width)`` for ``gt_rles`` / ``ignore_rles``, the padded input frame
``(input_size, input_size)`` for ``mask_rles`` (``input_size`` is the longer side of the stored,
unpadded image). Also here: the rejects table and :func:`gt_to_coco`, the COCO ground truth
that pycocotools evaluates against.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pose2seg.skeleton import KEYPOINT_NAMES, LIMBS, NUM_KEYPOINTS, NUM_SKELETON_CHANNELS
from preprocessing.features import pack_targets, unpack_targets

IMAGE_ID = "image_id"
FILE_NAME = "file_name"
ORIG_HEIGHT = "orig_height"
ORIG_WIDTH = "orig_width"
SCALE = "scale"
IMAGE = "image"
NUM_PEOPLE = "num_people"
PERSON_IDS = "person_ids"
KEYPOINTS = "keypoints"
AFFINES = "affines"
TEMPLATE_IDS = "template_ids"
SKELETON = "skeleton"
TARGETS = "targets"
MASK_RLES = "mask_rles"
GT_RLES = "gt_rles"
AREAS = "areas"
BBOXES = "bboxes"
MAX_IOUS = "max_ious"
IGNORE_RLES = "ignore_rles"

SCHEMA: pa.Schema = pa.schema(
    [
        pa.field(IMAGE_ID, pa.int64(), nullable=False),
        pa.field(FILE_NAME, pa.string()),
        pa.field(ORIG_HEIGHT, pa.int32()),
        pa.field(ORIG_WIDTH, pa.int32()),
        pa.field(SCALE, pa.float32()),
        pa.field(IMAGE, pa.binary()),
        pa.field(NUM_PEOPLE, pa.int32()),
        pa.field(PERSON_IDS, pa.list_(pa.int64())),
        pa.field(KEYPOINTS, pa.binary()),
        pa.field(AFFINES, pa.binary()),
        pa.field(TEMPLATE_IDS, pa.list_(pa.int32())),
        pa.field(SKELETON, pa.binary()),
        pa.field(TARGETS, pa.binary()),
        pa.field(MASK_RLES, pa.list_(pa.string())),
        pa.field(GT_RLES, pa.list_(pa.string())),
        pa.field(AREAS, pa.list_(pa.float32())),
        pa.field(BBOXES, pa.binary()),
        pa.field(MAX_IOUS, pa.list_(pa.float32())),
        pa.field(IGNORE_RLES, pa.list_(pa.string())),
    ]
)
"""One row per image; see the module docstring and ``docs/ARCHITECTURE.md``."""
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)

REJECT_SPLIT = "split"
REJECT_IMAGE_ID = "image_id"
REJECT_ANNOTATION_ID = "annotation_id"
REJECT_FILE_NAME = "file_name"
REJECT_REASON = "reason"
REJECT_DETAIL = "detail"
REJECTS_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field(REJECT_SPLIT, pa.string()),
        pa.field(REJECT_IMAGE_ID, pa.int64()),
        pa.field(REJECT_ANNOTATION_ID, pa.int64()),  # null for a whole-image rejection
        pa.field(REJECT_FILE_NAME, pa.string()),
        pa.field(REJECT_REASON, pa.string()),
        pa.field(REJECT_DETAIL, pa.string()),
    ]
)
"""The rejects table: one row per rejected person (or image, with a null annotation_id)."""
REASON_NO_KEYPOINTS = "no_keypoints"
"""Expected rejection: a person without any usable keypoint cannot be aligned; they become an
ignore region of their image and do not count against ``data.max_reject_fraction``."""


def channel_layout() -> list[str]:
    """Names of the 55 stored skeleton channels, in order (for ``meta.json``)."""
    names = []
    for a, b in LIMBS:
        limb = f"{KEYPOINT_NAMES[a]}-{KEYPOINT_NAMES[b]}"
        names += [f"paf_x:{limb}", f"paf_y:{limb}"]
    names += [f"heatmap:{name}" for name in KEYPOINT_NAMES]
    if len(names) != NUM_SKELETON_CHANNELS:  # pragma: no cover - a bug in skeleton.py
        raise RuntimeError("skeleton channel layout does not add up to NUM_SKELETON_CHANNELS")
    return names


def encode_image(image: np.ndarray, *, encoding: str) -> bytes:
    """``(h, w, 3)`` uint8 RGB -> PNG (lossless) or JPEG (quality 95) bytes."""
    from PIL import Image

    if encoding not in ("png", "jpeg"):
        raise ValueError(f"data.image_encoding must be 'png' or 'jpeg', got {encoding!r}")
    buffer = io.BytesIO()
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB")
    if encoding == "png":
        pil.save(buffer, format="PNG", compress_level=6)
    else:
        pil.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image; the message names the file."""


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than allowed (checked before decoding)."""


_STREAM_REPR = re.compile(r"<_?io\.BytesIO object at 0x[0-9a-fA-F]+>")


def image_error_text(exc: BaseException, name: str) -> str:
    """The first line of a Pillow error with the in-memory stream it names
    (``<_io.BytesIO object at 0x...>``) replaced by ``name``, the file or URI."""
    text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _STREAM_REPR.sub(lambda _: name, text)


def decode_image(data: bytes, *, name: str = "image", max_pixels: int = 0) -> np.ndarray:
    """PNG/JPEG bytes -> ``(h, w, 3)`` uint8 RGB.

    ``name`` (the file path or URI) is what an error message calls the image. ``max_pixels``
    (0: no limit) bounds ``h * w`` as the file's header declares it, before any pixel is
    decoded (Pillow reads the header only in ``Image.open``): :class:`ImageTooLargeError`.
    Undecodable bytes: :class:`ImageDecodeError`.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as pil:
            if max_pixels and pil.width * pil.height > max_pixels:
                raise ImageTooLargeError(
                    f"{name}: the image is {pil.width}x{pil.height} (WxH), "
                    f"{pil.width * pil.height} pixels, more than the {max_pixels} allowed"
                )
            return np.asarray(pil.convert("RGB"), dtype=np.uint8)
    except ImageTooLargeError:
        raise
    except Exception as exc:  # PIL raises many types for bad bytes (and decompression bombs)
        raise ImageDecodeError(
            f"{name}: not a decodable image ({image_error_text(exc, name)})"
        ) from None


def _array_bytes(
    value: np.ndarray, dtype: Any, shape: tuple[int, ...], name: str, image_id: int
) -> bytes:
    array = np.asarray(value)
    if array.shape != shape:
        raise ValueError(f"image {image_id}: {name} must have shape {shape}, got {array.shape}")
    return np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def _strings(values: Sequence[Any]) -> list[str]:
    """RLE counts as str, from str/bytes counts or RLE dicts."""
    out = []
    for value in values:
        if isinstance(value, dict):
            value = value["counts"]
        out.append(value.decode("ascii") if isinstance(value, bytes) else str(value))
    return out


def encode_image_row(
    *,
    image_id: int,
    file_name: str,
    orig_height: int,
    orig_width: int,
    scale: float,
    image: np.ndarray,
    image_encoding: str,
    person_ids: Sequence[int],
    keypoints: np.ndarray,
    affines: np.ndarray,
    template_ids: Sequence[int],
    skeleton: np.ndarray,
    targets: np.ndarray,
    mask_rles: Sequence[Any],
    gt_rles: Sequence[Any],
    areas: Sequence[float],
    bboxes: np.ndarray,
    max_ious: Sequence[float | None],
    ignore_rles: Sequence[Any],
) -> dict[str, Any]:
    """One image's Parquet row (plain Python values matching :data:`SCHEMA`).

    Args:
        image_id, file_name, orig_height, orig_width: the source image.
        scale: input = orig * scale.
        image: ``(h, w, 3)`` uint8 in the input frame, unpadded.
        image_encoding: ``png`` or ``jpeg``.
        person_ids: ``(N,)`` annotation ids of the kept people.
        keypoints: ``(N, K, 3)`` input-frame keypoints.
        affines: ``(N, 2, 3)`` input frame -> aligned frame.
        template_ids: ``(N,)``, -1 for box alignment / fallback.
        skeleton: ``(N, 55, S, S)`` int8 quantised features.
        targets: ``(N, S, S)`` bool aligned visible masks.
        mask_rles: N compressed RLEs (counts str/bytes or RLE dicts), padded input frame.
        gt_rles: N compressed RLEs, original frame.
        areas: ``(N,)`` original-frame areas.
        bboxes: ``(N, 4)`` xywh, original frame.
        max_ious: ``(N,)`` MaxIoU with any other person; None/NaN when unknown.
        ignore_rles: compressed RLEs of the image's ignore regions, original frame.

    Raises:
        ValueError: inconsistent shapes, naming the image id and the column.
    """
    image_id = int(image_id)
    n = len(person_ids)
    skeleton = np.asarray(skeleton)
    if skeleton.dtype != np.int8:
        raise ValueError(
            f"image {image_id}: skeleton must be int8 (quantised), got {skeleton.dtype}"
        )
    size = skeleton.shape[-1] if skeleton.ndim == 4 else 0
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image {image_id}: image must be (h, w, 3) uint8, got {image.shape} {image.dtype}"
        )
    for name, values in (
        (TEMPLATE_IDS, template_ids),
        (MASK_RLES, mask_rles),
        (GT_RLES, gt_rles),
        (AREAS, areas),
        (MAX_IOUS, max_ious),
    ):
        if len(values) != n:
            raise ValueError(f"image {image_id}: {name} has {len(values)} entries for {n} people")
    targets = np.asarray(targets, dtype=bool)
    if n and targets.shape != (n, size, size):
        raise ValueError(
            f"image {image_id}: targets must have shape {(n, size, size)}, got {targets.shape}"
        )
    return {
        IMAGE_ID: image_id,
        FILE_NAME: str(file_name),
        ORIG_HEIGHT: int(orig_height),
        ORIG_WIDTH: int(orig_width),
        SCALE: float(scale),
        IMAGE: encode_image(image, encoding=image_encoding),
        NUM_PEOPLE: n,
        PERSON_IDS: [int(i) for i in person_ids],
        KEYPOINTS: _array_bytes(keypoints, np.float32, (n, NUM_KEYPOINTS, 3), KEYPOINTS, image_id),
        AFFINES: _array_bytes(affines, np.float32, (n, 2, 3), AFFINES, image_id),
        TEMPLATE_IDS: [int(t) for t in template_ids],
        SKELETON: _array_bytes(
            skeleton, np.int8, (n, NUM_SKELETON_CHANNELS, size, size), SKELETON, image_id
        ),
        TARGETS: pack_targets(targets.reshape(n, size, size)),
        MASK_RLES: _strings(mask_rles),
        GT_RLES: _strings(gt_rles),
        AREAS: [float(a) for a in areas],
        BBOXES: _array_bytes(bboxes, np.float32, (n, 4), BBOXES, image_id),
        MAX_IOUS: [math.nan if m is None else float(m) for m in max_ious],
        IGNORE_RLES: _strings(ignore_rles),
    }


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Encoded rows (:func:`encode_image_row`) -> an Arrow table with exactly :data:`SCHEMA`."""
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def rejects_to_table(rejects: Sequence[Any]) -> pa.Table:
    """Rejections (objects or dicts with the reject columns) -> a table of :data:`REJECTS_SCHEMA`."""
    records = []
    for r in rejects:
        get = r.get if isinstance(r, dict) else lambda k, r=r: getattr(r, k)
        annotation_id = get(REJECT_ANNOTATION_ID)
        records.append(
            {
                REJECT_SPLIT: str(get(REJECT_SPLIT)),
                REJECT_IMAGE_ID: int(get(REJECT_IMAGE_ID)),
                REJECT_ANNOTATION_ID: None if annotation_id is None else int(annotation_id),
                REJECT_FILE_NAME: str(get(REJECT_FILE_NAME) or ""),
                REJECT_REASON: str(get(REJECT_REASON)),
                REJECT_DETAIL: str(get(REJECT_DETAIL) or ""),
            }
        )
    return pa.Table.from_pylist(records, schema=REJECTS_SCHEMA)


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return value.tolist()
    return list(value)


def _bytes(value: Any, column: str, image_id: int) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value.tobytes()
    raise ValueError(
        f"image {image_id}: column {column} must hold bytes, got {type(value).__name__}"
    )


def _array(
    row: dict[str, Any], column: str, dtype: Any, shape: tuple[int, ...], image_id: int
) -> np.ndarray:
    data = _bytes(row[column], column, image_id)
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise ValueError(
            f"image {image_id}: column {column} holds {len(data)} bytes, expected {expected} for shape {shape}"
        )
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)


def decode_row(row: dict[str, Any], *, roi_size: int | None = None) -> dict[str, Any]:
    """A Parquet row (from ``iter_batches``/``take``/pyarrow) -> the arrays the model needs.

    Args:
        row: one row with the columns of :data:`SCHEMA` (list columns as lists or arrays,
            binary columns as bytes).
        roi_size: S, only used to shape the empty skeleton/targets of an image without people
            (otherwise S is read from the skeleton's size); without it those are ``(0, 55, 0, 0)``
            and ``(0, 0, 0)``.

    Returns:
        ``image_id`` int, ``file_name`` str, ``orig_height``/``orig_width`` int, ``scale`` float,
        ``image`` (h, w, 3) uint8 unpadded input frame, ``num_people`` int, ``person_ids`` (N,)
        int64, ``keypoints`` (N, K, 3) float32, ``affines`` (N, 2, 3) float32, ``template_ids``
        (N,) int32, ``skeleton`` (N, 55, S, S) int8, ``targets`` (N, S, S) bool, ``mask_rles``
        (RLE dicts, padded input frame), ``gt_rles`` and ``ignore_rles`` (RLE dicts, original
        frame), ``areas`` (N,) float32, ``bboxes`` (N, 4) float32, ``max_ious`` (N,) float32
        (NaN = unknown).

    Raises:
        ValueError: a missing column or inconsistent sizes, naming the image id and column.
    """
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise ValueError(f"decode_row: row of image {row.get(IMAGE_ID)} lacks columns {missing}")
    image_id = int(row[IMAGE_ID])
    n = int(row[NUM_PEOPLE])
    image = decode_image(_bytes(row[IMAGE], IMAGE, image_id))
    orig_h, orig_w = int(row[ORIG_HEIGHT]), int(row[ORIG_WIDTH])
    skeleton_bytes = _bytes(row[SKELETON], SKELETON, image_id)
    if n > 0:
        size = math.isqrt(len(skeleton_bytes) // (n * NUM_SKELETON_CHANNELS))
    else:
        size = int(roi_size or 0)
    skeleton = _array(row, SKELETON, np.int8, (n, NUM_SKELETON_CHANNELS, size, size), image_id)
    targets = unpack_targets(_bytes(row[TARGETS], TARGETS, image_id), num_people=n, roi_size=size)
    padded = int(max(image.shape[:2]))

    def rles(column: str, height: int, width: int) -> list[dict[str, Any]]:
        return [{"size": [height, width], "counts": str(c)} for c in _list(row[column])]

    out = {
        IMAGE_ID: image_id,
        FILE_NAME: str(row[FILE_NAME]),
        ORIG_HEIGHT: orig_h,
        ORIG_WIDTH: orig_w,
        SCALE: float(row[SCALE]),
        IMAGE: image,
        NUM_PEOPLE: n,
        PERSON_IDS: np.asarray(_list(row[PERSON_IDS]), dtype=np.int64).reshape(-1),
        KEYPOINTS: _array(row, KEYPOINTS, np.float32, (n, NUM_KEYPOINTS, 3), image_id),
        AFFINES: _array(row, AFFINES, np.float32, (n, 2, 3), image_id),
        TEMPLATE_IDS: np.asarray(_list(row[TEMPLATE_IDS]), dtype=np.int32).reshape(-1),
        SKELETON: skeleton,
        TARGETS: targets,
        MASK_RLES: rles(MASK_RLES, padded, padded),
        GT_RLES: rles(GT_RLES, orig_h, orig_w),
        AREAS: np.asarray(_list(row[AREAS]), dtype=np.float32).reshape(-1),
        BBOXES: _array(row, BBOXES, np.float32, (n, 4), image_id),
        MAX_IOUS: np.asarray(
            [math.nan if m is None else m for m in _list(row[MAX_IOUS])], dtype=np.float32
        ).reshape(-1),
        IGNORE_RLES: rles(IGNORE_RLES, orig_h, orig_w),
    }
    for column in (PERSON_IDS, TEMPLATE_IDS, GT_RLES, MASK_RLES, AREAS, MAX_IOUS):
        if len(out[column]) != n:
            raise ValueError(
                f"image {image_id}: column {column} has {len(out[column])} entries for {n} people"
            )
    return out


def _rle_dict(value: Any, height: int, width: int) -> dict[str, Any]:
    if isinstance(value, dict):
        return {"size": [int(s) for s in value["size"]], "counts": _strings([value])[0]}
    return {"size": [height, width], "counts": _strings([value])[0]}


def gt_to_coco(decoded_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """COCO ground truth (``pycocotools.coco.COCO`` dataset dict) for decoded rows.

    Each kept person becomes an annotation (its visible-mask RLE in the original frame,
    ``area``, ``bbox``, ``iscrowd = 0``, ``max_iou`` or None); each ignore region (crowds,
    people without keypoints) an ``iscrowd = 1`` annotation with a fresh id above every person
    id. Rows need ``image_id``, ``file_name``, ``orig_height``, ``orig_width``, ``person_ids``,
    ``gt_rles``, ``areas``, ``bboxes``, ``max_ious``, ``ignore_rles`` (``image``, ``skeleton``,
    ``targets``, ``affines`` are not used and may be absent).

    Raises:
        ValueError: an image id appears twice, or a row's lists disagree in length.
    """
    from pycocotools import mask as mask_utils

    images, annotations, ignores = [], [], []
    seen: set[int] = set()
    max_id = 0
    for row in decoded_rows:
        image_id = int(row[IMAGE_ID])
        if image_id in seen:
            raise ValueError(f"gt_to_coco: image {image_id} appears twice")
        seen.add(image_id)
        h, w = int(row[ORIG_HEIGHT]), int(row[ORIG_WIDTH])
        images.append(
            {"id": image_id, "file_name": str(row.get(FILE_NAME, "")), "height": h, "width": w}
        )
        ids = [int(i) for i in _list(row[PERSON_IDS])]
        rles = _list(row[GT_RLES])
        areas = _list(row[AREAS])
        bboxes = np.asarray(row[BBOXES], dtype=np.float64).reshape(-1, 4)
        max_ious = _list(row[MAX_IOUS])
        if not (len(ids) == len(rles) == len(areas) == len(bboxes) == len(max_ious)):
            raise ValueError(f"gt_to_coco: image {image_id}: per-person lists differ in length")
        for pid, rle, area, box, miou in zip(ids, rles, areas, bboxes, max_ious, strict=True):
            max_id = max(max_id, pid)
            miou = None if miou is None or not np.isfinite(miou) else float(miou)
            annotations.append(
                {
                    "id": pid,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": _rle_dict(rle, h, w),
                    "area": float(area),
                    "bbox": [float(v) for v in box],
                    "iscrowd": 0,
                    "max_iou": miou,
                }
            )
        for rle in _list(row[IGNORE_RLES]):
            ignores.append((image_id, _rle_dict(rle, h, w)))
    for offset, (image_id, rle) in enumerate(ignores, start=1):
        encoded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        annotations.append(
            {
                "id": max_id + offset,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": rle,
                "area": float(mask_utils.area(encoded)),
                "bbox": [float(v) for v in mask_utils.toBbox(encoded)],
                "iscrowd": 1,
                "max_iou": None,
            }
        )
    ann_ids = [a["id"] for a in annotations]
    if len(set(ann_ids)) != len(ann_ids):
        raise ValueError("gt_to_coco: duplicate person ids across images")
    return {
        "info": {"description": "Pose2Seg preprocessed ground truth"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
    }


def input_frame_masks(decoded_rows: Sequence[dict[str, Any]], *, input_size: int) -> np.ndarray:
    """``(P, input_size, input_size)`` bool: the visible masks of every person of the decoded
    rows, in row and person order (the order of a collated batch), in the padded input frame
    (decoded from ``mask_rles``; used by the training augmentation to re-warp targets)."""
    from pycocotools import mask as mask_utils

    masks = []
    for row in decoded_rows:
        rles = _list(row[MASK_RLES])
        if len(rles) != len(row[PERSON_IDS]):
            raise ValueError(
                f"image {row[IMAGE_ID]}: {len(rles)} mask_rles for {len(row[PERSON_IDS])} people"
            )
        for rle in rles:
            encoded = _rle_dict(rle, input_size, input_size)
            encoded = {"size": encoded["size"], "counts": encoded["counts"].encode("ascii")}
            mask = mask_utils.decode(encoded).astype(bool)
            if mask.shape != (input_size, input_size):
                raise ValueError(
                    f"image {row[IMAGE_ID]}: a mask_rles entry is {mask.shape}, expected the "
                    f"{input_size}x{input_size} input frame (data.input_size)"
                )
            masks.append(mask)
    if not masks:
        return np.zeros((0, input_size, input_size), dtype=bool)
    return np.stack(masks)
