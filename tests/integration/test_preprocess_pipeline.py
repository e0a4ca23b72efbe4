"""Integration tests of the Ray Data preprocessing pipeline on a real local Ray instance:
generated data -> Parquet -> read back; idempotent re-runs; the real COCO sample; S3 round trip."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pose2seg.config import Config
from pose2seg.skeleton import NUM_SKELETON_CHANNELS
from preprocessing import schema
from preprocessing.pipeline import (
    META_FILE,
    TEMPLATES_FILE,
    PreprocessError,
    load_split,
    preprocess_dataset,
    processed_dir,
    variant_dir,
)

pytestmark = pytest.mark.integration

SMALL = {
    "data.synthetic_num_train": 20,
    "data.synthetic_num_val": 8,
    "data.synthetic_image_size": 128,
    "data.synthetic_max_people": 3,
    "data.input_size": 128,
    "data.images_per_shard": 6,
    "model.roi_size": 32,
    "model.num_templates": 2,
}


def _config(tmp_path, **overrides) -> Config:
    flat = {
        **SMALL,
        "data.root": str(tmp_path / "raw"),
        "data.processed": str(tmp_path / "processed"),
    }
    flat.update(overrides)
    return Config.from_flat(flat)


def _rows(ds) -> list[dict]:
    return [schema.decode_row(r) for r in ds.take_all()]


def test_synthetic_to_parquet_and_back_is_idempotent(ray_session, tmp_path):
    config = _config(tmp_path)
    summary = preprocess_dataset(config)
    train, val = summary.splits["train"], summary.splits["val"]
    assert (train.images_in, train.rows_out, val.images_in, val.rows_out) == (20, 20, 8, 8)
    assert train.people_out >= 20 and val.people_out >= 16  # val has >= 2 people per image
    assert train.reject_fraction == 0.0
    assert 0 < summary.bytes_per_person["total"] < summary.bytes_per_person["raw"]

    root = variant_dir(config)
    meta = json.loads(open(os.path.join(root, META_FILE)).read())
    assert meta["summary"]["splits"]["train"]["people_out"] == train.people_out
    assert len(meta["channel_layout"]) == NUM_SKELETON_CHANNELS
    assert meta["config"]["model.roi_size"] == 32
    templates = np.load(os.path.join(root, TEMPLATES_FILE))
    assert templates.shape == (2, 17, 2) and templates.dtype == np.float32
    rejects = [f for f in os.listdir(os.path.join(root, "rejects")) if f.endswith(".parquet")]
    assert "train-00000.parquet" in rejects and "val-00001.parquet" in rejects
    assert (
        pq.read_schema(os.path.join(root, "rejects", "train-00000.parquet")).names
        == schema.REJECTS_SCHEMA.names
    )

    ds = load_split(config, "val")
    assert ds.schema().names == list(schema.COLUMNS)
    rows = _rows(ds)
    assert len(rows) == 8 and len({r["image_id"] for r in rows}) == 8
    assert sum(r["num_people"] for r in rows) == val.people_out
    row = next(r for r in rows if r["num_people"])
    n = row["num_people"]
    assert (
        row["skeleton"].shape == (n, NUM_SKELETON_CHANNELS, 32, 32)
        and row["skeleton"].dtype == np.int8
    )
    assert row["targets"].shape == (n, 32, 32) and row["targets"].any(axis=(1, 2)).all()
    assert row["affines"].shape == (n, 2, 3) and max(row["image"].shape[:2]) == 128
    assert (row["template_ids"] >= 0).all()  # synthetic people have enough keypoints
    # Each person's PAF/heatmaps sit where their target mask is (aligned frame, same person).
    heat = row["skeleton"][:, 38:].astype(np.float32).max(axis=1) > 60
    assert (heat & row["targets"]).sum() > 0.3 * heat.sum()

    with contextlib.redirect_stdout(io.StringIO()) as out:
        again = preprocess_dataset(config)
    assert again.skipped and "skipped" in out.getvalue()
    forced = preprocess_dataset(config, force=True)
    assert not forced.skipped
    assert (
        forced.splits["train"].rows_out == 20
        and forced.splits["train"].people_out == train.people_out
    )
    assert load_split(config, "train").count() == 20  # overwrite, not append
    assert len(_rows(load_split(config, "val"))) == 8


def test_real_coco_sample_through_the_pipeline(ray_session, tmp_path, coco_sample_dir):
    config = _config(
        tmp_path,
        **{
            "data.source": "coco",
            "data.root": str(coco_sample_dir),
            "data.train_annotations": "person_keypoints_sample.json",
            "data.train_images": ".",
            "data.val_annotations": "person_keypoints_sample.json",
            "data.val_images": ".",
            "data.input_size": 256,
            "data.images_per_shard": 2,
            "model.roi_size": 64,
        },
    )
    summary = preprocess_dataset(config, splits=("val",))
    val = summary.splits["val"]
    assert (val.images_in, val.rows_out, val.people_out) == (4, 4, 12)
    assert val.people_rejected == {"no_keypoints": 2} and val.reject_fraction == 0.0
    rejects = pq.read_table(os.path.join(variant_dir(config), "rejects")).to_pylist()
    no_kp = sorted(r["annotation_id"] for r in rejects if r["reason"] == "no_keypoints")
    assert no_kp == [508900, 1202706]
    rows = {r["image_id"]: r for r in _rows(load_split(config, "val"))}
    assert len(rows[40083]["ignore_rles"]) == 1 and len(rows[196141]["ignore_rles"]) == 1
    assert rows[785]["scale"] == pytest.approx(256 / 640)
    assert rows[785]["image"].shape == (170, 256, 3)

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = gt_dict = schema.gt_to_coco(list(rows.values()))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt_dict
        coco.createIndex()
        dets = [
            {
                "image_id": a["image_id"],
                "category_id": 1,
                "segmentation": a["segmentation"],
                "score": 1.0,
            }
            for a in gt["annotations"]
            if not a["iscrowd"]
        ]
        ev = COCOeval(coco, coco.loadRes(dets), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    # The stored original-frame masks are the reader's: same area as a fresh decode.
    from preprocessing.coco import CocoPersonDataset

    record, _ = CocoPersonDataset(
        str(coco_sample_dir / "person_keypoints_sample.json"), str(coco_sample_dir), split="val"
    ).read(785)
    from pycocotools import mask as mask_utils

    rle = rows[785]["gt_rles"][0]
    stored = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    np.testing.assert_array_equal(stored.astype(bool), record.people[0].mask)


def test_reject_fraction_limit_raises(ray_session, tmp_path, coco_sample_dir):
    # Point the images at an empty folder: every image is missing -> all people rejected.
    empty = tmp_path / "no_images"
    empty.mkdir()
    config = _config(
        tmp_path,
        **{
            "data.source": "coco",
            "data.root": str(coco_sample_dir),
            "data.train_annotations": "person_keypoints_sample.json",
            "data.train_images": str(empty),
            "data.val_annotations": "person_keypoints_sample.json",
            "data.val_images": str(empty),
            "data.max_reject_fraction": 0.2,
        },
    )
    with pytest.raises(PreprocessError, match="max_reject_fraction"):
        preprocess_dataset(config, splits=("val",))
    assert not os.path.exists(os.path.join(variant_dir(config), META_FILE))


def test_s3_round_trip(ray_session, tmp_path, s3_bucket):
    from preprocessing.storage import upload_dir
    from preprocessing.synthetic import ensure_synthetic_dataset

    local = _config(
        tmp_path,
        **{"data.synthetic_num_train": 8, "data.synthetic_num_val": 4, "data.images_per_shard": 4},
    )
    ensure_synthetic_dataset(local)
    assert upload_dir(str(tmp_path / "raw"), f"s3://{s3_bucket}/raw") > 0
    config = local.with_overrides(
        {
            "data.source": "coco",
            "data.root": f"s3://{s3_bucket}/raw",
            "data.processed": f"s3://{s3_bucket}/processed",
        }
    )
    summary = preprocess_dataset(config)
    assert summary.splits["train"].rows_out == 8 and summary.splits["val"].rows_out == 4
    assert processed_dir(config, "val").startswith(f"s3://{s3_bucket}/processed/")
    rows = _rows(load_split(config, "val"))
    assert len(rows) == 4 and sum(r["num_people"] for r in rows) == summary.splits["val"].people_out
    again = preprocess_dataset(config, force=True)
    assert load_split(config, "train").count() == 8 and again.splits["train"].rows_out == 8
    assert preprocess_dataset(config).skipped


def test_entry_script_main(ray_session, tmp_path, capsys):
    from workflows.preprocess import main

    sets = [
        f"{k}={v}"
        for k, v in {**SMALL, "data.synthetic_num_train": 6, "data.synthetic_num_val": 3}.items()
    ]
    sets += [f"data.root={tmp_path / 'raw'}", f"data.processed={tmp_path / 'processed'}"]
    argv = [arg for s in sets for arg in ("--set", s)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train: images in 6, rows out 6" in out and "val: images in 3, rows out 3" in out
    assert main(argv) == 0 and "skipped" in capsys.readouterr().out
    assert main(["--set", "data.imput_size=3"]) == 2
    assert "data.input_size" in capsys.readouterr().err  # the config error suggests the key
