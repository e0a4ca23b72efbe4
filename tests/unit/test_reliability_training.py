"""Issue 27, the training half, without Ray: duplicate annotation ids (item 1), the MLflow
backfill and buffer (items 2 and 3), the experiment kind tag (item 11)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from preprocessing.coco import CocoPersonDataset

SAMPLE_JSON = "person_keypoints_sample.json"


# --------------------------------------------------------------------------------------------
# 1. Duplicate annotation ids: rejected in preprocessing, left out of the evaluated ground truth
# --------------------------------------------------------------------------------------------


def _sample_with_a_duplicate_id(coco_sample_dir: Path, tmp_path: Path) -> tuple[Path, int]:
    """The 4-image sample with annotation 460541 (image 196141) renumbered to 442619, the id of
    the person of image 785: one id, two people in two images."""
    data = json.loads((coco_sample_dir / SAMPLE_JSON).read_text())
    for ann in data["annotations"]:
        if ann["id"] == 460541:
            ann["id"] = 442619
    for image in data["images"]:
        shutil.copy(coco_sample_dir / image["file_name"], tmp_path / image["file_name"])
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(data))
    return path, 442619


def _perfect_results(dataset: CocoPersonDataset) -> list[dict]:
    """The reader's people written back as COCO results (their own masks, score 1)."""
    results = []
    for record, _ in dataset.iter_records():
        for person in record.people:
            rle = mask_utils.encode(np.asfortranarray(person.mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                {"image_id": record.image_id, "category_id": 1, "segmentation": rle, "score": 1.0}
            )
    return results


def test_a_duplicated_annotation_id_is_rejected_and_perfect_masks_score_ap_1(
    coco_sample_dir, tmp_path
):
    from workflows.coco_metrics import coco_segm_metrics
    from workflows.eval_io import load_gt

    path, dup = _sample_with_a_duplicate_id(coco_sample_dir, tmp_path)
    dataset = CocoPersonDataset(str(path), str(tmp_path), split="val")
    rejected = [r for r in dataset.dataset_rejections if r.reason == "duplicate_annotation_id"]
    assert [(r.annotation_id, r.image_id) for r in rejected] == [(dup, 785), (dup, 196141)]
    assert f"annotation id {dup} appears 2 times" in rejected[0].detail
    assert "image ids 785, 196141" in rejected[0].detail and str(path) in rejected[0].detail
    assert rejected[0].file_name == "000000000785.jpg"
    people = {p.annotation_id for rec, _ in dataset.iter_records() for p in rec.people}
    assert dup not in people and len(people) == 12  # 14 in the sample, both copies out

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        gt = load_gt(str(path))
    assert dup not in {a["id"] for a in gt["annotations"]}
    (warning,) = stderr.getvalue().splitlines()
    assert str(path) in warning and f"id {dup} in image ids 785, 196141" in warning
    # pycocotools indexes by id: with both copies in the ground truth this scored 0.842.
    assert coco_segm_metrics(gt, _perfect_results(dataset))["segm_ap"] == pytest.approx(1.0)
