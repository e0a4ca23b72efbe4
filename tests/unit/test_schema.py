"""Unit tests of preprocessing.schema: row encode/decode round trip and COCO ground truth."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from pose2seg.skeleton import NUM_KEYPOINTS, NUM_SKELETON_CHANNELS
from preprocessing.schema import (
    COLUMNS,
    REJECTS_SCHEMA,
    SCHEMA,
    channel_layout,
    decode_row,
    encode_image_row,
    gt_to_coco,
    rejects_to_table,
    rows_to_table,
)

S = 16


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _row(image_id: int, n: int, seed: int, *, encoding: str = "png") -> dict:
    rng = np.random.default_rng(seed)
    orig_h, orig_w = 40, 60
    masks = np.zeros((n, orig_h, orig_w), dtype=bool)
    for i in range(n):
        masks[i, 5 + i : 20 + i, 10 * i + 2 : 10 * i + 9] = True
    crowd = np.zeros((orig_h, orig_w), dtype=bool)
    crowd[30:38, 40:58] = True
    return encode_image_row(
        image_id=image_id,
        file_name=f"{image_id:06d}.png",
        orig_height=orig_h,
        orig_width=orig_w,
        scale=0.5,
        image=rng.integers(0, 255, size=(20, 30, 3), dtype=np.uint8),
        image_encoding=encoding,
        person_ids=[image_id * 100 + i for i in range(n)],
        keypoints=rng.random((n, NUM_KEYPOINTS, 3)).astype(np.float32),
        affines=rng.random((n, 2, 3)).astype(np.float32),
        template_ids=[i - 1 for i in range(n)],
        skeleton=rng.integers(-127, 128, size=(n, NUM_SKELETON_CHANNELS, S, S), dtype=np.int8),
        targets=rng.random((n, S, S)) > 0.5,
        mask_rles=[_rle(np.zeros((30, 30), bool)) for _ in range(n)],
        gt_rles=[_rle(m) for m in masks],
        areas=[float(m.sum()) for m in masks],
        bboxes=np.array(
            [
                mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
                for m in masks
            ]
        ).reshape(n, 4),
        max_ious=[0.25 if i else None for i in range(n)],
        ignore_rles=[_rle(crowd)],
    )


def test_schema_columns_are_the_documented_ones():
    assert COLUMNS == (
        "image_id", "file_name", "orig_height", "orig_width", "scale", "image", "num_people",
        "person_ids", "keypoints", "affines", "template_ids", "skeleton", "targets", "mask_rles",
        "gt_rles", "areas", "bboxes", "max_ious", "ignore_rles",
    )  # fmt: skip
    assert SCHEMA.field("skeleton").type == pa.binary()
    assert REJECTS_SCHEMA.names == [
        "split",
        "image_id",
        "annotation_id",
        "file_name",
        "reason",
        "detail",
    ]
    assert len(channel_layout()) == NUM_SKELETON_CHANNELS


def test_encode_decode_round_trip_through_parquet(tmp_path):
    rows = [_row(1, 3, seed=0), _row(2, 0, seed=1), _row(3, 1, seed=2, encoding="jpeg")]
    table = rows_to_table(rows)
    assert table.schema == SCHEMA
    pq.write_table(table, tmp_path / "x.parquet")
    back = pq.read_table(tmp_path / "x.parquet").to_pylist()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(20, 30, 3), dtype=np.uint8)
    keypoints = rng.random((3, NUM_KEYPOINTS, 3)).astype(np.float32)
    affines = rng.random((3, 2, 3)).astype(np.float32)
    skeleton = rng.integers(-127, 128, size=(3, NUM_SKELETON_CHANNELS, S, S), dtype=np.int8)
    targets = rng.random((3, S, S)) > 0.5

    d = decode_row(back[0])
    assert d["image_id"] == 1 and d["num_people"] == 3 and d["file_name"] == "000001.png"
    np.testing.assert_array_equal(d["image"], image)  # png is lossless
    np.testing.assert_array_equal(d["keypoints"], keypoints)
    np.testing.assert_array_equal(d["affines"], affines)
    np.testing.assert_array_equal(d["skeleton"], skeleton)
    np.testing.assert_array_equal(d["targets"], targets)
    assert d["skeleton"].dtype == np.int8 and d["targets"].dtype == bool
    np.testing.assert_array_equal(d["person_ids"], [100, 101, 102])
    np.testing.assert_array_equal(d["template_ids"], [-1, 0, 1])
    assert np.isnan(d["max_ious"][0]) and d["max_ious"][1] == pytest.approx(0.25)
    assert d["gt_rles"][0]["size"] == [40, 60]
    assert d["mask_rles"][0]["size"] == [30, 30]  # the padded input frame
    assert (
        mask_utils.decode({**d["gt_rles"][1], "counts": d["gt_rles"][1]["counts"].encode()}).sum()
        == 15 * 7
    )
    assert d["scale"] == 0.5 and d["orig_height"] == 40 and d["orig_width"] == 60

    empty = decode_row(back[1], roi_size=S)
    assert empty["skeleton"].shape == (0, NUM_SKELETON_CHANNELS, S, S)
    assert empty["targets"].shape == (0, S, S) and empty["affines"].shape == (0, 2, 3)
    jpeg = decode_row(back[2])
    assert jpeg["image"].shape == (20, 30, 3)


def test_encode_and_decode_reject_inconsistent_rows():
    row = _row(5, 2, seed=0)
    with pytest.raises(ValueError, match="image 5: column keypoints"):
        decode_row({**row, "keypoints": row["keypoints"][:-4]})
    with pytest.raises(ValueError, match="lacks columns"):
        decode_row({k: v for k, v in row.items() if k != "skeleton"})
    with pytest.raises(ValueError, match="image 7: areas"):
        encode_image_row(**{**_encode_args(), "image_id": 7, "areas": [1.0]})


def _encode_args() -> dict:
    n = 2
    return {
        "image_id": 7, "file_name": "x", "orig_height": 4, "orig_width": 4, "scale": 1.0,
        "image": np.zeros((4, 4, 3), np.uint8), "image_encoding": "png", "person_ids": [1, 2],
        "keypoints": np.zeros((n, NUM_KEYPOINTS, 3)), "affines": np.zeros((n, 2, 3)),
        "template_ids": [0, 0], "skeleton": np.zeros((n, NUM_SKELETON_CHANNELS, 4, 4), np.int8),
        "targets": np.zeros((n, 4, 4), bool), "mask_rles": ["a", "b"], "gt_rles": ["a", "b"],
        "areas": [1.0, 2.0], "bboxes": np.zeros((n, 4)), "max_ious": [0.0, 0.0], "ignore_rles": [],
    }  # fmt: skip


def test_rejects_table():
    table = rejects_to_table(
        [
            {
                "split": "val",
                "image_id": 3,
                "annotation_id": 9,
                "file_name": "a.jpg",
                "reason": "no_keypoints",
                "detail": "",
            },
            {
                "split": "val",
                "image_id": 4,
                "annotation_id": None,
                "file_name": "b.jpg",
                "reason": "unreadable_image",
                "detail": "x",
            },
        ]
    )
    assert table.schema == REJECTS_SCHEMA
    assert table.column("annotation_id").to_pylist() == [9, None]


def test_gt_to_coco_loads_in_pycocotools_and_scores_ap_one_against_itself():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rows = [
        decode_row(r) for r in rows_to_table([_row(1, 3, seed=0), _row(2, 2, seed=1)]).to_pylist()
    ]
    gt = gt_to_coco(rows)
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 0, 0, 0, 0, 1, 1]
    assert len({a["id"] for a in gt["annotations"]}) == 7
    assert (
        gt["annotations"][1]["max_iou"] == pytest.approx(0.25)
        and gt["annotations"][0]["max_iou"] is None
    )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        results = [
            {
                "image_id": a["image_id"],
                "category_id": 1,
                "segmentation": a["segmentation"],
                "score": 1.0,
            }
            for a in gt["annotations"]
            if not a["iscrowd"]
        ]
        dt = coco.loadRes(results)
        ev = COCOeval(coco, dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="image 1 appears twice"):
        gt_to_coco(rows + rows[:1])
