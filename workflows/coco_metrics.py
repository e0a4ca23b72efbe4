"""Segm AP with pycocotools: the overall COCO metrics and the AP by occlusion level.

Used by the per-epoch validation in training, by ``evaluate.py`` and by the benchmarks. The
numbers are exactly what pycocotools' ``COCOeval(iouType="segm")`` computes on the same
ground truth and results: nothing is recomputed here.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

# The metric that picks the best checkpoint, ranks Tune trials and decides whether the registry's
# alias moves (also the version tag that stores it): segm AP on the val split.
VAL_METRIC = "val_segm_ap"

METRIC_NAMES = (
    "segm_ap",
    "segm_ap50",
    "segm_ap75",
    "segm_ap_small",
    "segm_ap_medium",
    "segm_ap_large",
)


@contextlib.contextmanager
def quiet_pycocotools():
    """Silence pycocotools' progress prints, also inside Ray workers (where Ray's own stdout
    capture ignores ``contextlib.redirect_stdout``): a module-level ``print`` shadows the builtin."""
    import pycocotools.coco
    import pycocotools.cocoeval

    modules = (pycocotools.coco, pycocotools.cocoeval)
    for module in modules:
        module.print = lambda *args, **kwargs: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for module in modules:
            module.__dict__.pop("print", None)


def _coco_from_dict(gt: dict[str, Any]):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with quiet_pycocotools():
        coco.createIndex()
    return coco


def coco_segm_metrics(gt: dict[str, Any] | Any, results: list[dict[str, Any]]) -> dict[str, float]:
    """Run COCOeval (segm) and return its six AP figures; empty results score 0.

    ``gt``: a COCO ground-truth dict (or a ``pycocotools.coco.COCO``); ``results``: COCO result
    dicts (``image_id``, ``category_id``, ``segmentation`` RLE, ``score``).
    """
    from pycocotools.cocoeval import COCOeval

    coco_gt = gt if hasattr(gt, "loadRes") else _coco_from_dict(gt)
    if not results or not coco_gt.getAnnIds(iscrowd=False):
        return dict.fromkeys(METRIC_NAMES, 0.0)
    known = set(coco_gt.getImgIds())
    unknown = sorted({r["image_id"] for r in results} - known)
    if unknown:
        raise ValueError(f"results name image ids that are not in the ground truth: {unknown[:10]}")
    with quiet_pycocotools():
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 where a size range has no ground truth: keep it as NaN, not a score.
    return {
        name: (float(v) if v >= 0 else float("nan"))
        for name, v in zip(METRIC_NAMES, ev.stats[:6], strict=True)
    }


def occlusion_breakdown(
    gt: dict[str, Any], results: list[dict[str, Any]], *, bins: list[float]
) -> list[dict[str, Any]]:
    """Segm AP per MaxIoU bin ``[lo, hi)`` (the last bin includes ``hi``).

    People outside a bin are turned into ignore regions (``iscrowd = 1``), the mechanism
    COCOeval offers: a prediction that matches them counts neither as a hit nor as a false
    positive. Annotations need a ``max_iou`` field; people without one are left out of every bin.
    """
    rows = []
    for i, (lo, hi) in enumerate(zip(bins, bins[1:], strict=False)):
        last = i == len(bins) - 2
        sub = copy.deepcopy(gt)
        count = 0
        for ann in sub["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            miou = ann.get("max_iou")
            inside = miou is not None and lo <= miou and (miou < hi or (last and miou <= hi))
            if inside:
                count += 1
            else:
                ann["iscrowd"] = 1
        metrics = (
            coco_segm_metrics(sub, results) if count else dict.fromkeys(METRIC_NAMES, float("nan"))
        )
        rows.append(
            {"bin": f"[{lo:g}, {hi:g}{']' if last else ')'}", "num_people": count, **metrics}
        )
    return rows


def occluded_subset_ap(
    gt: dict[str, Any], results: list[dict[str, Any]], *, min_iou: float
) -> dict[str, float]:
    """Segm AP on the people whose MaxIoU is at least ``min_iou`` (the "occluded" subset)."""
    rows = occlusion_breakdown(gt, results, bins=[min_iou, 1.0])
    return {"occluded_segm_ap": rows[0]["segm_ap"], "occluded_num_people": rows[0]["num_people"]}
