"""Evaluate a model on a COCO-format split: segm AP with pycocotools, AP by occlusion level.

    python workflows/evaluate.py --model models:/pose2seg@champion
    python workflows/evaluate.py --model models:/pose2seg@champion --keypoints person_keypoints_results.json
    python workflows/evaluate.py --config configs/ochuman_eval.yaml --model models:/pose2seg-coco@champion

Keypoints come from the ground truth (the paper's "GT kpt" setting; people without any labelled
keypoint cannot be segmented by a pose-based model and count as misses) or from a COCO
keypoint-results JSON of any pose estimator (matched to images by ``image_id``). Batch
inference runs on Ray Data actors. The printed AP is pycocotools' ``COCOeval`` on the written
``results.json`` against the split's annotation file, unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from pose2seg.config import Config  # noqa: E402
from workflows.common import (  # noqa: E402
    add_config_args,
    config_from_args,
    resolve_model_and_connect,
    run_main,
)


class KeypointResultsError(ValueError):
    """A keypoint-results JSON names an unknown image or holds malformed keypoints."""


def split_paths(config: Config, split: str) -> tuple[str, str]:
    from preprocessing.storage import join

    d = config.data
    ann, img = (
        (d.val_annotations, d.val_images)
        if split == "val"
        else (d.train_annotations, d.train_images)
    )
    return join(d.root, ann), join(d.root, img)


def load_gt(annotations_uri: str) -> dict[str, Any]:
    from preprocessing.storage import read_bytes

    try:
        gt = json.loads(read_bytes(annotations_uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{annotations_uri}: not valid JSON: {exc}") from None
    for key in ("images", "annotations"):
        if key not in gt:
            raise ValueError(f"{annotations_uri}: COCO annotation file has no {key!r}")
    gt.setdefault("categories", [{"id": 1, "name": "person"}])
    return gt


def gt_keypoints(gt: dict[str, Any]) -> dict[int, np.ndarray]:
    """image id -> (N,17,3) keypoints of the non-crowd people with at least one labelled keypoint."""
    out: dict[int, list] = {int(im["id"]): [] for im in gt["images"]}
    for ann in gt["annotations"]:
        kp = ann.get("keypoints")
        if ann.get("iscrowd", 0) or not kp or len(kp) != 51:
            continue
        arr = np.asarray(kp, np.float32).reshape(17, 3)
        if (arr[:, 2] > 0).any() and int(ann["image_id"]) in out:
            out[int(ann["image_id"])].append(arr)
    return {k: np.stack(v) if v else np.zeros((0, 17, 3), np.float32) for k, v in out.items()}


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
            arr = np.asarray(kp, np.float32)
        except (TypeError, ValueError):
            arr = np.zeros(0)
        if arr.shape != (51,) or not np.isfinite(arr).all():
            raise KeypointResultsError(
                f"{source}: entry {i} (image_id {image_id}) has malformed keypoints: expected 51 finite numbers"
            )
        if float(res.get("score", 1.0)) >= min_score:
            out[image_id].append(arr.reshape(17, 3))
    return {k: np.stack(v) if v else np.zeros((0, 17, 3), np.float32) for k, v in out.items()}


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


@dataclass
class EvalOutcome:
    metrics: dict[str, float]
    occlusion: list[dict[str, Any]]
    results_path: str
    output_dir: str
    inference: dict[str, Any]
    mlflow_run_id: str | None = None
    overlays: list[str] = field(default_factory=list)


def run_evaluate(
    config: Config,
    *,
    model_ref: str,
    split: str = "val",
    keypoints: str | None = None,
    num_actors: int = 1,
    use_gpu: bool = False,
    log_to_mlflow: bool = True,
) -> EvalOutcome:
    """The whole evaluation on an initialised Ray; writes results, metrics and overlays."""
    from preprocessing.storage import join, read_bytes
    from workflows.evaluation import coco_segm_metrics, occluded_subset_ap, occlusion_breakdown
    from workflows.inference import InferenceItem, run_batch_inference

    if config.data.source == "synthetic":
        from preprocessing.synthetic import ensure_synthetic_dataset

        ensure_synthetic_dataset(config)
    ann_uri, images_uri = split_paths(config, split)
    gt = with_max_iou(load_gt(ann_uri))
    kp_source = keypoints or config.eval.keypoints
    if kp_source == "gt":
        kps = gt_keypoints(gt)
    else:
        kps = results_keypoints(json.loads(read_bytes(kp_source)), gt, source=kp_source)
    items = [
        InferenceItem(
            image_id=int(im["id"]),
            uri=join(images_uri, im["file_name"]),
            keypoints=kps[int(im["id"])],
        )
        for im in gt["images"]
    ]
    results, stats = run_batch_inference(
        items, model_ref=model_ref, config=config, num_actors=num_actors, use_gpu=use_gpu
    )

    name = f"eval-{split}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = os.path.join(config.eval.output_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, "results.json")
    with open(results_path, "w") as fh:
        json.dump(results, fh)
    t0 = time.time()
    metrics = coco_segm_metrics(gt, results)
    stats["cocoeval_seconds"] = time.time() - t0
    metrics.update(occluded_subset_ap(gt, results, min_iou=config.eval.occluded_min_iou))
    occlusion = occlusion_breakdown(gt, results, bins=config.eval.occlusion_bins)
    with open(os.path.join(out_dir, "metrics.json"), "w") as fh:
        json.dump(
            {
                "metrics": metrics,
                "occlusion": occlusion,
                "inference": stats,
                "model": model_ref,
                "keypoints": kp_source,
            },
            fh,
            indent=1,
        )
    write_occlusion_table(occlusion, out_dir)
    overlays = write_overlays(gt, results, kps, images_uri, out_dir, limit=config.eval.num_overlays)
    outcome = EvalOutcome(
        metrics=metrics,
        occlusion=occlusion,
        results_path=results_path,
        output_dir=out_dir,
        inference=stats,
        overlays=overlays,
    )
    if log_to_mlflow:
        from workflows import tracking

        handle = tracking.start_run(
            config, run_name=name, tags={"pose2seg.kind": "evaluate", "pose2seg.model": model_ref}
        )
        tracking.log_metrics(handle, {f"{split}_{k}": v for k, v in metrics.items()}, step=0)
        for fname in ("metrics.json", "occlusion.md", "occlusion.csv", "results.json"):
            tracking.log_artifact_file(handle, os.path.join(out_dir, fname), "evaluation")
        tracking.end_run(handle)
        outcome.mlflow_run_id = handle.run_id
    return outcome


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
            pixels, mask_arr, kps.get(image_id, np.zeros((0, 17, 3), np.float32))
        )
        path = os.path.join(out_dir, "overlays", f"{image_id}.png")
        Image.fromarray(drawn).save(path)
        paths.append(path)
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument(
        "--model",
        default=None,
        help="models:/NAME@ALIAS (default: the config's model and alias), runs:/..., or a checkpoint folder",
    )
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument(
        "--keypoints",
        default=None,
        help="'gt' or a COCO keypoint-results JSON (default: eval.keypoints)",
    )
    parser.add_argument("--actors", type=int, default=1, help="Ray Data inference actors")
    parser.add_argument("--gpu", action="store_true", help="one GPU per inference actor")
    parser.add_argument("--no-mlflow", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    model_ref = resolve_model_and_connect(args.model, config, args.address)
    out = run_evaluate(
        config,
        model_ref=model_ref,
        split=args.split,
        keypoints=args.keypoints,
        num_actors=args.actors,
        use_gpu=args.gpu,
        log_to_mlflow=not args.no_mlflow,
    )
    m = out.metrics
    print(
        f"segm AP {m['segm_ap']:.4f}  AP50 {m['segm_ap50']:.4f}  AP75 {m['segm_ap75']:.4f}  "
        f"APm {m['segm_ap_medium']:.4f}  APl {m['segm_ap_large']:.4f}  occluded AP {m['occluded_segm_ap']:.4f}"
    )
    with open(os.path.join(out.output_dir, "occlusion.md")) as fh:
        print(fh.read())
    print(
        f"inference: {out.inference['images_per_s']:.1f} images/s, {out.inference['people_per_s']:.1f} people/s"
    )
    print(f"results: {out.results_path}   MLflow run: {out.mlflow_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
