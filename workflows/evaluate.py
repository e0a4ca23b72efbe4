"""Evaluate a model on a COCO-format split: segm AP with pycocotools, AP by occlusion level.

    python workflows/evaluate.py --model models:/pose2seg@champion
    python workflows/evaluate.py --model models:/pose2seg@champion --keypoints person_keypoints_results.json
    python workflows/evaluate.py --config configs/ochuman_eval.yaml --model models:/pose2seg-coco@champion

    python workflows/evaluate.py --config configs/ochuman_eval.yaml --split val test

Splits are named (``train``, ``val``, and any declared under ``eval.splits``); several splits
give one paper-style table (per split AP, AP50, AP75 and AP by MaxIoU bin) and one MLflow run.
Keypoints come from the ground truth (the paper's "GT kpt" setting) or from a COCO
keypoint-results JSON of any pose estimator (matched to images by ``image_id``), or from the
keypoint-detector stage (``--keypoints detector``; ``--with-detector`` reports both). People without
any labelled keypoint are scored by ``eval.protocol`` (``ignore``: ignore regions, the default
and the paper's protocol; ``miss``: misses), exactly as in training-time validation. Batch
inference runs on Ray Data actors through the one prediction path. The printed AP is
pycocotools' ``COCOeval`` on the written ``results.json`` against the written
``ground_truth.json`` (the annotation file under the protocol).
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

from pose2seg.config import Config, ConfigError  # noqa: E402
from workflows.cli import (  # noqa: E402
    add_config_args,
    command,
    config_from_args,
    resolve_model_and_connect,
)


@dataclass
class EvalOutcome:
    """One split's evaluation."""

    metrics: dict[str, float]
    occlusion: list[dict[str, Any]]
    results_path: str
    output_dir: str
    inference: dict[str, Any]
    mlflow_run_id: str | None = None
    overlays: list[str] = field(default_factory=list)
    rejects_path: str = ""  # rejects.json: unreadable / unsafe images, people out of frame
    split: str = "val"
    gt_path: str = ""
    """The ground truth the AP is computed on (the annotation file under ``eval.protocol``)."""


@dataclass
class SplitsOutcome:
    """Several splits evaluated by one command: one outcome per split and the combined table."""

    splits: dict[str, EvalOutcome]
    table: str
    """The paper-style table (markdown): per split AP, AP50, AP75 and AP by MaxIoU bin."""
    output_dir: str
    mlflow_run_id: str | None = None
    keypoints: str = "gt"
    """Where the keypoints came from, with the robustness degradation when it is on."""


def _split_keypoints(kp_source: str, gts: dict[str, dict], unlabelled: bool) -> dict[str, dict]:
    """Per split: image id -> (N,17,3) keypoints, from the ground truth or one results file
    (whose entries are shared out to the splits by image id)."""
    from preprocessing.storage import read_bytes
    from workflows.eval_io import gt_keypoints, results_keypoints

    if kp_source == "gt":
        return {name: gt_keypoints(gt, include_unlabelled=unlabelled) for name, gt in gts.items()}
    doc = json.loads(read_bytes(kp_source))
    if len(gts) == 1:
        ((name, gt),) = gts.items()
        return {name: results_keypoints(doc, gt, source=kp_source)}
    # Several splits: check every entry against the union, then give each split its own.
    union = {"images": [im for gt in gts.values() for im in gt["images"]]}
    results_keypoints(doc, union, source=kp_source)
    out = {}
    for name, gt in gts.items():
        ids = {int(im["id"]) for im in gt["images"]}
        mine = [r for r in doc if r["image_id"] in ids]
        out[name] = results_keypoints(mine, gt, source=kp_source)
    return out


def splits_table(outcomes: dict[str, EvalOutcome]) -> tuple[str, list[dict[str, Any]]]:
    """The paper-style table (markdown) and its rows: per split, images, people, AP, AP50,
    AP75 and the AP of every MaxIoU bin."""

    def fmt(v: float) -> str:
        return f"{v:.4f}" if v == v else "n/a"

    bins = [r["bin"] for r in next(iter(outcomes.values())).occlusion] if outcomes else []
    head = ["split", "images", "people", "AP", "AP50", "AP75"] + [f"AP MaxIoU {b}" for b in bins]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    for name, out in outcomes.items():
        m = out.metrics
        row = {
            "split": name,
            "images": out.inference["images"],
            "people": int(m.get("num_people", 0)),
            "AP": m["segm_ap"],
            "AP50": m["segm_ap50"],
            "AP75": m["segm_ap75"],
            **{f"AP MaxIoU {r['bin']}": r["segm_ap"] for r in out.occlusion},
        }
        rows.append(row)
        cells = [name, str(row["images"]), str(row["people"])] + [fmt(row[h]) for h in head[3:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", rows


def evaluate_split(
    config: Config,
    *,
    split: str,
    raw_gt: dict[str, Any],
    keypoints: dict[int, Any],
    model_ref: str,
    out_dir: str,
    kp_source: str,
    num_actors: int = 1,
    use_gpu: bool = False,
) -> EvalOutcome:
    """Predict one split with the batch inference and score it under ``eval.protocol``."""
    from workflows.batch_inference import (
        InferenceItem,
        run_batch_inference,
        safe_image_uri,
        write_rejects,
    )
    from workflows.eval_io import (
        protocol_gt,
        split_metrics,
        split_paths,
        write_occlusion_table,
        write_overlays,
    )

    _, images_uri = split_paths(config, split)
    gt = protocol_gt(raw_gt, config.eval.protocol)
    items = []
    for im in gt["images"]:
        uri, unsafe = safe_image_uri(images_uri, str(im["file_name"]))
        items.append(
            InferenceItem(int(im["id"]), uri, keypoints[int(im["id"])], reject_detail=unsafe)
        )
    results, stats = run_batch_inference(
        items, model_ref=model_ref, config=config, num_actors=num_actors, use_gpu=use_gpu
    )
    # A rejected image stays in the ground truth: its people count as misses in the AP.
    rejects = stats.pop("rejects")
    os.makedirs(out_dir, exist_ok=True)
    rejects_path = write_rejects(
        rejects, out_dir, num_images=len(items), max_fraction=config.eval.max_reject_fraction
    )
    results_path = os.path.join(out_dir, "results.json")
    with open(results_path, "w") as fh:
        json.dump(results, fh)
    gt_path = os.path.join(out_dir, "ground_truth.json")
    with open(gt_path, "w") as fh:
        json.dump(gt, fh)
    t0 = time.time()
    metrics, occlusion = split_metrics(gt, results, config)
    stats["cocoeval_seconds"] = time.time() - t0
    stats["fallback_people"] = int(metrics["num_fallback"])
    metrics["num_people"] = float(sum(1 for a in gt["annotations"] if not a.get("iscrowd", 0)))
    with open(os.path.join(out_dir, "metrics.json"), "w") as fh:
        json.dump(
            {
                "split": split,
                "protocol": config.eval.protocol,
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
    rejected = {r["image_id"] for r in rejects if r["person_index"] is None}
    readable = {"images": [im for im in gt["images"] if int(im["id"]) not in rejected]}
    overlays = write_overlays(
        readable, results, keypoints, images_uri, out_dir, limit=config.eval.num_overlays
    )
    return EvalOutcome(
        metrics=metrics,
        occlusion=occlusion,
        results_path=results_path,
        output_dir=out_dir,
        inference=stats,
        overlays=overlays,
        split=split,
        gt_path=gt_path,
        rejects_path=rejects_path,
    )


def run_evaluate_splits(
    config: Config,
    *,
    model_ref: str,
    splits: list[str] | None = None,
    keypoints: str | None = None,
    num_actors: int = 1,
    use_gpu: bool = False,
    log_to_mlflow: bool = True,
) -> SplitsOutcome:
    """Evaluate one or several named splits (default ``eval.default_splits``) on an
    initialised Ray; writes per-split results, metrics, ground truth and overlays, the combined
    table, and logs everything to one MLflow run."""
    from workflows.eval_io import (
        degrade_split_keypoints,
        keypoint_degradation,
        load_gt,
        split_paths,
        with_max_iou,
    )

    splits = list(dict.fromkeys(splits or config.eval.default_splits))
    paths = {name: split_paths(config, name) for name in splits}  # unknown names raise here
    if config.data.source == "synthetic":
        from preprocessing.synthetic import ensure_synthetic_dataset

        ensure_synthetic_dataset(config)
    gts = {name: with_max_iou(load_gt(paths[name][0])) for name in splits}
    kp_source = keypoints or config.eval.keypoints
    if kp_source == "detector":  # the keypoint-detector stage (detector.* keys)
        from preprocessing.storage import join
        from workflows.keypoint_detection import run_keypoint_detection

        kps = {
            split: run_keypoint_detection(
                [(int(im["id"]), join(paths[split][1], im["file_name"])) for im in gt["images"]],
                config=config,
                num_actors=num_actors,
                use_gpu=use_gpu,
            )
            for split, gt in gts.items()
        }
    else:
        kps = _split_keypoints(kp_source, gts, config.model.unlabelled_people == "whole_image")
    degradation = keypoint_degradation(config)
    if degradation:  # the robustness evaluation: keypoints as a pose estimator errs
        kps = {
            split: degrade_split_keypoints(
                kps[split], config, gt=gts[split] if kp_source == "gt" else None
            )
            for split in splits
        }
        kp_source = f"{kp_source} ({degradation})"

    name = f"eval-{'-'.join(splits)}-{time.strftime('%Y%m%d-%H%M%S')}"
    base = os.path.join(config.eval.output_dir, name)
    outcomes = {
        split: evaluate_split(
            config,
            split=split,
            raw_gt=gts[split],
            keypoints=kps[split],
            model_ref=model_ref,
            out_dir=os.path.join(base, split),
            kp_source=kp_source,
            num_actors=num_actors,
            use_gpu=use_gpu,
        )
        for split in splits
    }
    table, rows = splits_table(outcomes)
    with open(os.path.join(base, "splits.md"), "w") as fh:
        fh.write(table)
    with open(os.path.join(base, "splits.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    result = SplitsOutcome(splits=outcomes, table=table, output_dir=base, keypoints=kp_source)
    if log_to_mlflow:
        from workflows import mlflow_tracking as tracking

        handle = tracking.start_run(
            config,
            run_name=name,
            tags={
                "pose2seg.kind": "evaluate",
                "pose2seg.model": model_ref,
                "pose2seg.splits": ",".join(splits),
                "pose2seg.protocol": config.eval.protocol,
                "pose2seg.keypoints": kp_source,
            },
        )
        for split, out in outcomes.items():
            logged = {f"{split}_{k}": v for k, v in out.metrics.items()}
            for i, r in enumerate(out.occlusion):
                logged[f"{split}_maxiou_bin{i}_segm_ap"] = r["segm_ap"]
            tracking.log_metrics(handle, logged, step=0)
            for fname in (
                "metrics.json",
                "occlusion.md",
                "occlusion.csv",
                "results.json",
                "rejects.json",
            ):
                tracking.log_artifact_file(
                    handle, os.path.join(out.output_dir, fname), f"evaluation/{split}"
                )
        for fname in ("splits.md", "splits.json"):
            tracking.log_artifact_file(handle, os.path.join(base, fname), "evaluation")
        tracking.end_run(handle)
        result.mlflow_run_id = handle.run_id
        for out in outcomes.values():
            out.mlflow_run_id = handle.run_id
    return result


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
    """One split (see :func:`run_evaluate_splits`)."""
    out = run_evaluate_splits(
        config,
        model_ref=model_ref,
        splits=[split],
        keypoints=keypoints,
        num_actors=num_actors,
        use_gpu=use_gpu,
        log_to_mlflow=log_to_mlflow,
    )
    return out.splits[split]


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
    parser.add_argument(
        "--split",
        nargs="+",
        default=None,
        metavar="NAME",
        help="one or several split names: train, val or those of eval.splits "
        "(default: eval.default_splits)",
    )
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


@command
def main(argv: list[str] | None = None) -> int:
    from workflows.eval_io import split_paths

    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    splits = args.split or config.eval.default_splits
    for split in splits:
        try:
            split_paths(config, split)  # an unknown name fails before any cluster work
        except ValueError as exc:
            raise ConfigError(f"--split: {exc}") from None
    model_ref = resolve_model_and_connect(args.model, config, args.address)
    out = run_evaluate_splits(
        config,
        model_ref=model_ref,
        splits=splits,
        keypoints=args.keypoints,
        num_actors=args.actors,
        use_gpu=args.gpu,
        log_to_mlflow=not args.no_mlflow,
    )
    for split, res in out.splits.items():
        m = res.metrics
        print(
            f"[{split}] segm AP {m['segm_ap']:.4f}  AP50 {m['segm_ap50']:.4f}  "
            f"AP75 {m['segm_ap75']:.4f}  APm {m['segm_ap_medium']:.4f}  "
            f"APl {m['segm_ap_large']:.4f}  occluded AP {m['occluded_segm_ap']:.4f}  "
            f"fallback people {res.inference['fallback_people']}"
        )
        print(
            f"[{split}] inference: {res.inference['images_per_s']:.1f} images/s, "
            f"{res.inference['people_per_s']:.1f} people/s   results: {res.results_path}"
        )
        if res.inference.get("rejected_images") or res.inference.get("rejected_people"):
            print(
                f"[{split}] rejected: {res.inference['rejected_images']} images, "
                f"{res.inference['rejected_people']} people (see {res.rejects_path})"
            )
    print(f"protocol: {config.eval.protocol}   keypoints: {out.keypoints}")
    print(out.table)
    print(f"tables: {out.output_dir}   MLflow run: {out.mlflow_run_id}")
    if args.with_detector:
        detected = run_evaluate_splits(
            config,
            model_ref=model_ref,
            splits=splits,
            keypoints="detector",
            num_actors=args.actors,
            use_gpu=args.gpu,
            log_to_mlflow=not args.no_mlflow,
        )
        label = args.keypoints or config.eval.keypoints
        print(f"{'split':<8} {'keypoints':<28} segm AP  AP50    occluded AP")
        for split in splits:
            for name, o in ((label, out), ("detector (Keypoint R-CNN)", detected)):
                m = o.splits[split].metrics
                print(
                    f"{split:<8} {name:<28} {m['segm_ap']:.4f}   {m['segm_ap50']:.4f}  "
                    f"{m['occluded_segm_ap']:.4f}"
                )
        print(f"tables with detected keypoints: {detected.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
