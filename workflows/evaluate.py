"""Evaluate a model on a COCO-format split: segm AP with pycocotools, AP by occlusion level.

    python workflows/evaluate.py --model models:/pose2seg@champion
    python workflows/evaluate.py --model models:/pose2seg@champion --keypoints person_keypoints_results.json
    python workflows/evaluate.py --config configs/ochuman_eval.yaml --model models:/pose2seg-coco@champion

Keypoints come from the ground truth (the paper's "GT kpt" setting; people without any labelled
keypoint cannot be segmented by a pose-based model and count as misses), from a COCO
keypoint-results JSON of any pose estimator (matched to images by ``image_id``), or from the
keypoint-detector stage (``--keypoints detector``; ``--with-detector`` reports both). Batch
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

from pose2seg.config import Config  # noqa: E402
from workflows.cli import (  # noqa: E402
    add_config_args,
    config_from_args,
    resolve_model_and_connect,
    run_main,
)


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
    from workflows.batch_inference import InferenceItem, run_batch_inference
    from workflows.coco_metrics import coco_segm_metrics, occluded_subset_ap, occlusion_breakdown
    from workflows.eval_io import (
        gt_keypoints,
        load_gt,
        results_keypoints,
        split_paths,
        with_max_iou,
        write_occlusion_table,
        write_overlays,
    )

    if config.data.source == "synthetic":
        from preprocessing.synthetic import ensure_synthetic_dataset

        ensure_synthetic_dataset(config)
    ann_uri, images_uri = split_paths(config, split)
    gt = with_max_iou(load_gt(ann_uri))
    kp_source = keypoints or config.eval.keypoints
    if kp_source == "gt":
        kps = gt_keypoints(gt)
    elif kp_source == "detector":  # the keypoint-detector stage (detector.* keys)
        from workflows.keypoint_detection import run_keypoint_detection

        kps = run_keypoint_detection(
            [(int(im["id"]), join(images_uri, im["file_name"])) for im in gt["images"]],
            config=config,
            num_actors=num_actors,
            use_gpu=use_gpu,
        )
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
        from workflows import mlflow_tracking as tracking

        handle = tracking.start_run(
            config, run_name=name, tags={"pose2seg.kind": "evaluate", "pose2seg.model": model_ref}
        )
        tracking.log_metrics(handle, {f"{split}_{k}": v for k, v in metrics.items()}, step=0)
        for fname in ("metrics.json", "occlusion.md", "occlusion.csv", "results.json"):
            tracking.log_artifact_file(handle, os.path.join(out_dir, fname), "evaluation")
        tracking.end_run(handle)
        outcome.mlflow_run_id = handle.run_id
    return outcome


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
        help="'gt', 'detector' (Keypoint R-CNN, detector.* keys) or a COCO keypoint-results "
        "JSON (default: eval.keypoints)",
    )
    parser.add_argument(
        "--with-detector",
        action="store_true",
        help="also evaluate with the keypoint detector's poses and print both APs",
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
    if args.with_detector:
        detected = run_evaluate(
            config,
            model_ref=model_ref,
            split=args.split,
            keypoints="detector",
            num_actors=args.actors,
            use_gpu=args.gpu,
            log_to_mlflow=not args.no_mlflow,
        )
        print(f"{'keypoints':<28} segm AP  AP50    occluded AP")
        for label, o in (
            (args.keypoints or config.eval.keypoints, out),
            ("detector (Keypoint R-CNN)", detected),
        ):
            m = o.metrics
            print(
                f"{label:<28} {m['segm_ap']:.4f}   {m['segm_ap50']:.4f}  {m['occluded_segm_ap']:.4f}"
            )
        print(f"results with detected keypoints: {detected.results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
