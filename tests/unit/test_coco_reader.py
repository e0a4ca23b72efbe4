"""preprocessing.coco: the real COCO sample, a generated set, and every bad case."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from preprocessing.coco import (
    REJECT_REASONS,
    CocoFormatError,
    CocoPersonDataset,
    ImageRecord,
    decode_segmentation,
)
from preprocessing.synthetic import generate_synthetic_dataset, mask_to_polygons

SAMPLE_JSON = "person_keypoints_sample.json"


def segm_ap_of_ground_truth(dataset: CocoPersonDataset, annotations_path: str) -> float:
    """Write the reader's people back as COCO results (RLE of its masks, score 1); segm AP."""
    results = []
    for record, rejections in dataset.iter_records():
        assert record is not None and not rejections
        for person in record.people:
            rle = mask_utils.encode(np.asfortranarray(person.mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                {"image_id": record.image_id, "category_id": 1, "segmentation": rle, "score": 1.0}
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(annotations_path)
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


# --------------------------------------------------------------------------------------------
# The real COCO sample
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(coco_sample_dir) -> CocoPersonDataset:
    return CocoPersonDataset(str(coco_sample_dir / SAMPLE_JSON), str(coco_sample_dir), split="val")


def test_reads_every_image_and_person_of_the_sample(sample):
    assert sample.image_ids == [785, 40083, 196141, 197388]
    assert sample.num_people == 14
    records = []
    for record, rejections in sample.iter_records():
        assert rejections == []
        assert isinstance(record, ImageRecord)
        records.append(record)
    people = [p for r in records for p in r.people]
    assert len(people) == 14
    assert sum(p.num_keypoints == 0 for p in people) == 2
    assert all(r.crowd == [] for r in records)
    for record in records:
        assert (
            record.pixels.shape == (record.height, record.width, 3)
            and record.pixels.dtype == np.uint8
        )
        for person in record.people:
            assert person.mask.shape == (record.height, record.width) and person.mask.dtype == bool
            assert person.mask.any()
            assert person.keypoints.shape == (17, 3) and person.keypoints.dtype == np.float32
            assert person.num_keypoints == int((person.keypoints[:, 2] > 0).sum())
            assert person.bbox.shape == (4,) and person.max_iou is None
            # COCO's polygon area and the mask's pixel count agree to a few percent
            assert person.mask.sum() == pytest.approx(person.area, rel=0.1)
    no_kp = [p for p in people if p.num_keypoints == 0]
    assert all((p.keypoints == 0).all() for p in no_kp)


def test_a_shard_subset_reads_like_the_whole_file(sample):
    ids = sample.image_ids[1:3]
    part = CocoPersonDataset(
        sample.annotations_uri,
        sample.images_uri,
        split="train",
        data=json.loads(sample.subset_json(ids)),
    )
    assert part.image_ids == sorted(ids)
    for image_id in ids:
        whole, whole_rejects = sample.read(image_id)
        piece, piece_rejects = part.read(image_id)
        assert [p.annotation_id for p in piece.people] == [p.annotation_id for p in whole.people]
        for a, b in zip(piece.people, whole.people, strict=True):
            assert np.array_equal(a.mask, b.mask) and np.array_equal(a.keypoints, b.keypoints)
        assert len(piece_rejects) == len(whole_rejects)


def test_sample_ground_truth_round_trips_to_ap_1(sample, coco_sample_dir):
    assert segm_ap_of_ground_truth(sample, str(coco_sample_dir / SAMPLE_JSON)) == pytest.approx(1.0)


def test_generated_ground_truth_round_trips_to_ap_1(tmp_path):
    generate_synthetic_dataset(
        str(tmp_path),
        num_train=1,
        num_val=12,
        image_size=128,
        max_people=4,
        overlap=0.6,
        seed=3,
        segmentation="mixed",
    )
    annotations = str(tmp_path / "annotations" / "person_keypoints_val.json")
    dataset = CocoPersonDataset(annotations, str(tmp_path / "images" / "val"), split="val")
    assert dataset.num_people >= 24
    people = [p for r, _ in dataset.iter_records() for p in r.people]
    assert all(p.max_iou is not None and 0 <= p.max_iou <= 1 for p in people)
    assert segm_ap_of_ground_truth(dataset, annotations) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Bad cases, each in a small dataset written to tmp_path
# --------------------------------------------------------------------------------------------


def _square_polygon(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _keypoints(x: float, y: float) -> list[float]:
    kps = np.zeros((17, 3))
    kps[:, 0], kps[:, 1], kps[:, 2] = x, y, 2
    return kps.reshape(-1).tolist()


def _person(ann_id: int, image_id: int, **overrides: Any) -> dict[str, Any]:
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "iscrowd": 0,
        "segmentation": _square_polygon(4, 4, 12, 20),
        "area": 128.0,
        "bbox": [4.0, 4.0, 8.0, 16.0],
        "keypoints": _keypoints(8, 10),
        "num_keypoints": 17,
    }
    ann.update(overrides)
    return ann


def _write(
    tmp_path: Path, images: list[dict], annotations: list[dict], *, pixels: dict | None = None
) -> CocoPersonDataset:
    """Write a tiny COCO set: PNGs for every image (unless ``pixels`` says otherwise) + JSON."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    pixels = pixels or {}
    for info in images:
        content = pixels.get(info["file_name"], "rgb")
        path = image_dir / info["file_name"]
        if content == "absent":
            continue
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, Image.Image):
            content.save(path)
        else:
            Image.new("RGB", (info["width"], info["height"]), (10, 20, 30)).save(path)
    categories = [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 2, "name": "bicycle"},
    ]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return CocoPersonDataset(str(tmp_path / "ann.json"), str(image_dir), split="train")


def _image(image_id: int, name: str = "", height: int = 24, width: int = 16) -> dict[str, Any]:
    return {
        "id": image_id,
        "file_name": name or f"{image_id}.png",
        "height": height,
        "width": width,
    }


def test_missing_image_is_one_counted_rejection(tmp_path):
    ds = _write(
        tmp_path,
        [_image(1), _image(2)],
        [_person(11, 1), _person(12, 1), _person(13, 2)],
        pixels={"1.png": "absent"},
    )
    record, rejections = ds.read(1)
    assert record is None
    (rej,) = rejections
    assert (rej.reason, rej.image_id, rej.annotation_id, rej.split) == (
        "image_missing",
        1,
        None,
        "train",
    )
    assert rej.file_name == "1.png" and "1.png" in rej.detail
    assert rej.detail.endswith("people=2") and "[11, 12]" in rej.detail
    assert ds.num_people_in(1) == 2
    record, rejections = ds.read(2)
    assert record is not None and rejections == [] and len(record.people) == 1


def test_unreadable_image(tmp_path):
    ds = _write(tmp_path, [_image(1)], [_person(11, 1)], pixels={"1.png": b"this is not a png"})
    record, (rej,) = ds.read(1)
    assert record is None and rej.reason == "image_unreadable" and rej.detail.endswith("people=1")
    # The detail names the file, not Pillow's in-memory stream (issue 27).
    assert "1.png" in rej.detail and "BytesIO" not in rej.detail and "0x" not in rej.detail


def test_size_mismatch(tmp_path):
    wrong = Image.new("RGB", (16, 25))
    ds = _write(tmp_path, [_image(1)], [_person(11, 1)], pixels={"1.png": wrong})
    record, (rej,) = ds.read(1)
    assert record is None and rej.reason == "size_mismatch"
    assert "25x16" in rej.detail and "24x16" in rej.detail


@pytest.mark.parametrize(
    ("keypoints", "fragment"),
    [
        (_keypoints(8, 10)[:50], "got 50"),
        ([*_keypoints(8, 10)[:-1], 3], "visibility"),
        ([*_keypoints(8, 10)[:-1], "2"], "non-number"),
        ([float("nan"), *_keypoints(8, 10)[1:]], "NaN"),
        ([1e308, *_keypoints(8, 10)[1:]], "1e+308 is out of range"),
        ("17 points", "got str"),
    ],
)
def test_malformed_keypoints_reject_that_person_only(tmp_path, keypoints, fragment):
    ds = _write(tmp_path, [_image(1)], [_person(11, 1, keypoints=keypoints), _person(12, 1)])
    record, (rej,) = ds.read(1)
    assert [p.annotation_id for p in record.people] == [12]
    assert (rej.reason, rej.annotation_id) == ("malformed_keypoints", 11)
    assert fragment in rej.detail and "annotation 11" in rej.detail


@pytest.mark.parametrize(
    ("segmentation", "fragment"),
    [
        ([[1, 2, 3, 4, 5]], "polygon 0"),
        ([], "empty polygon list"),
        (7, "got int"),
        ({"size": [10, 10], "counts": "abc"}, "differs from the image"),
        ({"size": [24, 16], "counts": "0000"}, "do not decode"),
        ({"size": [24, 16], "counts": [10, 20]}, "summing to 384"),
        ({"size": [24, 16]}, "'counts'"),
    ],
)
def test_malformed_segmentation(tmp_path, segmentation, fragment):
    ds = _write(tmp_path, [_image(1)], [_person(11, 1, segmentation=segmentation), _person(12, 1)])
    record, (rej,) = ds.read(1)
    assert [p.annotation_id for p in record.people] == [12]
    assert rej.reason == "malformed_segmentation" and fragment in rej.detail


def test_empty_mask_is_rejected(tmp_path):
    empty = {"size": [24, 16], "counts": [24 * 16]}
    ds = _write(tmp_path, [_image(1)], [_person(11, 1, segmentation=empty)])
    record, (rej,) = ds.read(1)
    assert record.people == [] and rej.reason == "empty_mask"


def test_unknown_image_and_not_person(tmp_path):
    ds = _write(
        tmp_path, [_image(1)], [_person(11, 1), _person(12, 99), _person(13, 1, category_id=2)]
    )
    (orphan,) = ds.dataset_rejections
    assert (orphan.reason, orphan.image_id, orphan.annotation_id) == ("unknown_image", 99, 12)
    assert ds.num_people == 1
    record, (rej,) = ds.read(1)
    assert [p.annotation_id for p in record.people] == [11]
    assert (rej.reason, rej.annotation_id) == ("not_person", 13)


def test_uncompressed_and_compressed_rle_decode_to_the_same_mask(tmp_path):
    mask = np.zeros((24, 16), dtype=bool)
    mask[3:15, 2:9] = True
    mask[6:9, 4:6] = False
    compressed = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    # COCO's uncompressed RLE: column-major run lengths starting with zeros.
    flat = mask.reshape(-1, order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    uncompressed = {"size": [24, 16], "counts": runs if not flat[0] else [0, *runs]}
    ds = _write(
        tmp_path,
        [_image(1)],
        [
            _person(11, 1, segmentation=uncompressed),
            _person(
                12, 1, segmentation={"size": [24, 16], "counts": compressed["counts"].decode()}
            ),
            _person(13, 1, segmentation=mask_to_polygons(mask)),
        ],
    )
    record, rejections = ds.read(1)
    assert rejections == []
    for person in record.people:
        assert np.array_equal(person.mask, mask)


def test_crowd_region_goes_to_crowd(tmp_path):
    crowd = _person(
        11,
        1,
        iscrowd=1,
        keypoints=[0] * 51,
        segmentation={"size": [24, 16], "counts": [40, 60, 284]},
    )
    ds = _write(tmp_path, [_image(1)], [crowd, _person(12, 1)])
    record, rejections = ds.read(1)
    assert rejections == [] and [p.annotation_id for p in record.people] == [12]
    (region,) = record.crowd
    assert region.iscrowd and region.num_keypoints == 0 and (region.keypoints == 0).all()
    assert region.mask.sum() == 60
    assert ds.num_people == 1  # crowd regions are not people


def test_image_without_people_gives_an_empty_record(tmp_path):
    ds = _write(tmp_path, [_image(1), _image(2)], [_person(11, 2)])
    record, rejections = ds.read(1)
    assert rejections == [] and record.people == [] and record.crowd == []
    assert record.pixels.shape == (24, 16, 3)


def test_person_without_keypoints_is_kept(tmp_path):
    no_key = _person(13, 1)
    del no_key["keypoints"]  # as in COCO *instances* files
    ds = _write(
        tmp_path, [_image(1)], [_person(11, 1, keypoints=[0] * 51, num_keypoints=0), no_key]
    )
    record, rejections = ds.read(1)
    assert rejections == [] and [p.num_keypoints for p in record.people] == [0, 0]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_rgba_palette_images_become_rgb(tmp_path, mode):
    img = Image.new(mode, (16, 24), 128 if mode in ("L", "P") else (200, 100, 50, 255))
    ds = _write(tmp_path, [_image(1)], [_person(11, 1)], pixels={"1.png": img})
    record, rejections = ds.read(1)
    assert (
        rejections == [] and record.pixels.shape == (24, 16, 3) and record.pixels.dtype == np.uint8
    )
    if mode == "RGBA":
        assert tuple(record.pixels[0, 0]) == (200, 100, 50)


@pytest.mark.parametrize("missing", ["images", "annotations"])
def test_json_without_images_or_annotations_raises(tmp_path, missing):
    body = {"images": [], "annotations": []}
    del body[missing]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(body))
    with pytest.raises(CocoFormatError, match=rf"broken\.json: missing key '{missing}'"):
        CocoPersonDataset(str(path), str(tmp_path), split="val")


def test_bad_json_text_and_bad_entries_raise(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(CocoFormatError, match="bad.json: not valid JSON"):
        CocoPersonDataset(str(path), str(tmp_path), split="val")
    path.write_text(
        json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 4}], "annotations": []})
    )
    with pytest.raises(CocoFormatError, match=r"images\[0\] \(id 1\) lacks key 'height'"):
        CocoPersonDataset(str(path), str(tmp_path), split="val")
    path.write_text(json.dumps({"images": [_image(1), _image(1)], "annotations": []}))
    with pytest.raises(CocoFormatError, match="image id 1 appears twice"):
        CocoPersonDataset(str(path), str(tmp_path), split="val")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        CocoPersonDataset(str(tmp_path / "absent.json"), str(tmp_path), split="val")


def test_unknown_image_id_in_read_raises(tmp_path):
    ds = _write(tmp_path, [_image(1)], [])
    with pytest.raises(KeyError, match="image id 5"):
        ds.read(5)


def test_every_reason_used_is_declared(tmp_path):
    assert {"image_missing", "image_unreadable", "size_mismatch", "malformed_keypoints"} <= set(
        REJECT_REASONS
    )
    assert {"malformed_segmentation", "unknown_image", "not_person"} <= set(REJECT_REASONS)
    with pytest.raises(ValueError, match="RLE 'size'"):
        decode_segmentation({"size": "24x16", "counts": "x"}, 24, 16)
