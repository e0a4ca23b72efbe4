"""Our AP figures are exactly pycocotools' on the same results; the occlusion bins behave."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from workflows.coco_metrics import coco_segm_metrics, occlusion_breakdown


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _dataset(seed: int = 0):
    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    ann_id = 1
    for image_id in range(1, 6):
        h, w = 64, 80
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.png"})
        for k in range(3):
            m = np.zeros((h, w), bool)
            y, x = rng.integers(0, 40), rng.integers(0, 50)
            m[y : y + 20, x : x + 25] = True
            rle = _rle(m)
            anns.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(m.sum()),
                    "bbox": list(mask_utils.toBbox(rle)),
                    "iscrowd": 0,
                    "max_iou": float(k) / 3,
                }
            )
            ann_id += 1
            # A prediction shifted by a random amount: imperfect, so AP is strictly between 0 and 1.
            p = np.roll(m, int(rng.integers(0, 8)), axis=1)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": _rle(p),
                    "score": float(rng.random()),
                }
            )
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    return gt, results


def _pycocotools_stats(gt, results):
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_ap_is_exactly_pycocotools():
    gt, results = _dataset()
    ours = coco_segm_metrics(gt, results)
    stats = _pycocotools_stats(gt, results)
    assert 0.0 < ours["segm_ap"] < 1.0
    assert ours["segm_ap"] == stats[0]
    assert ours["segm_ap50"] == stats[1]
    assert ours["segm_ap75"] == stats[2]


def test_perfect_results_score_one_and_empty_results_zero():
    gt, _ = _dataset()
    perfect = [
        {
            "image_id": a["image_id"],
            "category_id": 1,
            "segmentation": a["segmentation"],
            "score": 1.0,
        }
        for a in gt["annotations"]
    ]
    assert coco_segm_metrics(gt, perfect)["segm_ap"] == pytest.approx(1.0)
    assert coco_segm_metrics(gt, [])["segm_ap"] == 0.0


def test_unknown_image_id_is_an_error_naming_it():
    gt, results = _dataset()
    results[0] = {**results[0], "image_id": 999}
    with pytest.raises(ValueError, match="999"):
        coco_segm_metrics(gt, results)


def test_occlusion_bins_count_people_and_ignore_the_rest():
    gt, _ = _dataset()
    perfect = [
        {
            "image_id": a["image_id"],
            "category_id": 1,
            "segmentation": a["segmentation"],
            "score": 1.0,
        }
        for a in gt["annotations"]
    ]
    rows = occlusion_breakdown(gt, perfect, bins=[0.0, 0.3, 0.6, 1.0])
    assert [r["num_people"] for r in rows] == [5, 5, 5]
    # Predictions of people outside a bin match ignore regions: they are not false positives.
    assert all(r["segm_ap"] == pytest.approx(1.0) for r in rows)


def test_mean_mask_iou():
    a = np.zeros((2, 4, 4), bool)
    b = a.copy()
    a[0, :2] = True
    b[0, :1] = True
    assert mean_mask_iou(a, b) == pytest.approx((0.5 + 1.0) / 2)


def mean_mask_iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean IoU of (P, S, S) boolean masks; 1.0 for two empty masks."""
    inter = np.logical_and(pred, target).reshape(len(pred), -1).sum(1)
    union = np.logical_or(pred, target).reshape(len(pred), -1).sum(1)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return float(iou.mean()) if len(iou) else float("nan")
