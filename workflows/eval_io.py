"""Evaluation inputs and outputs shared by training-time validation and the commands: named
splits, a split's ground truth under the evaluation protocol, keypoints from the ground truth
or a keypoint-results file, MaxIoU, the metrics of a split, the tables and overlays.

Training-time validation (``workflows.train_validation.validate``) and ``evaluate.py`` both build
their ground truth with :func:`protocol_gt` and their metrics with :func:`split_metrics`, and
their predictions with :class:`pose2seg.inference.Predictor` on :func:`gt_keypoints`: the val AP
that picks checkpoints and moves the registry alias is the AP ``evaluate.py`` reports.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from pose2seg.config import Config
from pose2seg.keypoint_checks import keypoint_number_problem
from pose2seg.skeleton import NUM_KEYPOINTS


class KeypointResultsError(ValueError):
    """A keypoint-results JSON names an unknown image or holds malformed keypoints."""


def split_names(config: Config) -> list[str]:
    """Every split the config knows: ``train``, ``val`` and those of ``eval.splits``."""
    return list(dict.fromkeys(["train", "val", *config.eval.splits]))


def split_paths(config: Config, split: str) -> tuple[str, str]:
    """``(annotation file URI, image folder URI)`` of a named split: a declaration in
    ``eval.splits`` if there is one, else ``train`` / ``val`` from the ``data.*`` keys."""
    from preprocessing.storage import join

    d = config.data
    if split in config.eval.splits:
        body = config.eval.splits[split]
        ann, img = body["annotations"], body["images"]
    elif split == "val":
        ann, img = d.val_annotations, d.val_images
    elif split == "train":
        ann, img = d.train_annotations, d.train_images
    else:
        raise ValueError(
            f"unknown split {split!r}: the config knows {split_names(config)} "
            "(declare more under eval.splits)"
        )
    return join(d.root, ann), join(d.root, img)


def has_keypoints(ann: dict[str, Any]) -> bool:
    """An annotation with at least one labelled keypoint (v > 0)."""
    kp = ann.get("keypoints")
    if not kp or len(kp) != 3 * NUM_KEYPOINTS:
        return False
    return bool((np.asarray(kp, np.float32).reshape(NUM_KEYPOINTS, 3)[:, 2] > 0).any())


def protocol_gt(gt: dict[str, Any], protocol: str) -> dict[str, Any]:
    """The ground truth evaluated under ``eval.protocol`` (a new dict; ``gt`` is unchanged).

    ``ignore``: non-crowd people without any labelled keypoint become ignore regions
    (``iscrowd = 1``), like crowds: a pose-based model is given no pose for them, so they
    neither count as misses nor make a mask that covers them a false positive (the paper's
    protocol). ``miss``: the annotation file as it is (they count as misses). Crowd regions are
    ignore regions under both (COCOeval's rule).
    """
    import copy

    if protocol not in ("ignore", "miss"):
        raise ValueError(f"eval.protocol must be 'ignore' or 'miss', got {protocol!r}")
    out = copy.deepcopy(gt)
    if protocol == "ignore":
        for ann in out["annotations"]:
            if not ann.get("iscrowd", 0) and not has_keypoints(ann):
                ann["iscrowd"] = 1
    return out


_WARNED_DUPLICATES: set[str] = set()


def load_gt(annotations_uri: str) -> dict[str, Any]:
    """The ground truth of an annotation file, as evaluation scores it: annotations whose id
    repeats are left out (every copy, as preprocessing rejects them), with a one-line warning
    on stderr naming the file, the ids and their images (once per file and process)."""
    import sys

    from preprocessing.coco import drop_duplicate_annotations
    from preprocessing.storage import read_bytes

    try:
        gt = json.loads(read_bytes(annotations_uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{annotations_uri}: not valid JSON: {exc}") from None
    for key in ("images", "annotations"):
        if key not in gt:
            raise ValueError(f"{annotations_uri}: COCO annotation file has no {key!r}")
    gt.setdefault("categories", [{"id": 1, "name": "person"}])
    gt, dropped = drop_duplicate_annotations(gt, annotations_uri)
    if dropped and annotations_uri not in _WARNED_DUPLICATES:
        _WARNED_DUPLICATES.add(annotations_uri)
        print(f"[pose2seg] warning: {dropped}", file=sys.stderr, flush=True)
    return gt


def _gt_people(
    gt: dict[str, Any], *, include_unlabelled: bool = False
) -> dict[int, list[dict[str, Any]]]:
    """image id -> its non-crowd annotations with at least one labelled keypoint (all of them
    with ``include_unlabelled``), in order."""
    out: dict[int, list] = {int(im["id"]): [] for im in gt["images"]}
    for ann in gt["annotations"]:
        if ann.get("iscrowd", 0) or not (include_unlabelled or has_keypoints(ann)):
            continue
        if int(ann["image_id"]) in out:
            out[int(ann["image_id"])].append(ann)
    return out


def gt_keypoints(gt: dict[str, Any], *, include_unlabelled: bool = False) -> dict[int, np.ndarray]:
    """image id -> (N,17,3) keypoints of the non-crowd people with at least one labelled
    keypoint, in annotation order (the only ground truth inference is given). With
    ``include_unlabelled`` (``model.unlabelled_people = whole_image``, the official test) every
    non-crowd person, a missing ``keypoints`` list read as all zero."""

    def _kpts(ann: dict[str, Any]) -> np.ndarray:
        kp = ann.get("keypoints") or [0.0] * (3 * NUM_KEYPOINTS)
        return np.asarray(kp, np.float32).reshape(NUM_KEYPOINTS, 3)

    return {
        k: np.stack([_kpts(a) for a in v]) if v else np.zeros((0, NUM_KEYPOINTS, 3), np.float32)
        for k, v in _gt_people(gt, include_unlabelled=include_unlabelled).items()
    }


def keypoint_degradation(config: Config) -> str | None:
    """A label for ``eval.keypoint_drop_prob`` / ``keypoint_jitter`` when either is on."""
    e = config.eval
    if e.keypoint_drop_prob <= 0 and e.keypoint_jitter <= 0:
        return None
    return (
        f"drop {e.keypoint_drop_prob:g}, jitter {e.keypoint_jitter:g}, seed {e.keypoint_noise_seed}"
    )


def degrade_split_keypoints(
    keypoints: dict[int, np.ndarray], config: Config, *, gt: dict[str, Any] | None = None
) -> dict[int, np.ndarray]:
    """The robustness evaluation's keypoints: each image's people dropped and jittered by
    :func:`pose2seg.keypoint_noise.degrade_image_keypoints` (seeded by the image id). With the
    ground truth ``gt`` (keypoints from :func:`gt_keypoints`) the jitter is scaled by each
    person's annotated area, as OKS is; otherwise by its keypoints' box. A person left with no
    keypoint is not predicted (a miss), as when a pose estimator misses the person."""
    from pose2seg.keypoint_noise import degrade_image_keypoints

    people = _gt_people(gt) if gt is not None else {}
    out = {}
    for image_id, kpts in keypoints.items():
        anns = people.get(image_id)
        areas = None
        if anns is not None and len(anns) == len(kpts):
            areas = np.asarray([float(a.get("area", 0.0)) for a in anns], np.float64)
        out[image_id] = degrade_image_keypoints(
            kpts,
            image_id=image_id,
            seed=config.eval.keypoint_noise_seed,
            drop_prob=config.eval.keypoint_drop_prob,
            jitter=config.eval.keypoint_jitter,
            areas=areas,
        )
    return out


def results_keypoints(
    results: Any, gt: dict[str, Any], *, source: str, min_score: float = 0.0
) -> dict[int, np.ndarray]:
    """image id -> (N,17,3) from a COCO keypoint-results list; clear errors name the entry."""
    if not isinstance(results, list):
        raise KeypointResultsError(
            f"{source}: expected a JSON list of keypoint results, got {type(results).__name__}"
        )
    known = {int(im["id"]) for im in gt["images"]}
    out: dict[int, list] = {k: [] for k in known}
    for i, res in enumerate(results):
        if not isinstance(res, dict) or "image_id" not in res or "keypoints" not in res:
            raise KeypointResultsError(f"{source}: entry {i} needs 'image_id' and 'keypoints'")
        image_id = res["image_id"]
        if not isinstance(image_id, int) or image_id not in known:
            raise KeypointResultsError(
                f"{source}: entry {i} names image_id {image_id!r}, which is not in the ground truth"
            )
        kp = res["keypoints"]
        try:
            arr = np.asarray(kp, np.float64)
        except (TypeError, ValueError):
            arr = np.zeros(0)
        problem = keypoint_number_problem(arr) if arr.shape == (3 * NUM_KEYPOINTS,) else ""
        if arr.shape != (3 * NUM_KEYPOINTS,) or problem:
            raise KeypointResultsError(
                f"{source}: entry {i} (image_id {image_id}) has malformed keypoints: "
                + (problem or f"expected {3 * NUM_KEYPOINTS} finite numbers")
            )
        arr = arr.astype(np.float32)
        if float(res.get("score", 1.0)) >= min_score:
            out[image_id].append(arr.reshape(NUM_KEYPOINTS, 3))
    return {
        k: np.stack(v) if v else np.zeros((0, NUM_KEYPOINTS, 3), np.float32) for k, v in out.items()
    }


def with_max_iou(gt: dict[str, Any]) -> dict[str, Any]:
    """Give every non-crowd annotation a ``max_iou``: kept if the dataset has it (the synthetic
    set stores the full-body IoU), else the max box IoU with another person of the image."""
    from pycocotools import mask as mask_utils

    by_image: dict[int, list] = {}
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
    for anns in by_image.values():
        missing = [a for a in anns if a.get("max_iou") is None]
        if not missing:
            continue
        boxes = [list(map(float, a["bbox"])) for a in anns]
        ious = (
            mask_utils.iou(boxes, boxes, [0] * len(boxes)) if len(boxes) > 1 else np.zeros((1, 1))
        )
        ious = np.asarray(ious)
        np.fill_diagonal(ious, 0.0)
        for i, a in enumerate(anns):
            if a.get("max_iou") is None:
                a["max_iou"] = float(ious[i].max()) if len(anns) > 1 else 0.0
    return gt


def split_metrics(
    gt: dict[str, Any], results: list[dict[str, Any]], config: Config, *, by_bin: bool = True
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The metrics of one split: pycocotools segm AP (six figures), the occluded-subset AP and
    the AP by MaxIoU bin (``by_bin``); plus the number of people whose RoI came from the
    fallback.

    ``gt``: from :func:`protocol_gt` (with ``max_iou``, :func:`with_max_iou`); ``results``: the
    Predictor's. Results are put in a fixed order first (image id, then the Predictor's order
    within an image) so that ties in score are broken the same way whoever gathered them.
    """
    from workflows.coco_metrics import coco_segm_metrics, occluded_subset_ap, occlusion_breakdown

    ordered = sorted(results, key=lambda r: int(r["image_id"]))
    metrics = coco_segm_metrics(gt, ordered)
    metrics.update(occluded_subset_ap(gt, ordered, min_iou=config.eval.occluded_min_iou))
    metrics["num_fallback"] = float(sum(bool(r.get("fallback", False)) for r in ordered))
    occlusion = occlusion_breakdown(gt, ordered, bins=config.eval.occlusion_bins) if by_bin else []
    return metrics, occlusion


def write_occlusion_table(rows: list[dict[str, Any]], out_dir: str) -> None:
    import csv

    cols = ["bin", "num_people", "segm_ap", "segm_ap50", "segm_ap75"]
    with open(os.path.join(out_dir, "occlusion.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| MaxIoU | people | AP | AP50 | AP75 |", "|---|---|---|---|---|"]
    for r in rows:
        vals = [
            f"{r[c]:.4f}" if r[c] == r[c] else "n/a" for c in ("segm_ap", "segm_ap50", "segm_ap75")
        ]
        lines.append(f"| {r['bin']} | {r['num_people']} | " + " | ".join(vals) + " |")
    with open(os.path.join(out_dir, "occlusion.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def write_overlays(
    gt: dict[str, Any],
    results: list[dict[str, Any]],
    kps: dict[int, np.ndarray],
    images_uri: str,
    out_dir: str,
    *,
    limit: int,
) -> list[str]:
    """PNG overlays (masks coloured per person, skeletons drawn) of the first ``limit`` images."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    from preprocessing.schema import decode_image
    from preprocessing.storage import join, read_bytes
    from preprocessing.visualize import draw_instances

    if limit <= 0:
        return []
    os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
    by_image: dict[int, list] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    paths = []
    for im in gt["images"][:limit]:
        image_id = int(im["id"])
        pixels = decode_image(read_bytes(join(images_uri, im["file_name"])))
        masks = [
            mask_utils.decode(r["segmentation"]).astype(bool) for r in by_image.get(image_id, [])
        ]
        mask_arr = np.stack(masks) if masks else np.zeros((0, *pixels.shape[:2]), bool)
        drawn = draw_instances(
            pixels, mask_arr, kps.get(image_id, np.zeros((0, NUM_KEYPOINTS, 3), np.float32))
        )
        path = os.path.join(out_dir, "overlays", f"{image_id}.png")
        Image.fromarray(drawn).save(path)
        paths.append(path)
    return paths
