"""A trained model's predictions in fp32 and in a reduced precision, side by side (a script, not
a test): per-person mask IoU between the two, the val segm AP of each, and the in-process
inference speed of each (images/s by wall clock and by CPU time, ``--threads`` torch threads).

The model is a checkpoint folder, an MLflow pyfunc folder or a ``models:/`` URI (e.g. the
default run's ``models:/pose2seg@champion``); its val split is the config's (ground-truth
keypoints). Both precisions go through ``pose2seg.arch.load_predictor`` as serving does.

    python benchmarks/precision_check.py --model models:/pose2seg@champion
    python benchmarks/precision_check.py --model runs/NAME/checkpoint_... --precision bf16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.bench_inference import load_items  # noqa: E402

common.limit_threads_env()


def predict_all(predictor, images, items) -> list[dict]:
    results = []
    for image, item in zip(images, items, strict=True):
        results += predictor.predict(image, item.keypoints, image_id=item.image_id)
    return results


def person_ious(reference: list[dict], other: list[dict]) -> list[float]:
    """IoU of each person's mask in ``other`` against ``reference`` (same people, same keys)."""
    from pycocotools import mask as mask_utils

    def by_person(results):
        return {(r["image_id"], r["person_index"]): r["segmentation"] for r in results}

    ref, oth = by_person(reference), by_person(other)
    if ref.keys() != oth.keys():
        raise SystemExit(f"the two precisions segment different people: {ref.keys() ^ oth.keys()}")
    ious = []
    for key in sorted(ref):
        a = mask_utils.decode(dict(ref[key])).astype(bool)
        b = mask_utils.decode(dict(oth[key])).astype(bool)
        union = (a | b).sum()
        ious.append(1.0 if union == 0 else float((a & b).sum() / union))
    return ious


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(parser, "precision_check")
    parser.add_argument("--model", required=True, help="checkpoint folder or models:/ URI")
    parser.add_argument("--precision", default="bf16", help="the precision compared to fp32")
    parser.add_argument("--max-images", type=int, default=0, help="first N val images (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per precision")
    args = parser.parse_args(argv)
    config = common.config_from_args(args)

    import json

    import numpy as np
    import torch

    from pose2seg.arch import load_predictor
    from preprocessing.pipeline import raw_paths
    from preprocessing.schema import decode_image
    from preprocessing.storage import read_bytes
    from workflows.batch_inference import resolve_checkpoint_dir
    from workflows.coco_metrics import coco_segm_metrics

    torch.set_num_threads(args.threads)
    machine = common.machine_info()
    common.print_header("precision check", machine)
    items = load_items(config, args.max_images)
    images = [decode_image(read_bytes(it.uri)) for it in items]
    annotations_uri, _ = raw_paths(config, "val")
    gt = json.loads(read_bytes(annotations_uri))
    keep = {it.image_id for it in items}
    gt = {
        **gt,
        "images": [im for im in gt["images"] if int(im["id"]) in keep],
        "annotations": [a for a in gt["annotations"] if int(a["image_id"]) in keep],
    }
    figures: dict[str, dict] = {}
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as work:
        checkpoint = resolve_checkpoint_dir(args.model, work)
        for precision in ("fp32", args.precision):
            predictor = load_predictor(checkpoint, precision=precision)
            reps = common.repeat(
                lambda p=predictor: predict_all(p, images, items), repeats=args.repeats, warmup=1
            )
            results[precision] = reps.results[-1]
            metrics = coco_segm_metrics(gt, results[precision])
            figures[precision] = {
                "resolved": predictor.precision.describe(),
                "images_per_s_wall": common.rate(len(items), reps.median_wall_s),
                "images_per_s_cpu": common.rate(len(items), reps.median_cpu_s),
                "segm_ap": metrics.get("segm_ap"),
            }
            print(
                f"{precision:5s} [{predictor.precision.describe()}]: "
                f"{figures[precision]['images_per_s_wall']:.2f} images/s wall, "
                f"{figures[precision]['images_per_s_cpu']:.2f} by CPU time; "
                f"val segm AP {figures[precision]['segm_ap']:.4f}",
                flush=True,
            )
    ious = person_ious(results["fp32"], results[args.precision])
    summary = {
        "people": len(ious),
        "iou_min": float(np.min(ious)),
        "iou_mean": float(np.mean(ious)),
        "iou_below_0.99": int(sum(i < 0.99 for i in ious)),
        "speedup_wall": figures[args.precision]["images_per_s_wall"]
        / figures["fp32"]["images_per_s_wall"],
    }
    print(
        f"{len(items)} val images, {len(ious)} people: mask IoU {args.precision} vs fp32 "
        f"min {summary['iou_min']:.4f}, mean {summary['iou_mean']:.4f}, "
        f"{summary['iou_below_0.99']} below 0.99; speed-up {summary['speedup_wall']:.2f}x (wall)",
        flush=True,
    )
    result = {"model": args.model, "figures": figures, "ious": summary}
    print("wrote", common.write_json(args.out, result, machine=machine))
    return 0


if __name__ == "__main__":
    common.main_guard(main)
